//! A room hub (the relay core: server sessions over a durable room) fed
//! arbitrary message sequences from several connections, with timers and
//! disconnections between them. It never panics (its invariants are
//! `debug_assert!`s, on here), every frame it sends decodes, and what it
//! acknowledged is in its store.
//!
//! Connection 0 opens a real session first (a `hello` from a client with a
//! few nodes, and its upload), so the fuzzer's frames on it reach an open
//! session; the rest of the input is length-prefixed chunks: one control
//! byte (connection, whether time passes, whether the connection goes),
//! then frame bytes, decoded as the relay's connections decode them. A
//! `hello` is admitted as the relay would, with access the control byte
//! picks: full, read-only, or expiring a few seconds on.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use syncline_core::auth::Access;
use syncline_core::proto::message::{Envelope, Message};
use syncline_core::proto::scope::Scope;
use syncline_core::proto::session::{Config, Credentials};
use syncline_core::{Keypair, RoomId, Value};
use syncline_hub::{ClientLink, HubConfig, Input, RoomHub};
use syncline_store::{DurableRoom, MemoryStore};

fn room_id() -> RoomId {
    RoomId::new("fuzz").expect("valid room id")
}

/// The frames an honest client opens connection 0 with.
fn opening() -> &'static [Vec<u8>] {
    static FRAMES: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    FRAMES.get_or_init(|| {
        let mut room = DurableRoom::load(
            Arc::new(MemoryStore::new()),
            Keypair::from_seed([1; 32]),
            &room_id(),
        )
        .expect("an empty store loads");
        for i in 0..3 {
            room.transact(1_000 + i, |tx| tx.set("/a", "n", Value::Int(i as i64)))
                .expect("a small commit");
        }
        let mut link = ClientLink::open(
            0,
            1,
            &mut room,
            Config::default(),
            Scope::everything(),
            &Credentials::default(),
        )
        .expect("opening writes nothing");
        let mut frames: Vec<Vec<u8>> = std::iter::from_fn(|| link.poll_transmit()).collect();
        // What it would upload once welcomed: its nodes, as a pack.
        let all: Vec<_> = (0..room.room().dag().next_idx()).collect();
        let pack = room.export_pack(&all).expect("own nodes export");
        frames.push(
            Envelope {
                version: syncline_core::proto::message::PROTOCOL_VERSION,
                session: 1,
                corr: 1,
                message: syncline_core::proto::message::Message::Pack {
                    checksum: *blake3::hash(&pack).as_bytes(),
                    pack,
                    phase: syncline_core::proto::message::Phase::Live,
                    last: true,
                },
            }
            .encode(),
        );
        frames
    })
}

/// An envelope as the relay's connection hands it to the hub: a `hello`
/// with the access `pick` chooses (0-7: full, 8-11: read-only, 12-15:
/// expiring 3 s after `now`).
fn input(conn: u64, env: Envelope, pick: u8, now: u64) -> Input {
    let env = Box::new(env);
    if !matches!(env.message, Message::Hello { .. }) {
        return Input::Frame { conn, env };
    }
    let access = match pick {
        0..=7 => Access::full(),
        8..=11 => Access {
            write: None,
            ..Access::full()
        },
        _ => Access {
            expires_at: Some(now + 3_000),
            ..Access::full()
        },
    };
    Input::Hello { conn, env, access }
}

fuzz_target!(|data: &[u8]| {
    let store = Arc::new(MemoryStore::new());
    let room = DurableRoom::load(store.clone(), Keypair::from_seed([9; 32]), &room_id())
        .expect("an empty store loads");
    let config = HubConfig {
        slice_bytes: 4096,
        ..HubConfig::default()
    };
    let mut hub = RoomHub::new(room, config, 0);
    let mut now = 0u64;
    let step = |hub: &mut RoomHub, now: u64, inputs: Vec<Input>| {
        hub.handle_batch(now, inputs).expect("a memory store does not fail");
        while let Some((_, frame)) = hub.poll_transmit() {
            assert!(Envelope::decode(&frame).is_ok(), "the hub sent a frame that does not decode");
        }
        while hub.poll_event().is_some() {}
    };
    let opening: Vec<Input> = opening()
        .iter()
        .map(|f| input(0, Envelope::decode(f).expect("an honest frame decodes"), 0, 0))
        .collect();
    step(&mut hub, now, opening);
    let mut rest = data;
    while rest.len() >= 3 {
        let control = rest[0];
        let n = u16::from_le_bytes([rest[1], rest[2]]) as usize;
        rest = &rest[3..];
        let (bytes, tail) = rest.split_at(n.min(rest.len()));
        rest = tail;
        let conn = u64::from(control & 3);
        if control & 4 != 0 {
            now += u64::from(control >> 4) * 1_000;
            hub.handle_timeout(now);
        }
        let mut inputs = Vec::new();
        if let Ok(env) = Envelope::decode(bytes) {
            inputs.push(input(conn, env, control >> 4, now));
        }
        if control & 8 != 0 {
            inputs.push(Input::Gone { conn });
        }
        step(&mut hub, now, inputs);
    }
    // Everything the room holds (and so everything it acknowledged) is in
    // its store.
    let reloaded = DurableRoom::load(store, Keypair::from_seed([9; 32]), &room_id())
        .expect("what the hub stored loads");
    assert_eq!(reloaded.room().dag().len(), hub.room().room().dag().len());
    assert_eq!(reloaded.room().state_hash(), hub.room().room().state_hash());
});
