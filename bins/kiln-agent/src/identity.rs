//! Applying a new identity to a restored guest (`apply_identity`, feature `identity-v1`).
//!
//! Owns: the [`IdentitySink`] seam between the protocol logic and the system effects,
//! [`SystemIdentity`] (the real effects, only for the guest's PID 1), [`FakeIdentity`] (a
//! recording test double) and [`apply`], which runs the steps in their fixed order:
//!
//! ```text
//!  1 rng        RNDADDENTROPY on /dev/urandom (credits) │ fallback: write (mixes only)
//!               then RNDRESEEDCRNG (re-key the CRNG now; best effort, reported)
//!  2 clock      clock_settime(CLOCK_REALTIME, host wall clock)
//!  3 hostname   sethostname
//!  4 machine-id /etc/machine-id: rewritten in place in its tmpfs copy (see below), or
//!               temp file + rename where that copy could not be set up
//!  5 restore-id /run/kiln/restore-id (temp file + rename); the agent then exports
//!               KILN_RESTORE_ID to every later exec
//! ```
//!
//! Why `/etc/machine-id` is a tmpfs file bound over the root file system's: the first write
//! to the ext4 root after a restore cost ~40–60 ms of a ~60 ms identity under TCG (measured
//! in the guest: RNG 5 ms, clock 1 ms, hostname 0.4 ms, machine-id 42–63 ms, restore id
//! 3–5 ms): ext4's create/rename and journal paths run for the first time since the restore,
//! and TCG translates them anew (its translation cache is not in the snapshot). So PID 1
//! copies the id to [`MACHINE_ID_RUN_PATH`] at boot, before any capture, and bind-mounts it
//! over `/etc/machine-id` (what systemd does for a read-only root); a restore then rewrites
//! that tmpfs file in place (a rename would detach it from the bind mount). A reader racing
//! the rewrite could see a mix of old and new bytes; none runs then (no exec is served
//! before the acknowledgement).
//!
//! Must not: touch the system through anything but an [`IdentitySink`]; the in-process tests
//! run the agent on a developer's host as root, so an agent that is not the guest's PID 1
//! never gets a [`SystemIdentity`] ([`SystemIdentity::for_pid1`] refuses).
//!
//! Invariants: steps run in order and stop at the first failure, which is answered as
//! `identity_failed` naming the step and the steps already applied (earlier steps cannot be
//! undone: entropy stays mixed in, the clock stays set). A success is only reported when all
//! five steps succeeded. The request is handled synchronously on the agent's only thread, so
//! no other request (no exec) can observe a half-applied identity.

use std::fs::{self, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use kiln_agent_proto::{
    ErrorBody, ErrorCode, GuestIdentity, Hostname, IdentityAck, MachineId, RestoreId, UnixNanos,
};

use crate::sys;

/// Where the real machine id lives.
pub const MACHINE_ID_PATH: &str = "/etc/machine-id";
/// The tmpfs file bound over [`MACHINE_ID_PATH`] (see the module docs).
pub const MACHINE_ID_RUN_PATH: &str = "/run/kiln/machine-id";
/// Where commands can read the current restore id.
pub const RESTORE_ID_PATH: &str = "/run/kiln/restore-id";
/// Environment variable carrying the restore id into every exec after a restore.
pub const RESTORE_ID_ENV: &str = "KILN_RESTORE_ID";
/// The random device used to reseed the kernel RNG.
const URANDOM: &str = "/dev/urandom";

/// One step of applying an identity, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IdentityStep {
    /// Mix (and credit) the entropy into the kernel RNG and re-key it.
    Rng,
    /// Set the wall clock.
    Clock,
    /// Set the hostname.
    Hostname,
    /// Replace `/etc/machine-id`.
    MachineId,
    /// Record the restore id for commands.
    RestoreId,
}

impl IdentityStep {
    /// What the step does, for error messages.
    pub fn describe(self) -> &'static str {
        match self {
            IdentityStep::Rng => "reseed the kernel rng",
            IdentityStep::Clock => "set the wall clock",
            IdentityStep::Hostname => "set the hostname",
            IdentityStep::MachineId => "write the machine id",
            IdentityStep::RestoreId => "record the restore id",
        }
    }
}

/// How the entropy reached the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RngOutcome {
    /// Added with `RNDADDENTROPY` (credited) rather than written (mixed in only).
    pub credited: bool,
    /// `RNDRESEEDCRNG` re-keyed the CRNG at once.
    pub reseeded: bool,
}

