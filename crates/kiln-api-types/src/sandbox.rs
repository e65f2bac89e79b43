//! A sandbox as the API describes it: the one typed [`SandboxSpec`] a client asks for, the
//! [`SandboxStatus`] the engine records, and the [`SandboxInfo`] that pairs them.
//!
//! The spec is carried unchanged from the request to the engine, the store (secret values
//! removed: [`SandboxSpec::redacted`]) and back in every [`SandboxInfo`]; nothing copies its
//! fields one by one. Must not: know how a spec becomes a VM (that is the engine's
//! `MachineSpec → VmConfig` function).
//!
//! Lifecycle ([`SandboxState`]):
//!
//! ```text
//!   creating ──ready──▶ running ◀──resume── paused
//!      │                  │  └────pause────▶  │
//!      │                  ▼                   ▼
//!      │               stopping ──saved──▶ stopped ──start──▶ creating
//!      │                  │  (save failed: back to running/paused; start failed: stopped)
//!      └──error──▶ failed ◀── QEMU died / agent lost / expired while failing
//!   any state ──rm──▶ removed (the row is gone; only the event says so)
//! ```

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::names::{ImageName, InvalidInput, Labels, SandboxName, SnapshotName, check_duration};
use crate::network::{NetworkSpec, NetworkStatus, Refusal};
use crate::{
    DEFAULT_CPUS, DEFAULT_IMAGE, DEFAULT_MEMORY_MIB, MAX_CPUS, MAX_MEMORY_MIB, MAX_PUBLISHED_PORTS,
    MIN_CPUS, MIN_MEMORY_MIB, PortMapping, SandboxId, Secrets,
};

/// The size of a sandbox's machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MachineSpec {
    /// Number of vCPUs.
    #[serde(default = "default_cpus")]
    pub cpus: u32,
    /// Guest memory in MiB.
    #[serde(default = "default_memory")]
    pub memory_mib: u32,
    /// A desktop sandbox's screen, `WIDTHxHEIGHT` (default: its image's, 1280x800 unless its
    /// recipe says otherwise). Only desktop images have one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub screen: Option<crate::desktop::Screen>,
}

fn default_cpus() -> u32 {
    DEFAULT_CPUS
}
fn default_memory() -> u32 {
    DEFAULT_MEMORY_MIB
}

impl Default for MachineSpec {
    fn default() -> Self {
        MachineSpec {
            cpus: DEFAULT_CPUS,
            memory_mib: DEFAULT_MEMORY_MIB,
            screen: None,
        }
    }
}

impl MachineSpec {
    /// Checks the ranges; the error names the field and the allowed range.
    pub fn validate(&self) -> Result<(), InvalidInput> {
        if !(MIN_CPUS..=MAX_CPUS).contains(&self.cpus) {
            return Err(InvalidInput::Range {
                field: "cpus",
                min: MIN_CPUS.into(),
                max: MAX_CPUS.into(),
                got: self.cpus.into(),
            });
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(InvalidInput::Range {
                field: "memory_mib",
                min: MIN_MEMORY_MIB.into(),
                max: MAX_MEMORY_MIB.into(),
                got: self.memory_mib.into(),
            });
        }
        if let Some(screen) = &self.screen {
            screen.validate()?;
        }
        Ok(())
    }
}

/// What a sandbox starts from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum SandboxSource {
    /// A built image: its warm snapshot is restored (captured first if missing), or the
    /// image boots from scratch when `cold` is set or no snapshot can be used.
    Image {
        /// Image name.
        image: ImageName,
        /// Machine size.
        #[serde(default)]
        machine: MachineSpec,
        /// Boot from scratch instead of restoring the warm snapshot.
        #[serde(default)]
        cold: bool,
    },
    /// A user snapshot (`kiln snapshot`); image and machine size are the snapshot's.
    Snapshot {
        /// Snapshot name.
        snapshot: SnapshotName,
    },
}

impl Default for SandboxSource {
    fn default() -> Self {
        SandboxSource::Image {
            image: DEFAULT_IMAGE
                .parse()
                .expect("the default image name is valid"),
            machine: MachineSpec::default(),
            cold: false,
        }
    }
}

/// How long a sandbox lives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Lifetime {
    /// Remove the sandbox this many seconds after it started (`kiln ttl` moves the deadline).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u64>,
    /// Remove the sandbox after this many seconds without exec, file or tunnel activity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_secs: Option<u64>,
}

