//! The guest identity a host hands the agent after every snapshot restore.
//!
//! Owns: [`GuestIdentity`] (the `apply_identity` request body), [`IdentityAck`] (its answer),
//! the validated value types [`RestoreId`], [`Entropy`], [`UnixNanos`], [`Hostname`],
//! [`MachineId`], and [`IdentityError`].
//!
//! ```text
//!  host                                                guest agent
//!   │ restore VM, connect: SYNC ──────────────────▶     new session
//!   │ ◀──────────────────── SYNC_ACK (features: "identity-v1")
//!   │ apply_identity {restore_id, entropy, wall_clock_unix_ns, hostname, machine_id}
//!   │   ─────────────────────────────────────────▶     1. RNG: add (credit) entropy, reseed
//!   │                                                   2. clock_settime(CLOCK_REALTIME)
//!   │                                                   3. sethostname
//!   │                                                   4. /etc/machine-id (temp + rename)
//!   │                                                   5. remember restore id (file, env)
//!   │ ◀──── identity_applied {restore_id (echo), entropy_credited, rng_reseeded, ...}
//!   │       or error {code: identity_failed, message names the failed step}
//!   │ only now: exec, ...
//! ```
//!
//! Invariants:
//! - Every value type validates on construction **and** on deserialisation
//!   (`#[serde(try_from)]`), so a hostile or buggy value fails to parse as a whole message
//!   (the agent answers `bad_request`) and no half-valid identity ever reaches the agent logic.
//! - Validation errors never echo the offending value (it may be huge or binary); they name
//!   the field and the rule.
//! - [`Entropy`]'s `Debug` never prints the bytes: they seed the guest's RNG.
//! - JSON encodings: ids and entropy are lowercase hex strings, the clock a JSON integer.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Feature string in [`crate::AgentInfo::features`] of an agent that understands
/// `apply_identity` as described here.
pub const FEATURE_IDENTITY_V1: &str = "identity-v1";

/// Length of a [`RestoreId`] and a [`MachineId`] in hex characters (128 bits).
pub const ID_HEX_LEN: usize = 32;
/// Fewest entropy bytes an identity may carry (256 bits).
pub const MIN_ENTROPY_BYTES: usize = 32;
/// Most entropy bytes an identity may carry.
pub const MAX_ENTROPY_BYTES: usize = 512;
/// Longest hostname (one RFC 1123 label).
pub const MAX_HOSTNAME_LEN: usize = 63;
/// Earliest accepted wall clock, 2000-01-01T00:00:00Z in unix nanoseconds. Anything earlier
/// is a host bug (typically seconds or milliseconds passed as nanoseconds).
pub const MIN_WALL_CLOCK_NS: u64 = 946_684_800 * 1_000_000_000;
/// Latest accepted wall clock: `i64::MAX` nanoseconds (2262-04-11), the most a signed
/// nanosecond clock can represent.
pub const MAX_WALL_CLOCK_NS: u64 = i64::MAX as u64;

/// An identity value that breaks its rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// A 128-bit id is not exactly 32 lowercase hex digits.
    #[error("{field} must be {ID_HEX_LEN} lowercase hex digits (got {len} characters)")]
    BadId {
        /// Which field.
        field: &'static str,
        /// Its length in bytes.
        len: usize,
    },
    /// The machine id is all zeros (systemd treats that as "unset").
    #[error("machine_id must not be all zeros")]
    ZeroMachineId,
    /// The entropy string is not lowercase hex of even length.
    #[error("entropy must be lowercase hex")]
    BadEntropyHex,
    /// The entropy has too few or too many bytes.
    #[error("entropy must be {MIN_ENTROPY_BYTES}..={MAX_ENTROPY_BYTES} bytes (got {len} bytes)")]
    EntropyLength {
        /// Number of bytes (for hex input: half the characters, rounded down).
        len: usize,
    },
    /// The hostname breaks RFC 1123 label syntax.
    #[error("hostname {reason} (got {len} characters)")]
    BadHostname {
        /// The rule it breaks.
        reason: &'static str,
        /// Its length in bytes.
        len: usize,
    },
    /// The wall clock is outside [`MIN_WALL_CLOCK_NS`]`..=`[`MAX_WALL_CLOCK_NS`].
    #[error(
        "wall_clock_unix_ns {ns} is outside {MIN_WALL_CLOCK_NS}..={MAX_WALL_CLOCK_NS} (not nanoseconds?)"
    )]
    WallClockRange {
        /// The value.
        ns: u64,
    },
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn check_id(field: &'static str, s: &str) -> Result<(), IdentityError> {
    if s.len() != ID_HEX_LEN || !is_lower_hex(s) {
        return Err(IdentityError::BadId {
            field,
            len: s.len(),
        });
    }
    Ok(())
}

