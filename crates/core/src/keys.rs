//! Ed25519 identities. Key material comes in as bytes: the core never reads
//! the OS random number generator, so callers choose where seeds come from.

use ed25519_dalek::{Signer, SigningKey, Verifier, VerifyingKey};

use crate::ids::{AuthorId, NodeId, Signature};

/// An author's signing key.
#[derive(Clone)]
pub struct Keypair {
    signing: SigningKey,
    author: AuthorId,
}

impl std::fmt::Debug for Keypair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        write!(f, "Keypair({:?})", self.author)
    }
}

impl Keypair {
    /// The keypair for a 32-byte secret seed.
    pub fn from_seed(seed: [u8; 32]) -> Keypair {
        let signing = SigningKey::from_bytes(&seed);
        let author = AuthorId(signing.verifying_key().to_bytes());
        Keypair { signing, author }
    }

    /// The secret seed, for persisting the identity.
    pub fn seed(&self) -> [u8; 32] {
        self.signing.to_bytes()
    }

    /// The public identity.
    pub fn author(&self) -> AuthorId {
        self.author
    }

    /// Signs a node id (the id already commits to every other field).
    pub fn sign(&self, id: &NodeId) -> Signature {
        Signature(self.signing.sign(&id.0).to_bytes())
    }

    /// Signs a message other than a node id: a capability, a handshake
    /// proof. Callers put a domain tag first, so that no such message is
    /// ever a 32-byte node id (a signature over one never vouches for the
    /// other).
    pub fn sign_message(&self, message: &[u8]) -> Signature {
        debug_assert!(message.len() != 32, "messages are longer than node ids");
        Signature(self.signing.sign(message).to_bytes())
    }
}

/// Checks `sig` over `id` by `author`. An author key that is not a valid
/// curve point fails like a bad signature.
pub fn verify(author: &AuthorId, id: &NodeId, sig: &Signature) -> bool {
    let Ok(key) = VerifyingKey::from_bytes(&author.0) else {
        return false;
    };
    key.verify(&id.0, &ed25519_dalek::Signature::from_bytes(&sig.0))
        .is_ok()
}

/// Checks `sig` over `message` by `author` ([`Keypair::sign_message`]),
/// refusing the malleable forms of a signature.
pub fn verify_message(author: &AuthorId, message: &[u8], sig: &Signature) -> bool {
    let Ok(key) = VerifyingKey::from_bytes(&author.0) else {
        return false;
    };
    key.verify_strict(message, &ed25519_dalek::Signature::from_bytes(&sig.0))
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_and_verify() {
        let k = Keypair::from_seed([7; 32]);
        let id = NodeId([1; 32]);
        let sig = k.sign(&id);
        assert!(verify(&k.author(), &id, &sig));
        assert!(!verify(&k.author(), &NodeId([2; 32]), &sig));
        let other = Keypair::from_seed([8; 32]);
        assert!(!verify(&other.author(), &id, &sig));
        assert_eq!(Keypair::from_seed(k.seed()).author(), k.author());
    }
}
