//! The engine's start decisions, through [`Engine::sandbox_create`] on a temporary home with a
//! fake QEMU (`$KILN_QEMU`, a shell script written by each test) instead of the real one.
//!
//! The fake answers `-version` and the capability probe (`-M none -qmp stdio`: a QMP server on
//! stdio replaying QEMU 7.2's answers), and refuses to start any VM: it records the VM's
//! command line (one line per start: `capture` when its paths are in a `run/capture-*` directory, else `sandbox`) and exits 1 with a
//! message. So every create fails in the end, and what is checked is the path it took: which
//! VMs it tried, in which order, the warning it published, what it left on disk. No VM, no
//! root, no network.
//!
//! Each test is its own process under nextest: the environment (`KILN_QEMU`, `KILN_ACCEL`,
//! `KILN_NO_SNAPSHOT`) is set once, before the engine starts any thread.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use kiln_api_types::{EventKind, SandboxSpec};
use kiln_core::{CoreError, Engine, Home};

/// What the fake prints when asked to start a VM.
const REFUSAL: &str = "fake qemu: no VMs here";

struct Fixture {
    _tmp: tempfile::TempDir,
    home: PathBuf,
    vm_log: PathBuf,
    engine: Arc<Engine>,
}

/// Sets the process environment for the engine. Called first thing in each test, while the
/// process has a single thread.
fn set_env(qemu: &Path, no_snapshot: bool) {
    // SAFETY: each test runs in its own process (nextest) and calls this before it starts the
    // engine or anything else that could read the environment from another thread.
    #[allow(unsafe_code)]
    unsafe {
        std::env::set_var("KILN_QEMU", qemu);
        std::env::set_var("KILN_ACCEL", "tcg");
        if no_snapshot {
            std::env::set_var("KILN_NO_SNAPSHOT", "1");
        } else {
            std::env::remove_var("KILN_NO_SNAPSHOT");
        }
    }
}

/// The fake QEMU: version, capability probe over QMP on stdio, and a refusal to boot.
fn write_fake_qemu(dir: &Path, vm_log: &Path) -> PathBuf {
    let path = dir.join("qemu-system-x86_64");
    let script = format!(
        r#"#!/bin/sh
case " $* " in
*" -version "*)
    echo "QEMU emulator version 7.2.22 (kiln test fake)"
    exit 0 ;;
*" -M none "*)
    echo '{{"QMP": {{"version": {{"qemu": {{"micro": 22, "minor": 2, "major": 7}}, "package": ""}}, "capabilities": []}}}}'
    while IFS= read -r line; do
        id=$(printf '%s' "$line" | sed -n 's/.*"id": *\([0-9][0-9]*\).*/\1/p')
        case "$line" in
        *query-migrate-capabilities*)
            echo '{{"return": [{{"capability": "x-ignore-shared", "state": false}}], "id": '"$id"'}}' ;;
        *quit*)
            echo '{{"return": {{}}, "id": '"$id"'}}'
            exit 0 ;;
        *)
            echo '{{"return": {{}}, "id": '"$id"'}}' ;;
        esac
    done
    exit 0 ;;
esac
case " $* " in
*"/run/capture-"*) echo capture >> '{log}' ;;
*) echo sandbox >> '{log}' ;;
esac
echo '{REFUSAL}' >&2
exit 1
"#,
        log = vm_log.display()
    );
    std::fs::write(&path, script).expect("write the fake qemu");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

/// An image named `fake` (id `0123456789ab`) with a kernel, initramfs and a sparse rootfs.
fn write_image(home: &Path) {
    let dir = home.join("images/fake");
    std::fs::create_dir_all(&dir).expect("image dir");
    std::fs::write(dir.join("vmlinuz"), b"not a kernel").expect("kernel");
    std::fs::write(dir.join("initramfs.cpio"), b"not an initramfs").expect("initramfs");
    std::fs::File::create(dir.join("rootfs.ext4"))
        .and_then(|f| f.set_len(64 << 20))
        .expect("rootfs");
    let recipe = kiln_image::builtin("base").expect("the base recipe");
    let manifest = kiln_image::ImageManifest {
        schema: kiln_image::MANIFEST_SCHEMA,
        id: kiln_image::ImageId("0123456789ab".to_owned()),
        name: "fake".to_owned(),
        inputs: kiln_image::FingerprintInputs::new(&recipe, "", "6.1.0", "agent", "m", "s"),
        recipe,
        fingerprint: "f".into(),
        kernel_version: "6.1.0".into(),
        kernel_release: "6.1.0-test".into(),
        created_unix: 1,
        files: Vec::new(),
        rootfs_sha256: None,
        recipe_path: None,
        origin: None,
    };
    std::fs::write(
        dir.join("manifest.json"),
        serde_json::to_vec_pretty(&manifest).expect("manifest json"),
    )
    .expect("manifest");
}

async fn fixture(no_snapshot: bool) -> Fixture {
    let tmp = tempfile::tempdir().expect("tempdir");
    let vm_log = tmp.path().join("vms.log");
    let qemu = write_fake_qemu(tmp.path(), &vm_log);
    set_env(&qemu, no_snapshot);
    let home = tmp.path().join("home");
    write_image(&home);
    let engine = Engine::start(Home::new(home.clone()))
        .await
        .expect("engine starts");
    Fixture {
        _tmp: tmp,
        home,
        vm_log,
        engine,
    }
}

