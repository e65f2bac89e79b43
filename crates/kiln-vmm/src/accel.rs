//! Accelerator choice: KVM when it can really boot the guest, TCG otherwise.
//!
//! `/dev/kvm` existing is not proof that KVM works: nested or paravirtual KVM (e.g. the
//! `kvm_pvm` hosts kiln is developed on) runs tiny guests but hangs or fails with
//! `KVM internal error` on a Linux kernel. So the verdict comes from booting the real guest
//! kernel under KVM with a probe initramfs (`kiln.probe=1`: `/init` prints
//! [`PROBE_MARKER`] and powers off) within [`PROBE_DEADLINE`].
//!
//! Decision, in order:
//! 1. `KILN_ACCEL=tcg` → TCG. `KILN_ACCEL=kvm` → KVM *without probing* (the operator says it
//!    works), but an error if `/dev/kvm` is missing or cannot be opened, since QEMU would
//!    fail anyway. `auto` or unset → continue.
//! 2. No `/dev/kvm` → TCG. `/dev/kvm` cannot be opened → TCG, with the errno.
//! 3. A cached probe verdict in `$KILN_HOME/accel.json` whose key (host kernel release +
//!    QEMU version) matches → that verdict.
//! 4. Probe; cache the verdict. Overrides and the `/dev/kvm` checks are cheap and never
//!    cached, so loading the kvm module or changing `KILN_ACCEL` takes effect at once.
//!
//! Invariants: the probe QEMU never outlives the probe (killed at the deadline, killed on
//! drop, dies with the daemon); its output is read into bounded buffers.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;
use tracing::{info, warn};

use crate::cmdline::{BASE_CMDLINE, FAST_BOOT_CMDLINE, MACHINE};
use crate::error::VmmError;
use crate::process::{Lifetime, supervise_settings};
use crate::qemu::QemuInfo;

/// Environment variable overriding the choice: `kvm`, `tcg` or `auto`.
pub const ACCEL_ENV: &str = "KILN_ACCEL";

/// What the probe initramfs prints on the console once the kernel ran `/init`.
pub const PROBE_MARKER: &str = "KILN-PROBE-OK";

/// Kernel command-line flag that makes `/init` print [`PROBE_MARKER`] and power off.
pub const PROBE_CMDLINE: &str = "kiln.probe=1";

/// How long the probe may take. A real KVM host boots the guest kernel in well under 1 s;
/// broken nested KVM hangs or crawls.
pub const PROBE_DEADLINE: Duration = Duration::from_secs(6);

/// Console bytes kept for the verdict's reason.
const PROBE_OUTPUT_LIMIT: usize = 16 * 1024;

/// A hardware accelerator choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualization through `/dev/kvm`.
    Kvm,
    /// QEMU's binary translator (slow but works everywhere).
    Tcg,
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// The `KILN_ACCEL` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccelOverride {
    /// Probe (the default).
    Auto,
    /// Use KVM without probing.
    Kvm,
    /// Use TCG.
    Tcg,
}

impl AccelOverride {
    /// Parses a `KILN_ACCEL` value (case-insensitive; unset or empty means `auto`).
    pub fn parse(value: Option<&str>) -> Result<AccelOverride, VmmError> {
        match value.map(|v| v.trim().to_ascii_lowercase()).as_deref() {
            None | Some("") | Some("auto") => Ok(AccelOverride::Auto),
            Some("kvm") => Ok(AccelOverride::Kvm),
            Some("tcg") => Ok(AccelOverride::Tcg),
            Some(_) => Err(VmmError::AccelOverrideInvalid {
                value: value.unwrap_or_default().to_owned(),
            }),
        }
    }
}

/// What a cached verdict is valid for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccelKey {
    /// Host kernel release (`uname -r`).
    pub host_kernel: String,
    /// QEMU version.
    pub qemu_version: String,
}

/// The accelerator to use and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccelVerdict {
    /// The choice.
    pub accel: Accel,
    /// Human-readable reason (shown by `kiln doctor` and in logs).
    pub reason: String,
    /// When the verdict was reached (Unix seconds).
    pub probed_at: u64,
    /// What it is valid for.
    pub key: AccelKey,
}

