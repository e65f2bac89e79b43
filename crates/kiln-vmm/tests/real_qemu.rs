//! Real QEMU tests: they boot Linux guests under TCG, so they are `#[ignore]`d for the fast
//! run and run by `scripts/test` with the end-to-end suite, once the guest images are built.
//!
//! Inputs are found the way the end-to-end suite finds them: the `base` image in
//! `$KILN_E2E_HOME/images/base` (its kernel, and its initramfs with the real agent and rootfs
//! for the snapshot tests); the busybox test initramfs of the first tests is built from that
//! initramfs's modules by `tests/support/make-test-initramfs.sh`. `KILN_TEST_KERNEL`,
//! `KILN_TEST_INITRAMFS` and `KILN_TEST_IMAGE_DIR` override them.
//! ```text
//! KILN_E2E_HOME=/tmp/kiln-e2e-home cargo nextest run -p kiln-vmm --run-ignored only
//! ```

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use kiln_vmm::accel::{self, ProbeOutcome};
use kiln_vmm::qmp::commands::{QueryStatus, RunState};
use kiln_vmm::{Accel, Vm, VmConfig, VmExit, VmmError, create_overlay};

const BOOT_LIMIT: Duration = Duration::from_secs(60);

/// The `base` image of the end-to-end suite's home (or `KILN_TEST_IMAGE_DIR`).
fn image_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("KILN_TEST_IMAGE_DIR") {
        return PathBuf::from(dir);
    }
    match std::env::var_os("KILN_E2E_HOME") {
        Some(h) if !h.is_empty() => PathBuf::from(h).join("images/base"),
        _ => panic!(
            "KILN_E2E_HOME is not set: these tests use its built base image (scripts/test sets it)"
        ),
    }
}

/// The guest kernel: `KILN_TEST_KERNEL`, else the base image's.
fn test_kernel() -> PathBuf {
    std::env::var_os("KILN_TEST_KERNEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| image_dir().join("vmlinuz"))
}

/// The busybox test initramfs (markers, `kiln.test=sleep`): `KILN_TEST_INITRAMFS`, else built
/// once per test process from the base image's initramfs.
fn test_initramfs() -> PathBuf {
    if let Some(p) = std::env::var_os("KILN_TEST_INITRAMFS") {
        return PathBuf::from(p);
    }
    static BUILT: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let dir = tempfile::tempdir().expect("tempdir");
            let out = dir.path().join("test.cpio");
            let script =
                Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/make-test-initramfs.sh");
            let status = std::process::Command::new("sh")
                .arg(&script)
                .arg(image_dir().join("initramfs.cpio"))
                .arg(&out)
                .status()
                .expect("run make-test-initramfs.sh");
            assert!(status.success(), "make-test-initramfs.sh failed: {status}");
            (dir, out)
        })
        .1
        .clone()
}

fn config(run_dir: &Path, extra: &str) -> VmConfig {
    VmConfig {
        nic: None,
        display: None,
        qemu: kiln_vmm::qemu::find_binary().expect("qemu installed"),
        accel: Accel::Tcg,
        cpus: 1,
        memory_mib: 256,
        kernel: test_kernel(),
        initramfs: test_initramfs(),
        extra_cmdline: extra.to_owned(),
        disk: None,
        memory_file: run_dir.join("mem"),
        memory_shared: true,
        run_dir: run_dir.to_owned(),
        incoming: None,
    }
}

