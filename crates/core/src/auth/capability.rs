//! Capabilities: signed, expiring claims that a key may read, write or
//! administer rooms, delegable only narrower.
//!
//! A capability names a room (or a room prefix `team/*`), a subject key,
//! rights, the paths its holder may write and an expiry, and is signed by
//! its issuer. A root capability's issuer must be a key the verifier
//! trusts (the relay's own key, an app backend's key); a delegated one is
//! issued by the subject of its parent, which it carries, and which must
//! hold `admin` (Meadowcap's rule: delegation only narrows, checked at
//! every link). Each signature covers the parent's whole encoding, so a
//! chain cannot be taken apart and recombined.
//!
//! Tokens travel as the canonical MessagePack encoding (in `hello`) or, for
//! people and environment variables, as `sl1.` followed by its unpadded
//! base64url.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use thiserror::Error;

use crate::codec::mp::{DecodeError, Reader, Writer};
use crate::ids::{AuthorId, RoomId, Signature};
use crate::keys::{Keypair, verify_message};
use crate::proto::message::{MAX_BLOB_FIELD_BYTES, MAX_TEXT_BYTES};
use crate::proto::scope::Scope;

/// Longest delegation chain (links, the root included).
pub const MAX_CHAIN: usize = 8;
/// Most write path globs in one capability.
pub const MAX_WRITE_PATHS: usize = 32;
/// What a token string starts with.
pub const TOKEN_PREFIX: &str = "sl1.";

const ENCODING_VERSION: u64 = 1;
const SIGNING_DOMAIN: &str = "syncline capability v1";

/// What a capability allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Rights(u8);

impl Rights {
    /// Open sessions and receive the room's history.
    pub const READ: Rights = Rights(1);
    /// Push nodes (within the write paths).
    pub const WRITE: Rights = Rights(2);
    /// Delegate capabilities (narrower than one's own).
    pub const ADMIN: Rights = Rights(4);

    /// No rights.
    pub fn none() -> Rights {
        Rights(0)
    }

    /// Both sets.
    pub fn union(self, other: Rights) -> Rights {
        Rights(self.0 | other.0)
    }

    /// Whether every right of `other` is in `self`.
    pub fn contains(self, other: Rights) -> bool {
        self.0 & other.0 == other.0
    }

    /// Parses `read`, `write`, `admin` or a comma-separated list of them
    /// (`read,write`); `write` and `admin` imply `read`.
    pub fn parse(text: &str) -> Result<Rights, CapabilityError> {
        let mut rights = Rights::none();
        for word in text.split(',').map(str::trim) {
            rights = rights.union(match word {
                "read" => Rights::READ,
                "write" => Rights::READ.union(Rights::WRITE),
                "admin" => Rights::READ.union(Rights::ADMIN),
                _ => return Err(CapabilityError::Invalid("rights: read, write or admin")),
            });
        }
        Ok(rights)
    }

    /// The bits on the wire (read 1, write 2, admin 4).
    pub fn bits(self) -> u64 {
        u64::from(self.0)
    }

    /// Rights from their wire bits.
    pub fn from_wire(bits: u64) -> Result<Rights, CapabilityError> {
        if bits == 0 || bits > 7 {
            return Err(CapabilityError::Invalid("rights"));
        }
        Ok(Rights(bits as u8))
    }
}

impl fmt::Display for Rights {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = [
            (Rights::READ, "read"),
            (Rights::WRITE, "write"),
            (Rights::ADMIN, "admin"),
        ]
        .iter()
        .filter(|(r, _)| self.contains(*r))
        .map(|(_, n)| *n)
        .collect();
        f.write_str(&names.join(","))
    }
}

