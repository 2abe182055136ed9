//! Invites: one-time codes that a new device trades for a capability.
//!
//! An admin asks the relay for an invite to a room (`syncline invite`);
//! the relay keeps what the invite grants under the hash of a fresh secret
//! and answers the code: the relay's address and the secret. The device
//! sends the secret and its own key (`syncline join CODE`); the relay
//! checks that the invite exists, is unused and unexpired, marks it used,
//! and answers a capability for that key, signed with its own key. The
//! secret never leaves the code; the relay stores only its hash.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use super::capability::{CapabilityError, MAX_WRITE_PATHS, Rights, RoomPattern};
use crate::codec::mp::{Reader, Writer};
use crate::proto::message::MAX_TEXT_BYTES;

/// What an invite code starts with.
pub const INVITE_PREFIX: &str = "sli1.";

/// What an invite grants, as the relay keeps it until it is used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invite {
    /// The room (or rooms) the capability will name.
    pub room: RoomPattern,
    /// Its rights.
    pub rights: Rights,
    /// Its write paths (empty: the whole room).
    pub write_paths: Vec<String>,
    /// Unix milliseconds after which the code is void.
    pub code_expires_ms: u64,
    /// How long the capability lasts once the code is used, in
    /// milliseconds.
    pub grant_ms: u64,
}

impl Invite {
    /// The stored form.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.array(5);
        w.str(self.room.as_str());
        w.uint(self.rights.bits());
        w.array(self.write_paths.len());
        for p in &self.write_paths {
            w.str(p);
        }
        w.uint(self.code_expires_ms);
        w.uint(self.grant_ms);
        w.into_bytes()
    }

    /// Reads the stored form.
    pub fn decode(bytes: &[u8]) -> Result<Invite, CapabilityError> {
        let mut r = Reader::new(bytes);
        r.array_exact(5)?;
        let room = RoomPattern::parse(r.str(MAX_TEXT_BYTES)?)?;
        let rights = Rights::from_wire(r.uint()?)?;
        let n = r.array(MAX_WRITE_PATHS)?;
        let write_paths = (0..n)
            .map(|_| Ok(r.str(MAX_TEXT_BYTES)?.to_owned()))
            .collect::<Result<Vec<_>, CapabilityError>>()?;
        let invite = Invite {
            room,
            rights,
            write_paths,
            code_expires_ms: r.uint()?,
            grant_ms: r.uint()?,
        };
        r.finish()?;
        Ok(invite)
    }
}

/// An invite code: where to redeem it, and the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct InviteCode {
    /// The relay's WebSocket URL (`ws://host:port/ws`).
    pub url: String,
    /// The one-time secret.
    pub secret: [u8; 16],
}

impl std::fmt::Debug for InviteCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        write!(f, "InviteCode({})", self.url)
    }
}

impl InviteCode {
    /// Under which key the relay stores the invite: the secret's hash.
    pub fn store_key(secret: &[u8; 16]) -> String {
        format!("invite/{}", super::hex(blake3::hash(secret).as_bytes()))
    }

    /// The code as people paste it: `sli1.`, the URL and the secret, each
    /// unpadded base64url, joined by a dot.
    pub fn to_code(&self) -> String {
        format!(
            "{INVITE_PREFIX}{}.{}",
            URL_SAFE_NO_PAD.encode(&self.url),
            URL_SAFE_NO_PAD.encode(self.secret)
        )
    }

    /// Parses a pasted code.
    pub fn parse(code: &str) -> Result<InviteCode, CapabilityError> {
        let malformed = |why: &str| CapabilityError::Malformed(format!("invite code: {why}"));
        let body = code
            .trim()
            .strip_prefix(INVITE_PREFIX)
            .ok_or_else(|| malformed("does not start with sli1."))?;
        let (url, secret) = body.split_once('.').ok_or_else(|| malformed("no secret"))?;
        let url = URL_SAFE_NO_PAD
            .decode(url)
            .ok()
            .and_then(|u| String::from_utf8(u).ok())
            .filter(|u| u.len() <= MAX_TEXT_BYTES)
            .ok_or_else(|| malformed("bad address"))?;
        let secret = URL_SAFE_NO_PAD
            .decode(secret)
            .ok()
            .and_then(|s| <[u8; 16]>::try_from(s).ok())
            .ok_or_else(|| malformed("bad secret"))?;
        Ok(InviteCode { url, secret })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invites_and_codes_round_trip() {
        let invite = Invite {
            room: RoomPattern::parse("team").unwrap(),
            rights: Rights::parse("write").unwrap(),
            write_paths: vec!["/docs/**".into()],
            code_expires_ms: 10,
            grant_ms: 20,
        };
        assert_eq!(Invite::decode(&invite.encode()), Ok(invite));
        let code = InviteCode {
            url: "ws://127.0.0.1:7700/ws".into(),
            secret: [7; 16],
        };
        assert_eq!(InviteCode::parse(&code.to_code()), Ok(code.clone()));
        assert!(
            !format!("{code:?}").contains("Bw"),
            "the secret is not printed"
        );
        for bad in ["", "sli1.", "sli1.abc", "sli1.abc.def", "x.y.z"] {
            assert!(InviteCode::parse(bad).is_err(), "{bad:?}");
        }
    }
}
