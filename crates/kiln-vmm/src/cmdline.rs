//! QEMU command-line builder: [`VmConfig`] → argument vector. Pure; no I/O.
//!
//! # Machine type: `q35` (measured)
//!
//! Boot of the Debian 6.1 cloud kernel (bzImage) + a busybox initramfs whose `/init` loads the
//! virtio modules and waits until `/sys/class/virtio-ports/*/name` shows `org.kiln.agent.0`
//! (TCG, 1 vCPU, 256 MiB, QEMU 7.2, 2-core host; seconds from QEMU spawn to that point,
//! medians of interleaved runs; harness: `tests/real_qemu.rs` and the script beside it):
//!
//! | machine (virtio transport)             | idle host (n=12) | 2 CPU hogs (n=8) | hung boots      |
//! |----------------------------------------|------------------|------------------|-----------------|
//! | `microvm` (virtio-mmio, found via ACPI) | 2.04             | 3.18             | 2/8 hogs, 4/26 builds |
//! | `q35`, trimmed (virtio-pci)             | 2.22             | 3.53             | 0 of 130+       |
//! | `pc` (virtio-pci)                       | 3.3 (n=3)        | -                | 0               |
//!
//! `microvm` is ~0.2 s faster, but under TCG on a loaded host its guest intermittently fails
//! "Fast TSC calibration using PIT" and, having neither HPET nor an ACPI PM timer to fall back
//! on ("tsc: No reference (HPET/PMTIMER) available"), hangs forever. `q35` has both
//! references, never hung, and its PCI addresses are stable for snapshot/restore. So kiln uses
//! `q35` with the legacy devices it does not need turned off ([`MACHINE`]).
//! `tsc_early_khz=<host TSC kHz>` fixes microvm (0 of 10 hangs); kiln now passes it on q35
//! too under TCG (`crate::tsc`), because a q35 guest's PIT calibration on a loaded host can
//! also be off by an order of magnitude, and a snapshot keeps it (it is passed as the
//! configuration's extra command line, outside the device fingerprint).
//!
//! Not done here but measured: booting the *uncompressed* ELF `vmlinux` (PVH entry, extracted
//! from the bzImage's LZ4 payload) instead of the bzImage takes q35 from 2.18 s to 1.76 s.
//! That is the image builder's choice: `-kernel` accepts either.
//!
//! # Kernel command line (measured)
//!
//! [`BASE_CMDLINE`] is the boot contract. [`FAST_BOOT_CMDLINE`], same harness on q35, idle
//! host, n=7 medians: nothing 2.53 s (n=12) → `quiet` 2.35 s (every console byte is an emulated UART
//! write) → `+ cryptomgr.notests` 2.10 s (the crypto self-tests run in TCG) →
//! `+ init_on_alloc=0` 2.07 s (within noise at boot; saves zeroing every allocation later).
//! Kept for robustness rather than boot speed: `tsc=reliable no_timer_check` (no clocksource
//! watchdog or timer IRQ check, which under TCG on a loaded host can demote the TSC to the
//! slow, MMIO-read HPET) and `mitigations=off` (single-tenant guest: the host is protected by
//! QEMU/KVM, not by guest mitigations, whose per-syscall cost is large under TCG).
//! Dropped for no measurable effect: `audit=0 nowatchdog 8250.nr_uarts=1 random.trust_cpu=on
//! nokaslr rcupdate.rcu_expedited=1`. Errors and panics are still printed with `quiet`.
//!
//! # Other choices
//! - Disk: the per-sandbox qcow2 overlay is attached with `cache.no-flush=on` (= `cache=unsafe`):
//!   guest flushes become no-ops. A host crash may lose the overlay, which is ephemeral
//!   anyway; QEMU's own qcow2 metadata still reaches the file on flush/migration.
//! - TCG translation cache: `tb-size=256` MiB bounds per-VM host memory for translated code
//!   (QEMU's default is 1 GiB); it is mapped lazily, so a small guest uses far less.
//! - The command line is a pure function of [`VmConfig`]: a snapshot restore must use the same
//!   one (plus `-incoming`) so that device state matches.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use crate::accel::Accel;

