//! Capability tokens, as bytes in a `hello` and as `sl1.` strings: decoding
//! never panics, what decodes re-encodes to the same bytes (one encoding
//! per capability), verifying a decoded chain never panics, and admitting a
//! `hello` that carries the bytes refuses anything not signed by the root.
//! Invite records and codes decode without panicking, and round-trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use syncline_core::auth::{self, Capability, Invite, InviteCode, Policy, Presented};
use syncline_core::{Keypair, RoomId};

fuzz_target!(|data: &[u8]| {
    let root = Keypair::from_seed([1; 32]);
    if let Ok(cap) = Capability::decode(data) {
        assert_eq!(cap.encode(), data, "a capability has one encoding");
        // Only the root's key could have signed a chain that verifies, and
        // the fuzzer does not hold it.
        assert!(cap.verify(&[root.author()]).is_err(), "a forged chain verified");
        assert_eq!(Capability::from_token(&cap.to_token()).as_ref(), Ok(&cap));
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Capability::from_token(text);
        if let Ok(code) = InviteCode::parse(text) {
            assert_eq!(InviteCode::parse(&code.to_code()).as_ref(), Ok(&code));
        }
    }
    if let Ok(invite) = Invite::decode(data) {
        assert_eq!(Invite::decode(&invite.encode()).as_ref(), Ok(&invite));
    }
    // A proven hello carrying the bytes, for a locked room.
    let peer = Keypair::from_seed([2; 32]);
    let room = RoomId::new("locked").expect("a valid room id");
    let challenge = [3; 32];
    let proof = auth::hello_proof(&peer, &challenge, &room, 1);
    let policy = Policy {
        roots: vec![root.author()],
        ..Policy::default()
    };
    let hello = Presented {
        room: &room,
        session: 1,
        peer: &peer.author(),
        proof: Some(&proof),
        token: Some(data),
    };
    assert!(auth::admit(&policy, &challenge, hello, 0).is_err());
});
