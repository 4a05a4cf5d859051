//! Frame authentication: HMAC-SHA256 of every frame body with the cluster
//! secret. A frame is `tag (32 bytes) | body`; a peer that does not know the
//! secret cannot make a frame this agent accepts.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Length of an HMAC-SHA256 tag.
pub const TAG_LEN: usize = 32;

/// The cluster secret, ready to sign and verify frames.
#[derive(Clone)]
pub struct FrameKey {
    mac: Hmac<Sha256>,
}

impl std::fmt::Debug for FrameKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FrameKey(..)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("the cluster secret is empty")]
    EmptySecret,
}

impl FrameKey {
    pub fn new(secret: &[u8]) -> Result<FrameKey, AuthError> {
        if secret.is_empty() {
            return Err(AuthError::EmptySecret);
        }
        // Hmac accepts keys of any length; the error type is uninhabited
        // for HMAC, so this cannot fail with a non-empty key.
        let mac = Hmac::<Sha256>::new_from_slice(secret).map_err(|_| AuthError::EmptySecret)?;
        Ok(FrameKey { mac })
    }

    /// The tag of `body`.
    pub fn sign(&self, body: &[u8]) -> [u8; TAG_LEN] {
        let mut mac = self.mac.clone();
        mac.update(body);
        mac.finalize().into_bytes().into()
    }

    /// The tag of the concatenation of `parts` (no copy of a large body).
    pub fn sign_parts(&self, parts: &[&[u8]]) -> [u8; TAG_LEN] {
        let mut mac = self.mac.clone();
        for part in parts {
            mac.update(part);
        }
        mac.finalize().into_bytes().into()
    }

    /// Whether `tag` is the tag of the concatenation of `parts` (constant
    /// time).
    pub fn verify_parts(&self, parts: &[&[u8]], tag: &[u8]) -> bool {
        let mut mac = self.mac.clone();
        for part in parts {
            mac.update(part);
        }
        mac.verify_slice(tag).is_ok()
    }

    /// Whether `tag` is `body`'s tag (constant time).
    pub fn verify(&self, body: &[u8], tag: &[u8]) -> bool {
        let mut mac = self.mac.clone();
        mac.update(body);
        mac.verify_slice(tag).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tag_verifies_only_with_the_same_secret_and_body() {
        let key = FrameKey::new(b"0123456789abcdef").unwrap();
        let other = FrameKey::new(b"0123456789abcdeg").unwrap();
        let tag = key.sign(b"hello");
        assert!(key.verify(b"hello", &tag));
        assert!(!key.verify(b"hellp", &tag));
        assert!(!other.verify(b"hello", &tag));
        assert!(!key.verify(b"hello", &tag[..31]));
        assert_eq!(key.sign_parts(&[b"he", b"", b"llo"]), tag);
        assert!(key.verify_parts(&[b"hel", b"lo"], &tag));
        assert!(!key.verify_parts(&[b"hel", b"lp"], &tag));
    }
}
