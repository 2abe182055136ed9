//! Write authority decided from history (`auth::governance`): every
//! replica refuses the same nodes, whatever order they arrive in.

use syncline_core::auth::{Capability, Claims, Rights, RoomPattern};
use syncline_core::dag::DagError;
use syncline_core::room::{ReceiveError, TxnError};
use syncline_core::{Keypair, NodeIdx, Room, RoomId, Transaction, Value};

const NOW: u64 = 1_700_000_000_000;

fn room_id() -> RoomId {
    RoomId::new("governed").unwrap()
}

struct World {
    root: Keypair,
    admin: Keypair,
    writer: Keypair,
    /// The relay's replica (writes the policy), then the others.
    rooms: Vec<Room>,
}

fn cap(issuer: &Keypair, subject: &Keypair, rights: &str, paths: &[&str], id: u8) -> Capability {
    let claims = Claims {
        id: [id; 16],
        room: RoomPattern::parse("governed").unwrap(),
        subject: subject.author(),
        rights: Rights::parse(rights).unwrap(),
        write_paths: paths.iter().map(|p| (*p).to_owned()).collect(),
        not_after_ms: NOW + 3_600_000,
    };
    Capability::issue(issuer, claims, None)
}

impl World {
    /// Three replicas that trust `root`; the first declares the policy.
    fn new() -> World {
        let root = Keypair::from_seed([1; 32]);
        let mut rooms: Vec<Room> = (0..3).map(|_| Room::new(room_id())).collect();
        for r in &mut rooms {
            r.govern(vec![root.author()]);
        }
        let mut w = World {
            admin: Keypair::from_seed([2; 32]),
            writer: Keypair::from_seed([3; 32]),
            root,
            rooms,
        };
        let root = w.root.clone();
        w.commit(0, &root, |tx| tx.declare_policy(&[root.author()]))
            .unwrap();
        w.sync_all();
        w
    }

