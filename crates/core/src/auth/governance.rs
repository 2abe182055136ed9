//! Write authority in a room's history: which nodes are valid, decided
//! from each node and its causal past alone, so that the relay and every
//! replica decide alike (`docs/security.md`, "Write authority").
//!
//! A room becomes governed when its history holds a **policy** node: a
//! `Set` of field `roots` on the reserved entry `/.syncline/policy`, by a
//! key the replica trusts to declare one (a relay writes it, with its own
//! key, when it locks a room; replicas trust the relay they sync with). Its
//! value lists the root keys. From then on, every node inserted must be
//! valid:
//!
//! - a root's node is valid;
//! - otherwise its author needs capabilities ([`Capability`], rooted in the
//!   policy's roots, for this room) **recorded in history**: in the node
//!   itself or in its causal past, as a `Set` on the reserved entry
//!   `/.syncline/grants` (field: the capability id in hex; value: its
//!   encoding). They count while unrevoked (no revocation of any link in
//!   the node's causal past) and unexpired at the node's clock;
//! - every path each operation touches must be covered by the write paths
//!   of one of them. A path is where the entry was *created* (the names of
//!   its `Create` operations up to the root, each in the node's causal
//!   past); a move touches the entry's path and its destination; creating
//!   a folder (a map entry by path) on the way to a covered path is
//!   allowed;
//! - a revocation (a `Set` on the reserved entry `/.syncline/revoked`,
//!   field: the capability id, value `true`) needs a capability with
//!   `admin`; grants and revocations are never unset; nothing else may
//!   touch `/.syncline`.
//!
//! What a revoked key can still do: nodes whose causal past does not hold
//! the revocation were made before its author could know of it, and stay
//! valid wherever they arrive. The relay also refuses the key's sessions
//! from the moment it learns of the revocation, so through the relay a
//! revoked key writes nothing new.

use std::sync::OnceLock;

use crate::auth::capability::{Capability, Grant, Rights};
use crate::auth::hex;
use crate::dag::{Dag, NodeIdx};
use crate::ids::{AuthorId, EntryId, IdMap, RoomId};
use crate::node::Node;
use crate::op::{EntryKind, Op};
use crate::proto::scope::Scope;
use crate::value::Value;

/// The reserved top-level entry name.
pub const RESERVED: &str = ".syncline";
/// Field of the policy entry that lists the roots.
pub const ROOTS_FIELD: &str = "roots";
/// Deepest entry path resolved (a deeper one is refused).
const MAX_DEPTH: usize = 256;

fn reserved(name: &str) -> EntryId {
    EntryId::derived(&EntryId::derived(&EntryId::ROOT, RESERVED), name)
}

/// The entry whose `roots` field declares the policy.
pub fn policy_entry() -> EntryId {
    reserved("policy")
}

/// The entry whose fields record capabilities.
pub fn grants_entry() -> EntryId {
    reserved("grants")
}

/// The entry whose fields record revocations.
pub fn revocations_entry() -> EntryId {
    reserved("revoked")
}

/// The operation that declares `roots` as a room's policy.
pub fn policy_op(roots: &[AuthorId]) -> Op {
    Op::Set {
        entry: policy_entry(),
        field: ROOTS_FIELD.to_owned(),
        value: Value::Bytes(roots.iter().flat_map(|r| r.0).collect()),
    }
}

/// The operation that records `cap` in history.
pub fn grant_op(cap: &Capability) -> Op {
    Op::Set {
        entry: grants_entry(),
        field: hex(&cap.claims.id),
        value: Value::Bytes(cap.encode()),
    }
}

/// The operation that revokes capability `id`.
pub fn revocation_op(id: &[u8; 16]) -> Op {
    Op::Set {
        entry: revocations_entry(),
        field: hex(id),
        value: Value::Bool(true),
    }
}