/// Lowercase hex of `bytes`.
fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
}

/// Identifies one restore of a snapshot: 32 lowercase hex digits (128 bits), chosen by the
/// host, fresh for every restore. Commands in the guest see it as `KILN_RESTORE_ID` and in
/// `/run/kiln/restore-id`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RestoreId(String);

impl RestoreId {
    /// Validates a textual id.
    pub fn new(s: impl Into<String>) -> Result<RestoreId, IdentityError> {
        let s = s.into();
        check_id("restore_id", &s)?;
        Ok(RestoreId(s))
    }

    /// The id of 16 random bytes (the host supplies the randomness).
    pub fn from_bytes(bytes: [u8; 16]) -> RestoreId {
        RestoreId(to_hex(&bytes))
    }

    /// The 32 hex digits.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A 128-bit machine id in `/etc/machine-id` format: 32 lowercase hex digits, not all zero.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MachineId(String);

impl MachineId {
    /// Validates a textual machine id.
    pub fn new(s: impl Into<String>) -> Result<MachineId, IdentityError> {
        let s = s.into();
        check_id("machine_id", &s)?;
        if s.bytes().all(|b| b == b'0') {
            return Err(IdentityError::ZeroMachineId);
        }
        Ok(MachineId(s))
    }

    /// The machine id of 16 random bytes (the host supplies the randomness).
    pub fn from_bytes(bytes: [u8; 16]) -> Result<MachineId, IdentityError> {
        MachineId::new(to_hex(&bytes))
    }

    /// The 32 hex digits.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A hostname that is one RFC 1123 label: 1..=63 ASCII letters, digits and `-`, neither
/// starting nor ending with `-`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Hostname(String);

impl Hostname {
    /// Validates a hostname.
    pub fn new(s: impl Into<String>) -> Result<Hostname, IdentityError> {
        let s = s.into();
        let bad = |reason| IdentityError::BadHostname {
            reason,
            len: s.len(),
        };
        if s.is_empty() {
            return Err(bad("must not be empty"));
        }
        if s.len() > MAX_HOSTNAME_LEN {
            return Err(bad("must be at most 63 characters"));
        }
        if !s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(bad("may contain only ascii letters, digits and '-'"));
        }
        if s.starts_with('-') || s.ends_with('-') {
            return Err(bad("must not start or end with '-'"));
        }
        Ok(Hostname(s))
    }

    /// The hostname.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Bytes for the guest kernel's RNG: [`MIN_ENTROPY_BYTES`]`..=`[`MAX_ENTROPY_BYTES`], from
/// the host's CSPRNG, fresh for every restore. Lowercase hex on the wire. `Debug` shows only
/// the length.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Entropy(Vec<u8>);

impl Entropy {
    /// Checks the length.
    pub fn new(bytes: Vec<u8>) -> Result<Entropy, IdentityError> {
        if !(MIN_ENTROPY_BYTES..=MAX_ENTROPY_BYTES).contains(&bytes.len()) {
            return Err(IdentityError::EntropyLength { len: bytes.len() });
        }
        Ok(Entropy(bytes))
    }