/// The verdict as `kiln doctor` reports it: `accel` is `None` when KVM is present but has not
/// been probed yet and there is no image to probe with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DoctorAccel {
    /// The choice, if known.
    pub accel: Option<Accel>,
    /// Why (or why unknown).
    pub reason: String,
}

/// State of `/dev/kvm`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvmDevice {
    /// No `/dev/kvm`.
    Missing,
    /// It exists but cannot be opened read-write (the error text, with errno).
    Unusable(String),
    /// It opens.
    Present,
}

/// How the KVM boot probe went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// The marker appeared.
    Booted {
        /// Time from QEMU spawn to the marker.
        elapsed: Duration,
    },
    /// QEMU exited without the marker (e.g. `KVM internal error`).
    Failed {
        /// QEMU's stderr or the console tail.
        detail: String,
    },
    /// No marker within the deadline.
    TimedOut {
        /// The deadline.
        deadline: Duration,
    },
    /// QEMU could not be started.
    SpawnFailed(String),
}

/// The host facts the decision depends on; faked in tests.
pub(crate) trait AccelEnv {
    fn override_var(&self) -> Option<String>;
    fn kvm_device(&self) -> KvmDevice;
    fn host_kernel(&self) -> String;
    fn now_unix(&self) -> u64;
    async fn probe(&self, kernel: &Path, initramfs: &Path) -> ProbeOutcome;
}

struct RealEnv<'a> {
    qemu: &'a Path,
}

impl AccelEnv for RealEnv<'_> {
    fn override_var(&self) -> Option<String> {
        std::env::var(ACCEL_ENV).ok()
    }

    fn kvm_device(&self) -> KvmDevice {
        match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
        {
            Ok(_) => KvmDevice::Present,
            Err(e) if e.kind() == ErrorKind::NotFound => KvmDevice::Missing,
            Err(e) => KvmDevice::Unusable(e.to_string()),
        }
    }

    fn host_kernel(&self) -> String {
        rustix::system::uname()
            .release()
            .to_string_lossy()
            .into_owned()
    }

    fn now_unix(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }

    async fn probe(&self, kernel: &Path, initramfs: &Path) -> ProbeOutcome {
        probe_kvm(self.qemu, kernel, initramfs, PROBE_DEADLINE).await
    }
}

/// Chooses the accelerator, probing KVM with the given guest kernel and probe-capable
/// initramfs if needed (and caching the verdict in `cache`, i.e. `$KILN_HOME/accel.json`).
pub async fn resolve(
    qemu: &QemuInfo,
    kernel: &Path,
    initramfs: &Path,
    cache: &Path,
) -> Result<AccelVerdict, VmmError> {
    let env = RealEnv { qemu: &qemu.path };
    let verdict = resolve_with(&env, qemu, Some((kernel, initramfs)), cache).await?;
    // With probe input, resolve_with always reaches a verdict.
    Ok(verdict.unwrap_or_else(|| tcg_verdict(&env, qemu, "no verdict reached".to_owned())))
}

/// Like [`resolve`] for `kiln doctor`: without probe input (no image built yet) it reports
/// what it can without booting anything.
pub async fn resolve_for_doctor(
    qemu: &QemuInfo,
    probe_input: Option<(&Path, &Path)>,
    cache: &Path,
) -> Result<DoctorAccel, VmmError> {
    let env = RealEnv { qemu: &qemu.path };
    Ok(match resolve_with(&env, qemu, probe_input, cache).await? {
        Some(v) => DoctorAccel { accel: Some(v.accel), reason: v.reason },
        None => DoctorAccel {
            accel: None,
            reason: "/dev/kvm is present but not probed yet: build an image so that kiln can boot its kernel under kvm"
                .to_owned(),
        },
    })
}

fn tcg_verdict<E: AccelEnv>(env: &E, qemu: &QemuInfo, reason: String) -> AccelVerdict {
    AccelVerdict {
        accel: Accel::Tcg,
        reason,
        probed_at: env.now_unix(),
        key: key(env, qemu),
    }
}

fn key<E: AccelEnv>(env: &E, qemu: &QemuInfo) -> AccelKey {
    AccelKey {
        host_kernel: env.host_kernel(),
        qemu_version: qemu.version.to_string(),
    }
}