/// Whether a commit by `author` in `room` should carry `cap`: it is
/// `author`'s, allows writing, and is not recorded in the room yet (the
/// first commit with a capability records it, so that every replica finds
/// it in the history of what follows).
pub fn should_carry(room: &crate::room::Room, author: &AuthorId, cap: &Capability) -> bool {
    cap.claims.subject == *author
        && cap.claims.rights.contains(Rights::WRITE)
        && room
            .doc()
            .field(&grants_entry(), &hex(&cap.claims.id))
            .is_none()
}

/// A capability recorded in history.
#[derive(Clone, Debug)]
struct Recorded {
    /// Where.
    node: NodeIdx,
    cap: Capability,
    /// What it grants under the policy's roots (`None`: nothing), checked
    /// once, when first needed (the policy may come after it).
    verified: OnceLock<Option<Grant>>,
}

/// Where an entry was created: under which parent, with which name, by
/// which nodes (concurrent creates of one path make one entry; a node
/// may use the entry when any of them is in its causal past).
#[derive(Clone, Debug)]
struct Creation {
    parent: EntryId,
    name: Box<str>,
    nodes: Vec<NodeIdx>,
}

/// A room's write authority: the keys trusted to declare its policy, the
/// policy once declared, and what history recorded (entries' creations,
/// grants, revocations).
#[derive(Clone, Debug)]
pub struct Governance {
    room: RoomId,
    trusted: Vec<AuthorId>,
    /// The policy's roots, once one is in the room.
    policy: Option<Vec<AuthorId>>,
    grants: Vec<Recorded>,
    revocations: Vec<([u8; 16], NodeIdx)>,
    creations: IdMap<EntryId, Creation>,
}

impl Governance {
    /// Governance of `room`, where `trusted` may declare the policy; the
    /// history already held is read with [`Governance::observe`].
    pub fn new(room: RoomId, trusted: Vec<AuthorId>) -> Governance {
        Governance {
            room,
            trusted,
            policy: None,
            grants: Vec::new(),
            revocations: Vec::new(),
            creations: IdMap::default(),
        }
    }

    /// The keys trusted to declare the room's policy.
    pub fn trusted(&self) -> &[AuthorId] {
        &self.trusted
    }

    /// Whether a policy governs the room.
    pub fn is_governed(&self) -> bool {
        self.policy.is_some()
    }

    /// Learns what node `idx` (being inserted) records: a policy, grants,
    /// revocations, and once governed the entries it creates. Returns
    /// whether this node declared the policy: the caller then hands over the
    /// earlier nodes' creations ([`Governance::observe_creations`]), which
    /// an ungoverned room does not keep.
    pub fn observe(&mut self, idx: NodeIdx, node: &Node) -> bool {
        let was = self.policy.is_some();
        for op in &node.ops {
            match op {
                Op::Set {
                    entry,
                    field,
                    value: Value::Bytes(bytes),
                } if *entry == policy_entry()
                    && field == ROOTS_FIELD
                    && self.policy.is_none()
                    && self.trusted.contains(&node.author) =>
                {
                    let roots = bytes
                        .chunks_exact(32)
                        .map(|c| AuthorId(c.try_into().expect("32-byte chunks")))
                        .collect();
                    self.policy = Some(roots);
                }
                Op::Set {
                    entry,
                    value: Value::Bytes(bytes),
                    ..
                } if *entry == grants_entry() => {
                    self.record_grant(idx, bytes);
                }
                Op::Set { entry, field, .. } if *entry == revocations_entry() => {
                    if let Some(id) = crate::ids::from_hex::<16>(field) {
                        self.revocations.push((id, idx));
                    }
                }
                _ => {}
            }
        }
        if self.policy.is_some() {
            self.observe_creations(idx, node);
        }
        !was && self.policy.is_some()
    }