    /// Parses lowercase hex (length checked before anything is allocated).
    pub fn from_hex(s: &str) -> Result<Entropy, IdentityError> {
        let len = s.len() / 2;
        if !(MIN_ENTROPY_BYTES..=MAX_ENTROPY_BYTES).contains(&len) {
            return Err(IdentityError::EntropyLength { len });
        }
        if !s.len().is_multiple_of(2) || !is_lower_hex(s) {
            return Err(IdentityError::BadEntropyHex);
        }
        let nibble = |b: u8| match b {
            b'0'..=b'9' => b - b'0',
            // Only a..=f remain: checked above.
            _ => b - b'a' + 10,
        };
        let bytes = s
            .as_bytes()
            .chunks_exact(2)
            .map(|p| (nibble(p[0]) << 4) | nibble(p[1]))
            .collect();
        Ok(Entropy(bytes))
    }

    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Entropy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Entropy(<{} bytes>)", self.0.len())
    }
}

/// Wall-clock time as nanoseconds since the unix epoch (UTC), within
/// [`MIN_WALL_CLOCK_NS`]`..=`[`MAX_WALL_CLOCK_NS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "u64", into = "u64")]
pub struct UnixNanos(u64);

impl UnixNanos {
    /// Checks the range.
    pub fn new(ns: u64) -> Result<UnixNanos, IdentityError> {
        if !(MIN_WALL_CLOCK_NS..=MAX_WALL_CLOCK_NS).contains(&ns) {
            return Err(IdentityError::WallClockRange { ns });
        }
        Ok(UnixNanos(ns))
    }

    /// The host's current wall clock (`SystemTime::now()`).
    pub fn now() -> Result<UnixNanos, IdentityError> {
        let ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        UnixNanos::new(ns)
    }

    /// Nanoseconds since the epoch.
    pub fn as_nanos(self) -> u64 {
        self.0
    }

    /// Whole seconds and the nanosecond remainder (for a `timespec`).
    pub fn as_secs_nanos(self) -> (u64, u32) {
        // The remainder is < 10^9 and fits.
        (self.0 / 1_000_000_000, (self.0 % 1_000_000_000) as u32)
    }
}

macro_rules! string_conversions {
    ($($ty:ident),*) => {$(
        impl TryFrom<String> for $ty {
            type Error = IdentityError;
            fn try_from(s: String) -> Result<$ty, IdentityError> {
                $ty::new(s)
            }
        }
        impl From<$ty> for String {
            fn from(v: $ty) -> String {
                v.0
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl fmt::Debug for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($ty), self.0)
            }
        }
    )*};
}
string_conversions!(RestoreId, MachineId, Hostname);

impl TryFrom<String> for Entropy {
    type Error = IdentityError;
    fn try_from(s: String) -> Result<Entropy, IdentityError> {
        Entropy::from_hex(&s)
    }
}

impl From<Entropy> for String {
    fn from(e: Entropy) -> String {
        to_hex(&e.0)
    }
}

impl TryFrom<u64> for UnixNanos {
    type Error = IdentityError;
    fn try_from(ns: u64) -> Result<UnixNanos, IdentityError> {
        UnixNanos::new(ns)
    }
}

impl From<UnixNanos> for u64 {
    fn from(t: UnixNanos) -> u64 {
        t.0
    }
}

/// The new identity for a restored guest: body of the `apply_identity` request. All fields
/// are required; every value is validated when parsed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestIdentity {
    /// Fresh id of this restore; echoed in the [`IdentityAck`].
    pub restore_id: RestoreId,
    /// Fresh bytes from the host's CSPRNG for the guest kernel's RNG.
    pub entropy: Entropy,
    /// The host's wall clock, sampled just before sending.
    pub wall_clock_unix_ns: UnixNanos,
    /// The guest's new hostname.
    pub hostname: Hostname,
    /// The guest's new `/etc/machine-id`.
    pub machine_id: MachineId,
}