/// The system effects of applying an identity. The real implementation is
/// [`SystemIdentity`]; tests use [`FakeIdentity`].
pub trait IdentitySink: Send + Sync {
    /// Step 1: feeds `entropy` to the kernel RNG. Fails only if the bytes reached it in no way.
    fn reseed_rng(&self, entropy: &[u8]) -> io::Result<RngOutcome>;
    /// Step 2: sets the wall clock; returns how far it moved (new − old, ns, saturating).
    fn set_wall_clock(&self, at: UnixNanos) -> io::Result<i64>;
    /// Step 3: sets the hostname.
    fn set_hostname(&self, name: &Hostname) -> io::Result<()>;
    /// Step 4: replaces the machine id file.
    fn write_machine_id(&self, id: &MachineId) -> io::Result<()>;
    /// Step 5: records the restore id where commands can read it.
    fn record_restore_id(&self, id: &RestoreId) -> io::Result<()>;
}

/// Runs the five steps in order (see the module docs). On failure, the error names the step,
/// the cause and the steps already applied.
pub(crate) fn apply(
    sink: &dyn IdentitySink,
    identity: &GuestIdentity,
) -> Result<IdentityAck, ErrorBody> {
    let mut done: Vec<IdentityStep> = Vec::with_capacity(5);
    let fail = |step: IdentityStep, done: &[IdentityStep], e: io::Error| {
        let applied = if done.is_empty() {
            "nothing".to_owned()
        } else {
            let names: Vec<&str> = done.iter().map(|s| s.describe()).collect();
            names.join(", ")
        };
        ErrorBody {
            code: ErrorCode::IdentityFailed,
            message: format!(
                "failed to {}: {e} (already applied: {applied})",
                step.describe()
            ),
        }
    };
    let rng = sink
        .reseed_rng(identity.entropy.as_bytes())
        .map_err(|e| fail(IdentityStep::Rng, &done, e))?;
    done.push(IdentityStep::Rng);
    let clock_step_ns = sink
        .set_wall_clock(identity.wall_clock_unix_ns)
        .map_err(|e| fail(IdentityStep::Clock, &done, e))?;
    done.push(IdentityStep::Clock);
    sink.set_hostname(&identity.hostname)
        .map_err(|e| fail(IdentityStep::Hostname, &done, e))?;
    done.push(IdentityStep::Hostname);
    sink.write_machine_id(&identity.machine_id)
        .map_err(|e| fail(IdentityStep::MachineId, &done, e))?;
    done.push(IdentityStep::MachineId);
    sink.record_restore_id(&identity.restore_id)
        .map_err(|e| fail(IdentityStep::RestoreId, &done, e))?;
    Ok(IdentityAck {
        restore_id: identity.restore_id.clone(),
        entropy_credited: rng.credited,
        rng_reseeded: rng.reseeded,
        clock_set: true,
        clock_step_ns,
        hostname_set: true,
        machine_id_written: true,
    })
}

/// Replaces `path` with `contents` atomically for readers: writes a sibling temp file with
/// `mode`, then renames it over `path`. Not fsynced: the guest's disk is as ephemeral as
/// the guest, and what matters is that no reader ever sees a partial file.
pub fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(".kiln-tmp");
    let tmp = path.with_file_name(tmp_name);
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        file.write_all(contents)?;
        file.set_permissions(Permissions::from_mode(mode))?;
        drop(file);
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn write_restore_id(path: &Path, id: &RestoreId) -> io::Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    write_atomically(path, format!("{id}\n").as_bytes(), 0o444)
}

/// Rewrites `path` in place: `contents` at offset 0, then the length cut to fit. Keeps the
/// inode (a bind mount of it stays valid); not atomic for a concurrent reader.
pub fn rewrite_in_place(path: &Path, contents: &[u8]) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let file = OpenOptions::new().write(true).open(path)?;
    file.write_all_at(contents, 0)?;
    file.set_len(contents.len() as u64)
}

/// How the machine id is replaced.
#[derive(Debug)]
enum MachineIdFile {
    /// A tmpfs file bound over `/etc/machine-id`: rewritten in place.
    Bound(PathBuf),
    /// The file itself: temp file + rename.
    Replace(PathBuf),
}

