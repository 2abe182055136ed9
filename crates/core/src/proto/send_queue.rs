//! What a session has yet to send, and how fast it may send it.
//!
//! A session never exports more than its peer can take: nodes to send wait
//! here (4 bytes each plus their phase, not packs), and the session cuts
//! the next pack only while the packs in flight (sent, not acknowledged)
//! stay under its window. Acknowledgements clock the rest out, so a peer
//! that reads slowly holds at most a window of a relay's memory, and a
//! catch-up of any size costs one export of each node, in order.
//!
//! A message that must follow queued nodes (`subscribed` confirms that a
//! new scope's nodes have all been sent) waits here too, behind them.

use std::collections::VecDeque;

use crate::dag::NodeIdx;
use crate::ids::IdSet;
use crate::proto::message::{Message, Phase};

/// The send queue of a session; see the module docs.
#[derive(Debug, Default)]
pub(crate) struct SendQueue {
    nodes: VecDeque<(NodeIdx, Phase)>,
    /// Nodes a pack took ahead of their turn (reaching along an author's
    /// chain for a signature): skipped when their turn comes.
    taken_ahead: IdSet<NodeIdx>,
    /// Nodes queued so far, and taken off the queue so far.
    queued: u64,
    taken: u64,
    /// Messages to send once `taken` reaches the count given.
    after: VecDeque<(u64, u64, Message)>,
    /// Bytes per node of the last pack cut, to size the next.
    bytes_per_node: usize,
}

impl SendQueue {
    /// Queues `nodes` (in causal order) for packs of `phase`.
    pub(crate) fn push(&mut self, nodes: &[NodeIdx], phase: Phase) {
        self.nodes.extend(nodes.iter().map(|&n| (n, phase)));
        self.queued += nodes.len() as u64;
    }

    /// Queues `message` (with correlation id `corr`) to go once every node
    /// queued so far has been sent.
    pub(crate) fn push_message(&mut self, corr: u64, message: Message) {
        self.after.push_back((self.queued, corr, message));
    }

    /// The next message whose nodes have all gone, if any.
    pub(crate) fn pop_message(&mut self) -> Option<(u64, Message)> {
        if self.after.front().is_some_and(|(at, ..)| *at <= self.taken) {
            return self.after.pop_front().map(|(_, corr, m)| (corr, m));
        }
        None
    }

    /// Whether no node waits.
    pub(crate) fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Whether nothing at all waits (nodes or messages).
    pub(crate) fn is_idle(&self) -> bool {
        self.nodes.is_empty() && self.after.is_empty()
    }

    /// How many nodes to try in the next pack so that it comes out near
    /// `frame_bytes`, at most `max_nodes`.
    pub(crate) fn pack_size(&self, frame_bytes: usize, max_nodes: usize) -> usize {
        let guess = frame_bytes / self.bytes_per_node.max(1);
        guess.clamp(1, max_nodes.max(1))
    }

    /// Records that a pack of `nodes` nodes came out at `bytes`.
    pub(crate) fn observe_pack(&mut self, nodes: usize, bytes: usize) {
        self.bytes_per_node = bytes.div_ceil(nodes.max(1)).max(1);
    }

    /// Takes up to `count` nodes of the front's phase off the queue,
    /// skipping nodes already sent ahead of their turn.
    pub(crate) fn take(&mut self, count: usize) -> Option<(Vec<NodeIdx>, Phase)> {
        let phase = self.nodes.front()?.1;
        let mut chunk = Vec::with_capacity(count.min(self.nodes.len()));
        while chunk.len() < count {
            match self.nodes.front() {
                Some(&(n, p)) if p == phase => {
                    self.nodes.pop_front();
                    self.taken += 1;
                    if !self.taken_ahead.remove(&n) {
                        chunk.push(n);
                    }
                }
                _ => break,
            }
        }
        if self.nodes.is_empty() {
            // Nothing queued can still come up: forget what went ahead.
            self.taken_ahead.clear();
        }
        (!chunk.is_empty()).then_some((chunk, phase))
    }

    /// Puts back the tail of a chunk that did not fit in its pack.
    pub(crate) fn put_back(&mut self, rest: &[NodeIdx], phase: Phase) {
        for &n in rest.iter().rev() {
            self.nodes.push_front((n, phase));
        }
        self.taken -= rest.len() as u64;
    }

    /// Records nodes a pack took ahead of their turn.
    pub(crate) fn sent_ahead(&mut self, nodes: impl IntoIterator<Item = NodeIdx>) {
        if !self.nodes.is_empty() {
            self.taken_ahead.extend(nodes);
        }
    }

    /// Whether the next node waiting is of `phase`.
    pub(crate) fn next_is(&self, phase: Phase) -> bool {
        self.nodes.front().is_some_and(|(_, p)| *p == phase)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_in_order_by_phase_skipping_nodes_sent_ahead() {
        let mut q = SendQueue::default();
        q.push(&[1, 2, 3, 4], Phase::Catchup);
        q.push(&[5, 6], Phase::Live);
        q.push_message(9, Message::Heartbeat);
        q.sent_ahead([3]);
        assert_eq!(q.take(2), Some((vec![1, 2], Phase::Catchup)));
        assert!(q.pop_message().is_none());
        // Node 3 went ahead: skipped; a chunk stops at a change of phase.
        assert_eq!(q.take(10), Some((vec![4], Phase::Catchup)));
        assert!(q.next_is(Phase::Live));
        assert_eq!(q.take(10), Some((vec![5, 6], Phase::Live)));
        q.put_back(&[6], Phase::Live);
        assert!(q.pop_message().is_none(), "node 6 is queued again");
        assert_eq!(q.take(10), Some((vec![6], Phase::Live)));
        assert_eq!(q.pop_message(), Some((9, Message::Heartbeat)));
        assert!(q.is_idle());
        assert_eq!(q.take(1), None);
    }

    #[test]
    fn packs_are_sized_from_the_last_one() {
        let mut q = SendQueue::default();
        assert_eq!(q.pack_size(1000, 50), 50);
        q.observe_pack(10, 1000);
        assert_eq!(q.pack_size(4000, 50), 40);
        assert_eq!(q.pack_size(50, 50), 1);
    }
}