/// The decision procedure (see the module docs). `Ok(None)`: a probe is needed but there is
/// no input to probe with.
pub(crate) async fn resolve_with<E: AccelEnv>(
    env: &E,
    qemu: &QemuInfo,
    probe_input: Option<(&Path, &Path)>,
    cache: &Path,
) -> Result<Option<AccelVerdict>, VmmError> {
    let over = AccelOverride::parse(env.override_var().as_deref())?;
    let device = env.kvm_device();
    let verdict = |accel, reason: String| AccelVerdict {
        accel,
        reason,
        probed_at: env.now_unix(),
        key: key(env, qemu),
    };
    match over {
        AccelOverride::Tcg => return Ok(Some(verdict(Accel::Tcg, format!("{ACCEL_ENV}=tcg")))),
        AccelOverride::Kvm => {
            return match device {
                KvmDevice::Present => Ok(Some(verdict(
                    Accel::Kvm,
                    format!("{ACCEL_ENV}=kvm (not probed)"),
                ))),
                KvmDevice::Missing => Err(VmmError::KvmForcedUnavailable {
                    reason: "there is no /dev/kvm".to_owned(),
                }),
                KvmDevice::Unusable(e) => Err(VmmError::KvmForcedUnavailable {
                    reason: format!("/dev/kvm cannot be opened: {e}"),
                }),
            };
        }
        AccelOverride::Auto => {}
    }
    match device {
        KvmDevice::Missing => return Ok(Some(verdict(Accel::Tcg, "no /dev/kvm".to_owned()))),
        KvmDevice::Unusable(e) => {
            return Ok(Some(verdict(
                Accel::Tcg,
                format!("cannot open /dev/kvm: {e}"),
            )));
        }
        KvmDevice::Present => {}
    }
    let want = key(env, qemu);
    if let Some(cached) = read_cache(cache) {
        if cached.key == want {
            return Ok(Some(cached));
        }
        info!(cached = ?cached.key, now = ?want, "host kernel or QEMU changed: probing kvm again");
    }
    let Some((kernel, initramfs)) = probe_input else {
        return Ok(None);
    };
    let outcome = env.probe(kernel, initramfs).await;
    let (accel, reason) = verdict_from_probe(&outcome);
    let v = verdict(accel, reason);
    info!(accel = %v.accel, reason = %v.reason, "kvm probe finished");
    if let Err(e) = write_cache(cache, &v) {
        warn!(path = %cache.display(), error = %e, "cannot cache the accelerator verdict");
    }
    Ok(Some(v))
}

/// Turns a probe outcome into a choice and its reason.
pub fn verdict_from_probe(outcome: &ProbeOutcome) -> (Accel, String) {
    match outcome {
        ProbeOutcome::Booted { elapsed } => (
            Accel::Kvm,
            format!("kvm booted the guest kernel in {} ms", elapsed.as_millis()),
        ),
        ProbeOutcome::Failed { detail } => (
            Accel::Tcg,
            format!("/dev/kvm is present but kvm failed to boot the guest kernel: {detail}"),
        ),
        ProbeOutcome::TimedOut { deadline } => (
            Accel::Tcg,
            format!(
                "/dev/kvm is present but the guest kernel did not boot under kvm within {} s \
                 (nested or paravirtual kvm?)",
                deadline.as_secs()
            ),
        ),
        ProbeOutcome::SpawnFailed(e) => (Accel::Tcg, format!("could not start the kvm probe: {e}")),
    }
}

fn read_cache(path: &Path) -> Option<AccelVerdict> {
    let bytes = std::fs::read(path).ok()?;
    match serde_json::from_slice(&bytes) {
        Ok(v) => Some(v),
        Err(e) => {
            warn!(path = %path.display(), error = %e, "ignoring unreadable accelerator cache");
            None
        }
    }
}

fn write_cache(path: &Path, v: &AccelVerdict) -> std::io::Result<()> {
    let mut json = serde_json::to_vec_pretty(v).map_err(std::io::Error::other)?;
    json.push(b'\n');
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp: PathBuf = path.with_extension(format!("json.tmp.{}", std::process::id()));
    std::fs::write(&tmp, json)?;
    std::fs::rename(&tmp, path)
}