/// Copies `/etc/machine-id` (empty if missing) to [`MACHINE_ID_RUN_PATH`] and bind-mounts
/// the copy over it. Runs at boot, so the one ext4 write it may need (creating a missing
/// `/etc/machine-id` as the mount point) happens before a capture, never after a restore.
fn bind_machine_id_to_tmpfs() -> io::Result<PathBuf> {
    let run = PathBuf::from(MACHINE_ID_RUN_PATH);
    let current = match fs::read(MACHINE_ID_PATH) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            write_atomically(Path::new(MACHINE_ID_PATH), b"", 0o444)?;
            Vec::new()
        }
        Err(e) => return Err(e),
    };
    if let Some(dir) = run.parent() {
        fs::create_dir_all(dir)?;
    }
    write_atomically(&run, &current, 0o444)?;
    sys::mount(
        MACHINE_ID_RUN_PATH,
        MACHINE_ID_PATH,
        None,
        libc::MS_BIND,
        None,
    )?;
    Ok(run)
}

/// The real effects. Only [`SystemIdentity::for_pid1`] makes one.
#[derive(Debug)]
pub struct SystemIdentity {
    machine_id: MachineIdFile,
    restore_id_path: PathBuf,
}

impl SystemIdentity {
    /// The real sink, if this process is PID 1 (the guest's init); `None` anywhere else, so
    /// an agent run on a host for tests or debugging can never change the host's clock,
    /// hostname, RNG or machine id. Binds a tmpfs copy of the machine id over
    /// `/etc/machine-id` (see the module docs); if that fails, the file is replaced instead.
    pub fn for_pid1() -> Option<SystemIdentity> {
        if std::process::id() != 1 {
            return None;
        }
        let machine_id = match bind_machine_id_to_tmpfs() {
            Ok(run) => MachineIdFile::Bound(run),
            Err(e) => {
                crate::console::warn(format_args!(
                    "cannot bind a tmpfs machine-id over {MACHINE_ID_PATH} ({e}); \
                     restores will replace the file on the root file system"
                ));
                MachineIdFile::Replace(PathBuf::from(MACHINE_ID_PATH))
            }
        };
        Some(SystemIdentity {
            machine_id,
            restore_id_path: PathBuf::from(RESTORE_ID_PATH),
        })
    }
}

impl IdentitySink for SystemIdentity {
    fn reseed_rng(&self, entropy: &[u8]) -> io::Result<RngOutcome> {
        let mut random = OpenOptions::new().write(true).open(URANDOM)?;
        let credited = match sys::rng_add_entropy(&random, entropy) {
            Ok(()) => true,
            Err(e) => {
                crate::console::warn(format_args!(
                    "RNDADDENTROPY failed ({e}), mixing the entropy in without credit"
                ));
                random.write_all(entropy)?;
                false
            }
        };
        let reseeded = match sys::rng_reseed_crng(&random) {
            Ok(()) => true,
            Err(e) => {
                crate::console::warn(format_args!("RNDRESEEDCRNG failed: {e}"));
                false
            }
        };
        Ok(RngOutcome { credited, reseeded })
    }

    fn set_wall_clock(&self, at: UnixNanos) -> io::Result<i64> {
        let before = sys::clock_realtime_ns()?;
        let (secs, nanos) = at.as_secs_nanos();
        sys::set_clock_realtime(secs, nanos)?;
        let step = i128::from(at.as_nanos()) - before;
        Ok(i64::try_from(step).unwrap_or(if step < 0 { i64::MIN } else { i64::MAX }))
    }

    fn set_hostname(&self, name: &Hostname) -> io::Result<()> {
        sys::sethostname(name.as_str())
    }

    fn write_machine_id(&self, id: &MachineId) -> io::Result<()> {
        let contents = format!("{id}\n");
        match &self.machine_id {
            MachineIdFile::Bound(run) => rewrite_in_place(run, contents.as_bytes()),
            MachineIdFile::Replace(path) => write_atomically(path, contents.as_bytes(), 0o444),
        }
    }

    fn record_restore_id(&self, id: &RestoreId) -> io::Result<()> {
        write_restore_id(&self.restore_id_path, id)
    }
}

/// What a [`FakeIdentity`] was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentityCall {
    /// [`IdentitySink::reseed_rng`] with this many bytes.
    Rng {
        /// Number of entropy bytes.
        len: usize,
    },
    /// [`IdentitySink::set_wall_clock`].
    Clock(UnixNanos),
    /// [`IdentitySink::set_hostname`].
    Hostname(Hostname),
    /// [`IdentitySink::write_machine_id`].
    MachineId(MachineId),
    /// [`IdentitySink::record_restore_id`].
    RestoreId(RestoreId),
}