/// Name of the virtio-serial port the guest agent serves.
pub const AGENT_PORT_NAME: &str = "org.kiln.agent.0";

/// The boot contract: serial console, reboot (→ QEMU exit) on panic, the agent as init, and
/// the agent port's name.
pub const BASE_CMDLINE: &str = "console=ttyS0 panic=-1 rdinit=/init kiln.port=org.kiln.agent.0";

/// Options that measurably shorten boot under TCG (see the module docs).
pub const FAST_BOOT_CMDLINE: &str =
    "quiet cryptomgr.notests init_on_alloc=0 tsc=reliable no_timer_check mitigations=off";

/// Hygiene, not speed: `init_on_free=1` makes the guest kernel zero every page and slab
/// object it frees, so a value that lived in a process, a pipe or a tmpfs file that is gone
/// (e.g. a secret removed before a user snapshot) is not left in guest RAM for a memory
/// snapshot to save.
pub const HYGIENE_CMDLINE: &str = "init_on_free=1";

/// `-machine` options: q35 without the legacy devices a sandbox does not use.
pub const MACHINE: &str =
    "q35,smm=off,vmport=off,sata=off,smbus=off,usb=off,graphics=off,i8042=off";

/// TCG translation cache size.
pub const TCG_TB_SIZE_MIB: u32 = 256;

/// How a VM is started for an incoming migration (snapshot restore).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Incoming {
    /// `-incoming defer`: wait for QMP `migrate-incoming`.
    Defer,
    /// `-incoming <uri>`, e.g. `exec:cat /path/state`.
    Uri(String),
}

/// Everything needed to start one VM. User input of the driver; the caller owns the paths.
/// Written to `<run_dir>/vm.json` when the VM starts, so a later daemon can adopt it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VmConfig {
    /// QEMU binary.
    pub qemu: PathBuf,
    /// Accelerator.
    pub accel: Accel,
    /// vCPUs (1..=255).
    pub cpus: u32,
    /// Guest RAM in MiB (at least 64).
    pub memory_mib: u32,
    /// Guest kernel (bzImage).
    pub kernel: PathBuf,
    /// Initramfs (the agent is `/init`).
    pub initramfs: PathBuf,
    /// Appended to the kernel command line (e.g. `kiln.probe=1`); may be empty.
    pub extra_cmdline: String,
    /// qcow2 overlay attached as the first virtio-blk disk (`/dev/vda`).
    pub disk: Option<PathBuf>,
    /// File backing guest RAM (`memory-backend-file`); conventionally `<run_dir>/mem`.
    pub memory_file: PathBuf,
    /// `share=on` (writes reach the file: snapshot capture) or `share=off` (private
    /// copy-on-write mapping: clones restored from a template file).
    pub memory_shared: bool,
    /// Runtime directory: sockets, logs and the pidfile live here.
    pub run_dir: PathBuf,
    /// Start waiting for an incoming migration instead of booting.
    pub incoming: Option<Incoming>,
    /// The network device, if the VM has one (`None`: no NIC at all).
    #[serde(default)]
    pub nic: Option<Nic>,
    /// A screen, pointer and keyboard, if the VM is a desktop (`None`: headless).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display: Option<Display>,
}

/// A desktop VM's screen: QEMU's standard VGA (the guest's `bochs` DRM driver), whose EDID
/// offers `width` × `height` as the preferred mode; a `virtio-tablet-pci` (absolute pointer)
/// and a `virtio-keyboard-pci`, fed by QMP `input-send-event` and by VNC viewers; and QEMU's
/// VNC server on [`RunPaths::vnc_socket`] only (no TCP port), every client shared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Display {
    /// Screen width in pixels.
    pub width: u32,
    /// Screen height in pixels.
    pub height: u32,
}

impl Display {
    /// The VGA's video memory (MiB): room for two frames of 32-bit pixels (the driver's
    /// double buffering), as a power of two (QEMU rounds up to one anyway), at least 4.
    /// Smaller than QEMU's 16 MiB default for the usual screens: video memory is not guest
    /// RAM, so every restore reads it from the snapshot's state.
    pub fn vgamem_mib(&self) -> u32 {
        let bytes = 2 * u64::from(self.width) * u64::from(self.height) * 4;
        let mib = bytes.div_ceil(1 << 20).max(4);
        u32::try_from(mib.next_power_of_two()).unwrap_or(u32::MAX)
    }
}

