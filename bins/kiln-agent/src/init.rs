//! PID 1 duties: the boot contract of docs/architecture.md, "Boot contract".
//!
//! Owns: everything the agent does as the initramfs `/init` before it serves the channel.
//!
//! ```text
//!  early_mounts: devtmpfs /dev, console on fds 0-2, proc /proc, sysfs /sys
//!  kiln.probe=1? ──yes──▶ "KILN-PROBE-OK" on the console, power off
//!  load_modules: /lib/modules/load-order, finit_module each (EEXIST is fine)
//!  mount_root:   wait for /sys/block/vda (bounded), mount /dev/vda ext4 rw on /newroot
//!  switch_root:  move /dev /proc /sys into /newroot, mount --move /newroot /, chroot, chdir /
//!  late_setup:   tmpfs /run /tmp /dev/shm, devpts /dev/pts, hostname "kiln", lo up
//! ```
//!
//! Invariants: every step either succeeds, logs a warning (non-essential steps), or returns a
//! [`BootError`] naming the step; the caller then prints it on the console and powers off, so
//! a broken boot never hangs. Nothing is written to the root disk.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::console::{say, warn};
use crate::sys;

/// Directory of the initramfs' kernel modules.
const MODULE_DIR: &str = "/lib/modules";
/// How long to wait for the root disk to appear.
const ROOT_WAIT: Duration = Duration::from_secs(30);
/// Root disk name (first virtio-blk disk).
const ROOT_DISK: &str = "vda";
/// Where the root disk is mounted before the switch.
const NEW_ROOT: &str = "/newroot";
/// Default agent port name if the command line names none.
pub const DEFAULT_PORT_NAME: &str = "org.kiln.agent.0";

/// A boot step failed.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// A system call or file operation of a boot step failed.
    #[error("failed to {step}")]
    Step {
        /// What was being done.
        step: String,
        /// The failure.
        #[source]
        source: io::Error,
    },
    /// Something did not appear in time.
    #[error("timed out after {waited:?} waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long.
        waited: Duration,
    },
}

fn step<T>(what: impl FnOnce() -> String, result: io::Result<T>) -> Result<T, BootError> {
    result.map_err(|source| BootError::Step {
        step: what(),
        source,
    })
}

/// What the agent reads from `/proc/cmdline`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cmdline {
    /// `kiln.probe=1`: accelerator probe, print the marker and power off.
    pub probe: bool,
    /// `kiln.port=NAME`: the virtio-serial port to serve.
    pub port_name: String,
}

impl Default for Cmdline {
    fn default() -> Self {
        Cmdline {
            probe: false,
            port_name: DEFAULT_PORT_NAME.to_owned(),
        }
    }
}

impl Cmdline {
    /// Parses a kernel command line.
    pub fn parse(line: &str) -> Cmdline {
        let mut out = Cmdline::default();
        for word in line.split_ascii_whitespace() {
            if let Some(v) = word.strip_prefix("kiln.probe=") {
                out.probe = v == "1";
            } else if let Some(v) = word.strip_prefix("kiln.port=")
                && !v.is_empty()
            {
                v.clone_into(&mut out.port_name);
            }
        }
        out
    }

    /// Reads and parses `/proc/cmdline`.
    pub fn read() -> Result<Cmdline, BootError> {
        let line = step(
            || "read /proc/cmdline".to_owned(),
            std::fs::read_to_string("/proc/cmdline"),
        )?;
        Ok(Cmdline::parse(&line))
    }
}

fn mkdir(path: &str) -> Result<(), BootError> {
    match std::fs::create_dir_all(path) {
        Ok(()) => Ok(()),
        Err(source) => Err(BootError::Step {
            step: format!("create {path}"),
            source,
        }),
    }
}

fn mount(
    source: &str,
    target: &str,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), BootError> {
    step(
        || format!("mount {source} on {target}"),
        sys::mount(source, target, fstype, flags, data),
    )
}

/// Mounts devtmpfs, proc and sysfs, and points fds 0-2 at /dev/console.
pub fn early_mounts() -> Result<(), BootError> {
    mkdir("/dev")?;
    match sys::mount(
        "devtmpfs",
        "/dev",
        Some("devtmpfs"),
        libc::MS_NOSUID,
        Some("mode=0755"),
    ) {
        Ok(()) => {}
        // Already mounted (CONFIG_DEVTMPFS_MOUNT or a re-exec): fine.
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
        Err(source) => {
            return Err(BootError::Step {
                step: "mount devtmpfs on /dev".to_owned(),
                source,
            });
        }
    }
    match OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
    {
        Ok(console) => {
            if let Err(e) = sys::dup_to_stdio(console) {
                warn(format_args!("cannot attach stdio to /dev/console: {e}"));
            }
        }
        Err(e) => warn(format_args!("cannot open /dev/console: {e}")),
    }
    let nosuid_nodev_noexec = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    mkdir("/proc")?;
    mount("proc", "/proc", Some("proc"), nosuid_nodev_noexec, None)?;
    mkdir("/sys")?;
    mount("sysfs", "/sys", Some("sysfs"), nosuid_nodev_noexec, None)?;
    Ok(())
}