impl IdentityCall {
    /// The step this call belongs to.
    pub fn step(&self) -> IdentityStep {
        match self {
            IdentityCall::Rng { .. } => IdentityStep::Rng,
            IdentityCall::Clock(_) => IdentityStep::Clock,
            IdentityCall::Hostname(_) => IdentityStep::Hostname,
            IdentityCall::MachineId(_) => IdentityStep::MachineId,
            IdentityCall::RestoreId(_) => IdentityStep::RestoreId,
        }
    }
}

/// Test double: records every call, touches nothing of the system, optionally fails one
/// step, and optionally writes `machine-id` and `restore-id` into a directory of the test's
/// choosing (with the same [`write_atomically`] the real sink uses).
#[derive(Debug)]
pub struct FakeIdentity {
    calls: Mutex<Vec<IdentityCall>>,
    fail_at: Option<IdentityStep>,
    rng: RngOutcome,
    files_dir: Option<PathBuf>,
}

impl Default for FakeIdentity {
    fn default() -> Self {
        FakeIdentity::new()
    }
}

impl FakeIdentity {
    /// A fake where every step succeeds and the RNG is credited and reseeded.
    pub fn new() -> FakeIdentity {
        FakeIdentity {
            calls: Mutex::new(Vec::new()),
            fail_at: None,
            rng: RngOutcome {
                credited: true,
                reseeded: true,
            },
            files_dir: None,
        }
    }

    /// Makes `step` fail (with `EPERM`).
    pub fn failing_at(mut self, step: IdentityStep) -> FakeIdentity {
        self.fail_at = Some(step);
        self
    }

    /// What the RNG step reports.
    pub fn with_rng(mut self, rng: RngOutcome) -> FakeIdentity {
        self.rng = rng;
        self
    }