impl Lifetime {
    /// Checks both durations (1 s to 365 days).
    pub fn validate(&self) -> Result<(), InvalidInput> {
        if let Some(t) = self.ttl_secs {
            check_duration("lifetime.ttl_secs", t)?;
        }
        if let Some(t) = self.idle_timeout_secs {
            check_duration("lifetime.idle_timeout_secs", t)?;
        }
        Ok(())
    }
}

/// `POST /v1/sandboxes`: everything a sandbox is started with, defined once.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SandboxSpec {
    /// What it starts from (default: the `python` image, 1 vCPU, 256 MiB).
    #[serde(default)]
    pub source: SandboxSource,
    /// Unique name; usable wherever an id is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<SandboxName>,
    /// Labels, for filtering (`kiln ps --filter label=K=V`).
    #[serde(default, skip_serializing_if = "Labels::is_empty")]
    pub labels: Labels,
    /// Lifetime and idle timeout.
    #[serde(default)]
    pub lifetime: Lifetime,
    /// Secrets delivered into the guest as `/run/secrets/<name>` (mode 0400) after boot or
    /// restore; never written to a snapshot, a disk layer, the store or a log. Shown in a
    /// [`SandboxInfo`] with empty values.
    #[serde(default, skip_serializing_if = "Secrets::is_empty")]
    pub secrets: Secrets,
    /// Also pass the secrets as environment variables to every exec in the sandbox (an exec's
    /// own `env` wins on a name clash).
    #[serde(default)]
    pub secret_env: bool,
    /// Host ports on 127.0.0.1 tunnelled to guest ports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub publish: Vec<PortMapping>,
    /// Its network (default: none, no network device).
    #[serde(default, skip_serializing_if = "is_none_network")]
    pub network: NetworkSpec,
}

fn is_none_network(n: &NetworkSpec) -> bool {
    *n == NetworkSpec::None
}

impl SandboxSpec {
    /// A spec starting from `image` with defaults for everything else.
    pub fn from_image(image: ImageName) -> SandboxSpec {
        SandboxSpec {
            source: SandboxSource::Image {
                image,
                machine: MachineSpec::default(),
                cold: false,
            },
            ..SandboxSpec::default()
        }
    }

    /// Checks what the field types alone cannot: ranges, counts and duplicates.
    pub fn validate(&self) -> Result<(), InvalidInput> {
        if let SandboxSource::Image { machine, .. } = &self.source {
            machine.validate()?;
        }
        self.lifetime.validate()?;
        self.network.validate()?;
        if self.publish.len() > MAX_PUBLISHED_PORTS {
            return Err(InvalidInput::TooMany {
                what: "published ports",
                got: self.publish.len(),
                max: MAX_PUBLISHED_PORTS,
            });
        }
        for (i, p) in self.publish.iter().enumerate() {
            if p.host == 0 || p.guest == 0 {
                return Err(InvalidInput::Rule(format!(
                    "invalid port mapping {p}: ports are 1 to 65535"
                )));
            }
            if self.publish[..i].iter().any(|q| q.host == p.host) {
                return Err(InvalidInput::Rule(format!(
                    "host port {} is published twice",
                    p.host
                )));
            }
        }
        self.secrets.validate().map_err(InvalidInput::Rule)
    }

    /// The spec with every secret value emptied (names kept): what is stored and shown.
    pub fn redacted(&self) -> SandboxSpec {
        SandboxSpec {
            secrets: self.secrets.redacted(),
            ..self.clone()
        }
    }
}

/// Lifecycle state of a sandbox (see the module diagram).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SandboxState {
    /// QEMU is starting or restoring; the agent has not answered yet.
    Creating,
    /// The agent answered; execs, files and tunnels are accepted.
    Running,
    /// The guest's vCPUs are stopped in place: by `kiln pause`, or by QEMU when the host file
    /// system under the sandbox's disk ran out of space (then `error` says so, and it resumes
    /// by itself once space is back). No CPU use.
    Paused,
    /// The guest agent stopped answering (a stopped QEMU, a guest starved by a fork bomb, ...):
    /// operations are refused with `sandbox_unresponsive`. It returns to `running` when the
    /// agent answers again, and becomes `failed` after a grace period.
    Unresponsive,
    /// Being saved and shut down (`kiln stop`).
    Stopping,
    /// Saved to disk, no QEMU running (`kiln start` brings it back).
    Stopped,
    /// QEMU or the agent died, or it could not start; see `error`.
    Failed,
}

