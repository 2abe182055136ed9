//! The difference, beyond version vectors: RIBLT symbols streamed by the
//! server and decoded by the client (`diff/ibf@1`), or Merkle Search Tree
//! ranges refined by the client (`diff/mst@1`); either ends with the client
//! naming what it lacks and uploading what the server lacks.

use super::*;

impl Session {
    /// Server: whether a reconciliation message belongs to the strategy
    /// chosen at the handshake (building an MST for a peer that did not
    /// negotiate one would be work for nothing).
    fn strategy_allows(&self, message: &Message) -> bool {
        let wanted = match message {
            Message::MstRequest { .. } | Message::MstDone { .. } => Strategy::Mst,
            _ => Strategy::Ibf,
        };
        self.strategy == Some(wanted)
    }

    /// Client, once the difference is known: everything of the local
    /// author's chain before the first node it must upload is held by the
    /// server (whose history is causally complete).
    pub(super) fn report_held(&mut self, room: &Room, upload: &[NodeIdx]) {
        let me = self.client_state().local;
        let dag = room.dag();
        let through_seq = upload
            .iter()
            .filter(|&&n| *dag.author(n) == me)
            .map(|&n| dag.seq(n) - 1)
            .min()
            .unwrap_or_else(|| dag.author_seq(&me));
        if through_seq > 0 {
            self.events.push_back(Event::ServerHolds { through_seq });
        }
    }

    /// Server: sends the next `count` symbols of the room's sketch, or
    /// closes if the difference is beyond what the sketch keeps (the client
    /// then reconnects with its version vector).
    pub(super) fn send_symbols(&mut self, now: u64, room: &mut Room, count: usize) {
        let sketch = room.sketch();
        let start = self.server_state().symbols_sent;
        // Keep each frame well under the limit.
        let per_frame = (self.config.max_frame - 256) / CodedSymbol::WIRE_BYTES;
        let most = sketch.capacity().min(self.config.max_symbols);
        let end = (start + count.min(per_frame)).min(most);
        if end <= start {
            return self.close(
                now,
                Reason::TooLarge,
                "difference beyond the sketch: resend hello with the version vector",
            );
        }
        let mut bytes = Vec::with_capacity((end - start) * CodedSymbol::WIRE_BYTES);
        for symbol in sketch.symbols(start..end) {
            symbol.encode(&mut bytes);
        }
        self.server_state().symbols_sent = end;
        self.send(
            now,
            0,
            Message::IbfSymbols {
                start: start as u64,
                symbols: bytes,
            },
        );
    }

    /// Client: feeds the server's symbols to the decoder; once decoded, asks
    /// for what it lacks and uploads what the server lacks.
    pub(super) fn receive_symbols(
        &mut self,
        now: u64,
        room: &mut Room,
        signer: Option<&Keypair>,
        start: u64,
        bytes: &[u8],
    ) {
        let Some(decoder) = self.client_state().decoder.as_mut() else {
            return self.close(now, Reason::Malformed, "symbols outside a RIBLT difference");
        };
        if start != decoder.symbols_used() as u64
            || !bytes.len().is_multiple_of(CodedSymbol::WIRE_BYTES)
        {
            return self.close(now, Reason::Malformed, "symbols out of order or truncated");
        }
        let symbols: Vec<CodedSymbol> = bytes
            .chunks_exact(CodedSymbol::WIRE_BYTES)
            .filter_map(CodedSymbol::decode)
            .collect();
        if let Err(e) = decoder.add_symbols(&symbols, room.sketch()) {
            let reason = match e {
                RibltError::CapacityExceeded { .. } => Reason::TooLarge,
                RibltError::Inconsistent { .. } => Reason::Malformed,
            };
            return self.close(now, reason, &e.to_string());
        }
        if !decoder.is_decoded() {
            // The first batch was sized from an estimate: what is missing
            // is usually a fraction of it.
            let more = (decoder.symbols_used() / 4).max(MIN_SYMBOL_BATCH) as u64;
            return self.send(now, 0, Message::IbfMore { count: more });
        }
        let diff = decoder.difference();
        self.client_state().decoder = None;
        let upload = room.nodes_for_keys(&diff.local_only);
        self.send(
            now,
            0,
            Message::IbfDone {
                need: diff.remote_only.iter().map(key_prefix).collect(),
                has: upload.len() as u64,
            },
        );
        self.difference_known(now, room, signer, upload, diff.remote_only.len() as u64);
    }

