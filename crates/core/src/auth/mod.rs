//! Who may open a session in a room, and what it may do there
//! (`docs/security.md`).
//!
//! Every `hello` proves that its sender holds the private key of the peer
//! it claims: it carries a signature over a server challenge bound to the
//! connection, the room and the session ([`hello_proof`]), so a `hello`
//! recorded on one connection is worthless on another. A room is open (any
//! proven key reads and writes) or locked: then the `hello` must carry a
//! [`Capability`] for this room whose subject is that key, rooted in a key
//! the server trusts, unexpired and unrevoked. Every refusal reads the same
//! whether or not the room exists.
//!
//! The decision ([`admit`]) is a pure function of the policy, the `hello`
//! and the time, made by the driver before the room is even looked up.

pub mod capability;
pub mod governance;
pub mod invite;

use std::collections::HashSet;

pub use capability::{Capability, CapabilityError, Claims, Grant, Rights, RoomPattern};
pub use governance::Governance;
pub use invite::{Invite, InviteCode};

use crate::ids::{AuthorId, RoomId, Signature};
use crate::keys::{Keypair, verify_message};
use crate::proto::message::Reason;
use crate::proto::scope::Scope;

const HELLO_DOMAIN: &[u8] = b"syncline hello v1";

/// The bytes a client signs to open session `session` of `room` on the
/// connection whose challenge is `challenge`.
fn hello_message(challenge: &[u8; 32], room: &RoomId, session: u64, peer: &AuthorId) -> Vec<u8> {
    let mut m = Vec::with_capacity(HELLO_DOMAIN.len() + 32 + 8 + 32 + room.as_str().len());
    m.extend_from_slice(HELLO_DOMAIN);
    m.extend_from_slice(challenge);
    m.extend_from_slice(&session.to_be_bytes());
    m.extend_from_slice(&peer.0);
    m.extend_from_slice(room.as_str().as_bytes());
    m
}

/// A client's proof that it holds `key`, for one session on one connection.
pub fn hello_proof(key: &Keypair, challenge: &[u8; 32], room: &RoomId, session: u64) -> Signature {
    key.sign_message(&hello_message(challenge, room, session, &key.author()))
}

/// Whether `proof` is `peer`'s signature for this session on this
/// connection.
pub fn verify_hello_proof(
    peer: &AuthorId,
    challenge: &[u8; 32],
    room: &RoomId,
    session: u64,
    proof: &Signature,
) -> bool {
    verify_message(peer, &hello_message(challenge, room, session, peer), proof)
}

/// A server's access rules.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    /// Rooms open to every proven key (read and write); the rest are
    /// locked.
    pub open: Vec<RoomPattern>,
    /// Keys whose capabilities are trusted as roots (the server's own, an
    /// app backend's).
    pub roots: Vec<AuthorId>,
    /// Capability ids revoked: a chain holding one grants nothing.
    pub revoked: HashSet<[u8; 16]>,
}

impl Policy {
    /// Every room open.
    pub fn open() -> Policy {
        Policy {
            open: vec![RoomPattern::parse("*").expect("* is a pattern")],
            ..Policy::default()
        }
    }

    /// Whether `room` is open.
    pub fn is_open(&self, room: &RoomId) -> bool {
        self.open.iter().any(|p| p.matches(room))
    }
}

/// What a session may do once admitted.
#[derive(Clone, Debug, PartialEq)]
pub struct Access {
    /// Where it may write; `None`: it may only read.
    pub write: Option<Scope>,
    /// When its capability ends; `None` in open rooms. [`admit`] gives
    /// Unix milliseconds; a driver whose sessions keep another clock moves
    /// it there with [`Access::on_clock`].
    pub expires_at: Option<u64>,
    /// The capability ids it rests on (empty in open rooms).
    pub chain: Vec<[u8; 16]>,
}

impl Access {
    /// Read and write anywhere, for good: an open room.
    pub fn full() -> Access {
        Access {
            write: Some(Scope::everything()),
            expires_at: None,
            chain: Vec::new(),
        }
    }

    /// The same access with its expiry on a clock that reads `now` while
    /// Unix time is `now_unix_ms`.
    pub fn on_clock(mut self, now_unix_ms: u64, now: u64) -> Access {
        self.expires_at = self
            .expires_at
            .map(|t| now.saturating_add(t.saturating_sub(now_unix_ms)));
        self
    }