/// A VM's one network device: `virtio-net-pci` with `mac`, and what its frames go to.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Nic {
    /// MAC address (`aa:bb:cc:dd:ee:ff`). A restored guest keeps the captured one until the
    /// agent sets a fresh one; only the frames' backend must be the restoring VM's.
    pub mac: String,
    /// Where the frames go.
    pub backend: NicBackend,
}

/// The backend of a [`Nic`]. Not device state: a snapshot captured with one is restored with
/// the other ([`device_fingerprint`] leaves it out).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum NicBackend {
    /// `-netdev stream`: QEMU listens on [`RunPaths::net_socket`]; each frame is preceded by
    /// its length (4 bytes, big-endian). kiln's relay connects (and reconnects after a daemon
    /// restart). Nobody connected: frames go nowhere.
    Stream,
    /// `-netdev tap` on an existing (persistent) tap device.
    Tap {
        /// The tap's interface name.
        ifname: String,
    },
    /// `-netdev user`: QEMU's own user networking (libslirp), with no policy of kiln's: the
    /// guest reaches the host's loopback through `host`. Only the baseline of `kiln bench
    /// network` uses it (what the policy costs is measured against it).
    User {
        /// The guest's network (CIDR).
        net: String,
        /// The gateway's address inside it.
        host: String,
        /// slirp's DNS address (it must differ from `host`).
        dns: String,
    },
}

/// The files of a runtime directory (see `docs/architecture.md`, state directory).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunPaths {
    /// QMP socket (QEMU listens).
    pub qmp_socket: PathBuf,
    /// Agent virtio-serial socket (QEMU listens).
    pub agent_socket: PathBuf,
    /// The console socket: the daemon listens, QEMU connects ([`crate::console`]).
    pub console_socket: PathBuf,
    /// Guest serial console output, capped (with its rotated `console.log.1`).
    pub console_log: PathBuf,
    /// QEMU's stdout and stderr.
    pub qemu_log: PathBuf,
    /// QEMU's pid and start time ([`crate::procid::ProcessIdentity`]).
    pub pidfile: PathBuf,
    /// The [`VmConfig`] QEMU was started with (JSON), for [`crate::Vm::attach`].
    pub config_file: PathBuf,
    /// The network device's frames with [`NicBackend::Stream`] (QEMU listens).
    pub net_socket: PathBuf,
    /// A desktop VM's VNC server (QEMU listens; the daemon's live view relays to it).
    pub vnc_socket: PathBuf,
}

impl RunPaths {
    /// The paths inside `run_dir`.
    pub fn new(run_dir: &Path) -> RunPaths {
        RunPaths {
            qmp_socket: run_dir.join("qmp.sock"),
            agent_socket: run_dir.join("agent.sock"),
            console_socket: run_dir.join("console.sock"),
            console_log: run_dir.join("console.log"),
            qemu_log: run_dir.join("qemu.log"),
            pidfile: run_dir.join("qemu.pid"),
            config_file: run_dir.join("vm.json"),
            net_socket: run_dir.join("net.sock"),
            vnc_socket: run_dir.join("vnc.sock"),
        }
    }
}

/// The full kernel command line for `cfg`.
pub fn kernel_cmdline(cfg: &VmConfig) -> String {
    let mut s = format!("{BASE_CMDLINE} {FAST_BOOT_CMDLINE} {HYGIENE_CMDLINE}");
    let extra = cfg.extra_cmdline.trim();
    if !extra.is_empty() {
        s.push(' ');
        s.push_str(extra);
    }
    s
}