/// Why a capability was refused.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum CapabilityError {
    /// Not a capability's encoding.
    #[error("malformed token: {0}")]
    Malformed(String),
    /// A field that decodes but is not valid.
    #[error("invalid token field: {0}")]
    Invalid(&'static str),
    /// A signature that does not verify.
    #[error("a signature in the token does not verify")]
    BadSignature,
    /// The root issuer is not a key this verifier trusts.
    #[error("the token's issuer {0:?} is not trusted here")]
    UntrustedIssuer(AuthorId),
    /// A link not issued by the subject of the one before it.
    #[error("broken delegation: a link is not issued by its parent's subject")]
    BrokenChain,
    /// A link delegated by a holder without `admin`.
    #[error("delegated by a key without admin rights")]
    NotDelegable,
    /// A link that claims more than its parent.
    #[error("delegation widens {0}")]
    Widens(&'static str),
    /// More links than [`MAX_CHAIN`].
    #[error("delegation chain longer than {MAX_CHAIN}")]
    TooLong,
}

impl From<DecodeError> for CapabilityError {
    fn from(e: DecodeError) -> CapabilityError {
        CapabilityError::Malformed(e.to_string())
    }
}

/// A room or a family of rooms: an exact room id, or a prefix ending in
/// `*` (`team/*`; `*` alone is every room).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RoomPattern(String);

impl RoomPattern {
    /// Validates a pattern.
    pub fn parse(text: &str) -> Result<RoomPattern, CapabilityError> {
        let valid = match text.strip_suffix('*') {
            Some("") => true,
            Some(prefix) => RoomId::new(prefix).is_ok(),
            None => RoomId::new(text).is_ok(),
        };
        if !valid {
            return Err(CapabilityError::Invalid(
                "room: a room id, or a prefix ending in *",
            ));
        }
        Ok(RoomPattern(text.to_owned()))
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `room` is one of the rooms named.
    pub fn matches(&self, room: &RoomId) -> bool {
        match self.0.strip_suffix('*') {
            Some(prefix) => room.as_str().starts_with(prefix),
            None => room.as_str() == self.0,
        }
    }

    /// Whether every room `self` names, `wider` names too.
    pub fn within(&self, wider: &RoomPattern) -> bool {
        match wider.0.strip_suffix('*') {
            Some(prefix) => self.0.starts_with(prefix),
            None => self.0 == wider.0,
        }
    }
}

impl fmt::Display for RoomPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a capability claims.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claims {
    /// Names this capability (for revocation and logs).
    pub id: [u8; 16],
    /// The rooms it is good for.
    pub room: RoomPattern,
    /// The key that may use it (it proves possession in `hello`).
    pub subject: AuthorId,
    /// What it allows.
    pub rights: Rights,
    /// With `write`: the path globs its holder may write (empty: the whole
    /// room).
    pub write_paths: Vec<String>,
    /// Unix time in milliseconds after which it is void.
    pub not_after_ms: u64,
}

/// A signed capability, with the chain of parents it was delegated from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Capability {
    /// What it claims.
    pub claims: Claims,
    /// Who signed it: a trusted root, or the subject of `parent`.
    pub issuer: AuthorId,
    /// The capability it was delegated from.
    pub parent: Option<Box<Capability>>,
    /// The issuer's signature over everything above.
    pub sig: Signature,
}

/// What a verified capability grants its subject.
#[derive(Clone, Debug, PartialEq)]
pub struct Grant {
    /// The rooms.
    pub room: RoomPattern,
    /// The rights.
    pub rights: Rights,
    /// Where it may write (the whole room when `is_everything`).
    pub write: Scope,
    /// When it ends (Unix milliseconds), the earliest along the chain.
    pub not_after_ms: u64,
    /// Every capability id of the chain, root first: revoking any one
    /// voids it.
    pub chain: Vec<[u8; 16]>,
}

impl Capability {
    /// A capability signed by `issuer`: a root one (`parent` `None`, to be
    /// trusted by the verifier) or one delegated from `parent`, whose
    /// subject `issuer` must be. Checks only what signing can: the chain is
    /// checked by [`Capability::verify`].
    pub fn issue(issuer: &Keypair, claims: Claims, parent: Option<Capability>) -> Capability {
        let mut cap = Capability {
            claims,
            issuer: issuer.author(),
            parent: parent.map(Box::new),
            sig: Signature([0; 64]),
        };
        cap.sig = issuer.sign_message(&cap.signed_message());
        cap
    }

    /// The canonical encoding (what `hello` carries).
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        self.put(&mut w, true);
        w.into_bytes()
    }

    /// Decodes a capability, refusing anything longer than a token field
    /// or deeper than [`MAX_CHAIN`]. Signatures are not checked here.
    pub fn decode(bytes: &[u8]) -> Result<Capability, CapabilityError> {
        if bytes.len() > MAX_BLOB_FIELD_BYTES {
            return Err(CapabilityError::Malformed(format!(
                "{} bytes; at most {MAX_BLOB_FIELD_BYTES}",
                bytes.len()
            )));
        }
        let mut r = Reader::new(bytes);
        let cap = Capability::read(&mut r, 1)?;
        r.finish()?;
        // Canonical only: one capability, one encoding (its id in logs and
        // revocation lists means one thing).
        if cap.encode() != bytes {
            return Err(CapabilityError::Malformed(
                "not the canonical encoding".into(),
            ));
        }
        Ok(cap)
    }

    /// The token string: `sl1.` and the encoding in unpadded base64url.
    pub fn to_token(&self) -> String {
        format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(self.encode()))
    }

    /// Parses a token string.
    pub fn from_token(token: &str) -> Result<Capability, CapabilityError> {
        let body = token.trim().strip_prefix(TOKEN_PREFIX).ok_or_else(|| {
            CapabilityError::Malformed(format!("does not start with {TOKEN_PREFIX}"))
        })?;
        if body.len() > MAX_BLOB_FIELD_BYTES * 4 / 3 + 4 {
            return Err(CapabilityError::Malformed("too long".into()));
        }
        let bytes = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|e| CapabilityError::Malformed(e.to_string()))?;
        Capability::decode(&bytes)
    }

    /// Checks the whole chain: the root issued by one of `roots`, every
    /// signature, every link issued by its parent's subject holding
    /// `admin`, and every link no wider than its parent (rights, rooms,
    /// write paths, expiry). Time is not checked: compare
    /// [`Grant::not_after_ms`] with the caller's clock.
    pub fn verify(&self, roots: &[AuthorId]) -> Result<Grant, CapabilityError> {
        let mut chain: Vec<&Capability> = vec![self];
        while let Some(parent) = &chain[chain.len() - 1].parent {
            chain.push(parent);
            if chain.len() > MAX_CHAIN {
                return Err(CapabilityError::TooLong);
            }
        }
        chain.reverse();
        let root = chain[0];
        if !roots.contains(&root.issuer) {
            return Err(CapabilityError::UntrustedIssuer(root.issuer));
        }
        let mut scopes = Vec::with_capacity(chain.len());
        for (i, link) in chain.iter().enumerate() {
            if !verify_message(&link.issuer, &link.signed_message(), &link.sig) {
                return Err(CapabilityError::BadSignature);
            }
            let scope = Scope::parse(&link.claims.write_paths)
                .map_err(|_| CapabilityError::Invalid("write paths"))?;
            if i > 0 {
                let parent = chain[i - 1];
                let (c, p) = (&link.claims, &parent.claims);
                if link.issuer != p.subject {
                    return Err(CapabilityError::BrokenChain);
                }
                if !p.rights.contains(Rights::ADMIN) {
                    return Err(CapabilityError::NotDelegable);
                }
                if !p.rights.contains(c.rights) {
                    return Err(CapabilityError::Widens("rights"));
                }
                if !c.room.within(&p.room) {
                    return Err(CapabilityError::Widens("rooms"));
                }
                if !scope.within(&scopes[i - 1]) {
                    return Err(CapabilityError::Widens("write paths"));
                }
                if c.not_after_ms > p.not_after_ms {
                    return Err(CapabilityError::Widens("expiry"));
                }
            }
            scopes.push(scope);
        }
        Ok(Grant {
            room: self.claims.room.clone(),
            rights: self.claims.rights,
            write: scopes.pop().expect("a chain has a link"),
            not_after_ms: self.claims.not_after_ms,
            chain: chain.iter().map(|c| c.claims.id).collect(),
        })
    }

    /// What the issuer signs: a domain tag, the claims, the issuer and the
    /// parent's whole encoding.
    fn signed_message(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.str(SIGNING_DOMAIN);
        self.put(&mut w, false);
        w.into_bytes()
    }

    fn put(&self, w: &mut Writer, with_sig: bool) {
        let c = &self.claims;
        w.array(9 + with_sig as usize);
        w.uint(ENCODING_VERSION);
        w.bin(&c.id);
        w.str(c.room.as_str());
        w.bin(&c.subject.0);
        w.uint(c.rights.bits());
        w.array(c.write_paths.len());
        for p in &c.write_paths {
            w.str(p);
        }
        w.uint(c.not_after_ms);
        w.bin(&self.issuer.0);
        match &self.parent {
            Some(p) => p.put(w, true),
            None => w.nil(),
        }
        if with_sig {
            w.bin(&self.sig.0);
        }
    }

    fn read(r: &mut Reader<'_>, depth: usize) -> Result<Capability, CapabilityError> {
        if depth > MAX_CHAIN {
            return Err(CapabilityError::TooLong);
        }
        r.array_exact(10)?;
        if r.uint()? != ENCODING_VERSION {
            return Err(CapabilityError::Invalid("encoding version"));
        }
        let id = r.bin_array()?;
        let room = RoomPattern::parse(r.str(MAX_TEXT_BYTES)?)?;
        let subject = AuthorId(r.bin_array()?);
        let rights = Rights::from_wire(r.uint()?)?;
        let n = r.array(MAX_WRITE_PATHS)?;
        let write_paths = (0..n)
            .map(|_| Ok(r.str(MAX_TEXT_BYTES)?.to_owned()))
            .collect::<Result<Vec<_>, CapabilityError>>()?;
        let not_after_ms = r.uint()?;
        let issuer = AuthorId(r.bin_array()?);
        let parent = if r.peek()? == 0xc0 {
            r.nil()?;
            None
        } else {
            Some(Box::new(Capability::read(r, depth + 1)?))
        };
        let sig = Signature(r.bin_array()?);
        Ok(Capability {
            claims: Claims {
                id,
                room,
                subject,
                rights,
                write_paths,
                not_after_ms,
            },
            issuer,
            parent,
            sig,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> Keypair {
        Keypair::from_seed([n; 32])
    }

    fn claims(subject: &Keypair, rights: &str, paths: &[&str], not_after_ms: u64) -> Claims {
        Claims {
            id: [subject.author().0[0]; 16],
            room: RoomPattern::parse("team/*").unwrap(),
            subject: subject.author(),
            rights: Rights::parse(rights).unwrap(),
            write_paths: paths.iter().map(|p| (*p).to_owned()).collect(),
            not_after_ms,
        }
    }

    #[test]
    fn a_chain_verifies_and_round_trips_as_a_token() {
        let (root, admin, device) = (key(1), key(2), key(3));
        let parent = Capability::issue(
            &root,
            claims(&admin, "admin,write", &["/docs/**"], 100),
            None,
        );
        let mut c = claims(&device, "write", &["/docs/a/**"], 50);
        c.room = RoomPattern::parse("team/alpha").unwrap();
        let cap = Capability::issue(&admin, c, Some(parent));
        let grant = cap.verify(&[root.author()]).unwrap();
        assert_eq!(grant.rights, Rights::parse("write").unwrap());
        assert!(grant.room.matches(&RoomId::new("team/alpha").unwrap()));
        assert!(!grant.room.matches(&RoomId::new("team/beta").unwrap()));
        assert_eq!(grant.not_after_ms, 50);
        assert_eq!(grant.chain.len(), 2);
        let token = cap.to_token();
        assert!(token.starts_with(TOKEN_PREFIX));
        assert_eq!(Capability::from_token(&token).unwrap(), cap);
        assert_eq!(
            cap.verify(&[admin.author()]),
            Err(CapabilityError::UntrustedIssuer(root.author()))
        );
    }

    #[test]
    fn delegation_only_narrows() {
        let (root, admin, device) = (key(1), key(2), key(3));
        let trusted = [root.author()];
        let parent = || {
            Capability::issue(
                &root,
                claims(&admin, "admin,write", &["/docs/**"], 100),
                None,
            )
        };
        let delegate = |c: Claims| Capability::issue(&admin, c, Some(parent())).verify(&trusted);
        assert_eq!(
            delegate(claims(&device, "write", &["/**"], 50)),
            Err(CapabilityError::Widens("write paths"))
        );
        assert_eq!(
            delegate(claims(&device, "write", &[], 50)),
            Err(CapabilityError::Widens("write paths")),
            "no paths is the whole room"
        );
        assert_eq!(
            delegate(claims(&device, "write", &["/docs/x"], 101)),
            Err(CapabilityError::Widens("expiry"))
        );
        let mut wider_room = claims(&device, "write", &["/docs/x"], 50);
        wider_room.room = RoomPattern::parse("*").unwrap();
        assert_eq!(delegate(wider_room), Err(CapabilityError::Widens("rooms")));

        // Without admin, no delegation at all.
        let writer = Capability::issue(&root, claims(&admin, "write", &[], 100), None);
        let cap = Capability::issue(&admin, claims(&device, "read", &[], 50), Some(writer));
        assert_eq!(cap.verify(&trusted), Err(CapabilityError::NotDelegable));
        // A read-only admin cannot hand out write.
        let reader = Capability::issue(&root, claims(&admin, "admin", &[], 100), None);
        let cap = Capability::issue(&admin, claims(&device, "write", &[], 50), Some(reader));
        assert_eq!(cap.verify(&trusted), Err(CapabilityError::Widens("rights")));
        // Only the parent's subject may delegate.
        let cap = Capability::issue(&device, claims(&device, "read", &[], 50), Some(parent()));
        assert_eq!(cap.verify(&trusted), Err(CapabilityError::BrokenChain));
    }

    #[test]
    fn altered_tokens_are_refused() {
        let (root, device) = (key(1), key(3));
        let cap = Capability::issue(&root, claims(&device, "read", &[], 100), None);
        let mut altered = cap.clone();
        altered.claims.rights = Rights::parse("write").unwrap();
        assert_eq!(
            altered.verify(&[root.author()]),
            Err(CapabilityError::BadSignature)
        );
        let mut resubjected = cap.clone();
        resubjected.claims.subject = key(4).author();
        assert_eq!(
            resubjected.verify(&[root.author()]),
            Err(CapabilityError::BadSignature)
        );
        // Every flipped bit of the encoding fails to decode or to verify.
        let bytes = cap.encode();
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[i] ^= 1 << bit;
                if let Ok(c) = Capability::decode(&b) {
                    assert!(c.verify(&[root.author()]).is_err(), "byte {i} bit {bit}");
                }
            }
        }
        for bad in ["", "sl1.", "sl1.!!!", "token", "sl1.AAAA"] {
            assert!(Capability::from_token(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn chains_are_bounded() {
        let root = key(1);
        let mut cap = Capability::issue(&root, claims(&key(2), "admin,write", &[], 100), None);
        for n in 3..3 + MAX_CHAIN as u8 {
            cap = Capability::issue(
                &key(n - 1),
                claims(&key(n), "admin,write", &[], 100),
                Some(cap),
            );
        }
        assert_eq!(cap.verify(&[root.author()]), Err(CapabilityError::TooLong));
        assert!(Capability::decode(&cap.encode()).is_err());
    }
}
