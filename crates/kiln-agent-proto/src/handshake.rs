//! The resync handshake: SYNC and SYNC_ACK bodies and version choice.
//!
//! Owns: [`SyncFrame`], [`SyncAckFrame`], [`AgentInfo`] and [`choose_version`].
//!
//! ```text
//!  SYNC body (19..=49 bytes)
//!   0                8                16      17
//!   +----------------+----------------+-------+---------------------------+
//!   |  "KILN-SYN"    | nonce (u64 LE) |   n   | n × version (u16 LE)      |
//!   +----------------+----------------+-------+---------------------------+
//!
//!  SYNC_ACK body (18..=8192 bytes)
//!   0                8                16              18
//!   +----------------+----------------+---------------+-------------------+
//!   |  "KILN-ACK"    | nonce (u64 LE) | version u16LE | AgentInfo JSON    |
//!   +----------------+----------------+---------------+-------------------+
//! ```
//!
//! The host sends SYNC with a fresh nonce (and may resend with newer nonces while the guest
//! boots); it discards every byte until the SYNC_ACK carrying its most recent nonce. The guest,
//! on every SYNC, drops its whole previous session and answers SYNC_ACK with the same nonce and
//! the version it chose ([`choose_version`]); version 0 means "no common version".
//!
//! Invariants: the 8-byte body magics make a SYNC/SYNC_ACK recognisable when hunting through
//! garbage; a body that parses always re-encodes to the same bytes modulo JSON formatting.

use bytes::{BufMut, BytesMut};
use serde::{Deserialize, Serialize};

use crate::MAX_OFFERED_VERSIONS;
use crate::error::ProtoError;
use crate::frame::{FrameKind, SYNC_ACK_FIXED_LEN, SYNC_FIXED_LEN};

/// First eight bytes of every SYNC body.
pub const SYNC_MAGIC: [u8; 8] = *b"KILN-SYN";
/// First eight bytes of every SYNC_ACK body.
pub const SYNC_ACK_MAGIC: [u8; 8] = *b"KILN-ACK";

/// Host → guest: "forget everything, start a session identified by `nonce`".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncFrame {
    /// Fresh random value identifying this attempt; echoed by the SYNC_ACK.
    pub nonce: u64,
    /// Protocol versions the host can speak (1 ..= [`MAX_OFFERED_VERSIONS`] entries).
    pub versions: Vec<u16>,
}

impl SyncFrame {
    pub(crate) fn encode_body(&self, dst: &mut BytesMut) -> Result<(), ProtoError> {
        let count = self.versions.len();
        if count == 0 || count > MAX_OFFERED_VERSIONS {
            return Err(ProtoError::BadVersionList {
                count: u8::try_from(count).unwrap_or(u8::MAX),
                len: SYNC_FIXED_LEN + 2 * count,
            });
        }
        dst.put_slice(&SYNC_MAGIC);
        dst.put_u64_le(self.nonce);
        // Cannot truncate: count <= MAX_OFFERED_VERSIONS (16).
        dst.put_u8(count as u8);
        for v in &self.versions {
            dst.put_u16_le(*v);
        }
        Ok(())
    }

    pub(crate) fn decode_body(body: &[u8]) -> Result<SyncFrame, ProtoError> {
        if body.len() < SYNC_FIXED_LEN || body[..8] != SYNC_MAGIC {
            return Err(ProtoError::BadSyncMagic {
                kind: FrameKind::Sync,
            });
        }
        let nonce = read_u64(&body[8..16]);
        let count = body[16];
        let rest = &body[SYNC_FIXED_LEN..];
        if count == 0
            || usize::from(count) > MAX_OFFERED_VERSIONS
            || rest.len() != 2 * usize::from(count)
        {
            return Err(ProtoError::BadVersionList {
                count,
                len: body.len(),
            });
        }
        let versions = rest
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        Ok(SyncFrame { nonce, versions })
    }
}