/// QEMU's argument vector for `cfg` (without the program name).
pub fn build_args(cfg: &VmConfig) -> Vec<OsString> {
    let paths = RunPaths::new(&cfg.run_dir);
    let mut a = Args::default();
    a.push("-nodefaults")
        .push("-no-user-config")
        .push("-display")
        .push("none");
    // A guest reboot (including panic=-1 after a panic) makes QEMU exit instead.
    a.push("-no-reboot");
    a.push("-msg").push("timestamp=on");
    if let Some(name) = cfg.run_dir.file_name() {
        a.push("-name").push(opt(["kiln-".as_ref(), name]));
    }
    a.push("-machine")
        .push(format!("{MACHINE},memory-backend=ram0"));
    match cfg.accel {
        Accel::Kvm => a.push("-accel").push("kvm").push("-cpu").push("host"),
        Accel::Tcg => a
            .push("-accel")
            .push(format!("tcg,tb-size={TCG_TB_SIZE_MIB}"))
            .push("-cpu")
            .push("max"),
    };
    a.push("-smp").push(cfg.cpus.to_string());
    a.push("-m").push(format!("{}M", cfg.memory_mib));
    a.push("-object").push(opt([
        format!(
            "memory-backend-file,id=ram0,size={}M,mem-path=",
            cfg.memory_mib
        )
        .as_ref(),
        escape(cfg.memory_file.as_os_str()).as_os_str(),
        if cfg.memory_shared {
            ",share=on".as_ref()
        } else {
            ",share=off".as_ref()
        },
    ]));
    a.push("-kernel").push(cfg.kernel.as_os_str());
    a.push("-initrd").push(cfg.initramfs.as_os_str());
    a.push("-append").push(kernel_cmdline(cfg));

    // QEMU is the client of the daemon's listener and reconnects every second (a restarted
    // daemon binds it again); see `console.rs` for why.
    a.push("-chardev").push(opt([
        "socket,id=console,path=".as_ref(),
        escape(paths.console_socket.as_os_str()).as_os_str(),
        ",reconnect=1".as_ref(),
    ]));
    a.push("-serial").push("chardev:console");
    a.push("-chardev").push(opt([
        "socket,id=qmp,path=".as_ref(),
        escape(paths.qmp_socket.as_os_str()).as_os_str(),
        ",server=on,wait=off".as_ref(),
    ]));
    a.push("-mon").push("chardev=qmp,mode=control");
    a.push("-chardev").push(opt([
        "socket,id=agent,path=".as_ref(),
        escape(paths.agent_socket.as_os_str()).as_os_str(),
        ",server=on,wait=off".as_ref(),
    ]));
    // Port 0 of a virtio-serial bus is reserved for a console, so two ports: nr=1 is ours.
    a.push("-device")
        .push("virtio-serial-pci,id=vser0,max_ports=2");
    a.push("-device").push(format!(
        "virtserialport,bus=vser0.0,nr=1,chardev=agent,name={AGENT_PORT_NAME}"
    ));
    a.push("-device").push("virtio-rng-pci");
    if let Some(disk) = &cfg.disk {
        a.push("-blockdev").push(opt([
            "driver=file,node-name=disk0-file,cache.direct=off,cache.no-flush=on,filename="
                .as_ref(),
            escape(disk.as_os_str()).as_os_str(),
        ]));
        a.push("-blockdev").push(
            "driver=qcow2,node-name=disk0,file=disk0-file,cache.direct=off,cache.no-flush=on",
        );
        a.push("-device").push("virtio-blk-pci,drive=disk0");
    }
    if let Some(nic) = &cfg.nic {
        match &nic.backend {
            NicBackend::Stream => a.push("-netdev").push(opt([
                "stream,id=net0,server=on,addr.type=unix,addr.path=".as_ref(),
                escape(paths.net_socket.as_os_str()).as_os_str(),
            ])),
            NicBackend::Tap { ifname } => a.push("-netdev").push(opt([
                "tap,id=net0,script=no,downscript=no,vhost=off,ifname=".as_ref(),
                escape(OsStr::new(ifname)).as_os_str(),
            ])),
            NicBackend::User { net, host, dns } => a.push("-netdev").push(opt([
                "user,id=net0,ipv6=off,net=".as_ref(),
                escape(OsStr::new(net)).as_os_str(),
                ",host=".as_ref(),
                escape(OsStr::new(host)).as_os_str(),
                ",dns=".as_ref(),
                escape(OsStr::new(dns)).as_os_str(),
            ])),
        };
        // No option ROM: kiln boots the kernel directly, never from the network.
        a.push("-device").push(format!(
            "virtio-net-pci,netdev=net0,romfile=,mac={}",
            nic.mac
        ));
    }
    if let Some(d) = &cfg.display {
        a.push("-device").push(format!(
            "VGA,xres={},yres={},edid=on,vgamem_mb={}",
            d.width,
            d.height,
            d.vgamem_mib()
        ));
        a.push("-device").push("virtio-tablet-pci");
        a.push("-device").push("virtio-keyboard-pci");
        a.push("-vnc").push(opt([
            "unix:".as_ref(),
            escape(paths.vnc_socket.as_os_str()).as_os_str(),
            ",share=force-shared".as_ref(),
        ]));
    }
    // `-S` with `-incoming`: a loaded VM stays paused until the host says `cont`, even when
    // the stream came from a running (live-migrated) VM.
    match &cfg.incoming {
        Some(Incoming::Defer) => {
            a.push("-S").push("-incoming").push("defer");
        }
        Some(Incoming::Uri(uri)) => {
            a.push("-S").push("-incoming").push(uri.as_str());
        }
        None => {}
    }
    a.0
}

