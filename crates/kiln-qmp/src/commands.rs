//! Typed QMP commands.
//!
//! Each command is a type implementing [`QmpCommand`]: its fields serialize to the command's
//! `arguments` (a unit struct sends none) and `Returns` is what its `return` decodes into.
//! Only the fields kiln uses are modelled; unknown fields in replies are ignored, so newer
//! QEMUs that add fields keep working. Names follow QEMU 7.2's schema (`qapi/*.json`).

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// A QMP command: its wire name and the type its `return` value decodes into.
pub trait QmpCommand: Serialize {
    /// The command name (`execute` field).
    const NAME: &'static str;
    /// The type of the `return` value.
    type Returns: DeserializeOwned;
}

/// The empty `return` (`{}`) of commands that return nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub struct Empty {}

/// Declares a string-valued QAPI enum that tolerates values this version does not know.
macro_rules! qapi_str_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $variant:ident = $wire:literal,)* }) => {
        $(#[$m])*
        #[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
        #[serde(from = "String")]
        pub enum $name {
            $($(#[$vm])* $variant,)*
            /// A value this client does not know (a newer QEMU).
            Other(String),
        }

        impl From<String> for $name {
            fn from(s: String) -> Self {
                match s.as_str() {
                    $($wire => $name::$variant,)*
                    _ => $name::Other(s),
                }
            }
        }

        impl $name {
            /// The wire spelling.
            pub fn as_str(&self) -> &str {
                match self {
                    $($name::$variant => $wire,)*
                    $name::Other(s) => s,
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

qapi_str_enum! {
    /// The VM's run state (`RunState`).
    RunState {
        /// QEMU is being debugged.
        Debug = "debug",
        /// Waiting for an incoming migration.
        InMigrate = "inmigrate",
        /// An internal error stopped the VM (e.g. `KVM internal error`).
        InternalError = "internal-error",
        /// An I/O error stopped the VM.
        IoError = "io-error",
        /// Paused by `stop` (or after an incoming migration completed).
        Paused = "paused",
        /// Stopped after an outgoing migration.
        PostMigrate = "postmigrate",
        /// Not started yet (`-S`).
        Prelaunch = "prelaunch",
        /// Finishing an outgoing migration.
        FinishMigrate = "finish-migrate",
        /// Restoring a savevm snapshot.
        RestoreVm = "restore-vm",
        /// Running.
        Running = "running",
        /// Saving a savevm snapshot.
        SaveVm = "save-vm",
        /// The guest shut down (with `-no-shutdown`).
        Shutdown = "shutdown",
        /// The guest is suspended (S3).
        Suspended = "suspended",
        /// A watchdog fired.
        Watchdog = "watchdog",
        /// The guest panicked.
        GuestPanicked = "guest-panicked",
        /// COLO fault tolerance.
        Colo = "colo",
    }
}

qapi_str_enum! {
    /// State of a migration (`MigrationStatus`).
    MigrationStatus {
        /// No migration has run.
        None = "none",
        /// Setting up.
        Setup = "setup",
        /// Being cancelled.
        Cancelling = "cancelling",
        /// Cancelled.
        Cancelled = "cancelled",
        /// Transferring.
        Active = "active",
        /// Postcopy transfer.
        PostcopyActive = "postcopy-active",
        /// Postcopy paused.
        PostcopyPaused = "postcopy-paused",
        /// Postcopy recovering.
        PostcopyRecover = "postcopy-recover",
        /// Finished successfully.
        Completed = "completed",
        /// Failed; see `error-desc`.
        Failed = "failed",
        /// COLO.
        Colo = "colo",
        /// Paused before switchover.
        PreSwitchover = "pre-switchover",
        /// Migrating device state.
        Device = "device",
        /// Waiting for unplug.
        WaitUnplug = "wait-unplug",
    }
}

/// `query-status`: the VM's run state.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct QueryStatus;

/// Reply of [`QueryStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct StatusInfo {
    /// True when vCPUs are running.
    pub running: bool,
    /// The run state.
    pub status: RunState,
}

impl QmpCommand for QueryStatus {
    const NAME: &'static str = "query-status";
    type Returns = StatusInfo;
}

/// `stop`: pauses the vCPUs.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Stop;

impl QmpCommand for Stop {
    const NAME: &'static str = "stop";
    type Returns = Empty;
}

/// `cont`: resumes the vCPUs.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Cont;

impl QmpCommand for Cont {
    const NAME: &'static str = "cont";
    type Returns = Empty;
}

/// `screendump`: writes the display's current frame to a host file, as binary PPM (P6).
/// kiln never asks QEMU for PNG: 7.1's PNG writer crashed QEMU and 7.2's swaps red and blue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Screendump {
    /// The host file QEMU writes (replaced if it exists).
    pub filename: String,
}

impl QmpCommand for Screendump {
    const NAME: &'static str = "screendump";
    type Returns = Empty;
}

/// `input-send-event`: injects input events (`InputEvent`: `key`, `btn`, `abs`, `rel`) into
/// the guest's input devices, in order, as one batch.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InputSendEvent {
    /// The events, each `{"type": ..., "data": ...}` as QEMU's schema spells it.
    pub events: Vec<serde_json::Value>,
}

impl QmpCommand for InputSendEvent {
    const NAME: &'static str = "input-send-event";
    type Returns = Empty;
}

/// `quit`: QEMU exits immediately (the reply may race the socket closing).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Quit;

impl QmpCommand for Quit {
    const NAME: &'static str = "quit";
    type Returns = Empty;
}

/// `system_powerdown`: sends an ACPI power button press to the guest.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct SystemPowerdown;

impl QmpCommand for SystemPowerdown {
    const NAME: &'static str = "system_powerdown";
    type Returns = Empty;
}

/// Name of the migration capability that skips shared RAM blocks (the fast-snapshot recipe).
pub const X_IGNORE_SHARED: &str = "x-ignore-shared";

/// One migration capability and its state (`MigrationCapabilityStatus`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationCapabilityStatus {
    /// Capability name, e.g. [`X_IGNORE_SHARED`]. A string because the set differs between
    /// QEMU versions.
    pub capability: String,
    /// Enabled?
    pub state: bool,
}

/// `query-migrate-capabilities`: every capability this QEMU knows, with its state.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct QueryMigrateCapabilities;

impl QmpCommand for QueryMigrateCapabilities {
    const NAME: &'static str = "query-migrate-capabilities";
    type Returns = Vec<MigrationCapabilityStatus>;
}

/// `migrate-set-capabilities`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MigrateSetCapabilities {
    /// Capabilities to set.
    pub capabilities: Vec<MigrationCapabilityStatus>,
}

impl QmpCommand for MigrateSetCapabilities {
    const NAME: &'static str = "migrate-set-capabilities";
    type Returns = Empty;
}

/// `migrate`: starts an outgoing migration; completion is reported by `query-migrate` and
/// `MIGRATION` events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Migrate {
    /// Destination, e.g. `exec:cat > /path/state` (QEMU 7.2 has no `file:` URIs).
    pub uri: String,
    /// Resume a paused postcopy migration.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resume: Option<bool>,
}

impl QmpCommand for Migrate {
    const NAME: &'static str = "migrate";
    type Returns = Empty;
}

/// `migrate-incoming`: starts an incoming migration on a QEMU started with `-incoming defer`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MigrateIncoming {
    /// Source, e.g. `exec:cat /path/state`.
    pub uri: String,
}