    /// Whether revoking `id` ends this access.
    pub fn rests_on(&self, id: &[u8; 16]) -> bool {
        self.chain.contains(id)
    }
}

/// Why a `hello` was refused: the reason and message the `reject` carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// `unauthorized` or `token_expired`.
    pub reason: Reason,
    /// For people; never says whether the room exists.
    pub message: String,
}

impl Refusal {
    fn unauthorized(message: impl Into<String>) -> Refusal {
        Refusal {
            reason: Reason::Unauthorized,
            message: message.into(),
        }
    }
}

/// What a `hello` presents.
#[derive(Clone, Copy, Debug)]
pub struct Presented<'a> {
    /// The room it opens.
    pub room: &'a RoomId,
    /// The session id on its connection.
    pub session: u64,
    /// The key it claims.
    pub peer: &'a AuthorId,
    /// Its proof of holding that key.
    pub proof: Option<&'a Signature>,
    /// Its capability, encoded.
    pub token: Option<&'a [u8]>,
}

impl<'a> Presented<'a> {
    /// What `env` presents, if it is a `hello`.
    pub fn of_hello(env: &'a crate::proto::message::Envelope) -> Option<Presented<'a>> {
        let crate::proto::message::Message::Hello {
            room,
            peer,
            proof,
            token,
            ..
        } = &env.message
        else {
            return None;
        };
        Some(Presented {
            room,
            session: env.session,
            peer,
            proof: proof.as_ref(),
            token: token.as_deref(),
        })
    }
}

/// Decides whether a `hello` opens a session, and with what access: the
/// proof must verify against this connection's `challenge`; an open room
/// then admits anyone, a locked one needs a capability for this room and
/// this key, rooted in `policy.roots`, with read rights, unrevoked and not
/// expired at `now_ms` (Unix milliseconds).
pub fn admit(
    policy: &Policy,
    challenge: &[u8; 32],
    hello: Presented<'_>,
    now_ms: u64,
) -> Result<Access, Refusal> {
    let proven = hello.proof.is_some_and(|proof| {
        verify_hello_proof(hello.peer, challenge, hello.room, hello.session, proof)
    });
    if !proven {
        return Err(Refusal::unauthorized(
            "the hello does not prove possession of its peer key (sign this connection's challenge)",
        ));
    }
    if policy.is_open(hello.room) {
        return Ok(Access::full());
    }
    let Some(token) = hello.token else {
        return Err(Refusal::unauthorized(
            "this room needs a token: ask its admin for one (syncline token issue, syncline invite)",
        ));
    };
    let cap = Capability::decode(token).map_err(|e| Refusal::unauthorized(e.to_string()))?;
    let grant = cap
        .verify(&policy.roots)
        .map_err(|e| Refusal::unauthorized(e.to_string()))?;
    if cap.claims.subject != *hello.peer {
        return Err(Refusal::unauthorized("the token was issued to another key"));
    }
    if !grant.room.matches(hello.room) {
        return Err(Refusal::unauthorized("the token is not for this room"));
    }
    if !grant.rights.contains(Rights::READ) {
        return Err(Refusal::unauthorized("the token does not allow reading"));
    }
    if let Some(id) = grant.chain.iter().find(|id| policy.revoked.contains(*id)) {
        return Err(Refusal::unauthorized(format!(
            "capability {} was revoked",
            hex(id)
        )));
    }
    if grant.not_after_ms <= now_ms {
        return Err(Refusal {
            reason: Reason::TokenExpired,
            message: "the token expired: get a fresh one".into(),
        });
    }
    Ok(Access {
        write: grant
            .rights
            .contains(Rights::WRITE)
            .then(|| grant.write.clone()),
        expires_at: Some(grant.not_after_ms),
        chain: grant.chain,
    })
}

/// Lower-case hex, for ids in messages and logs.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHALLENGE: [u8; 32] = [9; 32];

    fn room(name: &str) -> RoomId {
        RoomId::new(name).unwrap()
    }

    struct Fixture {
        server: Keypair,
        device: Keypair,
        policy: Policy,
    }

    impl Fixture {
        fn new() -> Fixture {
            let server = Keypair::from_seed([1; 32]);
            Fixture {
                policy: Policy {
                    open: vec![RoomPattern::parse("public/*").unwrap()],
                    roots: vec![server.author()],
                    revoked: HashSet::new(),
                },
                server,
                device: Keypair::from_seed([2; 32]),
            }
        }