/// Version tag mixed into [`device_fingerprint`]; bump when its inputs change meaning.
/// v2: guests boot with the host's TSC rate under TCG (`kiln_vmm::tsc`); a v1 snapshot may
/// carry a guest whose clocks run an order of magnitude fast.
const FINGERPRINT_VERSION: &str = "kiln-device-fingerprint-v2";

/// The console chardev as the fingerprint spells it. The chardev's backend is not device
/// state (it is not migrated), so the fingerprint keeps the spelling of the time the console
/// was a file: snapshots taken before the console became a socket remain usable.
const FINGERPRINT_CONSOLE_CHARDEV: &str = "file,id=console,path=/run/console.log";

/// A digest (hex sha256) of everything in `cfg`'s argument vector that a restored VM must
/// share with the captured one for QEMU to accept the device state: machine type and options,
/// accelerator, CPU model, vCPUs, memory size and backend, the device list and their
/// options, disk presence and format, the agent port. Left out because they legitimately
/// differ between a capture and its clones: every host path (run directory, sockets, logs,
/// memory file, disk file), `share=on/off`, `-incoming`, the VM name, the network device's
/// MAC and backend (the MAC is migrated device state, and the agent sets a fresh one after
/// every restore; the backend is host plumbing). Left out because they
/// do not affect device state: the kernel command line, and the kernel/initramfs *paths*
/// (digesting their *content* is the caller's job, as for the rootfs).
pub fn device_fingerprint(cfg: &VmConfig) -> String {
    use sha2::{Digest, Sha256};
    let normalized = VmConfig {
        qemu: PathBuf::from("/qemu"),
        kernel: PathBuf::from("/kernel"),
        initramfs: PathBuf::from("/initramfs"),
        extra_cmdline: String::new(),
        disk: cfg.disk.as_ref().map(|_| PathBuf::from("/disk")),
        memory_file: PathBuf::from("/mem"),
        memory_shared: true,
        run_dir: PathBuf::from("/run"),
        incoming: None,
        nic: cfg.nic.as_ref().map(|_| Nic {
            mac: "02:00:00:00:00:00".to_owned(),
            backend: NicBackend::Stream,
        }),
        ..cfg.clone()
    };
    let mut h = Sha256::new();
    h.update(FINGERPRINT_VERSION.as_bytes());
    let args = build_args(&normalized);
    let mut skip_next = false;
    for (i, arg) in args.iter().enumerate() {
        if skip_next {
            skip_next = false;
            continue;
        }
        // The name is cosmetic. The kernel command line stays in: it is guest state once
        // booted (e.g. `init_on_free`), so a snapshot booted with another one is stale.
        if arg.as_bytes() == b"-name" && i + 1 < args.len() {
            skip_next = true;
            continue;
        }
        h.update([0u8]);
        if arg.as_bytes().starts_with(b"socket,id=console,") {
            h.update(FINGERPRINT_CONSOLE_CHARDEV.as_bytes());
        } else {
            h.update(arg.as_bytes());
        }
    }
    hex::encode(h.finalize())
}