    fn commit(
        &mut self,
        replica: usize,
        key: &Keypair,
        f: impl FnOnce(&mut Transaction<'_>) -> Result<(), TxnError>,
    ) -> Result<NodeIdx, TxnError> {
        let room = &mut self.rooms[replica];
        let now = NOW + room.dag().len() as u64;
        let mut tx = room.begin(key.author(), now);
        f(&mut tx)?;
        Ok(tx.commit()?.expect("a change").idx)
    }

    /// Every node of `from` as a pack, signed by the keys given.
    fn pack(&mut self, from: usize, keys: &[&Keypair]) -> Vec<u8> {
        let room = &mut self.rooms[from];
        let all: Vec<NodeIdx> = (0..room.dag().next_idx()).collect();
        // Sign each author's newest node with its key.
        for key in keys {
            let seq = room.dag().author_seq(&key.author());
            if let Some(idx) = room.dag().by_author_seq(&key.author(), seq) {
                let id = room.dag().id(idx);
                room.set_signature(idx, key.sign(&id));
            }
        }
        room.pack(&all, None).unwrap()
    }

    fn sync_all(&mut self) {
        let keys = [self.root.clone(), self.admin.clone(), self.writer.clone()];
        let refs: Vec<&Keypair> = keys.iter().collect();
        for from in 0..self.rooms.len() {
            let pack = self.pack(from, &refs);
            for to in 0..self.rooms.len() {
                if to != from {
                    self.rooms[to].receive_pack(&pack).unwrap();
                }
            }
        }
    }
}

fn unauthorized(e: TxnError) -> String {
    match e {
        TxnError::Unauthorized(why) => why,
        other => panic!("expected unauthorized, got {other:?}"),
    }
}

#[test]
fn without_a_recorded_capability_nothing_is_written() {
    let mut w = World::new();
    let writer = w.writer.clone();
    let why = unauthorized(
        w.commit(1, &writer, |tx| tx.set("/docs/a", "v", Value::Int(1)))
            .unwrap_err(),
    );
    assert!(why.contains("no capability"), "{why}");
    assert_eq!(
        w.rooms[1].dag().len(),
        1,
        "the refused node is not in the room"
    );
    // The document went back too.
    assert_eq!(w.rooms[1].state_hash(), w.rooms[0].state_hash());
}

#[test]
fn a_capability_carried_or_recorded_allows_its_paths_only() {
    let mut w = World::new();
    let (root, writer) = (w.root.clone(), w.writer.clone());
    let grant = cap(&root, &writer, "write", &["/docs/**"], 7);
    // The first node carries the grant and uses it.
    w.commit(1, &writer, |tx| {
        tx.record_grant(&grant)?;
        tx.set("/docs/a", "v", Value::Int(1))
    })
    .unwrap();
    // Later nodes find it in their causal past.
    w.commit(1, &writer, |tx| tx.set("/docs/b/c", "v", Value::Int(2)))
        .unwrap();
    let outside = unauthorized(
        w.commit(1, &writer, |tx| tx.set("/other", "v", Value::Int(3)))
            .unwrap_err(),
    );
    assert!(outside.contains("/other"), "{outside}");
    let moved = unauthorized(
        w.commit(1, &writer, |tx| tx.mv("/docs/a", "/a"))
            .unwrap_err(),
    );
    assert!(moved.contains("/a"), "a move out of the paths: {moved}");
    let reserved = unauthorized(w.commit(1, &writer, |tx| tx.revoke(&[9; 16])).unwrap_err());
    assert!(reserved.contains("admin"), "{reserved}");
    // Every replica accepts what was allowed.
    w.sync_all();
    let hash = w.rooms[0].state_hash();
    assert!(w.rooms.iter().all(|r| r.state_hash() == hash));
    assert_eq!(w.rooms[2].dag().len(), 3);
}

/// A node the policy refuses, made in a room that does not check (as a
/// hostile peer would), is refused by every governed replica.
#[test]
fn replicas_refuse_forged_authority() {
    let mut w = World::new();
    let (root, writer) = (w.root.clone(), w.writer.clone());
    let mut rogue = Room::new(room_id());
    let policy = w.pack(0, &[&root]);
    rogue.receive_pack(&policy).unwrap();
    // A capability the writer signed for itself.
    let forged = cap(&writer, &writer, "admin,write", &[], 8);
    let mut tx = rogue.begin(writer.author(), NOW + 10);
    tx.record_grant(&forged).unwrap();
    tx.set("/x", "v", Value::Int(1)).unwrap();
    let idx = tx.commit().unwrap().unwrap().idx;
    let pack = rogue.pack(&[idx], Some(&writer)).unwrap();
    match w.rooms[1].receive_pack(&pack) {
        Err(ReceiveError::Node {
            error: DagError::Unauthorized { reason, .. },
            ..
        }) => assert!(reason.contains("does not verify") || reason.contains("no capability")),
        other => panic!("a forged capability was accepted: {other:?}"),
    }
    assert_eq!(w.rooms[1].dag().len(), 1);
}

#[test]
fn a_revocation_refuses_what_follows_it_and_not_what_was_concurrent() {
    let mut w = World::new();
    let (root, admin, writer) = (w.root.clone(), w.admin.clone(), w.writer.clone());
    let grant = cap(&root, &writer, "write", &[], 7);
    let admin_grant = cap(&root, &admin, "admin,write", &[], 5);
    w.commit(1, &writer, |tx| {
        tx.record_grant(&grant)?;
        tx.set("/a", "v", Value::Int(1))
    })
    .unwrap();
    w.sync_all();
    // The admin revokes at replica 0; concurrently, the writer writes at
    // replica 1 without knowing.
    w.commit(0, &admin, |tx| {
        tx.record_grant(&admin_grant)?;
        tx.revoke(&[7; 16])
    })
    .unwrap();
    w.commit(1, &writer, |tx| tx.set("/b", "v", Value::Int(2)))
        .unwrap();
    w.sync_all();
    // The concurrent node stands everywhere.
    let hash = w.rooms[0].state_hash();
    assert!(w.rooms.iter().all(|r| r.state_hash() == hash));
    assert_eq!(
        w.rooms[2].dag().len(),
        4,
        "policy, grant, revocation, concurrent write"
    );
    // Having seen the revocation, the writer can write nothing more.
    let why = unauthorized(
        w.commit(1, &writer, |tx| tx.set("/c", "v", Value::Int(3)))
            .unwrap_err(),
    );
    assert!(why.contains("no capability"), "{why}");
}

#[test]
fn keys_not_trusted_cannot_declare_a_policy() {
    let mut w = World::new();
    let writer = w.writer.clone();
    // The writer's own "policy" is a write to the reserved entry, refused.
    let why = unauthorized(
        w.commit(1, &writer, |tx| tx.declare_policy(&[writer.author()]))
            .unwrap_err(),
    );
    assert!(why.contains("no capability"), "{why}");
    // In a room no trusted key governs, a policy by anyone else is only
    // data: nothing is checked.
    let mut open = Room::new(room_id());
    open.govern(vec![w.root.author()]);
    let mut tx = open.begin(writer.author(), NOW);
    tx.declare_policy(&[writer.author()]).unwrap();
    tx.commit().unwrap();
    assert!(!open.dag().governance().unwrap().is_governed());
}

/// A replica that has not seen the policy yet writes with its capability
/// carried in its first node; governed replicas accept it.
#[test]
fn a_node_made_before_the_policy_was_known_carries_its_grant() {
    let mut w = World::new();
    let (root, writer) = (w.root.clone(), w.writer.clone());
    let grant = cap(&root, &writer, "write", &[], 7);
    let mut offline = Room::new(room_id());
    let mut tx = offline.begin(writer.author(), NOW + 5);
    tx.record_grant(&grant).unwrap();
    tx.set("/a", "v", Value::Int(1)).unwrap();
    let idx = tx.commit().unwrap().unwrap().idx;
    let pack = offline.pack(&[idx], Some(&writer)).unwrap();
    w.rooms[1].receive_pack(&pack).unwrap();
    assert_eq!(w.rooms[1].dag().len(), 2);
}