/// Polls the console until `marker` appears; returns the time since `start`.
async fn wait_marker(vm: &Vm, marker: &str, start: Instant) -> Duration {
    loop {
        let console = std::fs::read_to_string(vm.console_log()).unwrap_or_default();
        if console.contains(marker) {
            return start.elapsed();
        }
        if let Some(exit) = vm.try_exit() {
            panic!("QEMU exited ({exit}) before {marker}; console:\n{console}");
        }
        assert!(
            start.elapsed() < BOOT_LIMIT,
            "no {marker} within {BOOT_LIMIT:?}; console:\n{console}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "boots a real guest under TCG: run by scripts/test"]
async fn vm_boots_with_disk_and_agent_port_then_guest_poweroff_exits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("base.raw");
    std::fs::File::create(&base)
        .and_then(|f| f.set_len(16 << 20))
        .expect("base image");
    let disk = dir.path().join("disk.qcow2");
    create_overlay(&base, &disk).await.expect("overlay");
    let cfg = VmConfig {
        disk: Some(disk),
        ..config(dir.path(), "")
    };
    let start = Instant::now();
    let vm = Vm::spawn(&cfg).await.expect("spawn");
    let qmp_up = start.elapsed();
    let status = vm.qmp().execute(&QueryStatus).await.expect("query-status");
    assert_eq!(status.status, RunState::Running);
    assert!(vm.agent_socket().exists());
    let init = wait_marker(&vm, "KILN-MARKER-INIT", start).await;
    let done = wait_marker(&vm, "KILN-MARKER-DONE", start).await;
    let exit = tokio::time::timeout(BOOT_LIMIT, vm.wait_exit())
        .await
        .expect("guest powers off");
    assert_eq!(exit, VmExit::Exited(0));
    let console = std::fs::read_to_string(vm.console_log()).expect("console");
    eprintln!("qmp up {qmp_up:?}, init {init:?}, devices {done:?}\n{console}");
    assert!(console.contains("name=org.kiln.agent.0"), "{console}");
    assert!(console.contains("block: vda"), "{console}");
    // Several waiters see the same exit.
    assert_eq!(vm.wait_exit().await, VmExit::Exited(0));
    assert!(!vm.identity().is_same_process_alive());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "boots a real guest under TCG: run by scripts/test"]
async fn vm_shutdown_quits_running_guest_and_kill_and_drop_reap() {
    let dir = tempfile::tempdir().expect("tempdir");
    let start = Instant::now();
    let vm = Vm::spawn(&config(&dir.path().join("a"), "kiln.test=sleep"))
        .await
        .expect("spawn");
    wait_marker(&vm, "KILN-MARKER-DONE", start).await;
    let _agent = tokio::net::UnixStream::connect(vm.agent_socket())
        .await
        .expect("agent socket accepts");
    let exit = vm.shutdown(Duration::from_secs(5)).await;
    assert_eq!(exit, VmExit::Exited(0), "quit is a clean exit");
    assert_eq!(
        vm.shutdown(Duration::from_secs(1)).await,
        exit,
        "idempotent"
    );

    let vm = Vm::spawn(&config(&dir.path().join("b"), "kiln.test=sleep"))
        .await
        .expect("spawn");
    assert_eq!(vm.kill().await, VmExit::Signaled(9));

    let vm = Vm::spawn(&config(&dir.path().join("c"), "kiln.test=sleep"))
        .await
        .expect("spawn");
    let ident = vm.identity();
    assert!(ident.is_same_process_alive());
    drop(vm);
    let t = Instant::now();
    while ident.is_same_process_alive() {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "dropping a Vm must kill QEMU"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "starts real QEMU: run by scripts/test"]
async fn vm_spawn_missing_kernel_is_early_exit_with_qemu_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = VmConfig {
        kernel: "/nonexistent/vmlinuz".into(),
        ..config(dir.path(), "")
    };
    match Vm::spawn(&cfg).await {
        Err(VmmError::EarlyExit { status, log_tail }) => {
            assert_eq!(status, VmExit::Exited(1));
            assert!(log_tail.contains("/nonexistent/vmlinuz"), "{log_tail}");
        }
        other => panic!("expected EarlyExit, got {other:?}"),
    }
}

#[tokio::test]
#[ignore = "starts real QEMU: run by scripts/test"]
async fn qemu_detect_real_binary_reports_version_and_x_ignore_shared() {
    let info = kiln_vmm::qemu::detect().await.expect("detect");
    eprintln!("{info:?}");
    assert!(info.version >= kiln_vmm::qemu::MIN_VERSION);
    assert!(info.x_ignore_shared, "QEMU 7.2 has x-ignore-shared");
    // Second call is served from the cache (still correct).
    assert_eq!(kiln_vmm::qemu::detect().await.expect("detect"), info);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "boots a real guest under KVM (if any): run by scripts/test"]
async fn accel_probe_real_kernel_finishes_within_deadline() {
    let qemu = kiln_vmm::qemu::detect().await.expect("detect");
    let kernel = test_kernel();
    let initramfs = test_initramfs();
    let t = Instant::now();
    let outcome = accel::probe_kvm(&qemu.path, &kernel, &initramfs, accel::PROBE_DEADLINE).await;
    let took = t.elapsed();
    eprintln!("probe: {outcome:?} in {took:?}");
    assert!(took < accel::PROBE_DEADLINE + Duration::from_secs(5));
    if !Path::new("/dev/kvm").exists() {
        assert!(!matches!(outcome, ProbeOutcome::Booted { .. }));
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = dir.path().join("accel.json");
    let verdict = accel::resolve(&qemu, &kernel, &initramfs, &cache)
        .await
        .expect("resolve");
    eprintln!("verdict: {verdict:?}");
    if Path::new("/dev/kvm").exists() && std::env::var_os(accel::ACCEL_ENV).is_none() {
        assert!(cache.exists(), "a probe verdict is cached");
    }
}

/// The fast-restore recipe (MACHINE_NOTES) works with this command line: capture with
/// `share=on` + `x-ignore-shared`, restore a clone with `share=off` on the same memory file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "boots a real guest under TCG: run by scripts/test"]
async fn vm_snapshot_restore_recipe_resumes_guest() {
    use kiln_vmm::Incoming;
    use kiln_vmm::qmp::commands::{
        Cont, Migrate, MigrateIncoming, MigrateSetCapabilities, MigrationCapabilityStatus,
        MigrationStatus, QueryMigrate, Stop, X_IGNORE_SHARED,
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let caps = MigrateSetCapabilities {
        capabilities: vec![MigrationCapabilityStatus {
            capability: X_IGNORE_SHARED.to_owned(),
            state: true,
        }],
    };
    let capture_cfg = config(&dir.path().join("cap"), "kiln.test=sleep");
    let start = Instant::now();
    let vm = Vm::spawn(&capture_cfg).await.expect("spawn");
    wait_marker(&vm, "kiln-tick 1", start).await;
    let qmp = vm.qmp();
    qmp.execute(&Stop).await.expect("stop");
    qmp.execute(&caps).await.expect("caps");
    let t = Instant::now();
    let uri = format!("exec:cat > {}", state.display());
    qmp.execute(&Migrate { uri, resume: None })
        .await
        .expect("migrate");
    loop {
        let info = qmp.execute(&QueryMigrate).await.expect("query-migrate");
        match info.status {
            Some(MigrationStatus::Completed) => break,
            Some(MigrationStatus::Failed) => panic!("migration failed: {:?}", info.error_desc),
            _ => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
    let saved = t.elapsed();
    vm.shutdown(Duration::from_secs(5)).await;
    let state_len = std::fs::metadata(&state).expect("state").len();

    let clone_cfg = VmConfig {
        memory_shared: false,
        incoming: Some(Incoming::Defer),
        extra_cmdline: capture_cfg.extra_cmdline.clone(),
        memory_file: capture_cfg.memory_file.clone(),
        ..config(&dir.path().join("clone"), "")
    };
    let t = Instant::now();
    let clone = Vm::spawn(&clone_cfg).await.expect("spawn clone");
    let qmp = clone.qmp();
    qmp.execute(&caps).await.expect("caps");
    qmp.execute(&MigrateIncoming {
        uri: format!("exec:cat {}", state.display()),
    })
    .await
    .expect("incoming");
    loop {
        let s = qmp.execute(&QueryStatus).await.expect("status");
        if s.status == RunState::Paused {
            break;
        }
        assert!(
            t.elapsed() < BOOT_LIMIT,
            "restore did not reach paused: {:?}",
            s.status
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let paused = t.elapsed();
    qmp.execute(&Cont).await.expect("cont");
    // The restored guest keeps counting where the captured one stopped.
    wait_marker(&clone, "kiln-tick", t).await;
    let ticking = t.elapsed();
    eprintln!(
        "save {saved:?} ({state_len} bytes), restore to paused {paused:?}, to first tick {ticking:?}"
    );
    assert!(
        state_len < 8 << 20,
        "x-ignore-shared must keep RAM out of the state ({state_len} bytes)"
    );
    assert_eq!(
        clone.shutdown(Duration::from_secs(5)).await,
        VmExit::Exited(0)
    );
    // The template memory file is untouched by the clone's private mapping.
    assert!(capture_cfg.memory_file.exists());
}

// ---------------------------------------------------------------------------------------------
// Warm snapshots with the real image (kernel + initramfs with the real agent + rootfs): the
// base image of `$KILN_E2E_HOME` (see `image_dir`).

use kiln_agent_host::AgentClient;
use kiln_vmm::{AfterCapture, BackingFormat, CaptureMode, create_overlay_with};

/// A VM of the real image with its own qcow2 overlay backed by `base` (the image's raw
/// rootfs, or a snapshot's captured qcow2 layer).
async fn image_config(run_dir: &Path, base: &Path, format: BackingFormat) -> VmConfig {
    let img = image_dir();
    std::fs::create_dir_all(run_dir).expect("run dir");
    let disk = run_dir.join("disk.qcow2");
    create_overlay_with(base, format, &disk)
        .await
        .expect("overlay");
    VmConfig {
        nic: None,
        display: None,
        qemu: kiln_vmm::qemu::find_binary().expect("qemu installed"),
        accel: Accel::Tcg,
        cpus: 1,
        memory_mib: 256,
        kernel: img.join("vmlinuz"),
        initramfs: img.join("initramfs.cpio"),
        extra_cmdline: String::new(),
        disk: Some(disk),
        memory_file: run_dir.join("mem"),
        memory_shared: true,
        run_dir: run_dir.to_owned(),
        incoming: None,
    }
}

/// Connects to the agent and answers one ping.
async fn agent_ping(vm: &Vm) -> AgentClient {
    let stream = tokio::net::UnixStream::connect(vm.agent_socket())
        .await
        .expect("agent socket");
    let (agent, _info) = tokio::select! {
        r = AgentClient::connect(stream, BOOT_LIMIT) => r.expect("agent handshake"),
        exit = vm.wait_exit() => panic!("QEMU exited ({exit}); console:\n{}", vm.console_tail(4096)),
    };
    agent.ping().await.expect("ping");
    agent
}

/// Runs `sh -c script` in the guest; returns stdout.
async fn guest_sh(agent: &AgentClient, script: &str) -> String {
    let out = agent
        .exec(kiln_agent_host::ExecRequest::new(["/bin/sh", "-c", script]))
        .await
        .expect("exec")
        .collect()
        .await
        .expect("exec output");
    assert!(
        out.stderr.is_empty(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sha256_file(path: &Path) -> String {
    use sha2::{Digest, Sha256};
    let mut f = std::fs::File::open(path).expect("open");
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).expect("hash");
    hex::encode(h.finalize())
}

/// Capture a booted guest (x-ignore-shared, paused), copy its disk layer while paused, then
/// restore two clones concurrently from the same memory file: both answer the agent, see the
/// disk as captured, write to memory and disk, and the template memory file is unchanged.
/// Prints cold boot → ping versus restore → ping.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "boots the real image under TCG: run by scripts/test"]
async fn snapshot_capture_then_two_concurrent_clones_share_untouched_template() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rootfs = image_dir().join("rootfs.ext4");
    let cap_cfg = image_config(&dir.path().join("cap"), &rootfs, BackingFormat::Raw).await;
    assert_eq!(kiln_vmm::device_fingerprint(&cap_cfg).len(), 64);

    let t = Instant::now();
    let vm = Vm::spawn(&cap_cfg).await.expect("spawn");
    let agent = agent_ping(&vm).await;
    let cold_ping = t.elapsed();
    assert_eq!(
        guest_sh(
            &agent,
            "echo captured > /root/marker && sync && cat /root/marker"
        )
        .await,
        "captured\n"
    );

    let snap = dir.path().join("snap");
    std::fs::create_dir_all(&snap).expect("snap dir");
    let state = snap.join("state");
    let report = vm
        .capture(&state, CaptureMode::IgnoreShared, AfterCapture::Paused)
        .await
        .expect("capture");
    let status = vm.qmp().execute(&QueryStatus).await.expect("status");
    assert!(!status.running, "left paused: {:?}", status.status);
    // The disk layer, copied while the VM is paused (QEMU flushed and inactivated it).
    let snap_disk = snap.join("disk.qcow2");
    std::fs::copy(cap_cfg.disk.as_ref().expect("disk"), &snap_disk).expect("copy disk");
    drop(agent);
    vm.kill().await;
    assert!(
        report.state_bytes < 8 << 20,
        "x-ignore-shared keeps RAM out of the state: {report:?}"
    );
    let template = cap_cfg.memory_file.clone();
    let before = sha256_file(&template);

    let mut clone_cfgs = Vec::new();
    for i in 0..2 {
        let mut cfg = image_config(
            &dir.path().join(format!("c{i}")),
            &snap_disk,
            BackingFormat::Qcow2,
        )
        .await;
        cfg.memory_file = template.clone();
        assert_eq!(
            kiln_vmm::device_fingerprint(&cfg),
            kiln_vmm::device_fingerprint(&cap_cfg)
        );
        clone_cfgs.push(cfg);
    }
    let restore_and_ping = |cfg: VmConfig| {
        let state = state.clone();
        async move {
            let t = Instant::now();
            let (vm, rep) = Vm::restore(&cfg, &state, CaptureMode::IgnoreShared)
                .await
                .expect("restore");
            let agent = agent_ping(&vm).await;
            (vm, rep, agent, t.elapsed())
        }
    };
    let (a, b) = tokio::join!(
        restore_and_ping(clone_cfgs[0].clone()),
        restore_and_ping(clone_cfgs[1].clone())
    );
    for (i, (vm, rep, agent, ping)) in [a, b].into_iter().enumerate() {
        eprintln!("clone {i}: {rep:?}, start → ping {ping:?}");
        assert_eq!(guest_sh(&agent, "cat /root/marker").await, "captured\n");
        // Dirty guest memory (page cache, a tmpfs-free 32 MiB buffer) and the disk.
        let out = guest_sh(
            &agent,
            &format!(
                "head -c 33554432 /dev/urandom | md5sum >/dev/null && echo clone{i} > /root/marker && sync && cat /root/marker"
            ),
        )
        .await;
        assert_eq!(out, format!("clone{i}\n"));
        let status = vm.qmp().execute(&QueryStatus).await.expect("status");
        assert_eq!(status.status, RunState::Running);
        drop(agent);
        vm.kill().await;
    }
    assert_eq!(
        sha256_file(&template),
        before,
        "clones must not write the template"
    );

    // One restore alone (no concurrent clone) for the headline number.
    let cfg = image_config(&dir.path().join("c9"), &snap_disk, BackingFormat::Qcow2).await;
    let (vm, rep, _agent, restore_ping) = restore_and_ping(VmConfig {
        memory_file: template.clone(),
        ..cfg
    })
    .await;
    vm.kill().await;
    eprintln!(
        "capture: {report:?}\ncold boot → ping {cold_ping:?}; single restore → ping {restore_ping:?} ({rep:?})"
    );
}

/// Full-RAM capture (the fallback without x-ignore-shared) of a running guest that resumes,
/// then one clone restored from the stream alone (its memory file is a fresh empty file).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "boots the real image under TCG: run by scripts/test"]
async fn snapshot_full_ram_capture_resumes_and_restores_from_stream() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rootfs = image_dir().join("rootfs.ext4");
    let cap_cfg = image_config(&dir.path().join("cap"), &rootfs, BackingFormat::Raw).await;
    let vm = Vm::spawn(&cap_cfg).await.expect("spawn");
    let agent = agent_ping(&vm).await;
    let state = dir.path().join("state");
    let report = vm
        .capture(&state, CaptureMode::FullRam, AfterCapture::Resume)
        .await
        .expect("capture");
    agent.ping().await.expect("captured VM resumed");
    let snap_disk = dir.path().join("disk.qcow2");
    // Only consistent because the guest does not write its disk in between.
    std::fs::copy(cap_cfg.disk.as_ref().expect("disk"), &snap_disk).expect("copy disk");
    drop(agent);
    vm.kill().await;
    assert!(
        report.state_bytes > 16 << 20,
        "full RAM is in the stream: {report:?}"
    );

    let cfg = image_config(&dir.path().join("c0"), &snap_disk, BackingFormat::Qcow2).await;
    let t = Instant::now();
    let (clone, rep) = Vm::restore(&cfg, &state, CaptureMode::FullRam)
        .await
        .expect("restore");
    let _agent = agent_ping(&clone).await;
    eprintln!(
        "full-ram capture: {report:?}\nrestore: {rep:?}, start → ping {:?}",
        t.elapsed()
    );
    clone.kill().await;
}

/// A restore from a corrupt state file fails with QEMU's words and leaves no QEMU behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "starts real QEMU: run by scripts/test"]
async fn snapshot_restore_corrupt_state_is_error_and_kills_qemu() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rootfs = image_dir().join("rootfs.ext4");
    let cfg = image_config(&dir.path().join("c0"), &rootfs, BackingFormat::Raw).await;
    std::fs::File::create(&cfg.memory_file)
        .and_then(|f| f.set_len(256 << 20))
        .expect("mem");
    let state = dir.path().join("state");
    std::fs::write(&state, b"not a migration stream").expect("state");
    let err = Vm::restore(&cfg, &state, CaptureMode::IgnoreShared)
        .await
        .expect_err("must fail");
    eprintln!("{err}");
    match &err {
        VmmError::ExitedDuring { log_tail, .. } | VmmError::MigrationFailed { log_tail, .. } => {
            assert!(!log_tail.is_empty(), "{err}");
        }
        other => panic!("unexpected error {other:?}"),
    }
    let ident = kiln_vmm::procid::ProcessIdentity::read(&cfg.run_dir.join("qemu.pid"))
        .expect("pidfile")
        .expect("identity");
    assert!(!ident.is_same_process_alive(), "QEMU was killed");
}

/// How far outside the host's bracket a restored guest clock may read, in seconds (the
/// identity's time is read before its delivery; the rest is margin).
const CLOCK_SLACK: f64 = 1.0;

/// Host wall clock as seconds since the epoch.
fn host_clock() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after the epoch")
        .as_secs_f64()
}

/// A fresh identity for clone `i`: distinct ids and names, host entropy, the host's clock.
fn identity_for(i: u8) -> kiln_agent_host::GuestIdentity {
    use kiln_agent_host::{Entropy, GuestIdentity, Hostname, MachineId, RestoreId, UnixNanos};
    let mut entropy = vec![0u8; 64];
    std::io::Read::read_exact(
        &mut std::fs::File::open("/dev/urandom").expect("urandom"),
        &mut entropy,
    )
    .expect("read urandom");
    GuestIdentity {
        restore_id: RestoreId::from_bytes([0xa0 + i; 16]),
        entropy: Entropy::new(entropy).expect("entropy"),
        wall_clock_unix_ns: UnixNanos::now().expect("clock"),
        hostname: Hostname::new(format!("clone-{i}")).expect("hostname"),
        machine_id: MachineId::from_bytes([0x10 + i; 16]).expect("machine id"),
    }
}

/// The real identity path in real guests: capture a booted guest whose clock is then left
/// 40 s behind (the snapshot ages), restore two clones, give each a fresh identity through
/// `connect_restored`, and check inside each guest that hostname, machine-id, restore id,
/// wall clock and RNG output are the new ones and differ between the clones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "boots the real image under TCG: run by scripts/test"]
async fn snapshot_clones_get_fresh_identity_from_real_agent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rootfs = image_dir().join("rootfs.ext4");
    let cap_cfg = image_config(&dir.path().join("cap"), &rootfs, BackingFormat::Raw).await;
    let vm = Vm::spawn(&cap_cfg).await.expect("spawn");
    let agent = agent_ping(&vm).await;
    // Age the snapshot: the captured guest clock is 40 s behind the host.
    guest_sh(&agent, "date -s @$(( $(date +%s) - 40 )) >/dev/null").await;
    let snap = dir.path().join("snap");
    std::fs::create_dir_all(&snap).expect("snap dir");
    let state = snap.join("state");
    vm.capture(&state, CaptureMode::IgnoreShared, AfterCapture::Paused)
        .await
        .expect("capture");
    let snap_disk = snap.join("disk.qcow2");
    std::fs::copy(cap_cfg.disk.as_ref().expect("disk"), &snap_disk).expect("copy disk");
    drop(agent);
    vm.kill().await;

    let mut seen = Vec::new();
    for i in 0..2u8 {
        let mut cfg = image_config(
            &dir.path().join(format!("c{i}")),
            &snap_disk,
            BackingFormat::Qcow2,
        )
        .await;
        cfg.memory_file = cap_cfg.memory_file.clone();
        let (vm, _rep) = Vm::restore(&cfg, &state, CaptureMode::IgnoreShared)
            .await
            .expect("restore");
        let identity = identity_for(i);
        let stream = tokio::net::UnixStream::connect(vm.agent_socket())
            .await
            .expect("agent socket");
        let config = kiln_agent_host::ClientConfig {
            handshake_deadline: BOOT_LIMIT,
            ..Default::default()
        };
        let (agent, info, ack) =
            kiln_agent_host::AgentClient::connect_restored(stream, config, &identity)
                .await
                .unwrap_or_else(|e| panic!("identity: {e:?}; console:\n{}", vm.console_tail(4096)));
        assert!(
            info.features
                .iter()
                .any(|f| f == kiln_agent_host::FEATURE_IDENTITY_V1)
        );
        assert_eq!(ack.restore_id, identity.restore_id);
        assert!(
            ack.clock_set && ack.hostname_set && ack.machine_id_written,
            "{ack:?}"
        );
        assert!(ack.entropy_credited && ack.rng_reseeded, "{ack:?}");
        assert!(
            ack.clock_step_ns > 30_000_000_000,
            "clock moved only {} ns",
            ack.clock_step_ns
        );
        let host_before = host_clock();
        let out = guest_sh(
            &agent,
            "hostname; cat /etc/machine-id; echo $KILN_RESTORE_ID; cat /run/kiln/restore-id; \
             date +%s.%N; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo",
        )
        .await;
        let host_after = host_clock();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 6, "{out}");
        assert_eq!(lines[0], format!("clone-{i}"));
        assert_eq!(lines[1], identity.machine_id.as_str());
        assert_eq!(lines[2], identity.restore_id.as_str());
        assert_eq!(lines[3].trim(), identity.restore_id.as_str());
        // The guest's reading lies between the host's readings around the exec, give or take
        // the delivery of the identity (a clock left at the capture's time is 40 s behind).
        let guest_now: f64 = lines[4].parse().expect("guest date");
        assert!(
            guest_now >= host_before - CLOCK_SLACK && guest_now <= host_after + CLOCK_SLACK,
            "guest clock {guest_now:.3} outside the host's [{host_before:.3}, {host_after:.3}] ± {CLOCK_SLACK} s"
        );
        seen.push(lines[5].to_owned());
        drop(agent);
        vm.kill().await;
    }
    assert_eq!(seen[0].len(), 64);
    assert_ne!(seen[0], seen[1], "clones produced the same random bytes");
}
