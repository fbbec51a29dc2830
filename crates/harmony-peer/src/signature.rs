//! Signing and checking hint requests with the cluster secret.
//!
//! A request carries `X-Harmony-Timestamp` (Unix milliseconds) and `X-Harmony-Signature`, the
//! hex HMAC-SHA256 of `timestamp + "\n" + body` under the shared secret. A receiver refuses a
//! timestamp more than [`SKEW_MAX`] from its own clock, a signature that does not verify
//! (compared in constant time by `Mac::verify_slice`), and a signature it already accepted
//! within the window (a replay). Every body carries a random nonce, so two honest requests
//! never share a signature.
//!
//! The replay memory is bounded ([`REPLAY_MEMORY_MAX`]): entries leave once their timestamp is
//! outside the window, after which the staleness check refuses them anyway. When the memory
//! is full of live entries a request is refused as a replay, because accepting it would mean
//! forgetting whether it was one. Hints are never needed for correctness, so refusing is the
//! safe side.

use std::collections::{HashSet, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::error::Error;

/// The request header with the signing time, Unix milliseconds.
pub const TIMESTAMP_HEADER: &str = "x-harmony-timestamp";
/// The request header with the hex HMAC-SHA256 signature.
pub const SIGNATURE_HEADER: &str = "x-harmony-signature";

/// The largest accepted difference between a request's timestamp and the receiver's clock.
pub const SKEW_MAX: Duration = Duration::from_secs(30);
/// The shortest cluster secret accepted, bytes.
pub const SECRET_BYTES_MIN: usize = 16;
/// Signatures remembered for replay detection, at most.
pub const REPLAY_MEMORY_MAX: usize = 65_536;

type HmacSha256 = Hmac<Sha256>;

/// The shared cluster secret. Its `Debug` never shows it.
#[derive(Clone)]
pub struct ClusterSecret(Vec<u8>);

impl std::fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClusterSecret(redacted, {} bytes)", self.0.len())
    }
}

impl ClusterSecret {
    /// Takes the secret's bytes; refuses one shorter than [`SECRET_BYTES_MIN`].
    pub fn new(secret: impl Into<Vec<u8>>) -> Result<Self, Error> {
        let secret = secret.into();
        if secret.len() < SECRET_BYTES_MIN {
            return Err(Error::SecretTooShort {
                len: secret.len(),
                min: SECRET_BYTES_MIN,
            });
        }
        Ok(ClusterSecret(secret))
    }

    fn mac(&self, timestamp: &str, body: &[u8]) -> HmacSha256 {
        // HMAC takes a key of any length; the constructor cannot fail.
        let mut mac = <HmacSha256 as KeyInit>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
        mac.update(timestamp.as_bytes());
        mac.update(b"\n");
        mac.update(body);
        mac
    }

    /// The hex signature of `body` sent at `timestamp` (the header's text).
    pub fn sign(&self, timestamp: &str, body: &[u8]) -> String {
        hex_encode(&self.mac(timestamp, body).finalize().into_bytes())
    }
}

/// Why a hint request was refused; each is a label of the refused counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Refusal {
    /// The signature is missing, not hex, or does not verify.
    BadSignature,
    /// The timestamp is outside [`SKEW_MAX`] of the receiver's clock.
    Stale,
    /// This signature was accepted before within the window (or the replay memory is full).
    Replay,
    /// The body is larger than the limit.
    TooLarge,
    /// A header or the body cannot be read.
    Malformed,
}

impl Refusal {
    /// The metric label and the JSON error's code.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::BadSignature => "bad_signature",
            Refusal::Stale => "stale",
            Refusal::Replay => "replay",
            Refusal::TooLarge => "too_large",
            Refusal::Malformed => "malformed",
        }
    }

    /// Every reason, for pre-registering the series.
    pub const ALL: [Refusal; 5] = [
        Refusal::BadSignature,
        Refusal::Stale,
        Refusal::Replay,
        Refusal::TooLarge,
        Refusal::Malformed,
    ];
}

/// Checks requests: timestamp, signature, replay. Shared by every request of one server.
pub struct Verifier {
    secret: ClusterSecret,
    seen: Mutex<Seen>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier").finish_non_exhaustive()
    }
}

/// Signatures accepted within the window, in arrival order.
#[derive(Default)]
struct Seen {
    set: HashSet<[u8; 32]>,
    order: VecDeque<(i64, [u8; 32])>,
}

impl Verifier {
    /// A verifier for `secret` with an empty replay memory.
    pub fn new(secret: ClusterSecret) -> Self {
        Verifier {
            secret,
            seen: Mutex::new(Seen::default()),
        }
    }

    /// Checks one request at `now_ms` (the receiver's clock, Unix milliseconds). On success the
    /// signature is remembered, so the same request is refused as a replay from then on.
    pub fn check(
        &self,
        timestamp: Option<&str>,
        signature: Option<&str>,
        body: &[u8],
        now_ms: i64,
    ) -> Result<(), Refusal> {
        let timestamp = timestamp.ok_or(Refusal::Malformed)?;
        let ts: i64 = timestamp.trim().parse().map_err(|_| Refusal::Malformed)?;
        let skew = i64::try_from(SKEW_MAX.as_millis()).unwrap_or(i64::MAX);
        if ts.abs_diff(now_ms) > skew.unsigned_abs() {
            return Err(Refusal::Stale);
        }
        let sig = signature
            .and_then(hex_decode_32)
            .ok_or(Refusal::BadSignature)?;
        self.secret
            .mac(timestamp, body)
            .verify_slice(&sig)
            .map_err(|_| Refusal::BadSignature)?;
        // Only a verified signature enters the memory, so forged requests cannot fill it.
        let mut seen = self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        while let Some(&(t, s)) = seen.order.front() {
            if t.saturating_add(skew) >= now_ms {
                break;
            }
            seen.order.pop_front();
            seen.set.remove(&s);
        }
        if seen.set.contains(&sig) || seen.set.len() >= REPLAY_MEMORY_MAX {
            return Err(Refusal::Replay);
        }
        seen.set.insert(sig);
        seen.order.push_back((ts, sig));
        Ok(())
    }
}