impl SandboxState {
    /// Every state, in lifecycle order.
    pub const ALL: [SandboxState; 7] = [
        SandboxState::Creating,
        SandboxState::Running,
        SandboxState::Paused,
        SandboxState::Unresponsive,
        SandboxState::Stopping,
        SandboxState::Stopped,
        SandboxState::Failed,
    ];

    /// The state's name as stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxState::Creating => "creating",
            SandboxState::Running => "running",
            SandboxState::Paused => "paused",
            SandboxState::Unresponsive => "unresponsive",
            SandboxState::Stopping => "stopping",
            SandboxState::Stopped => "stopped",
            SandboxState::Failed => "failed",
        }
    }

    /// Whether the state machine allows `self → to`.
    pub fn can_become(self, to: SandboxState) -> bool {
        use SandboxState::*;
        matches!(
            (self, to),
            (Creating, Running)
                | (Creating, Failed)
                | (Running, Paused)
                | (Paused, Running)
                | (Running, Stopping)
                | (Paused, Stopping)
                | (Stopping, Stopped)
                | (Stopping, Failed)
                | (Stopping, Running)
                | (Stopping, Paused)
                | (Stopped, Creating)
                | (Creating, Stopped)
                | (Running, Failed)
                | (Paused, Failed)
                | (Running, Unresponsive)
                | (Unresponsive, Running)
                | (Unresponsive, Paused)
                | (Unresponsive, Failed)
        )
    }
}

impl fmt::Display for SandboxState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SandboxState {
    type Err = InvalidInput;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SandboxState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| {
                InvalidInput::Rule(format!(
                    "unknown sandbox state {s:?} (one of creating, running, paused, unresponsive, stopping, stopped, failed)"
                ))
            })
    }
}

/// How a sandbox's current VM started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StartSource {
    /// Booted from scratch.
    Cold,
    /// Restored from a snapshot (warm, user, or its own `kiln stop` save).
    Snapshot,
    /// Taken from the warm pool: restored from the image's warm snapshot ahead of demand.
    Pool,
}

impl StartSource {
    /// The name as stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            StartSource::Cold => "cold",
            StartSource::Snapshot => "snapshot",
            StartSource::Pool => "pool",
        }
    }
}

impl FromStr for StartSource {
    type Err = InvalidInput;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cold" => Ok(StartSource::Cold),
            "snapshot" => Ok(StartSource::Snapshot),
            "pool" => Ok(StartSource::Pool),
            other => Err(InvalidInput::Rule(format!(
                "unknown start source {other:?}"
            ))),
        }
    }
}

/// What the engine records about a sandbox (as opposed to what was asked for).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SandboxStatus {
    /// Lifecycle state.
    pub state: SandboxState,
    /// Image it runs (for a snapshot source: the snapshot's image).
    pub image: ImageName,
    /// Content id of that image build.
    pub image_id: String,
    /// vCPUs it runs with.
    pub cpus: u32,
    /// Guest memory in MiB it runs with.
    pub memory_mib: u32,
    /// Accelerator in use (`kvm` or `tcg`).
    pub accel: String,
    /// Creation time, seconds since the Unix epoch.
    pub created_unix: u64,
    /// QEMU start → agent answered, in milliseconds (once running).
    pub boot_ms: Option<u64>,
    /// How its VM started.
    pub source: StartSource,
    /// The snapshot it was restored from, if any (it depends on it while it exists).
    #[serde(default)]
    pub snapshot: Option<String>,
    /// When its lifetime ends (seconds since the Unix epoch), if it has one.
    #[serde(default)]
    pub expires_unix: Option<u64>,
    /// What went wrong: why it `failed`, why it is `unresponsive`, or why kiln (not the user)
    /// `paused` it (no space left on the host).
    pub error: Option<String>,
    /// What the user should know about how this request went although it succeeded (e.g.
    /// why it cold-booted instead of restoring its image's warm snapshot). Only in the answer
    /// to the request that started it; not kept.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// Its network while it runs (absent for network `none` and when not running).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkStatus>,
}

/// What the API says about one sandbox: its id, the spec it was created with (secret
/// values removed) and its status (flattened into the same JSON object).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SandboxInfo {
    /// Identifier.
    pub id: SandboxId,
    /// The spec it was created with; secret values are empty.
    pub spec: SandboxSpec,
    /// What the engine records.
    #[serde(flatten)]
    pub status: SandboxStatus,
}