impl Fixture {
    /// The VMs the engine tried to start, in order (`capture` or `sandbox`).
    fn vms(&self) -> Vec<String> {
        std::fs::read_to_string(&self.vm_log)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Creates a sandbox from `spec` (JSON); returns the error and the warnings published.
    async fn create(&self, spec: serde_json::Value) -> (CoreError, Vec<String>) {
        let spec: SandboxSpec = serde_json::from_value(spec).expect("spec");
        let mut events = self.engine.events();
        let err = self
            .engine
            .sandbox_create(&spec)
            .await
            .expect_err("the fake QEMU boots nothing");
        let mut warnings = Vec::new();
        while let Ok(ev) = events.try_recv() {
            if let EventKind::Warning { message } = ev.kind {
                warnings.push(message);
            }
        }
        (err, warnings)
    }

    fn warm_dir(&self) -> PathBuf {
        self.home.join("snapshots/warm-0123456789ab-1c256m")
    }

    /// Nothing of the failed sandbox is left: no row, no runtime or capture directory.
    fn assert_nothing_left(&self) {
        let rows = self
            .engine
            .sandbox_list(&Default::default())
            .expect("sandbox list");
        assert!(rows.is_empty(), "rows left: {rows:?}");
        let run: Vec<_> = std::fs::read_dir(self.home.join("run"))
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(run.is_empty(), "left in run/: {run:?}");
    }
}

fn image_spec() -> serde_json::Value {
    serde_json::json!({ "source": { "kind": "image", "image": "fake" } })
}

#[tokio::test]
async fn create_failed_warm_capture_falls_back_to_cold_boot_with_a_warning() {
    let f = fixture(false).await;
    let (err, warnings) = f.create(image_spec()).await;
    // No warm snapshot yet: a capture VM first; it fails, so a cold boot is tried.
    assert_eq!(f.vms(), ["capture", "sandbox"]);
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].starts_with("cold boot instead of a warm restore: capturing warm snapshot warm-0123456789ab-1c256m failed"),
        "{warnings:?}"
    );
    assert!(warnings[0].contains(REFUSAL), "{warnings:?}");
    // The cold boot's own failure is the create's error.
    assert!(err.chain().contains(REFUSAL), "{}", err.chain());
    assert!(
        !f.warm_dir().exists(),
        "a failed capture published a snapshot"
    );
    f.assert_nothing_left();
}

#[tokio::test]
async fn create_no_snapshot_env_cold_boots_without_capturing() {
    let f = fixture(true).await;
    let (err, warnings) = f.create(image_spec()).await;
    assert_eq!(f.vms(), ["sandbox"], "KILN_NO_SNAPSHOT=1 must not capture");
    assert!(warnings.is_empty(), "{warnings:?}");
    assert!(err.chain().contains(REFUSAL), "{}", err.chain());
    f.assert_nothing_left();
}

#[tokio::test]
async fn create_cold_flag_cold_boots_without_capturing() {
    let f = fixture(false).await;
    let mut spec = image_spec();
    spec["source"]["cold"] = true.into();
    let (_, warnings) = f.create(spec).await;
    assert_eq!(f.vms(), ["sandbox"], "cold: true must not capture");
    assert!(warnings.is_empty(), "{warnings:?}");
    f.assert_nothing_left();
}

#[tokio::test]
async fn create_unusable_warm_snapshot_is_removed_and_cold_boots() {
    let f = fixture(false).await;
    let dir = f.warm_dir();
    std::fs::create_dir_all(&dir).expect("snapshot dir");
    std::fs::write(dir.join("manifest.json"), b"{ not a manifest").expect("manifest");
    let (_, warnings) = f.create(image_spec()).await;
    // Verified, found unusable, removed: no capture in this start, a cold boot.
    assert_eq!(f.vms(), ["sandbox"]);
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("warm snapshot warm-0123456789ab-1c256m is unusable and was removed"),
        "{warnings:?}"
    );
    assert!(!dir.exists(), "the unusable warm snapshot was kept");
    f.assert_nothing_left();
}

#[tokio::test]
async fn create_from_unusable_user_snapshot_is_refused_and_the_snapshot_kept_and_listed() {
    let f = fixture(false).await;
    let dir = f.home.join("snapshots/mine");
    std::fs::create_dir_all(&dir).expect("snapshot dir");
    std::fs::write(dir.join("manifest.json"), b"{ not a manifest").expect("manifest");
    let (err, warnings) = f
        .create(serde_json::json!({ "source": { "kind": "snapshot", "snapshot": "mine" } }))
        .await;
    assert!(
        matches!(err, CoreError::SnapshotUnusable { .. }),
        "{err:?}: {}",
        err.chain()
    );
    assert!(f.vms().is_empty(), "a VM was started: {:?}", f.vms());
    assert!(warnings.is_empty(), "{warnings:?}");
    // Kept, and reported as unusable with the reason.
    assert!(
        dir.join("manifest.json").is_file(),
        "the user snapshot was removed"
    );
    let listed = f.engine.snapshot_list().expect("snapshot list");
    let mine = listed
        .iter()
        .find(|s| s.name == "mine")
        .unwrap_or_else(|| panic!("not listed: {listed:?}"));
    assert!(
        mine.unusable.as_deref().is_some_and(|r| !r.is_empty()),
        "not reported unusable: {mine:?}"
    );
    f.assert_nothing_left();
}