impl QmpCommand for MigrateIncoming {
    const NAME: &'static str = "migrate-incoming";
    type Returns = Empty;
}

/// `query-migrate`: the state of the current or last migration.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct QueryMigrate;

/// RAM statistics of a migration (`MigrationStats`, subset).
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationRamStats {
    /// Bytes transferred.
    pub transferred: Option<u64>,
    /// Bytes remaining.
    pub remaining: Option<u64>,
    /// Total bytes of RAM.
    pub total: Option<u64>,
    /// Throughput in Mbit/s.
    pub mbps: Option<f64>,
}

/// Reply of [`QueryMigrate`] (`MigrationInfo`, subset).
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationInfo {
    /// Absent before any migration ran.
    pub status: Option<MigrationStatus>,
    /// Milliseconds since the migration started (or total, once finished).
    pub total_time: Option<u64>,
    /// Downtime in milliseconds (once completed).
    pub downtime: Option<u64>,
    /// Setup time in milliseconds.
    pub setup_time: Option<u64>,
    /// Why it failed.
    pub error_desc: Option<String>,
    /// RAM statistics.
    pub ram: Option<MigrationRamStats>,
}

impl QmpCommand for QueryMigrate {
    const NAME: &'static str = "query-migrate";
    type Returns = MigrationInfo;
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn unit_commands_serialize_without_arguments() {
        assert_eq!(
            serde_json::to_value(Stop).ok(),
            Some(serde_json::Value::Null)
        );
        assert_eq!(
            serde_json::to_value(QueryStatus).ok(),
            Some(serde_json::Value::Null)
        );
    }

    #[test]
    fn migrate_set_capabilities_serializes_qapi_shape() {
        let cmd = MigrateSetCapabilities {
            capabilities: vec![MigrationCapabilityStatus {
                capability: X_IGNORE_SHARED.to_owned(),
                state: true,
            }],
        };
        assert_eq!(
            serde_json::to_value(&cmd).ok(),
            Some(json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]}))
        );
        let m = Migrate {
            uri: "exec:cat > /x".to_owned(),
            resume: None,
        };
        assert_eq!(
            serde_json::to_value(&m).ok(),
            Some(json!({"uri": "exec:cat > /x"}))
        );
    }

    #[test]
    fn status_info_unknown_run_state_is_kept() {
        let s: StatusInfo = serde_json::from_value(
            json!({"running": false, "singlestep": false, "status": "paused"}),
        )
        .expect("decodes");
        assert_eq!(s.status, RunState::Paused);
        let s: StatusInfo =
            serde_json::from_value(json!({"running": false, "status": "brand-new"}))
                .expect("decodes");
        assert_eq!(s.status, RunState::Other("brand-new".to_owned()));
        assert_eq!(s.status.to_string(), "brand-new");
    }

    #[test]
    fn migration_info_decodes_kebab_case_fields() {
        let info: MigrationInfo = serde_json::from_value(json!({
            "status": "completed", "total-time": 22, "downtime": 5, "setup-time": 1,
            "ram": {"transferred": 300000, "remaining": 0, "total": 268435456, "mbps": 1.5, "dirty-sync-count": 2}
        }))
        .expect("decodes");
        assert_eq!(info.status, Some(MigrationStatus::Completed));
        assert_eq!(info.total_time, Some(22));
        assert_eq!(info.ram.and_then(|r| r.transferred), Some(300000));
        let empty: MigrationInfo = serde_json::from_value(json!({})).expect("decodes");
        assert_eq!(empty.status, None);
    }
}
