//! The warm pool as the API describes it: per image and machine size, how many sandboxes the
//! daemon keeps restored ahead of demand ([`PoolSetRequest`]), and what it has now
//! ([`PoolInfo`]). Must not: know how pooled sandboxes are made (that is `kiln-core`).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::names::{ImageName, InvalidInput};
use crate::sandbox::MachineSpec;

/// Most sandboxes one pool may keep.
pub const MAX_POOL_SIZE: u32 = 32;
/// Longest warm-up command (arguments).
pub const MAX_WARMUP_ARGS: usize = 64;
/// Longest a warm-up command may run (seconds).
pub const MAX_WARMUP_TIMEOUT_SECS: u64 = 600;

/// `PUT /v1/pools/{image}`: the pool of one image and machine size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PoolSetRequest {
    /// Sandboxes to keep ready (0 removes the pool; at most 32).
    pub size: u32,
    /// vCPUs of the pooled sandboxes (default: the image's, else 1). A start takes from the
    /// pool only when it asks for exactly this machine size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    /// Memory of the pooled sandboxes in MiB (default: the image's, else 256).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u32>,
    /// A command each pooled sandbox runs once after its restore, before it is ready (e.g.
    /// the language's interpreter once, so that the emulator has translated its hot code
    /// before a job arrives). Must exit 0, else the sandbox is discarded. Without one, a
    /// pooled sandbox of a language's image runs the language's warm-up (`GET
    /// /v1/languages`: `python3 -c pass`, ...), any other `true`, once (and is pooled even if
    /// that fails).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup: Option<Vec<String>>,
    /// Longest the warm-up may run, seconds (default 60).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup_timeout_secs: Option<u64>,
}

impl PoolSetRequest {
    /// Checks the ranges; the error names the field.
    pub fn validate(&self) -> Result<(), InvalidInput> {
        if self.size > MAX_POOL_SIZE {
            return Err(InvalidInput::Range {
                field: "size",
                min: 0,
                max: MAX_POOL_SIZE.into(),
                got: self.size.into(),
            });
        }
        // The sizes given are checked here; the defaults are valid.
        MachineSpec {
            cpus: self.cpus.unwrap_or(crate::DEFAULT_CPUS),
            memory_mib: self.memory_mib.unwrap_or(crate::DEFAULT_MEMORY_MIB),
            screen: None,
        }
        .validate()?;
        if let Some(w) = &self.warmup {
            if w.is_empty() || w.len() > MAX_WARMUP_ARGS {
                return Err(InvalidInput::Range {
                    field: "warmup (arguments)",
                    min: 1,
                    max: MAX_WARMUP_ARGS as u64,
                    got: w.len() as u64,
                });
            }
            if w.iter().any(|a| a.contains('\0')) {
                return Err(InvalidInput::Rule(
                    "warmup arguments must not contain NUL bytes".into(),
                ));
            }
        }
        if let Some(t) = self.warmup_timeout_secs
            && !(1..=MAX_WARMUP_TIMEOUT_SECS).contains(&t)
        {
            return Err(InvalidInput::Range {
                field: "warmup_timeout_secs",
                min: 1,
                max: MAX_WARMUP_TIMEOUT_SECS,
                got: t,
            });
        }
        Ok(())
    }
}

/// One pool: what it should hold and what it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PoolInfo {
    /// The image.
    pub image: ImageName,
    /// Machine size of its sandboxes.
    pub machine: MachineSpec,
    /// Sandboxes it keeps ready.
    pub size: u32,
    /// Ready now (restored, identity applied, agent answering, warm-up done).
    pub ready: u32,
    /// Being restored now.
    pub filling: u32,
    /// Sandboxes handed out since the daemon started.
    pub handed_out: u64,
    /// Starts of this image and size that found the pool empty since the daemon started.
    pub misses: u64,
    /// The warm-up command, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warmup: Option<Vec<String>>,
    /// Where the size comes from: `api` (`kiln pool set`, kept in the store) or `config`
    /// (`[[pool]]` in config.toml).
    pub origin: PoolOrigin,
    /// Why the last refill failed, if it did (it is retried).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// Where a pool's size was set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PoolOrigin {
    /// `PUT /v1/pools/{image}` (`kiln pool set`); kept in the store across restarts.
    Api,
    /// The daemon's config file.
    Config,
}

/// `GET /v1/pools`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PoolList {
    /// Every pool, by image and machine size.
    pub pools: Vec<PoolInfo>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(size: u32) -> PoolSetRequest {
        PoolSetRequest {
            size,
            cpus: None,
            memory_mib: None,
            warmup: None,
            warmup_timeout_secs: None,
        }
    }

    #[test]
    fn validate_names_the_field_out_of_range() {
        assert!(req(0).validate().is_ok());
        assert!(req(MAX_POOL_SIZE).validate().is_ok());
        let e = req(MAX_POOL_SIZE + 1).validate().unwrap_err().to_string();
        assert!(e.contains("size") && e.contains("33"), "{e}");
        let e = PoolSetRequest {
            warmup: Some(vec![]),
            ..req(1)
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(e.contains("warmup"), "{e}");
        let e = PoolSetRequest {
            warmup_timeout_secs: Some(0),
            ..req(1)
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(e.contains("warmup_timeout_secs"), "{e}");
        let e = PoolSetRequest {
            cpus: Some(0),
            ..req(1)
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(e.contains("cpus"), "{e}");
    }

    #[test]
    fn request_rejects_unknown_fields_and_leaves_the_machine_to_the_image() {
        let r: PoolSetRequest = serde_json::from_str(r#"{"size": 2}"#).unwrap();
        assert_eq!((r.cpus, r.memory_mib), (None, None));
        assert!(serde_json::from_str::<PoolSetRequest>(r#"{"size": 2, "sise": 3}"#).is_err());
    }
}