/// Boots `kernel` + `initramfs` under KVM with `kiln.probe=1` and watches the serial console
/// (QEMU's stdout) for [`PROBE_MARKER`]. QEMU is killed at the deadline and on every return.
pub async fn probe_kvm(
    qemu: &Path,
    kernel: &Path,
    initramfs: &Path,
    deadline: Duration,
) -> ProbeOutcome {
    let started = tokio::time::Instant::now();
    let mut cmd = Command::new(qemu);
    cmd.args([
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ])
    .args([
        "-machine", MACHINE, "-accel", "kvm", "-cpu", "host", "-smp", "1", "-m", "256M",
    ])
    .arg("-kernel")
    .arg(kernel)
    .arg("-initrd")
    .arg(initramfs)
    .arg("-append")
    .arg(format!(
        "{BASE_CMDLINE} {FAST_BOOT_CMDLINE} {PROBE_CMDLINE}"
    ))
    .args(["-serial", "stdio"])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    supervise_settings(&mut cmd, Lifetime::DiesWithParent);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return ProbeOutcome::SpawnFailed(format!("{}: {e}", qemu.display())),
    };
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return ProbeOutcome::SpawnFailed("no stdio pipes".to_owned());
    };
    let stderr_task = tokio::spawn(read_bounded(stderr, PROBE_OUTPUT_LIMIT));
    let watch = watch_for_marker(stdout, PROBE_MARKER.as_bytes(), PROBE_OUTPUT_LIMIT);
    let outcome = match tokio::time::timeout(deadline, watch).await {
        Ok((true, _)) => ProbeOutcome::Booted {
            elapsed: started.elapsed(),
        },
        Ok((false, console)) => {
            // QEMU closed its stdout: it exited (or is exiting). Give it a moment to finish
            // writing stderr.
            let status = tokio::time::timeout(Duration::from_secs(2), child.wait()).await;
            let stderr = tokio::time::timeout(Duration::from_secs(1), stderr_task).await;
            let stderr = match stderr {
                Ok(Ok(bytes)) => String::from_utf8_lossy(&bytes).into_owned(),
                _ => String::new(),
            };
            let status = match status {
                Ok(Ok(s)) => s.to_string(),
                _ => "still running".to_owned(),
            };
            ProbeOutcome::Failed {
                detail: failure_detail(&stderr, &console, &status),
            }
        }
        Err(_) => ProbeOutcome::TimedOut { deadline },
    };
    let _ = child.start_kill();
    let _ = tokio::time::timeout(Duration::from_secs(2), child.wait()).await;
    outcome
}

/// Reads until `marker` appears (true) or EOF (false), keeping only the last `limit` bytes.
async fn watch_for_marker<R: AsyncRead + Unpin>(
    mut r: R,
    marker: &[u8],
    limit: usize,
) -> (bool, String) {
    let mut tail: Vec<u8> = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => return (false, String::from_utf8_lossy(&tail).into_owned()),
            Ok(n) => n,
        };
        tail.extend_from_slice(&buf[..n]);
        if tail.windows(marker.len()).any(|w| w == marker) {
            return (true, String::new());
        }
        // Keep enough to find a marker split across reads.
        let keep = limit.max(marker.len());
        if tail.len() > keep {
            tail.drain(..tail.len() - keep);
        }
    }
}

