//! Webhook signatures (Standard Webhooks, as the official SDK verifies them): the signed content is
//! `"{webhook-id}.{webhook-timestamp}.{body}"`, HMAC-SHA256 keyed with the base64 part of a
//! `whsec_…` secret, sent as `webhook-signature: v1,<base64>` (several space-separated
//! signatures are allowed during secret rotation).

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

type HmacSha256 = Hmac<Sha256>;

pub const DEFAULT_TOLERANCE: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WebhookError {
    #[error("webhook secret must be `whsec_` followed by base64")]
    BadSecret,
    #[error("missing header {0}")]
    MissingHeader(&'static str),
    #[error("webhook-timestamp is not a unix time: {0:?}")]
    BadTimestamp(String),
    #[error("webhook-timestamp is {0} s away from now (tolerance {1} s)")]
    Stale(u64, u64),
    #[error("no valid v1 signature")]
    BadSignature,
    #[error("webhook-id {0:?} was already delivered")]
    Replay(String),
}

/// The key inside a `whsec_<base64>` secret (surrounding whitespace, e.g. a file's newline, is
/// ignored).
pub fn parse_secret(s: &str) -> Result<Vec<u8>, WebhookError> {
    let b = s.trim().strip_prefix("whsec_").ok_or(WebhookError::BadSecret)?;
    let key = B64.decode(b).map_err(|_| WebhookError::BadSecret)?;
    if key.len() < 16 {
        return Err(WebhookError::BadSecret);
    }
    Ok(key)
}

fn mac(key: &[u8], id: &str, ts: &str, body: &[u8]) -> HmacSha256 {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    m.update(id.as_bytes());
    m.update(b".");
    m.update(ts.as_bytes());
    m.update(b".");
    m.update(body);
    m
}

/// The environment variable the official SDK reads the signing key from.
pub const SIGNING_KEY_VAR: &str = "ANTHROPIC_WEBHOOK_SIGNING_KEY";

/// The `webhook-signature` value for a delivery.
pub fn sign(key: &[u8], id: &str, ts: &str, body: &[u8]) -> String {
    format!("v1,{}", B64.encode(mac(key, id, ts, body).finalize().into_bytes()))
}

/// Verifies deliveries and remembers their ids for the tolerance window, so that a captured
/// delivery cannot be replayed.
pub struct Verifier {
    key: Vec<u8>,
    tolerance: Duration,
    seen: Mutex<HashMap<String, SystemTime>>,
}

impl Verifier {
    pub fn new(key: Vec<u8>, tolerance: Duration) -> Verifier {
        Verifier { key, tolerance, seen: Mutex::new(HashMap::new()) }
    }

    pub fn verify(
        &self,
        id: Option<&str>,
        timestamp: Option<&str>,
        signature: Option<&str>,
        body: &[u8],
        now: SystemTime,
    ) -> Result<(), WebhookError> {
        let id = id.ok_or(WebhookError::MissingHeader("webhook-id"))?;
        let ts = timestamp.ok_or(WebhookError::MissingHeader("webhook-timestamp"))?;
        let sig = signature.ok_or(WebhookError::MissingHeader("webhook-signature"))?;
        let secs: u64 = ts.trim().parse().map_err(|_| WebhookError::BadTimestamp(ts.into()))?;
        // Checked: this header arrives before the signature is verified, from anyone.
        let sent =
            UNIX_EPOCH.checked_add(Duration::from_secs(secs)).ok_or_else(|| WebhookError::BadTimestamp(ts.into()))?;
        let skew = now.duration_since(sent).or_else(|e| Ok::<_, ()>(e.duration())).unwrap_or_default();
        if skew > self.tolerance {
            return Err(WebhookError::Stale(skew.as_secs(), self.tolerance.as_secs()));
        }
        let valid = sig.split_whitespace().filter_map(|s| s.strip_prefix("v1,")).any(|s| {
            // verify_slice compares in constant time.
            B64.decode(s).map(|raw| mac(&self.key, id, ts, body).verify_slice(&raw).is_ok()).unwrap_or(false)
        });
        if !valid {
            return Err(WebhookError::BadSignature);
        }
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let horizon = self.tolerance * 2;
        seen.retain(|_, t| now.duration_since(*t).map(|d| d <= horizon).unwrap_or(true));
        if seen.contains_key(id) {
            return Err(WebhookError::Replay(id.into()));
        }
        seen.insert(id.into(), now);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret() -> (String, Vec<u8>) {
        let key = b"0123456789abcdef0123456789abcdef".to_vec();
        (format!("whsec_{}", B64.encode(&key)), key)
    }

    #[test]
    fn valid_wrong_stale_replayed_and_truncated_deliveries() {
        let (s, key) = secret();
        assert_eq!(parse_secret(&format!("{s}\n")).unwrap(), key);
        assert_eq!(parse_secret("sk-nope"), Err(WebhookError::BadSecret));
        let v = Verifier::new(key.clone(), DEFAULT_TOLERANCE);
        let now = SystemTime::now();
        let ts = now.duration_since(UNIX_EPOCH).unwrap().as_secs().to_string();
        let body = br#"{"type":"event","data":{"type":"session.status_run_started"}}"#;
        let sig = sign(&key, "msg_1", &ts, body);
        // A rotated-out signature first, then the good one.
        let both = format!("v1,AAAA {sig}");
        assert_eq!(v.verify(Some("msg_1"), Some(&ts), Some(&both), body, now), Ok(()));
        assert_eq!(
            v.verify(Some("msg_1"), Some(&ts), Some(&sig), body, now),
            Err(WebhookError::Replay("msg_1".into()))
        );
        let other = sign(b"another-secret-another-secret!!", "msg_2", &ts, body);
        assert_eq!(v.verify(Some("msg_2"), Some(&ts), Some(&other), body, now), Err(WebhookError::BadSignature));
        let sig2 = sign(&key, "msg_2", &ts, body);
        assert_eq!(
            v.verify(Some("msg_2"), Some(&ts), Some(&sig2), &body[..body.len() - 3], now),
            Err(WebhookError::BadSignature)
        );
        let old = (now - Duration::from_secs(600)).duration_since(UNIX_EPOCH).unwrap().as_secs().to_string();
        let sig3 = sign(&key, "msg_3", &old, body);
        assert!(matches!(v.verify(Some("msg_3"), Some(&old), Some(&sig3), body, now), Err(WebhookError::Stale(..))));
        assert_eq!(v.verify(None, Some(&ts), Some(&sig), body, now), Err(WebhookError::MissingHeader("webhook-id")));
        assert!(matches!(v.verify(Some("m"), Some("soon"), Some(&sig), body, now), Err(WebhookError::BadTimestamp(_))));
        // Unsigned and from anyone: a time past what the clock can hold is refused like any
        // other bad header (it aborted the receiver).
        let far = u64::MAX.to_string();
        assert_eq!(
            v.verify(Some("m"), Some(&far), Some(&sig), body, now),
            Err(WebhookError::BadTimestamp(far.clone()))
        );
        let far_but_representable = (i64::MAX as u64 / 2).to_string();
        assert!(matches!(
            v.verify(Some("m"), Some(&far_but_representable), Some(&sig), body, now),
            Err(WebhookError::Stale(..))
        ));
    }
}