    /// Writes `machine-id` and `restore-id` into `dir` (which must exist).
    pub fn with_files_dir(mut self, dir: impl Into<PathBuf>) -> FakeIdentity {
        self.files_dir = Some(dir.into());
        self
    }

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<IdentityCall> {
        self.calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn record(&self, call: IdentityCall) -> io::Result<()> {
        let step = call.step();
        self.calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(call);
        if self.fail_at == Some(step) {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        Ok(())
    }
}

impl IdentitySink for FakeIdentity {
    fn reseed_rng(&self, entropy: &[u8]) -> io::Result<RngOutcome> {
        self.record(IdentityCall::Rng { len: entropy.len() })?;
        Ok(self.rng)
    }

    fn set_wall_clock(&self, at: UnixNanos) -> io::Result<i64> {
        self.record(IdentityCall::Clock(at))?;
        Ok(0)
    }

    fn set_hostname(&self, name: &Hostname) -> io::Result<()> {
        self.record(IdentityCall::Hostname(name.clone()))
    }

    fn write_machine_id(&self, id: &MachineId) -> io::Result<()> {
        self.record(IdentityCall::MachineId(id.clone()))?;
        match &self.files_dir {
            Some(dir) => {
                write_atomically(&dir.join("machine-id"), format!("{id}\n").as_bytes(), 0o444)
            }
            None => Ok(()),
        }
    }

    fn record_restore_id(&self, id: &RestoreId) -> io::Result<()> {
        self.record(IdentityCall::RestoreId(id.clone()))?;
        match &self.files_dir {
            Some(dir) => write_restore_id(&dir.join("restore-id"), id),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use kiln_agent_proto::Entropy;

    use super::*;

    fn identity() -> GuestIdentity {
        GuestIdentity {
            restore_id: RestoreId::from_bytes([0x11; 16]),
            entropy: Entropy::new(vec![7; 64]).expect("valid"),
            wall_clock_unix_ns: UnixNanos::new(1_767_225_600_000_000_000).expect("valid"),
            hostname: Hostname::new("sbx-1").expect("valid"),
            machine_id: MachineId::from_bytes([0x22; 16]).expect("valid"),
        }
    }

    fn read_trimmed(path: &Path) -> io::Result<String> {
        Ok(fs::read_to_string(path)?.trim_end().to_owned())
    }

    fn scratch_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("kiln-agent-identity-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("temp dir is writable");
        dir
    }

    #[test]
    fn apply_all_steps_succeed_runs_them_in_order() {
        let fake = FakeIdentity::new();
        let id = identity();
        let ack = apply(&fake, &id).expect("applies");
        assert_eq!(
            fake.calls(),
            vec![
                IdentityCall::Rng { len: 64 },
                IdentityCall::Clock(id.wall_clock_unix_ns),
                IdentityCall::Hostname(id.hostname.clone()),
                IdentityCall::MachineId(id.machine_id.clone()),
                IdentityCall::RestoreId(id.restore_id.clone()),
            ]
        );
        assert_eq!(
            ack,
            IdentityAck {
                restore_id: id.restore_id,
                entropy_credited: true,
                rng_reseeded: true,
                clock_set: true,
                clock_step_ns: 0,
                hostname_set: true,
                machine_id_written: true,
            }
        );
    }

    #[test]
    fn apply_uncredited_rng_is_reported() {
        let fake = FakeIdentity::new().with_rng(RngOutcome {
            credited: false,
            reseeded: false,
        });
        let ack = apply(&fake, &identity()).expect("applies");
        assert!(!ack.entropy_credited && !ack.rng_reseeded);
        assert!(ack.clock_set && ack.hostname_set && ack.machine_id_written);
    }

    #[test]
    fn apply_failed_step_stops_and_reports_what_was_applied() {
        let order = [
            IdentityStep::Rng,
            IdentityStep::Clock,
            IdentityStep::Hostname,
            IdentityStep::MachineId,
            IdentityStep::RestoreId,
        ];
        for (i, failing) in order.into_iter().enumerate() {
            let fake = FakeIdentity::new().failing_at(failing);
            let err = apply(&fake, &identity()).expect_err("a step fails");
            assert_eq!(err.code, ErrorCode::IdentityFailed);
            assert!(
                err.message
                    .starts_with(&format!("failed to {}", failing.describe())),
                "{}",
                err.message
            );
            let steps: Vec<IdentityStep> = fake.calls().iter().map(IdentityCall::step).collect();
            assert_eq!(steps, order[..=i], "steps after the failure must not run");
            if i == 0 {
                assert!(
                    err.message.contains("already applied: nothing"),
                    "{}",
                    err.message
                );
            } else {
                assert!(
                    err.message.contains(order[i - 1].describe()),
                    "{}",
                    err.message
                );
            }
        }
    }

    #[test]
    fn fake_with_files_dir_writes_both_files() {
        let dir = scratch_dir("files");
        let fake = FakeIdentity::new().with_files_dir(&dir);
        let id = identity();
        apply(&fake, &id).expect("applies");
        assert_eq!(
            read_trimmed(&dir.join("restore-id")).expect("written"),
            id.restore_id.as_str()
        );
        assert_eq!(
            read_trimmed(&dir.join("machine-id")).expect("written"),
            id.machine_id.as_str()
        );
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn rewrite_in_place_keeps_the_inode_and_fits_the_length() {
        use std::os::unix::fs::MetadataExt;
        let dir = scratch_dir("in-place");
        let path = dir.join("machine-id");
        fs::write(&path, b"0123456789abcdef0123456789abcdef\n").expect("write");
        let ino = fs::metadata(&path).expect("meta").ino();
        rewrite_in_place(&path, b"fedcba9876543210fedcba9876543210\n").expect("same length");
        assert_eq!(
            fs::read(&path).expect("read"),
            b"fedcba9876543210fedcba9876543210\n"
        );
        rewrite_in_place(&path, b"short\n").expect("shorter");
        assert_eq!(fs::read(&path).expect("read"), b"short\n");
        rewrite_in_place(&path, b"a longer line than before\n").expect("longer");
        assert_eq!(
            fs::read(&path).expect("read"),
            b"a longer line than before\n"
        );
        assert_eq!(fs::metadata(&path).expect("meta").ino(), ino, "same inode");
        assert!(rewrite_in_place(&dir.join("missing"), b"x").is_err());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn write_atomically_replaces_and_leaves_no_temp_file() {
        let dir = scratch_dir("atomic");
        let path = dir.join("machine-id");
        fs::write(&path, "old\n").expect("writable");
        write_atomically(&path, b"new\n", 0o444).expect("replaces");
        assert_eq!(fs::read_to_string(&path).expect("readable"), "new\n");
        let mode = fs::metadata(&path).expect("exists").permissions().mode();
        assert_eq!(mode & 0o777, 0o444);
        let names: Vec<_> = fs::read_dir(&dir)
            .expect("listable")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("machine-id")]);
        // A read-only target is still replaced (rename needs only the directory).
        write_atomically(&path, b"newer\n", 0o444).expect("replaces again");
        assert_eq!(fs::read_to_string(&path).expect("readable"), "newer\n");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn system_identity_is_refused_outside_pid1() {
        // The test harness is never PID 1: the real sink must not exist here.
        assert!(SystemIdentity::for_pid1().is_none());
    }
}