async fn read_bounded<R: AsyncRead + Unpin>(mut r: R, limit: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return out,
            Ok(n) => {
                // Keep draining past the limit so QEMU never blocks on a full pipe.
                let room = limit.saturating_sub(out.len());
                out.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
}

/// The most telling line(s) of a failed probe: QEMU's errors, else the console's end.
fn failure_detail(stderr: &str, console: &str, status: &str) -> String {
    let useful: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let picked: Vec<&str> = {
        let key: Vec<&str> = useful
            .iter()
            .copied()
            .filter(|l| l.contains("KVM") || l.contains("kvm") || l.contains("error"))
            .collect();
        if key.is_empty() {
            useful.iter().rev().take(3).rev().copied().collect()
        } else {
            key.into_iter().take(3).collect()
        }
    };
    if !picked.is_empty() {
        return format!("{} (QEMU {status})", picked.join("; "));
    }
    let last: Vec<&str> = console
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .rev()
        .take(2)
        .collect();
    if last.is_empty() {
        format!("QEMU {status} without output")
    } else {
        format!(
            "QEMU {status}; console ended with: {}",
            last.into_iter().rev().collect::<Vec<_>>().join(" | ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qemu::QemuVersion;
    use std::cell::Cell;

    struct FakeEnv {
        over: Option<&'static str>,
        device: KvmDevice,
        kernel: &'static str,
        outcome: ProbeOutcome,
        probes: Cell<u32>,
    }

    impl FakeEnv {
        fn new(device: KvmDevice, outcome: ProbeOutcome) -> FakeEnv {
            FakeEnv {
                over: None,
                device,
                kernel: "6.1.0-test",
                outcome,
                probes: Cell::new(0),
            }
        }
    }

    impl AccelEnv for FakeEnv {
        fn override_var(&self) -> Option<String> {
            self.over.map(str::to_owned)
        }
        fn kvm_device(&self) -> KvmDevice {
            self.device.clone()
        }
        fn host_kernel(&self) -> String {
            self.kernel.to_owned()
        }
        fn now_unix(&self) -> u64 {
            1_700_000_000
        }
        async fn probe(&self, _kernel: &Path, _initramfs: &Path) -> ProbeOutcome {
            self.probes.set(self.probes.get() + 1);
            self.outcome.clone()
        }
    }

    fn qemu() -> QemuInfo {
        QemuInfo {
            path: "/usr/bin/qemu-system-x86_64".into(),
            version: QemuVersion {
                major: 7,
                minor: 2,
                micro: 22,
            },
            version_line: "QEMU emulator version 7.2.22".into(),
            x_ignore_shared: true,
        }
    }

    fn input() -> Option<(&'static Path, &'static Path)> {
        Some((Path::new("/k"), Path::new("/i")))
    }

    fn booted() -> ProbeOutcome {
        ProbeOutcome::Booted {
            elapsed: Duration::from_millis(420),
        }
    }

    #[tokio::test]
    async fn resolve_no_dev_kvm_is_tcg_without_probe() {
        let dir = tempfile::tempdir().expect("tempdir");
        let env = FakeEnv::new(KvmDevice::Missing, booted());
        let v = resolve_with(&env, &qemu(), input(), &dir.path().join("accel.json"))
            .await
            .expect("ok")
            .expect("some");
        assert_eq!(v.accel, Accel::Tcg);
        assert_eq!(v.reason, "no /dev/kvm");
        assert_eq!(env.probes.get(), 0);
        assert!(
            !dir.path().join("accel.json").exists(),
            "cheap verdicts are not cached"
        );
    }

    #[tokio::test]
    async fn resolve_unopenable_dev_kvm_reports_errno() {
        let dir = tempfile::tempdir().expect("tempdir");
        let env = FakeEnv::new(
            KvmDevice::Unusable("Permission denied (os error 13)".into()),
            booted(),
        );
        let v = resolve_with(&env, &qemu(), input(), &dir.path().join("a.json"))
            .await
            .expect("ok")
            .expect("some");
        assert_eq!(v.accel, Accel::Tcg);
        assert!(v.reason.contains("os error 13"), "{}", v.reason);
    }

    #[tokio::test]
    async fn resolve_probe_failure_is_tcg_and_cached_until_key_changes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = dir.path().join("accel.json");
        let mut env = FakeEnv::new(
            KvmDevice::Present,
            ProbeOutcome::TimedOut {
                deadline: PROBE_DEADLINE,
            },
        );
        let v = resolve_with(&env, &qemu(), input(), &cache)
            .await
            .expect("ok")
            .expect("some");
        assert_eq!(v.accel, Accel::Tcg);
        assert!(v.reason.contains("did not boot under kvm"), "{}", v.reason);
        assert_eq!(
            v.key,
            AccelKey {
                host_kernel: "6.1.0-test".into(),
                qemu_version: "7.2.22".into()
            }
        );
        assert_eq!(env.probes.get(), 1);
        // Second call: served from the cache, even if the probe would now succeed.
        env.outcome = booted();
        let again = resolve_with(&env, &qemu(), input(), &cache)
            .await
            .expect("ok")
            .expect("some");
        assert_eq!(again, v);
        assert_eq!(env.probes.get(), 1);
        // A new host kernel invalidates the cache.
        env.kernel = "6.12.0-new";
        let fresh = resolve_with(&env, &qemu(), input(), &cache)
            .await
            .expect("ok")
            .expect("some");
        assert_eq!(fresh.accel, Accel::Kvm);
        assert_eq!(env.probes.get(), 2);
        // So does a new QEMU.
        let mut q = qemu();
        q.version.micro += 1;
        resolve_with(&env, &q, input(), &cache).await.expect("ok");
        assert_eq!(env.probes.get(), 3);
    }

    #[tokio::test]
    async fn resolve_probe_success_is_kvm() {
        let dir = tempfile::tempdir().expect("tempdir");
        let env = FakeEnv::new(KvmDevice::Present, booted());
        let v = resolve_with(&env, &qemu(), input(), &dir.path().join("a.json"))
            .await
            .expect("ok")
            .expect("some");
        assert_eq!(v.accel, Accel::Kvm);
        assert!(v.reason.contains("420 ms"), "{}", v.reason);
    }

    #[tokio::test]
    async fn resolve_overrides_skip_probe_and_cache() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = dir.path().join("a.json");
        let mut env = FakeEnv::new(KvmDevice::Present, booted());
        env.over = Some("TCG");
        let v = resolve_with(&env, &qemu(), input(), &cache)
            .await
            .expect("ok")
            .expect("some");
        assert_eq!((v.accel, v.reason.as_str()), (Accel::Tcg, "KILN_ACCEL=tcg"));
        env.over = Some("kvm");
        let v = resolve_with(&env, &qemu(), input(), &cache)
            .await
            .expect("ok")
            .expect("some");
        assert_eq!(v.accel, Accel::Kvm);
        assert_eq!(env.probes.get(), 0);
        assert!(!cache.exists());
        env.device = KvmDevice::Missing;
        let e = resolve_with(&env, &qemu(), input(), &cache)
            .await
            .expect_err("forced kvm without /dev/kvm");
        assert!(matches!(e, VmmError::KvmForcedUnavailable { .. }), "{e:?}");
        env.over = Some("fast");
        let e = resolve_with(&env, &qemu(), input(), &cache)
            .await
            .expect_err("bad value");
        assert!(matches!(e, VmmError::AccelOverrideInvalid { .. }), "{e:?}");
        env.over = Some("auto");
        let v = resolve_with(&env, &qemu(), input(), &cache)
            .await
            .expect("ok")
            .expect("some");
        assert_eq!(v.accel, Accel::Tcg);
    }

    #[tokio::test]
    async fn resolve_without_probe_input_is_unknown_and_corrupt_cache_is_ignored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = dir.path().join("a.json");
        std::fs::write(&cache, "{not json").expect("write");
        let env = FakeEnv::new(KvmDevice::Present, booted());
        assert_eq!(
            resolve_with(&env, &qemu(), None, &cache).await.expect("ok"),
            None
        );
        assert_eq!(env.probes.get(), 0);
        let v = resolve_with(&env, &qemu(), input(), &cache)
            .await
            .expect("ok")
            .expect("some");
        assert_eq!(v.accel, Accel::Kvm);
        let on_disk: AccelVerdict =
            serde_json::from_slice(&std::fs::read(&cache).expect("read")).expect("json");
        assert_eq!(on_disk, v);
    }

    #[test]
    fn failure_detail_prefers_kvm_errors() {
        let d = failure_detail(
            "KVM internal error. Suberror: 1\nemulation failure\nRAX=0000\n",
            "Linux version 6.1\n",
            "exit status: 1",
        );
        assert!(d.starts_with("KVM internal error. Suberror: 1"), "{d}");
        let d = failure_detail(
            "",
            "Linux version 6.1\nKernel panic - not syncing: x\n",
            "exit status: 0",
        );
        assert!(d.contains("Kernel panic"), "{d}");
    }

    #[tokio::test]
    async fn watch_for_marker_across_reads_and_eof() {
        let data = b"noise\r\nKILN-PRO"
            .iter()
            .chain(b"BE-OK\r\n")
            .copied()
            .collect::<Vec<u8>>();
        let (found, _) = watch_for_marker(&data[..], PROBE_MARKER.as_bytes(), 8).await;
        assert!(found);
        let (found, tail) =
            watch_for_marker(&b"boot log\nend"[..], PROBE_MARKER.as_bytes(), 1024).await;
        assert!(!found);
        assert_eq!(tail, "boot log\nend");
    }
}