fn hex_encode(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

fn hex_decode_32(s: &str) -> Option<[u8; 32]> {
    let s = s.trim().as_bytes();
    if s.len() != 64 {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    let mut out = [0u8; 32];
    for (i, pair) in s.chunks_exact(2).enumerate() {
        out[i] = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret() -> ClusterSecret {
        ClusterSecret::new("0123456789abcdef-test").unwrap()
    }

    #[test]
    fn a_short_secret_is_refused() {
        let e = ClusterSecret::new("short").unwrap_err();
        assert!(e.to_string().contains("16"), "{e}");
        assert!(!format!("{:?}", secret()).contains("0123"));
    }

    #[test]
    fn a_signed_request_verifies_once() {
        let v = Verifier::new(secret());
        let now = 1_800_000_000_000;
        let ts = now.to_string();
        let sig = secret().sign(&ts, b"body");
        assert_eq!(sig.len(), 64);
        assert_eq!(v.check(Some(&ts), Some(&sig), b"body", now + 5), Ok(()));
        assert_eq!(
            v.check(Some(&ts), Some(&sig), b"body", now + 6),
            Err(Refusal::Replay)
        );
        // Upper-case hex is the same signature: still a replay.
        assert_eq!(
            v.check(Some(&ts), Some(&sig.to_uppercase()), b"body", now + 7),
            Err(Refusal::Replay)
        );
    }

    #[test]
    fn forged_and_tampered_requests_are_refused() {
        let v = Verifier::new(secret());
        let now = 1_800_000_000_000;
        let ts = now.to_string();
        let other = ClusterSecret::new("another-secret-of-the-same-size").unwrap();
        let forged = other.sign(&ts, b"body");
        assert_eq!(
            v.check(Some(&ts), Some(&forged), b"body", now),
            Err(Refusal::BadSignature)
        );
        let sig = secret().sign(&ts, b"body");
        assert_eq!(
            v.check(Some(&ts), Some(&sig), b"bodY", now),
            Err(Refusal::BadSignature)
        );
        // The timestamp is signed too: moving it breaks the signature.
        let later = (now + 1).to_string();
        assert_eq!(
            v.check(Some(&later), Some(&sig), b"body", now),
            Err(Refusal::BadSignature)
        );
        assert_eq!(
            v.check(Some(&ts), Some("zz"), b"body", now),
            Err(Refusal::BadSignature)
        );
        assert_eq!(
            v.check(Some(&ts), None, b"body", now),
            Err(Refusal::BadSignature)
        );
        assert_eq!(
            v.check(None, Some(&sig), b"body", now),
            Err(Refusal::Malformed)
        );
        assert_eq!(
            v.check(Some("yesterday"), Some(&sig), b"body", now),
            Err(Refusal::Malformed)
        );
        // After all that, the genuine request still passes.
        assert_eq!(v.check(Some(&ts), Some(&sig), b"body", now), Ok(()));
    }

    #[test]
    fn stale_timestamps_are_refused_both_ways() {
        let v = Verifier::new(secret());
        let now = 1_800_000_000_000i64;
        let skew = SKEW_MAX.as_millis() as i64;
        for ts in [now - skew - 1, now + skew + 1] {
            let t = ts.to_string();
            let sig = secret().sign(&t, b"x");
            assert_eq!(
                v.check(Some(&t), Some(&sig), b"x", now),
                Err(Refusal::Stale)
            );
        }
        for ts in [now - skew, now + skew] {
            let t = ts.to_string();
            let sig = secret().sign(&t, b"x");
            assert_eq!(v.check(Some(&t), Some(&sig), b"x", now), Ok(()));
        }
    }

    #[test]
    fn the_replay_memory_forgets_only_what_staleness_refuses() {
        let v = Verifier::new(secret());
        let now = 1_800_000_000_000i64;
        let skew = SKEW_MAX.as_millis() as i64;
        let t = now.to_string();
        let sig = secret().sign(&t, b"x");
        assert_eq!(v.check(Some(&t), Some(&sig), b"x", now), Ok(()));
        // Still inside the window: remembered.
        assert_eq!(
            v.check(Some(&t), Some(&sig), b"x", now + skew),
            Err(Refusal::Replay)
        );
        // Past it: forgotten, and refused as stale instead.
        assert_eq!(
            v.check(Some(&t), Some(&sig), b"x", now + skew + 1),
            Err(Refusal::Stale)
        );
        assert!(v.seen.lock().unwrap().set.len() <= 1);
        let fresh = (now + skew + 2).to_string();
        let sig2 = secret().sign(&fresh, b"x");
        assert_eq!(
            v.check(Some(&fresh), Some(&sig2), b"x", now + skew + 2),
            Ok(())
        );
        assert_eq!(v.seen.lock().unwrap().set.len(), 1);
    }

    #[test]
    fn hex_round_trips() {
        let bytes: Vec<u8> = (0u8..32).map(|i| i.wrapping_mul(37)).collect();
        let s = hex_encode(&bytes);
        assert_eq!(hex_decode_32(&s).unwrap().to_vec(), bytes);
        assert_eq!(hex_decode_32(&s[..62]), None);
    }
}