/// Successful answer to `apply_identity`: every step ran, in order. A step that fails makes
/// the agent answer `identity_failed` instead (naming the step and what was already applied).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityAck {
    /// The request's restore id, echoed.
    pub restore_id: RestoreId,
    /// `true`: the entropy was added with `RNDADDENTROPY` (mixed in and credited);
    /// `false`: written to `/dev/urandom` (mixed in, not credited).
    pub entropy_credited: bool,
    /// `true`: `RNDRESEEDCRNG` re-keyed the kernel's CRNG from the pool, so random numbers
    /// differ from every other clone of the snapshot from now on. `false`: the CRNG picks up
    /// the new entropy only at its next scheduled reseed (up to a minute).
    pub rng_reseeded: bool,
    /// The wall clock was set.
    pub clock_set: bool,
    /// How far the clock moved (new − old), in nanoseconds, saturating.
    #[serde(default)]
    pub clock_step_ns: i64,
    /// The hostname was set.
    pub hostname_set: bool,
    /// `/etc/machine-id` was replaced.
    pub machine_id_written: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostname_rules_are_enforced() {
        assert!(Hostname::new("sbx-01").is_ok());
        assert!(Hostname::new("A").is_ok());
        assert!(Hostname::new("a".repeat(63)).is_ok());
        for bad in ["", "-a", "a-", "a.b", "a_b", "a b", "ä", "a\0"] {
            assert!(Hostname::new(bad).is_err(), "{bad:?} accepted");
        }
        assert!(matches!(
            Hostname::new("a".repeat(64)),
            Err(IdentityError::BadHostname { len: 64, .. })
        ));
    }

    #[test]
    fn ids_must_be_32_lowercase_hex() {
        let good = "0123456789abcdef0123456789abcdef";
        assert!(RestoreId::new(good).is_ok());
        assert!(MachineId::new(good).is_ok());
        for bad in [
            "",
            &good[1..],
            &format!("{good}0"),
            &good.to_uppercase(),
            "0123456789abcdef0123456789abcdeg",
        ] {
            assert!(RestoreId::new(bad).is_err(), "{bad:?} accepted");
            assert!(MachineId::new(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(
            MachineId::new("0".repeat(32)),
            Err(IdentityError::ZeroMachineId)
        );
        assert_eq!(RestoreId::from_bytes([0xab; 16]).as_str(), "ab".repeat(16));
    }

    #[test]
    fn entropy_bounds_and_hex_are_enforced() {
        assert!(Entropy::new(vec![0; 32]).is_ok());
        assert!(Entropy::new(vec![0; 512]).is_ok());
        assert_eq!(
            Entropy::new(vec![0; 31]),
            Err(IdentityError::EntropyLength { len: 31 })
        );
        assert_eq!(
            Entropy::new(vec![0; 513]),
            Err(IdentityError::EntropyLength { len: 513 })
        );
        let e = Entropy::from_hex(&"0f".repeat(32)).expect("valid");
        assert_eq!(e.as_bytes(), &[0x0f; 32]);
        assert_eq!(String::from(e), "0f".repeat(32));
        assert_eq!(
            Entropy::from_hex(&"0F".repeat(32)),
            Err(IdentityError::BadEntropyHex)
        );
        assert_eq!(
            Entropy::from_hex(&format!("{}0", "00".repeat(32))),
            Err(IdentityError::BadEntropyHex)
        );
        assert_eq!(
            Entropy::from_hex(&"zz".repeat(32)),
            Err(IdentityError::BadEntropyHex)
        );
        assert!(matches!(
            Entropy::from_hex(&"00".repeat(4096)),
            Err(IdentityError::EntropyLength { len: 4096 })
        ));
    }

    #[test]
    fn entropy_debug_hides_bytes() {
        let e = Entropy::new(vec![0x42; 40]).expect("valid");
        assert_eq!(format!("{e:?}"), "Entropy(<40 bytes>)");
    }

    #[test]
    fn wall_clock_range_is_enforced() {
        assert!(UnixNanos::new(MIN_WALL_CLOCK_NS).is_ok());
        assert!(UnixNanos::new(MAX_WALL_CLOCK_NS).is_ok());
        // Seconds or milliseconds passed as nanoseconds.
        assert!(UnixNanos::new(1_767_225_600).is_err());
        assert!(UnixNanos::new(1_767_225_600_000).is_err());
        assert!(UnixNanos::new(u64::MAX).is_err());
        assert_eq!(
            UnixNanos::new(1_767_225_600_123_456_789)
                .expect("valid")
                .as_secs_nanos(),
            (1_767_225_600, 123_456_789)
        );
        assert!(UnixNanos::now().is_ok());
    }

    #[test]
    fn error_messages_do_not_echo_values() {
        let huge = "x".repeat(10_000);
        for e in [
            Hostname::new(huge.clone()).err(),
            RestoreId::new(huge.clone()).err(),
            Entropy::from_hex(&huge).err(),
        ] {
            let msg = e.expect("rejected").to_string();
            assert!(msg.len() < 200 && !msg.contains("xxx"), "{msg}");
        }
    }
}
