//! The tcp fabric's pre-shared key: a mutual challenge-response before the
//! connection manager takes a byte of RTRS.
//!
//! ```text
//!  active                                        passive (listener with a key)
//!  HELLO  nonce_a ─────────────────────────────>
//!         <──────────── CHALLENGE nonce_p, HMAC(key, "srv" | nonce_a | nonce_p)
//!  checks the listener knows the key
//!  PROOF  HMAC(key, "clt" | nonce_a | nonce_p) ─>  checks the peer knows the key
//!  REQ ... (the usual CM exchange)
//! ```
//! Both sides pick a fresh 32-byte nonce (getrandom), so neither proof can
//! be replayed into another connection, and each side's proof carries its
//! own label, so one cannot be reflected as the other. A side that lacks the
//! key (or has another) gets `AUTH_FAIL` and a closed connection; a listener
//! without a key answers a HELLO with `AUTH_FAIL` too: a client with a key
//! never talks to a listener that cannot prove it holds it.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use std::path::Path;

/// Bytes of a nonce and of a proof.
pub(crate) const NONCE_LEN: usize = 32;
pub(crate) const PROOF_LEN: usize = 32;

/// Shortest key we take (bytes): 128 bits of secret at the least.
pub const MIN_KEY_LEN: usize = 16;

/// A pre-shared key of the tcp fabric.
#[derive(Clone)]
pub struct AuthKey {
    /// HMAC-SHA256 keyed with the key, cloned for each proof.
    keyed: Hmac<Sha256>,
    id: String,
}

impl std::fmt::Debug for AuthKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AuthKey({})", self.id)
    }
}

/// Which side proves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Role {
    /// The listener (proves first, in the CHALLENGE).
    Passive,
    /// The connecting side (proves in the PROOF).
    Active,
}

impl AuthKey {
    /// A key from its bytes (at least [`MIN_KEY_LEN`]).
    pub fn new(key: &[u8]) -> Result<AuthKey, String> {
        if key.len() < MIN_KEY_LEN {
            return Err(format!(
                "the key has {} bytes; at least {MIN_KEY_LEN} are needed",
                key.len()
            ));
        }
        let keyed = Hmac::<Sha256>::new_from_slice(key).map_err(|e| format!("the key: {e}"))?;
        let digest = Sha256::digest(key);
        let id = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
        Ok(AuthKey { keyed, id })
    }

    /// Reads a key file: its bytes, without a trailing newline. Like ssh,
    /// refuses a file others may read.
    pub fn from_file(path: &Path) -> Result<AuthKey, String> {
        use std::os::unix::fs::MetadataExt;
        let shown = path.display();
        let meta = std::fs::metadata(path).map_err(|e| format!("key file {shown}: {e}"))?;
        if meta.mode() & 0o077 != 0 {
            return Err(format!(
                "key file {shown}: group or others may access it (mode {:o}); chmod 600 it",
                meta.mode() & 0o777
            ));
        }
        let mut bytes = std::fs::read(path).map_err(|e| format!("key file {shown}: {e}"))?;
        while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            bytes.pop();
        }
        AuthKey::new(&bytes).map_err(|e| format!("key file {shown}: {e}"))
    }

    /// A short public name of the key (the first bytes of its SHA-256), for
    /// logs: which key a peer used, without showing it.
    pub fn id(&self) -> &str {
        &self.id
    }

    fn mac(
        &self,
        role: Role,
        nonce_a: &[u8; NONCE_LEN],
        nonce_p: &[u8; NONCE_LEN],
    ) -> Hmac<Sha256> {
        let mut m = self.keyed.clone();
        m.update(match role {
            Role::Passive => b"rtrs-tcp-auth srv",
            Role::Active => b"rtrs-tcp-auth clt",
        });
        m.update(nonce_a);
        m.update(nonce_p);
        m
    }

    /// `role`'s proof for the two nonces.
    pub(crate) fn prove(
        &self,
        role: Role,
        nonce_a: &[u8; NONCE_LEN],
        nonce_p: &[u8; NONCE_LEN],
    ) -> [u8; PROOF_LEN] {
        self.mac(role, nonce_a, nonce_p)
            .finalize()
            .into_bytes()
            .into()
    }

    /// Whether `proof` is `role`'s proof for the two nonces (compared in
    /// constant time).
    pub(crate) fn check(
        &self,
        role: Role,
        nonce_a: &[u8; NONCE_LEN],
        nonce_p: &[u8; NONCE_LEN],
        proof: &[u8],
    ) -> bool {
        self.mac(role, nonce_a, nonce_p).verify_slice(proof).is_ok()
    }
}

/// A fresh nonce from the kernel's random source.
pub(crate) fn nonce() -> std::io::Result<[u8; NONCE_LEN]> {
    let mut n = [0u8; NONCE_LEN];
    let mut got = 0;
    while got < NONCE_LEN {
        // SAFETY: writes at most NONCE_LEN - got bytes into the rest of `n`.
        let r = unsafe { libc::getrandom(n[got..].as_mut_ptr().cast(), NONCE_LEN - got, 0) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        got += r as usize;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_match_only_for_the_same_key_role_and_nonces() {
        let k = AuthKey::new(b"0123456789abcdef-secret").unwrap();
        let other = AuthKey::new(b"0123456789abcdef-Secret").unwrap();
        let (a, p) = (nonce().unwrap(), nonce().unwrap());
        assert_ne!(a, p, "fresh nonces");
        let srv = k.prove(Role::Passive, &a, &p);
        assert!(k.check(Role::Passive, &a, &p, &srv));
        // Another key, the other role (reflection), other nonces (replay),
        // a truncated proof: all refused.
        assert!(!other.check(Role::Passive, &a, &p, &srv));
        assert!(!k.check(Role::Active, &a, &p, &srv));
        assert!(!k.check(Role::Passive, &p, &a, &srv));
        assert!(!k.check(Role::Passive, &a, &p, &srv[..16]));
        assert_ne!(k.id(), other.id());
        assert_eq!(k.id().len(), 8);
    }

    #[test]
    fn short_keys_and_open_key_files_are_refused() {
        assert!(AuthKey::new(b"short").is_err());
        let dir = std::env::temp_dir().join(format!("rtrs-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("key");
        std::fs::write(&f, b"0123456789abcdef-secret\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = AuthKey::from_file(&f).unwrap_err();
        assert!(e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        let k = AuthKey::from_file(&f).unwrap();
        // The trailing newline is not part of the key.
        assert_eq!(
            k.id(),
            AuthKey::new(b"0123456789abcdef-secret").unwrap().id()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