/// Prints a line on the console and waits until it has left the UART.
pub fn console_line(line: &str) {
    let mut err = io::stderr().lock();
    let _ = writeln!(err, "{line}");
    let _ = err.flush();
    let _ = sys::tcdrain(2);
}

/// Syncs and powers off; if the kernel refuses, aborts (the kernel then panics, which a
/// `panic=` command line turns into a reset) rather than hanging.
pub fn power_off_now() -> ! {
    let _ = sys::tcdrain(2);
    sys::sync();
    let err = sys::power_off();
    say(format_args!("power off failed: {err}"));
    std::process::abort()
}

/// Makes any panic print its message and power the guest off (PID 1 must never hang).
pub fn install_panic_power_off() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        say(format_args!("fatal: panic in the agent, powering off"));
        power_off_now();
    }));
}

/// Loads the modules listed in `/lib/modules/load-order`, in order. Failures are logged, not
/// fatal: a missing disk or port is reported later with a clearer message.
pub fn load_modules() {
    let order = Path::new(MODULE_DIR).join("load-order");
    let list = match std::fs::read_to_string(&order) {
        Ok(list) => list,
        Err(e) => {
            warn(format_args!("cannot read {}: {e}", order.display()));
            return;
        }
    };
    for name in list.lines().map(str::trim) {
        if name.is_empty() || name.starts_with('#') || name.contains('/') {
            continue;
        }
        let path = Path::new(MODULE_DIR).join(name);
        let result = File::open(&path).and_then(|f| sys::finit_module(&f));
        match result {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => warn(format_args!("cannot load module {}: {e}", path.display())),
        }
    }
}

/// Polls `check` every 10 ms until it is true or `limit` passes.
pub fn wait_until(
    what: &str,
    limit: Duration,
    mut check: impl FnMut() -> bool,
) -> Result<(), BootError> {
    let start = Instant::now();
    while !check() {
        if start.elapsed() >= limit {
            return Err(BootError::Timeout {
                what: what.to_owned(),
                waited: limit,
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Waits for the root disk and mounts it read-write on /newroot.
pub fn mount_root() -> Result<(), BootError> {
    let dev = format!("/dev/{ROOT_DISK}");
    wait_until(&format!("the root disk {dev}"), ROOT_WAIT, || {
        Path::new("/sys/block").join(ROOT_DISK).exists() && Path::new(&dev).exists()
    })?;
    mkdir(NEW_ROOT)?;
    mount(&dev, NEW_ROOT, Some("ext4"), 0, None)
}

/// Moves /dev, /proc and /sys into /newroot and makes it the root.
pub fn switch_root() -> Result<(), BootError> {
    for dir in ["/dev", "/proc", "/sys"] {
        let target = format!("{NEW_ROOT}{dir}");
        mkdir(&target)?;
        mount(dir, &target, None, libc::MS_MOVE, None)?;
    }
    step(
        || format!("chdir to {NEW_ROOT}"),
        std::env::set_current_dir(NEW_ROOT),
    )?;
    mount(".", "/", None, libc::MS_MOVE, None)?;
    step(
        || "chroot into the new root".to_owned(),
        std::os::unix::fs::chroot("."),
    )?;
    step(|| "chdir to /".to_owned(), std::env::set_current_dir("/"))?;
    Ok(())
}

/// Scratch mounts, hostname and loopback. Failures are logged, not fatal.
pub fn late_setup() {
    let nosuid_nodev = libc::MS_NOSUID | libc::MS_NODEV;
    let mounts: [(&str, &str, &str, libc::c_ulong, &str); 4] = [
        ("tmpfs", "/run", "tmpfs", nosuid_nodev, "mode=0755"),
        ("tmpfs", "/tmp", "tmpfs", nosuid_nodev, "mode=1777"),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            libc::MS_NOSUID | libc::MS_NOEXEC,
            "mode=0620,ptmxmode=0666",
        ),
        ("tmpfs", "/dev/shm", "tmpfs", nosuid_nodev, "mode=1777"),
    ];
    for (source, target, fstype, flags, data) in mounts {
        let result =
            mkdir(target).and_then(|()| mount(source, target, Some(fstype), flags, Some(data)));
        if let Err(e) = result {
            warn(format_args!("{}", crate::console::error_chain(&e)));
        }
    }
    if let Err(e) = sys::sethostname("kiln") {
        warn(format_args!("cannot set hostname: {e}"));
    }
    if let Err(e) = sys::interface_up("lo") {
        warn(format_args!("cannot bring up lo: {e}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_parses_probe_and_port() {
        let c =
            Cmdline::parse("console=ttyS0 rdinit=/init kiln.port=org.kiln.agent.7 kiln.probe=1");
        assert!(c.probe);
        assert_eq!(c.port_name, "org.kiln.agent.7");
        let d = Cmdline::parse("console=ttyS0 kiln.probe=0 kiln.port=");
        assert_eq!(d, Cmdline::default());
    }

    #[test]
    fn wait_until_times_out_with_context() {
        let err = wait_until("nothing", Duration::ZERO, || false).expect_err("never true");
        assert!(err.to_string().contains("nothing"));
        assert!(wait_until("something", Duration::ZERO, || true).is_ok());
    }
}