impl SandboxInfo {
    /// Its name, if it has one.
    pub fn name(&self) -> Option<&SandboxName> {
        self.spec.name.as_ref()
    }
}

/// One entry of the event stream (`GET /v1/events`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Event {
    /// When, in milliseconds since the Unix epoch.
    pub time_unix_ms: u64,
    /// The sandbox concerned.
    pub sandbox: SandboxId,
    /// What happened.
    #[serde(flatten)]
    pub kind: EventKind,
}

/// What an [`Event`] reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventKind {
    /// A lifecycle transition, recorded in the store before it is published.
    State {
        /// New state.
        state: SandboxState,
        /// Why (for `failed`: the reason).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// The sandbox was removed (`rm`, TTL or idle expiry).
    Removed {
        /// Why (`removed`, `ttl expired`, `idle timeout`).
        reason: String,
    },
    /// The network filter refused a connection or a DNS question (rate-limited: at most a
    /// few per second per sandbox; `kiln inspect` keeps the newest 64).
    NetworkRefused {
        /// What was refused and why.
        refusal: Refusal,
    },
    /// A command started.
    ExecStarted {
        /// Program and arguments.
        argv: Vec<String>,
    },
    /// A command ended.
    ExecEnded {
        /// Its exit status.
        status: crate::ExitStatus,
    },
    /// Something the user should know although nothing failed (e.g. a warm snapshot was
    /// unusable, so the sandbox cold-booted).
    Warning {
        /// What happened and why.
        message: String,
    },
}

/// Which sandboxes a list or a bulk removal concerns: every condition must hold. Written
/// `label=KEY=VALUE`, `label=KEY` (any value), `status=STATE` or `name=NAME` on the command
/// line (`--filter`), and as the same `key=value` query parameters in the API.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SandboxFilter {
    /// Labels that must be present (with this value, when one is given).
    pub labels: Vec<(crate::LabelKey, Option<String>)>,
    /// Allowed states (any of them); empty means any.
    pub states: Vec<SandboxState>,
    /// The name it must have.
    pub name: Option<SandboxName>,
}

impl SandboxFilter {
    /// Adds one `key=value` condition.
    pub fn add(&mut self, condition: &str) -> Result<(), InvalidInput> {
        let (key, value) = condition.split_once('=').ok_or_else(|| {
            InvalidInput::Rule(format!(
                "invalid filter {condition:?}: expected label=KEY[=VALUE], status=STATE or name=NAME"
            ))
        })?;
        match key {
            "label" => match value.split_once('=') {
                Some(_) => {
                    let l: crate::Label = value.parse()?;
                    self.labels.push((l.key, Some(l.value)));
                }
                None => self.labels.push((value.parse()?, None)),
            },
            "status" | "state" => self.states.push(value.parse()?),
            "name" => self.name = Some(value.parse()?),
            other => {
                return Err(InvalidInput::Rule(format!(
                    "unknown filter {other:?}: use label, status or name"
                )));
            }
        }
        Ok(())
    }

    /// Whether `info` passes every condition.
    pub fn matches(&self, info: &SandboxInfo) -> bool {
        let labels = self
            .labels
            .iter()
            .all(|(k, v)| match (info.spec.labels.get(k), v) {
                (Some(have), Some(want)) => have == want,
                (Some(_), None) => true,
                (None, _) => false,
            });
        let state = self.states.is_empty() || self.states.contains(&info.status.state);
        let name = self.name.is_none() || self.name.as_ref() == info.spec.name.as_ref();
        labels && state && name
    }