    /// Learns which entries node `idx` created.
    pub fn observe_creations(&mut self, idx: NodeIdx, node: &Node) {
        for (index, op) in node.ops.iter().enumerate() {
            if let Op::Create { parent, name, .. } = op
                && let Some(id) = created_id(node, index, op)
            {
                self.creations
                    .entry(id)
                    .or_insert_with(|| Creation {
                        parent: *parent,
                        name: name.as_str().into(),
                        nodes: Vec::new(),
                    })
                    .nodes
                    .push(idx);
            }
        }
    }

    fn record_grant(&mut self, idx: NodeIdx, bytes: &[u8]) {
        let Ok(cap) = Capability::decode(bytes) else {
            return;
        };
        self.grants.push(Recorded {
            node: idx,
            cap,
            verified: OnceLock::new(),
        });
    }

    /// Whether `node`, about to be inserted with `parents` into `dag`, is
    /// valid: `Ok` or why not.
    pub fn check(&self, dag: &Dag, node: &Node, parents: &[NodeIdx]) -> Result<(), String> {
        let Some(roots) = &self.policy else {
            return Ok(());
        };
        if roots.contains(&node.author) {
            return Ok(());
        }
        // What the node itself records counts for it: each capability it
        // records, decoded and verified once.
        let own: Vec<(Option<Capability>, Option<Grant>)> = node
            .ops
            .iter()
            .filter_map(|op| match op {
                Op::Set {
                    entry,
                    value: Value::Bytes(b),
                    ..
                } if *entry == grants_entry() => {
                    let cap = Capability::decode(b).ok();
                    let grant = cap.as_ref().and_then(|c| c.verify(roots).ok());
                    Some((cap, grant))
                }
                _ => None,
            })
            .collect();
        let in_past = |at: NodeIdx| in_causal_past(dag, parents, at);
        let revoked = |chain: &[[u8; 16]]| {
            self.revocations
                .iter()
                .any(|(id, at)| chain.contains(id) && in_past(*at))
        };
        let mine = |cap: &Capability| {
            cap.claims.subject == node.author && cap.claims.room.matches(&self.room)
        };
        let recorded = self
            .grants
            .iter()
            .filter(|g| mine(&g.cap) && in_past(g.node))
            .filter_map(|g| g.verified.get_or_init(|| g.cap.verify(roots).ok()).as_ref());
        let carried = own
            .iter()
            .filter_map(|(cap, grant)| cap.as_ref().filter(|c| mine(c)).and(grant.as_ref()));
        let usable: Vec<(Rights, &Scope)> = recorded
            .chain(carried)
            .filter(|g| node.hlc.wall_ms <= g.not_after_ms && !revoked(&g.chain))
            .map(|g| (g.rights, &g.write))
            .collect();
        if usable.is_empty() {
            return Err(format!(
                "author {} holds no capability for this room in the node's history",
                node.author
            ));
        }
        let may = |rights: Rights| usable.iter().any(|(r, _)| r.contains(rights));
        let mut own = own.iter();
        for op in &node.ops {
            match op {
                Op::Set {
                    entry,
                    field,
                    value: Value::Bytes(_),
                } if *entry == grants_entry() => {
                    let (cap, grant) = own.next().expect("one entry per recorded capability");
                    let valid = grant.is_some()
                        && cap.as_ref().is_some_and(|c| hex(&c.claims.id) == *field);
                    if !valid {
                        return Err("records a capability that does not verify".into());
                    }
                }
                Op::Set {
                    entry,
                    field,
                    value: Value::Bool(true),
                } if *entry == revocations_entry() => {
                    if crate::ids::from_hex::<16>(field).is_none() {
                        return Err("revokes something that is not a capability id".into());
                    }
                    if !may(Rights::ADMIN) {
                        return Err("revokes a capability without admin rights".into());
                    }
                }
                _ => {
                    if !may(Rights::WRITE) {
                        return Err("writes with read-only capabilities".into());
                    }
                    // Creating the folders on the way to one's paths is no
                    // write of theirs.
                    let on_the_way = matches!(
                        op,
                        Op::Create {
                            kind: EntryKind::Map,
                            unique: false,
                            ..
                        }
                    );
                    for path in self.paths(dag, node, parents, op)? {
                        if path.first().is_some_and(|n| &**n == RESERVED) {
                            return Err(format!("writes the reserved /{RESERVED}"));
                        }
                        let names: Vec<&str> = path.iter().map(|n| &**n).collect();
                        let covered = usable.iter().any(|(r, scope)| {
                            r.contains(Rights::WRITE)
                                && (scope.matches(&names) || on_the_way && scope.leads_into(&names))
                        });
                        if !covered {
                            return Err(format!(
                                "writes /{} outside its capabilities' paths",
                                names.join("/")
                            ));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// The paths `op` of `node` touches: the entry's creation path, and for
    /// a create or move the destination.
    fn paths(
        &self,
        dag: &Dag,
        node: &Node,
        parents: &[NodeIdx],
        op: &Op,
    ) -> Result<Vec<Vec<Box<str>>>, String> {
        let under = |parent: &EntryId, name: &str| -> Result<Vec<Box<str>>, String> {
            let mut path = self.path(dag, node, parents, parent)?;
            path.push(name.into());
            Ok(path)
        };
        Ok(match op {
            Op::Create { parent, name, .. } => vec![under(parent, name)?],
            Op::Move {
                entry,
                parent,
                name,
                ..
            } => vec![self.path(dag, node, parents, entry)?, under(parent, name)?],
            Op::Set { entry, .. }
            | Op::Unset { entry, .. }
            | Op::Delete { entry }
            | Op::TextInsert { entry, .. }
            | Op::TextDelete { entry, .. } => {
                if [policy_entry(), grants_entry(), revocations_entry()].contains(entry) {
                    return Err(format!("changes the reserved /{RESERVED} that way"));
                }
                vec![self.path(dag, node, parents, entry)?]
            }
        })
    }

    /// Where `entry` was created, by names from the root: each creation in
    /// `node` itself or its causal past.
    fn path(
        &self,
        dag: &Dag,
        node: &Node,
        parents: &[NodeIdx],
        entry: &EntryId,
    ) -> Result<Vec<Box<str>>, String> {
        let mut names = Vec::new();
        let mut at = *entry;
        while at != EntryId::ROOT {
            if names.len() >= MAX_DEPTH {
                return Err("an entry nested deeper than 256".into());
            }
            let (parent, name) = match self.creations.get(&at) {
                Some(c) if c.nodes.iter().any(|&by| in_causal_past(dag, parents, by)) => {
                    (c.parent, c.name.clone())
                }
                _ => own_creation(node, &at).ok_or_else(|| {
                    "touches an entry not created in the node's history".to_owned()
                })?,
            };
            names.push(name);
            at = parent;
        }
        names.reverse();
        Ok(names)
    }
}

/// Whether node `at` is one of `parents` or an ancestor of one: in the
/// causal past of a node with those parents.
fn in_causal_past(dag: &Dag, parents: &[NodeIdx], at: NodeIdx) -> bool {
    parents.iter().any(|&p| p == at || dag.is_ancestor(at, p))
}

/// The id of the entry `op`, operation `index` of `node`, creates (if it
/// is a create).
fn created_id(node: &Node, index: usize, op: &Op) -> Option<EntryId> {
    let Op::Create {
        parent,
        name,
        unique,
        ..
    } = op
    else {
        return None;
    };
    Some(if *unique {
        EntryId::unique(&node.author, node.seq, index as u32)
    } else {
        EntryId::derived(parent, name)
    })
}

/// Where `node` itself creates `entry`.
fn own_creation(node: &Node, entry: &EntryId) -> Option<(EntryId, Box<str>)> {
    node.ops
        .iter()
        .enumerate()
        .find_map(|(index, op)| match op {
            Op::Create { parent, name, .. } if created_id(node, index, op) == Some(*entry) => {
                Some((*parent, name.as_str().into()))
            }
            _ => None,
        })
}
