//! The control plane: the API client the worker and the ops commands use, the local control
//! plane that serves the same wire format for local runs and tests, and webhook signatures.
//! Everything about the wire format that is inferred lives in `wire`.

pub mod client;
pub mod local;
pub mod webhook;
pub mod wire;

pub(crate) use client::Backoff;
pub use client::{ApiError, Client};

/// A credential held in memory. Its `Debug` and `Display` never show it, and its bytes are
/// overwritten when it is dropped.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into().into_bytes())
    }

    pub fn expose(&self) -> &str {
        // Only ever built from a String.
        std::str::from_utf8(&self.0).unwrap_or("")
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Constant-time comparison, for checking a presented key.
    pub fn matches(&self, presented: &[u8]) -> bool {
        let mut diff = (self.0.len() ^ presented.len()) as u8;
        for (i, b) in self.0.iter().enumerate() {
            diff |= b ^ presented.get(i).copied().unwrap_or(0);
        }
        diff == 0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        for b in self.0.iter_mut() {
            // SAFETY: `b` is a valid, aligned, exclusive reference into our own buffer; the
            // volatile write keeps the compiler from dropping a store to memory about to be freed.
            unsafe { std::ptr::write_volatile(b, 0) };
        }
    }
}

/// A random token: `prefix` + 32 bytes of the kernel's randomness, URL-safe base64.
pub(crate) fn random_token(prefix: &str) -> String {
    use base64::Engine;
    let mut buf = [0u8; 32];
    let mut f = std::fs::File::open("/dev/urandom").expect("/dev/urandom");
    std::io::Read::read_exact(&mut f, &mut buf).expect("reading /dev/urandom");
    format!("{prefix}{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("sk-env-abc");
        assert_eq!(format!("{s:?} {s}"), "Secret([redacted]) [redacted]");
        assert!(s.matches(b"sk-env-abc"));
        assert!(!s.matches(b"sk-env-abd"));
        assert!(!s.matches(b"sk-env-abc0"));
        assert!(!s.matches(b""));
    }
}