    /// Client: refines MST ranges with the server's summaries; once nothing
    /// is left to refine, asks for what it lacks and uploads what the server
    /// lacks.
    pub(super) fn receive_summaries(
        &mut self,
        now: u64,
        room: &mut Room,
        signer: Option<&Keypair>,
        answers: Vec<(mst::KeyRange, mst::Summary)>,
    ) {
        let Some(reconciler) = self.client_state().reconciler.as_mut() else {
            return self.close(
                now,
                Reason::Malformed,
                "summaries outside an MST difference",
            );
        };
        let next = match reconciler.step(room.id_tree(), answers) {
            Ok(next) => next,
            Err(e) => return self.close(now, Reason::Malformed, &e.to_string()),
        };
        let done = reconciler.is_done();
        for chunk in next.chunks(MAX_RANGES) {
            self.send(
                now,
                0,
                Message::MstRequest {
                    ranges: chunk.to_vec(),
                },
            );
        }
        if !done {
            return;
        }
        let diff = self
            .client_state()
            .reconciler
            .take()
            .expect("checked above")
            .into_diff();
        let need = diff.remote_only;
        let local: Vec<NodeId> = diff.local_only.iter().map(|k| NodeId(*k)).collect();
        let upload = room.nodes_for_ids(&local);
        for chunk in need.chunks(MAX_IDS) {
            self.send(
                now,
                0,
                Message::MstDone {
                    need: chunk.to_vec(),
                },
            );
        }
        if need.len().is_multiple_of(MAX_IDS) {
            // A full message says more follow: this one says none do.
            self.send(now, 0, Message::MstDone { need: Vec::new() });
        }
        self.difference_known(now, room, signer, upload, need.len() as u64);
    }

    /// Client, RIBLT or MST, once the whole difference is known and the
    /// server told what to send: the server lacks exactly `upload` of our
    /// older nodes, and `expecting` nodes are on their way.
    fn difference_known(
        &mut self,
        now: u64,
        room: &mut Room,
        signer: Option<&Keypair>,
        upload: Vec<NodeIdx>,
        expecting: u64,
    ) {
        self.peer_lacks = Some(upload.iter().copied().collect());
        self.report_held(room, &upload);
        self.client_state().expecting = expecting;
        if expecting == 0 {
            self.mark_caught_up();
        }
        self.enqueue(now, room, signer, &upload, Phase::Live, 0);
    }

    /// Server: a reconciliation request of the strategy chosen at the
    /// handshake (another strategy's is malformed).
    pub(super) fn on_reconcile_request(
        &mut self,
        now: u64,
        corr: u64,
        message: Message,
        room: &mut Room,
        signer: Option<&Keypair>,
    ) {
        if !self.strategy_allows(&message) {
            return self.close(
                now,
                Reason::Malformed,
                "reconciliation message for a strategy not chosen",
            );
        }
        match message {
            Message::MstRequest { ranges } => {
                let answers = mst::respond(room.id_tree(), &ranges);
                self.send(now, corr, Message::MstSummary { answers });
            }
            Message::MstDone { need } => {
                // A prefix may name more than the client lacks: a superset
                // only costs ids cited that needed not be.
                let nodes = room.nodes_for_key_prefixes(&need);
                let server = self.server_state();
                server.mst_need.extend_from_slice(&nodes);
                if need.len() < MAX_IDS {
                    let named = std::mem::take(&mut server.mst_need);
                    self.peer_lacks = Some(named.into_iter().collect());
                }
                self.enqueue(now, room, signer, &nodes, Phase::Catchup, 0);
            }
            Message::IbfMore { count } => {
                let count = (count as usize).max(MIN_SYMBOL_BATCH);
                self.send_symbols(now, room, count);
            }
            Message::IbfDone { need, .. } => {
                let nodes = room.nodes_for_key_prefixes(&need);
                self.peer_lacks = Some(nodes.iter().copied().collect());
                self.enqueue(now, room, signer, &nodes, Phase::Catchup, 0);
            }
            _ => unreachable!("dispatch hands over reconciliation requests only"),
        }
    }
}