        fn token(&self, rights: &str, not_after_ms: u64) -> Vec<u8> {
            let claims = Claims {
                id: [7; 16],
                room: RoomPattern::parse("team").unwrap(),
                subject: self.device.author(),
                rights: Rights::parse(rights).unwrap(),
                write_paths: vec!["/docs/**".into()],
                not_after_ms,
            };
            Capability::issue(&self.server, claims, None).encode()
        }

        fn admit(
            &self,
            room_name: &str,
            token: Option<&[u8]>,
            now: u64,
        ) -> Result<Access, Refusal> {
            let r = room(room_name);
            let proof = hello_proof(&self.device, &CHALLENGE, &r, 5);
            let hello = Presented {
                room: &r,
                session: 5,
                peer: &self.device.author(),
                proof: Some(&proof),
                token,
            };
            admit(&self.policy, &CHALLENGE, hello, now)
        }
    }

    #[test]
    fn proofs_bind_the_connection_room_and_session() {
        let key = Keypair::from_seed([3; 32]);
        let r = room("a");
        let proof = hello_proof(&key, &CHALLENGE, &r, 1);
        assert!(verify_hello_proof(&key.author(), &CHALLENGE, &r, 1, &proof));
        assert!(
            !verify_hello_proof(&key.author(), &[8; 32], &r, 1, &proof),
            "another connection"
        );
        assert!(!verify_hello_proof(
            &key.author(),
            &CHALLENGE,
            &room("b"),
            1,
            &proof
        ));
        assert!(!verify_hello_proof(
            &key.author(),
            &CHALLENGE,
            &r,
            2,
            &proof
        ));
        let other = Keypair::from_seed([4; 32]).author();
        assert!(
            !verify_hello_proof(&other, &CHALLENGE, &r, 1, &proof),
            "a claimed key"
        );
    }

    #[test]
    fn open_and_locked_rooms() {
        let f = Fixture::new();
        assert_eq!(f.admit("public/x", None, 0), Ok(Access::full()));
        let no_token = f.admit("team", None, 0).unwrap_err();
        let nowhere = f.admit("no-such-room", None, 0).unwrap_err();
        assert_eq!(
            no_token, nowhere,
            "a refusal never tells whether the room exists"
        );
        assert_eq!(no_token.reason, Reason::Unauthorized);

        let access = f.admit("team", Some(&f.token("write", 100)), 50).unwrap();
        assert_eq!(access.expires_at, Some(100));
        assert_eq!(access.clone().on_clock(50, 7).expires_at, Some(57));
        assert_eq!(
            access.write,
            Some(Scope::parse(&["/docs/**".into()]).unwrap())
        );
        let read_only = f.admit("team", Some(&f.token("read", 100)), 50).unwrap();
        assert_eq!(read_only.write, None);

        let expired = f
            .admit("team", Some(&f.token("write", 100)), 100)
            .unwrap_err();
        assert_eq!(expired.reason, Reason::TokenExpired);
        let elsewhere = f
            .admit("team2", Some(&f.token("write", 100)), 50)
            .unwrap_err();
        assert_eq!(elsewhere.reason, Reason::Unauthorized);

        let mut revoked = Fixture::new();
        revoked.policy.revoked.insert([7; 16]);
        let r = revoked.admit("team", Some(&revoked.token("write", 100)), 50);
        assert_eq!(r.unwrap_err().reason, Reason::Unauthorized);
    }

    #[test]
    fn a_token_works_only_for_its_subject_with_a_proof() {
        let f = Fixture::new();
        let token = f.token("write", 100);
        let r = room("team");
        let thief = Keypair::from_seed([6; 32]);
        // The thief signs with its own key but claims the device's.
        let proof = hello_proof(&thief, &CHALLENGE, &r, 5);
        let claimed = f.device.author();
        let hello = Presented {
            room: &r,
            session: 5,
            peer: &claimed,
            proof: Some(&proof),
            token: Some(&token),
        };
        assert!(admit(&f.policy, &CHALLENGE, hello, 50).is_err());
        // Or proves its own key and presents the device's token.
        let own = thief.author();
        let hello = Presented {
            peer: &own,
            ..hello
        };
        let refused = admit(&f.policy, &CHALLENGE, hello, 50).unwrap_err();
        assert!(refused.message.contains("another key"), "{refused:?}");
        // No proof at all.
        let hello = Presented {
            proof: None,
            ..hello
        };
        assert!(admit(&f.policy, &CHALLENGE, hello, 50).is_err());
    }
}