/// Guest → host: "the session for `nonce` has started, speaking `version`".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncAckFrame {
    /// The nonce of the SYNC being answered.
    pub nonce: u64,
    /// The version the guest chose; 0 if it shares none with the host's offer.
    pub version: u16,
    /// What the agent is.
    pub info: AgentInfo,
}

impl SyncAckFrame {
    pub(crate) fn encode_body(&self, dst: &mut BytesMut) -> Result<(), ProtoError> {
        let json = serde_json::to_vec(&self.info).map_err(|e| ProtoError::EncodeJson {
            what: "agent info",
            source: e.into(),
        })?;
        dst.put_slice(&SYNC_ACK_MAGIC);
        dst.put_u64_le(self.nonce);
        dst.put_u16_le(self.version);
        dst.put_slice(&json);
        Ok(())
    }

    pub(crate) fn decode_body(body: &[u8]) -> Result<SyncAckFrame, ProtoError> {
        if body.len() < SYNC_ACK_FIXED_LEN || body[..8] != SYNC_ACK_MAGIC {
            return Err(ProtoError::BadSyncMagic {
                kind: FrameKind::SyncAck,
            });
        }
        let nonce = read_u64(&body[8..16]);
        let version = u16::from_le_bytes([body[16], body[17]]);
        let info = serde_json::from_slice(&body[SYNC_ACK_FIXED_LEN..]).map_err(|e| {
            ProtoError::InvalidJson {
                what: "agent info",
                source: e.into(),
            }
        })?;
        Ok(SyncAckFrame {
            nonce,
            version,
            info,
        })
    }
}

fn read_u64(b: &[u8]) -> u64 {
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&b[..8]);
    u64::from_le_bytes(raw)
}

/// What the guest agent tells the host about itself in SYNC_ACK. Unknown fields are ignored
/// and every field added later must have a default, so old and new hosts both parse it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentInfo {
    /// The agent's crate version.
    pub agent_version: String,
    /// The agent's pid in the guest (1 when it is init).
    pub pid: u32,
    /// The guest kernel release (`uname -r`), if known.
    #[serde(default)]
    pub kernel_release: Option<String>,
    /// Optional capabilities beyond the version's baseline (e.g. `"exec"`); lets a host probe
    /// for additions without a version bump.
    #[serde(default)]
    pub features: Vec<String>,
}

/// The version a guest supporting `ours` picks from a host's `offered` list: the highest one
/// both support, or `None`.
pub fn choose_version(offered: &[u16], ours: &[u16]) -> Option<u16> {
    offered
        .iter()
        .copied()
        .filter(|v| *v != 0 && ours.contains(v))
        .max()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choose_version_picks_highest_common() {
        assert_eq!(choose_version(&[1, 2, 3], &[2, 3, 4]), Some(3));
        assert_eq!(choose_version(&[5], &[1]), None);
        assert_eq!(choose_version(&[0], &[0, 1]), None);
    }

    #[test]
    fn sync_body_with_wrong_count_is_rejected() {
        let mut body = BytesMut::new();
        SyncFrame {
            nonce: 1,
            versions: vec![1, 2],
        }
        .encode_body(&mut body)
        .expect("valid sync");
        body[16] = 3;
        assert!(matches!(
            SyncFrame::decode_body(&body),
            Err(ProtoError::BadVersionList { count: 3, .. })
        ));
    }

    #[test]
    fn sync_encode_without_versions_fails() {
        let mut body = BytesMut::new();
        let sync = SyncFrame {
            nonce: 1,
            versions: vec![],
        };
        assert!(sync.encode_body(&mut body).is_err());
    }

    #[test]
    fn agent_info_ignores_unknown_fields() {
        let info: AgentInfo =
            serde_json::from_str(r#"{"agent_version":"9","pid":1,"future":true}"#)
                .expect("unknown fields are ignored");
        assert_eq!(info.pid, 1);
        assert!(info.features.is_empty());
    }
}