    /// Whether there is no condition at all.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty() && self.states.is_empty() && self.name.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_default_is_python_image() {
        let spec: SandboxSpec = serde_json::from_str("{}").unwrap();
        assert_eq!(spec, SandboxSpec::default());
        match spec.source {
            SandboxSource::Image {
                image,
                machine,
                cold,
            } => {
                assert_eq!(image.as_str(), DEFAULT_IMAGE);
                assert_eq!(machine, MachineSpec::default());
                assert!(!cold);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn spec_source_snapshot_parses_and_refuses_unknown_fields() {
        let spec: SandboxSpec =
            serde_json::from_str(r#"{"source":{"kind":"snapshot","snapshot":"db1"}}"#).unwrap();
        assert!(matches!(spec.source, SandboxSource::Snapshot { .. }));
        let e = serde_json::from_str::<SandboxSpec>(
            r#"{"source":{"kind":"snapshot","snapshot":"db1","cpus":2}}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
        let e =
            serde_json::from_str::<SandboxSpec>(r#"{"source":{"kind":"image","image":"../etc"}}"#)
                .unwrap_err();
        assert!(e.to_string().contains("invalid image name"), "{e}");
    }

    #[test]
    fn spec_validate_names_the_field() {
        let spec = SandboxSpec {
            source: SandboxSource::Image {
                image: "python".parse().unwrap(),
                machine: MachineSpec {
                    cpus: 99,
                    memory_mib: 256,
                },
                cold: false,
            },
            ..SandboxSpec::default()
        };
        assert!(spec.validate().unwrap_err().to_string().contains("cpus"));
        let mut spec = SandboxSpec::default();
        spec.lifetime.ttl_secs = Some(0);
        assert!(
            spec.validate()
                .unwrap_err()
                .to_string()
                .contains("lifetime.ttl_secs")
        );
        let spec = SandboxSpec {
            publish: vec![
                PortMapping { host: 80, guest: 1 },
                PortMapping { host: 80, guest: 2 },
            ],
            ..SandboxSpec::default()
        };
        assert!(spec.validate().unwrap_err().to_string().contains("twice"));
    }

    #[test]
    fn redacted_spec_keeps_names_not_values() {
        let mut spec = SandboxSpec::default();
        spec.secrets.0.insert("TOKEN".into(), "hunter2".into());
        let json = serde_json::to_string(&spec.redacted()).unwrap();
        assert!(json.contains("TOKEN"), "{json}");
        assert!(!json.contains("hunter2"), "{json}");
    }

    #[test]
    fn state_machine_allows_only_drawn_transitions() {
        use SandboxState::*;
        assert!(Creating.can_become(Running));
        assert!(Running.can_become(Paused));
        assert!(Paused.can_become(Running));
        assert!(Stopped.can_become(Creating));
        assert!(!Stopped.can_become(Running));
        assert!(!Failed.can_become(Running));
        assert!(!Creating.can_become(Paused));
        assert!(Running.can_become(Unresponsive));
        assert!(Unresponsive.can_become(Running));
        assert!(Unresponsive.can_become(Failed));
        assert!(Unresponsive.can_become(Paused));
        assert!(!Paused.can_become(Unresponsive));
        assert!(!Unresponsive.can_become(Stopping));
        for s in SandboxState::ALL {
            assert_eq!(s.as_str().parse::<SandboxState>().unwrap(), s);
        }
    }

    #[test]
    fn filter_matches_labels_state_and_name() {
        let mut info = sample_info();
        info.spec.labels =
            Labels::from_labels(["team=ml".parse().unwrap(), "tier=gpu".parse().unwrap()]).unwrap();
        info.spec.name = Some("web".parse().unwrap());
        let f = |conds: &[&str]| {
            let mut f = SandboxFilter::default();
            for c in conds {
                f.add(c).unwrap();
            }
            f.matches(&info)
        };
        assert!(f(&[]));
        assert!(f(&["label=team=ml", "status=running"]));
        assert!(f(&["label=tier"]));
        assert!(!f(&["label=team=web"]));
        assert!(!f(&["label=owner"]));
        assert!(!f(&["status=paused"]));
        assert!(f(&["status=paused", "status=running"]));
        assert!(f(&["name=web"]));
        assert!(!f(&["name=db"]));
        let mut bad = SandboxFilter::default();
        assert!(
            bad.add("colour=red")
                .unwrap_err()
                .to_string()
                .contains("unknown filter")
        );
        assert!(bad.add("status=sleeping").is_err());
        assert!(bad.add("label").is_err());
    }

    fn sample_info() -> SandboxInfo {
        SandboxInfo {
            id: SandboxId::random(),
            spec: SandboxSpec::default(),
            status: SandboxStatus {
                network: None,
                state: SandboxState::Running,
                image: "python".parse().unwrap(),
                image_id: "x".into(),
                cpus: 1,
                memory_mib: 256,
                accel: "tcg".into(),
                created_unix: 1,
                boot_ms: Some(5),
                source: StartSource::Snapshot,
                snapshot: None,
                expires_unix: None,
                error: None,
                warnings: Vec::new(),
            },
        }
    }

    #[test]
    fn info_flattens_status() {
        let info = sample_info();
        let v = serde_json::to_value(&info).unwrap();
        assert_eq!(v["state"], "running");
        assert_eq!(v["source"], "snapshot");
        let back: SandboxInfo = serde_json::from_value(v).unwrap();
        assert_eq!(back, info);
    }
}
