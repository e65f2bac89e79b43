//! QEMU driver: command line, process lifecycle, accelerator probe, overlays and snapshots.
//!
//! Owns:
//! - [`qemu`]: finding `qemu-system-x86_64`, its version and capabilities;
//! - [`cmdline`]: [`VmConfig`] → argument vector (machine type and kernel command line,
//!   with the measurements behind them);
//! - [`Vm`]: one QEMU process (spawn, pidfile, QMP, exit notification, shutdown);
//! - [`console`]: the guest's serial console, read from a socket into a capped log;
//! - [`procid`]: pid + start-time identities for the daemon's startup janitor;
//! - [`accel`]: KVM-or-TCG, probed by booting the real guest kernel;
//! - [`create_overlay`]: qcow2 overlays over the read-only rootfs;
//! - [`snapshot`]: warm snapshots: [`Vm::capture`] (device state via migration) and
//!   [`Vm::restore`] (clones mapping the captured RAM file copy-on-write).
//!
//! Must not: know about sandboxes, images or the database, nor speak the guest agent's
//! protocol (that is `kiln-agent-host`; this crate only names the agent's chardev socket and
//! virtio-serial port). Everything here is driven by
//! paths and configs the caller provides.
//!
//! Runtime requirement: QEMU processes get `PR_SET_PDEATHSIG(SIGKILL)`, which fires when the
//! *thread* that spawned them exits. Call the spawning functions from tokio worker threads
//! (plain `async` tasks), never from `spawn_blocking`.

pub mod accel;
pub mod cmdline;
pub mod console;
mod error;
mod overlay;
mod process;
pub mod procid;
pub mod qemu;
mod screen;
pub mod snapshot;
pub mod tsc;
mod vm;

pub use accel::{Accel, AccelVerdict};
pub use cmdline::{Display, Incoming, Nic, NicBackend, RunPaths, VmConfig, device_fingerprint};
pub use error::VmmError;
pub use overlay::{BackingFormat, create_overlay, create_overlay_with, rebase_overlay};
pub use process::VmExit;
pub use snapshot::{AfterCapture, CaptureMode, CaptureReport, RestoreReport};
pub use vm::{QMP_CONNECT_TIMEOUT, Vm};

pub use kiln_qmp as qmp;