#[derive(Default)]
struct Args(Vec<OsString>);

impl Args {
    fn push(&mut self, s: impl Into<OsString>) -> &mut Args {
        self.0.push(s.into());
        self
    }
}

/// Doubles commas, QEMU's escape inside `key=value,...` option strings.
fn escape(s: &OsStr) -> OsString {
    let mut out = Vec::with_capacity(s.len());
    for &b in s.as_bytes() {
        out.push(b);
        if b == b',' {
            out.push(b',');
        }
    }
    OsString::from_vec(out)
}

fn opt<'a>(parts: impl IntoIterator<Item = &'a OsStr>) -> OsString {
    let mut s = OsString::new();
    for p in parts {
        s.push(p);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> VmConfig {
        VmConfig {
            qemu: "/usr/bin/qemu-system-x86_64".into(),
            accel: Accel::Tcg,
            cpus: 2,
            memory_mib: 256,
            kernel: "/img/vmlinuz".into(),
            initramfs: "/img/initramfs.cpio".into(),
            extra_cmdline: String::new(),
            disk: Some("/run/kiln/sb1/disk.qcow2".into()),
            memory_file: "/run/kiln/sb1/mem".into(),
            memory_shared: true,
            run_dir: "/run/kiln/sb1".into(),
            incoming: None,
            nic: None,
            display: None,
        }
    }

    #[test]
    fn display_adds_vga_tablet_keyboard_and_a_unix_vnc_server() {
        let mut cfg = config();
        let headless = strings(&build_args(&cfg));
        assert!(
            !values(&headless, "-device")
                .iter()
                .any(|d| d.starts_with("VGA"))
        );
        assert!(values(&headless, "-vnc").is_empty());
        cfg.display = Some(Display {
            width: 1280,
            height: 800,
        });
        let args = strings(&build_args(&cfg));
        let devices = values(&args, "-device");
        assert!(
            devices.contains(&"VGA,xres=1280,yres=800,edid=on,vgamem_mb=8"),
            "{devices:?}"
        );
        assert!(devices.contains(&"virtio-tablet-pci"));
        assert!(devices.contains(&"virtio-keyboard-pci"));
        assert_eq!(
            values(&args, "-vnc"),
            ["unix:/run/kiln/sb1/vnc.sock,share=force-shared"]
        );
        // A screen is device state: another one, or none, is another snapshot.
        let with = device_fingerprint(&cfg);
        assert_ne!(with, device_fingerprint(&config()));
        cfg.display = Some(Display {
            width: 1024,
            height: 768,
        });
        assert_ne!(with, device_fingerprint(&cfg));
        // The run directory (and so the socket's path) is not.
        let mut moved = cfg.clone();
        moved.run_dir = "/elsewhere/sb2".into();
        assert_eq!(device_fingerprint(&cfg), device_fingerprint(&moved));
    }

    #[test]
    fn vga_memory_holds_two_frames_as_a_power_of_two() {
        let mib = |width, height| Display { width, height }.vgamem_mib();
        assert_eq!(mib(640, 480), 4, "at least 4");
        assert_eq!(mib(1280, 800), 8, "7.8 MiB rounds up to 8");
        assert_eq!(mib(1920, 1080), 16);
        assert_eq!(mib(2560, 1600), 32);
    }

    fn nic(mac: &str, backend: NicBackend) -> Option<Nic> {
        Some(Nic {
            mac: mac.into(),
            backend,
        })
    }

    fn strings(args: &[OsString]) -> Vec<String> {
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    /// The value following `flag`, for every occurrence.
    fn values<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn build_args_tcg_has_required_pieces() {
        let args = strings(&build_args(&config()));
        for flag in ["-nodefaults", "-no-user-config", "-no-reboot"] {
            assert!(args.iter().any(|a| a == flag), "missing {flag}");
        }
        assert_eq!(values(&args, "-display"), ["none"]);
        assert_eq!(values(&args, "-accel"), ["tcg,tb-size=256"]);
        assert_eq!(values(&args, "-cpu"), ["max"]);
        assert_eq!(values(&args, "-smp"), ["2"]);
        assert_eq!(values(&args, "-m"), ["256M"]);
        assert_eq!(
            values(&args, "-machine"),
            [format!("{MACHINE},memory-backend=ram0")]
        );
        assert_eq!(
            values(&args, "-object"),
            ["memory-backend-file,id=ram0,size=256M,mem-path=/run/kiln/sb1/mem,share=on"]
        );
        assert_eq!(values(&args, "-kernel"), ["/img/vmlinuz"]);
        assert_eq!(values(&args, "-initrd"), ["/img/initramfs.cpio"]);
        let chardevs = values(&args, "-chardev");
        assert!(
            chardevs.contains(&"socket,id=console,path=/run/kiln/sb1/console.sock,reconnect=1")
        );
        assert!(chardevs.contains(&"socket,id=qmp,path=/run/kiln/sb1/qmp.sock,server=on,wait=off"));
        assert!(
            chardevs.contains(&"socket,id=agent,path=/run/kiln/sb1/agent.sock,server=on,wait=off")
        );
        assert_eq!(values(&args, "-serial"), ["chardev:console"]);
        assert_eq!(values(&args, "-mon"), ["chardev=qmp,mode=control"]);
        let devices = values(&args, "-device");
        assert!(
            devices
                .contains(&"virtserialport,bus=vser0.0,nr=1,chardev=agent,name=org.kiln.agent.0")
        );
        assert!(devices.contains(&"virtio-rng-pci"));
        assert!(devices.contains(&"virtio-blk-pci,drive=disk0"));
        assert!(values(&args, "-blockdev")[0].ends_with("filename=/run/kiln/sb1/disk.qcow2"));
        assert!(
            values(&args, "-blockdev")
                .iter()
                .all(|b| b.contains("cache.no-flush=on"))
        );
        assert!(values(&args, "-incoming").is_empty());
    }

    #[test]
    fn build_args_kvm_uses_host_cpu() {
        let args = strings(&build_args(&VmConfig {
            accel: Accel::Kvm,
            ..config()
        }));
        assert_eq!(values(&args, "-accel"), ["kvm"]);
        assert_eq!(values(&args, "-cpu"), ["host"]);
    }

    #[test]
    fn build_args_private_memory_without_disk_and_incoming_defer() {
        let cfg = VmConfig {
            memory_shared: false,
            disk: None,
            incoming: Some(Incoming::Defer),
            ..config()
        };
        let args = strings(&build_args(&cfg));
        assert!(values(&args, "-object")[0].ends_with(",share=off"));
        assert!(values(&args, "-blockdev").is_empty());
        assert!(
            !values(&args, "-device")
                .iter()
                .any(|d| d.starts_with("virtio-blk"))
        );
        assert_eq!(values(&args, "-incoming"), ["defer"]);
    }

    #[test]
    fn build_args_commas_in_paths_are_escaped() {
        let cfg = VmConfig {
            run_dir: "/tmp/a,b".into(),
            memory_file: "/tmp/a,b/mem".into(),
            ..config()
        };
        let args = strings(&build_args(&cfg));
        assert!(values(&args, "-object")[0].contains("mem-path=/tmp/a,,b/mem,share=on"));
        assert!(
            values(&args, "-chardev")
                .contains(&"socket,id=console,path=/tmp/a,,b/console.sock,reconnect=1")
        );
    }

    /// Snapshots record this digest: a change of it makes every existing snapshot unusable,
    /// so it changes only on purpose (the console's move from a file to a socket did not
    /// change it; v2, the guests' TSC rate under TCG, did on purpose).
    #[test]
    fn device_fingerprint_is_pinned() {
        assert_eq!(device_fingerprint(&config()), PINNED_FINGERPRINT);
    }

    const PINNED_FINGERPRINT: &str =
        "595e1c37a3290bf4da4a88349a1d2533f738df88e224158717087e2a89d2410a";

    #[test]
    fn device_fingerprint_ignores_paths_but_not_devices() {
        let base = device_fingerprint(&config());
        assert_eq!(base.len(), 64);
        let clone = VmConfig {
            run_dir: "/other/run/clone1".into(),
            memory_file: "/snapshots/s1/mem".into(),
            memory_shared: false,
            disk: Some("/other/run/clone1/disk.qcow2".into()),
            kernel: "/elsewhere/vmlinuz".into(),
            extra_cmdline: "kiln.debug=1".into(),
            incoming: Some(Incoming::Defer),
            ..config()
        };
        assert_eq!(
            device_fingerprint(&clone),
            base,
            "a clone matches its capture"
        );
        let differs = [
            VmConfig {
                cpus: 1,
                ..config()
            },
            VmConfig {
                memory_mib: 512,
                ..config()
            },
            VmConfig {
                accel: Accel::Kvm,
                ..config()
            },
            VmConfig {
                disk: None,
                ..config()
            },
        ];
        for cfg in differs {
            assert_ne!(device_fingerprint(&cfg), base, "{cfg:?}");
        }
    }

    #[test]
    fn kernel_cmdline_has_contract_and_extra() {
        let cmd = kernel_cmdline(&VmConfig {
            extra_cmdline: " kiln.probe=1 ".into(),
            ..config()
        });
        assert!(cmd.starts_with("console=ttyS0 panic=-1 rdinit=/init kiln.port=org.kiln.agent.0 "));
        assert!(cmd.ends_with(" kiln.probe=1"));
        assert!(cmd.contains("cryptomgr.notests"));
        let args = strings(&build_args(&config()));
        assert_eq!(values(&args, "-append"), [kernel_cmdline(&config())]);
    }

    #[test]
    fn nic_backends_and_mac_reach_the_command_line() {
        let args = strings(&build_args(&config()));
        assert!(
            values(&args, "-netdev").is_empty(),
            "no NIC without one: {args:?}"
        );
        let stream = strings(&build_args(&VmConfig {
            nic: nic("02:11:22:33:44:55", NicBackend::Stream),
            ..config()
        }));
        assert_eq!(
            values(&stream, "-netdev"),
            ["stream,id=net0,server=on,addr.type=unix,addr.path=/run/kiln/sb1/net.sock"]
        );
        assert!(
            values(&stream, "-device")
                .contains(&"virtio-net-pci,netdev=net0,romfile=,mac=02:11:22:33:44:55"),
            "{stream:?}"
        );
        let tap = strings(&build_args(&VmConfig {
            nic: nic(
                "02:11:22:33:44:55",
                NicBackend::Tap {
                    ifname: "kt-0123456789ab".into(),
                },
            ),
            ..config()
        }));
        assert_eq!(
            values(&tap, "-netdev"),
            ["tap,id=net0,script=no,downscript=no,vhost=off,ifname=kt-0123456789ab"]
        );
        let user = strings(&build_args(&VmConfig {
            nic: nic(
                "02:11:22:33:44:55",
                NicBackend::User {
                    net: "10.213.0.0/16".into(),
                    host: "10.213.0.1".into(),
                    dns: "10.213.255.254".into(),
                },
            ),
            ..config()
        }));
        assert_eq!(
            values(&user, "-netdev"),
            ["user,id=net0,ipv6=off,net=10.213.0.0/16,host=10.213.0.1,dns=10.213.255.254"]
        );
    }

    #[test]
    fn fingerprint_sees_a_nic_but_not_its_mac_or_backend() {
        let none = device_fingerprint(&config());
        let stream = device_fingerprint(&VmConfig {
            nic: nic("02:00:00:00:00:01", NicBackend::Stream),
            ..config()
        });
        let tap = device_fingerprint(&VmConfig {
            nic: nic(
                "02:00:00:00:00:02",
                NicBackend::Tap {
                    ifname: "kt-x".into(),
                },
            ),
            ..config()
        });
        assert_ne!(none, stream, "a NIC is device state");
        assert_eq!(stream, tap, "MAC and backend are not");
    }
}
