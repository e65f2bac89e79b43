//! Tests across modules: publish, then corrupt each part and check that `verify` names it.

use std::path::{Path, PathBuf};

use crate::manifest::checksum_line;
use crate::manifest::tests::fingerprint;
use crate::*;

/// A temporary directory whose sealed files are unsealed before it is removed.
struct Scratch(tempfile::TempDir);

impl Scratch {
    fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        remove_tree(self.0.path()).expect("remove test directory");
    }
}

fn scratch() -> Scratch {
    Scratch(tempfile::tempdir().expect("tempdir"))
}

/// Lifts the seal of a published file, as a writer below kiln (or a root user clearing the
/// flag by hand) could: the corruption tests simulate what the seal otherwise refuses.
fn unseal(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    unseal_file(path).expect("unseal");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
}

fn input() -> ManifestInput {
    ManifestInput {
        image_id: "1589762fc101".into(),
        fingerprint: fingerprint(),
        capture: CaptureInfo {
            pause_ms: 12,
            mode: CaptureKind::IgnoreShared,
        },
    }
}

/// Publishes a small snapshot `name` under `root`; returns its directory.
fn publish(root: &Path, name: &str) -> PathBuf {
    let b = SnapshotBuilder::begin(root, SnapshotName::new(name).expect("name")).expect("begin");
    std::fs::write(b.file(MEM_FILE), vec![7u8; 64 << 10]).expect("mem");
    std::fs::write(b.file(STATE_FILE), b"QEVM state").expect("state");
    std::fs::write(b.file(DISK_FILE), b"QFI disk").expect("disk");
    let (dir, manifest) = b.publish(input()).expect("publish");
    assert_eq!(manifest.files.len(), 3);
    dir
}

fn verify_full(dir: &Path) -> Result<SnapshotManifest, SnapshotError> {
    verify(dir, &fingerprint(), VerifyLevel::Full)
}

/// Rewrites manifest.json through `edit` and records a matching checksum.
fn rewrite_manifest(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join(MANIFEST_FILE);
    let mut v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&p).expect("read")).expect("json");
    edit(&mut v);
    let body = serde_json::to_vec_pretty(&v).expect("encode");
    unseal(&p);
    unseal(&dir.join(MANIFEST_SHA256_FILE));
    std::fs::write(&p, &body).expect("write");
    std::fs::write(dir.join(MANIFEST_SHA256_FILE), checksum_line(&body)).expect("write sum");
}

fn flip_byte(path: &Path, at: usize) {
    let mut b = std::fs::read(path).expect("read");
    b[at] ^= 0x01;
    unseal(path);
    std::fs::write(path, b).expect("write");
}

#[test]
fn publish_then_verify_full_returns_manifest_and_leaves_no_tmp() {
    let root = scratch();
    let dir = publish(root.path(), "warm");
    assert_eq!(dir, root.path().join("warm"));
    let m = verify_full(&dir).expect("verifies");
    assert_eq!(m.magic, MAGIC);
    assert_eq!(m.format_version, FORMAT_VERSION);
    assert_eq!(m.name.as_str(), "warm");
    assert_eq!(m.file(MEM_FILE).map(|f| f.size), Some(64 << 10));
    assert_eq!(m.capture.mode, CaptureKind::IgnoreShared);
    let names: Vec<_> = std::fs::read_dir(root.path())
        .expect("read")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(names, ["warm"], "no .tmp- directory left");
    // sha256sum-compatible checksum file.
    let sum = std::fs::read_to_string(dir.join(MANIFEST_SHA256_FILE)).expect("sum");
    assert!(sum.ends_with("  manifest.json\n"), "{sum}");
}

#[test]
fn verify_missing_dir_is_missing_dir() {
    let root = scratch();
    assert!(matches!(
        verify_full(&root.path().join("nope")),
        Err(SnapshotError::MissingDir { .. })
    ));
}

#[test]
fn verify_missing_manifest_or_data_file_is_missing_file() {
    let root = scratch();
    for victim in [MANIFEST_FILE, MANIFEST_SHA256_FILE, STATE_FILE, MEM_FILE] {
        let dir = publish(root.path(), &format!("s-{}", victim.replace('.', "_")));
        unseal(&dir.join(victim));
        std::fs::remove_file(dir.join(victim)).expect("remove");
        match verify(&dir, &fingerprint(), VerifyLevel::Sizes) {
            Err(SnapshotError::MissingFile { path }) => assert_eq!(path, dir.join(victim)),
            other => panic!("{victim}: expected MissingFile, got {other:?}"),
        }
    }
}

#[test]
fn verify_edited_manifest_is_checksum_mismatch() {
    let root = scratch();
    let dir = publish(root.path(), "s");
    let p = dir.join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&p).expect("read");
    unseal(&p);
    unseal(&dir.join(MANIFEST_SHA256_FILE));
    std::fs::write(&p, text.replace("\"cpus\": 1", "\"cpus\": 2")).expect("write");
    assert!(matches!(
        verify_full(&dir),
        Err(SnapshotError::ManifestChecksum { .. })
    ));
    std::fs::write(dir.join(MANIFEST_SHA256_FILE), "garbage\n").expect("write");
    assert!(matches!(
        verify_full(&dir),
        Err(SnapshotError::ChecksumFileMalformed { .. })
    ));
}

#[test]
fn verify_bad_json_with_matching_checksum_is_parse_error() {
    let root = scratch();
    let dir = publish(root.path(), "s");
    unseal(&dir.join(MANIFEST_FILE));
    unseal(&dir.join(MANIFEST_SHA256_FILE));
    let body = b"{\"magic\": \"kiln-snapshot\", \"format_version\": 1, ";
    std::fs::write(dir.join(MANIFEST_FILE), body).expect("write");
    std::fs::write(dir.join(MANIFEST_SHA256_FILE), checksum_line(body)).expect("sum");
    assert!(matches!(
        verify_full(&dir),
        Err(SnapshotError::ManifestParse { .. })
    ));
    // Valid JSON of the wrong shape is a parse error too.
    let body = br#"{"magic": "kiln-snapshot", "format_version": 1, "name": 3}"#;
    std::fs::write(dir.join(MANIFEST_FILE), body).expect("write");
    std::fs::write(dir.join(MANIFEST_SHA256_FILE), checksum_line(body)).expect("sum");
    assert!(matches!(
        verify_full(&dir),
        Err(SnapshotError::ManifestParse { .. })
    ));
}

#[test]
fn verify_wrong_magic_and_future_version_are_named() {
    let root = scratch();
    let dir = publish(root.path(), "s");
    rewrite_manifest(&dir, |v| v["magic"] = "qemu-savevm".into());
    match verify_full(&dir) {
        Err(SnapshotError::WrongMagic { found, .. }) => assert_eq!(found, "qemu-savevm"),
        other => panic!("expected WrongMagic, got {other:?}"),
    }
    rewrite_manifest(&dir, |v| {
        v["magic"] = MAGIC.into();
        v["format_version"] = 2.into();
        // A future version may change shapes: the version is reported, not the shape.
        v["files"] = "elsewhere".into();
    });
    match verify_full(&dir) {
        Err(SnapshotError::UnsupportedFormat { found, supported }) => {
            assert_eq!((found, supported), (2, FORMAT_VERSION));
        }
        other => panic!("expected UnsupportedFormat, got {other:?}"),
    }
}

#[test]
fn verify_unknown_or_duplicate_file_entry_is_invalid() {
    let root = scratch();
    let dir = publish(root.path(), "s");
    rewrite_manifest(&dir, |v| v["files"][1]["name"] = "../../etc/passwd".into());
    assert!(matches!(
        verify_full(&dir),
        Err(SnapshotError::ManifestInvalid { .. })
    ));
    rewrite_manifest(&dir, |v| v["files"][1]["name"] = MEM_FILE.into());
    assert!(matches!(
        verify_full(&dir),
        Err(SnapshotError::ManifestInvalid { .. })
    ));
}

#[test]
fn verify_truncated_file_is_size_mismatch_at_both_levels() {
    let root = scratch();
    let dir = publish(root.path(), "s");
    let mem = dir.join(MEM_FILE);
    unseal(&mem);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&mem)
        .and_then(|f| f.set_len(4096))
        .expect("truncate");
    for level in [VerifyLevel::Sizes, VerifyLevel::Full] {
        match verify(&dir, &fingerprint(), level) {
            Err(SnapshotError::SizeMismatch {
                path,
                expected,
                actual,
            }) => {
                assert_eq!(path, mem);
                assert_eq!((expected, actual), (64 << 10, 4096));
            }
            other => panic!("expected SizeMismatch, got {other:?}"),
        }
    }
}

#[test]
fn verify_flipped_byte_is_digest_mismatch_only_at_full() {
    let root = scratch();
    let dir = publish(root.path(), "s");
    for victim in [MEM_FILE, STATE_FILE, DISK_FILE] {
        flip_byte(&dir.join(victim), 3);
        assert!(verify(&dir, &fingerprint(), VerifyLevel::Sizes).is_ok());
        match verify_full(&dir) {
            Err(SnapshotError::DigestMismatch { path, .. }) => assert_eq!(path, dir.join(victim)),
            other => panic!("{victim}: expected DigestMismatch, got {other:?}"),
        }
        flip_byte(&dir.join(victim), 3);
        assert!(verify_full(&dir).is_ok(), "{victim} restored");
    }
}

#[test]
fn verify_each_fingerprint_field_change_names_that_field() {
    let root = scratch();
    let dir = publish(root.path(), "s");
    let base = fingerprint();
    let cases: Vec<(&str, SnapshotFingerprint)> = vec![
        (
            "qemu_version",
            SnapshotFingerprint {
                qemu_version: "8.2.0".into(),
                ..base.clone()
            },
        ),
        (
            "machine",
            SnapshotFingerprint {
                machine: "microvm".into(),
                ..base.clone()
            },
        ),
        (
            "device_fingerprint",
            SnapshotFingerprint {
                device_fingerprint: "e".repeat(64),
                ..base.clone()
            },
        ),
        (
            "cpu_model",
            SnapshotFingerprint {
                cpu_model: "host".into(),
                ..base.clone()
            },
        ),
        (
            "accel",
            SnapshotFingerprint {
                accel: "kvm".into(),
                ..base.clone()
            },
        ),
        (
            "cpus",
            SnapshotFingerprint {
                cpus: 2,
                ..base.clone()
            },
        ),
        (
            "memory_mib",
            SnapshotFingerprint {
                memory_mib: 512,
                ..base.clone()
            },
        ),
        (
            "kernel_digest",
            SnapshotFingerprint {
                kernel_digest: "0".repeat(64),
                ..base.clone()
            },
        ),
        (
            "initramfs_digest",
            SnapshotFingerprint {
                initramfs_digest: "0".repeat(64),
                ..base.clone()
            },
        ),
        (
            "image_digest",
            SnapshotFingerprint {
                image_digest: "0".repeat(64),
                ..base.clone()
            },
        ),
        (
            "disk_digest",
            SnapshotFingerprint {
                disk_digest: "t".repeat(64),
                ..base.clone()
            },
        ),
        (
            "format_version",
            SnapshotFingerprint {
                format_version: 9,
                ..base.clone()
            },
        ),
    ];
    assert_eq!(cases.len(), 12, "every field of SnapshotFingerprint");
    for (field, host) in cases {
        match verify(&dir, &host, VerifyLevel::Sizes) {
            Err(e @ SnapshotError::FingerprintMismatch { .. }) => {
                let SnapshotError::FingerprintMismatch { diffs } = &e else {
                    unreachable!()
                };
                assert_eq!(diffs.len(), 1, "{e}");
                assert_eq!(diffs[0].field, field);
                assert!(
                    e.to_string().contains(&format!("({field}): snapshot ")),
                    "{e}"
                );
            }
            other => panic!("{field}: expected FingerprintMismatch, got {other:?}"),
        }
    }
    let e = verify(
        &dir,
        &SnapshotFingerprint {
            accel: "kvm".into(),
            ..base
        },
        VerifyLevel::Sizes,
    )
    .expect_err("mismatch");
    assert_eq!(
        e.to_string(),
        "snapshot is incompatible: accelerator (accel): snapshot tcg, host kvm"
    );
}

/// Waits (polling, bounded) until no data file in `dir` is too recent to be sealed, i.e.
/// until any later write is guaranteed to change its ctime.
fn settle(dir: &Path) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    for f in DATA_FILES {
        let stamp = crate::seal::FileStamp::of(&dir.join(f)).expect("stamp");
        while stamp.is_racy(std::time::SystemTime::now()) {
            assert!(std::time::Instant::now() < deadline, "{f} stays racy");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}

/// Like [`publish`], but the data files are settled first, so publish seals them.
fn publish_settled(root: &Path, name: &str) -> PathBuf {
    let b = SnapshotBuilder::begin(root, SnapshotName::new(name).expect("name")).expect("begin");
    std::fs::write(b.file(MEM_FILE), vec![7u8; 64 << 10]).expect("mem");
    std::fs::write(b.file(STATE_FILE), b"QEVM state").expect("state");
    std::fs::write(b.file(DISK_FILE), b"QFI disk").expect("disk");
    // Publish seals them first (which moves ctime); sealing here lets them settle after it.
    for f in DATA_FILES {
        seal_file(&b.file(f)).expect("seal");
    }
    settle(b.dir());
    b.publish(input()).expect("publish").0
}

fn verify_cached(dir: &Path) -> Result<VerifyReport, SnapshotError> {
    verify_with_report(dir, &fingerprint(), VerifyLevel::FullCached)
}

/// Flips the byte in the middle of `path` in place, then puts its mtime back.
fn flip_middle_keeping_mtime(path: &Path) {
    use std::os::unix::fs::FileExt;
    unseal(path);
    let before = std::fs::metadata(path).expect("stat");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open");
    let at = before.len() / 2;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).expect("read");
    f.write_all_at(&[b[0] ^ 0x01], at).expect("write");
    f.set_times(std::fs::FileTimes::new().set_modified(before.modified().expect("mtime")))
        .expect("restore mtime");
    let after = std::fs::metadata(path).expect("stat");
    assert_eq!(
        after.modified().ok(),
        before.modified().ok(),
        "mtime restored"
    );
    assert_eq!(after.len(), before.len());
}

#[test]
fn publish_seals_settled_files_so_full_cached_hashes_nothing() {
    let root = scratch();
    let dir = publish_settled(root.path(), "s");
    assert_eq!(crate::seal::sealed_count(&dir), 3);
    let r = verify_cached(&dir).expect("verifies");
    assert!(r.hashed.is_empty(), "hashed {:?}", r.hashed);
    assert_eq!(r.manifest.name.as_str(), "s");
    // Full ignores seals; Sizes never hashes.
    let full = verify_with_report(&dir, &fingerprint(), VerifyLevel::Full).expect("full");
    assert_eq!(full.hashed, DATA_FILES);
    let sizes = verify_with_report(&dir, &fingerprint(), VerifyLevel::Sizes).expect("sizes");
    assert!(sizes.hashed.is_empty());
}

#[test]
fn full_cached_unsealed_snapshot_hashes_once_then_hits_the_seal() {
    let root = scratch();
    let dir = publish(root.path(), "s");
    settle(&dir);
    // As after a daemon restart: nothing sealed.
    crate::seal::forget_dir(&dir);
    assert_eq!(verify_cached(&dir).expect("first").hashed, DATA_FILES);
    assert_eq!(crate::seal::sealed_count(&dir), 3);
    assert!(verify_cached(&dir).expect("second").hashed.is_empty());
}

#[test]
fn full_cached_sealed_file_rewritten_with_mtime_restored_is_digest_mismatch() {
    let root = scratch();
    let dir = publish_settled(root.path(), "s");
    for victim in DATA_FILES {
        flip_middle_keeping_mtime(&dir.join(victim));
        let e = verify_cached(&dir).expect_err("a flipped byte is caught");
        match &e {
            SnapshotError::DigestMismatch { path, .. } => assert_eq!(path, &dir.join(victim)),
            other => panic!("{victim}: expected DigestMismatch, got {other:?}"),
        }
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("/{victim}: sha256 mismatch (manifest says ")),
            "{msg}"
        );
        assert_eq!(
            crate::seal::sealed_count(&dir),
            0,
            "a failure forgets seals"
        );
        // Repaired: verified by hashing everything again, then sealed again.
        flip_middle_keeping_mtime(&dir.join(victim));
        settle(&dir);
        assert_eq!(verify_cached(&dir).expect("repaired").hashed, DATA_FILES);
        assert!(verify_cached(&dir).expect("sealed").hashed.is_empty());
    }
}

#[test]
fn full_cached_sealed_file_truncated_is_size_mismatch() {
    let root = scratch();
    let dir = publish_settled(root.path(), "s");
    unseal(&dir.join(STATE_FILE));
    std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join(STATE_FILE))
        .and_then(|f| f.set_len(4))
        .expect("truncate");
    match verify_cached(&dir) {
        Err(e @ SnapshotError::SizeMismatch { .. }) => assert!(
            e.to_string()
                .ends_with("/state: size mismatch (manifest says 10 bytes, file has 4)"),
            "{e}"
        ),
        other => panic!("expected SizeMismatch, got {other:?}"),
    }
}

#[test]
fn full_cached_sealed_file_replaced_by_another_inode_is_hashed_again() {
    let root = scratch();
    let dir = publish_settled(root.path(), "s");
    let mem = dir.join(MEM_FILE);
    let tmp = dir.join("mem.new");
    // Same content, new inode: hashed again (and fine).
    unseal(&mem);
    std::fs::copy(&mem, &tmp).expect("copy");
    std::fs::rename(&tmp, &mem).expect("replace");
    assert_eq!(
        verify_cached(&dir).expect("same content").hashed,
        [MEM_FILE]
    );
    // Different content, new inode, same size and mtime: caught.
    let old = std::fs::metadata(&mem).expect("stat");
    let mut bytes = std::fs::read(&mem).expect("read");
    bytes[100] ^= 0x80;
    std::fs::write(&tmp, &bytes).expect("write");
    unseal(&mem);
    std::fs::File::options()
        .write(true)
        .open(&tmp)
        .and_then(|f| f.set_times(std::fs::FileTimes::new().set_modified(old.modified()?)))
        .expect("mtime");
    std::fs::rename(&tmp, &mem).expect("replace");
    match verify_cached(&dir) {
        Err(SnapshotError::DigestMismatch { path, .. }) => assert_eq!(path, mem),
        other => panic!("expected DigestMismatch, got {other:?}"),
    }
}

#[test]
fn full_cached_sealed_snapshot_still_reports_fingerprint_mismatch() {
    let root = scratch();
    let dir = publish_settled(root.path(), "s");
    let host = SnapshotFingerprint {
        qemu_version: "9.9.9".into(),
        ..fingerprint()
    };
    let e = verify_with_report(&dir, &host, VerifyLevel::FullCached).expect_err("mismatch");
    assert!(matches!(e, SnapshotError::FingerprintMismatch { .. }));
    assert_eq!(
        e.to_string(),
        "snapshot is incompatible: QEMU version (qemu_version): snapshot 7.2.22, host 9.9.9"
    );
}

#[test]
fn full_cached_seal_is_bound_to_the_manifest_digest() {
    let root = scratch();
    let dir = publish_settled(root.path(), "s");
    // The manifest (with a valid checksum) now claims other content for an untouched file.
    let claimed = "ab".repeat(32);
    let c = claimed.clone();
    rewrite_manifest(&dir, move |v| v["files"][0]["sha256"] = c.into());
    match verify_cached(&dir) {
        Err(SnapshotError::DigestMismatch { path, expected, .. }) => {
            assert_eq!(path, dir.join(MEM_FILE));
            assert_eq!(expected, claimed);
        }
        other => panic!("expected DigestMismatch, got {other:?}"),
    }
}

#[test]
fn publish_never_replaces_an_existing_snapshot() {
    let root = scratch();
    let dir = publish(root.path(), "s");
    let name = || SnapshotName::new("s").expect("name");
    assert!(matches!(
        SnapshotBuilder::begin(root.path(), name()),
        Err(SnapshotError::AlreadyExists { .. })
    ));
    // A competitor publishes between begin and publish: the rename refuses.
    let other = scratch();
    let b = SnapshotBuilder::begin(other.path(), name()).expect("begin");
    for f in DATA_FILES {
        std::fs::write(b.file(f), f).expect("write");
    }
    let tmp = b.dir().to_owned();
    std::fs::create_dir(other.path().join("s")).expect("competitor");
    std::fs::write(other.path().join("s/manifest.json"), "{}").expect("competitor");
    assert!(matches!(
        b.publish(input()),
        Err(SnapshotError::AlreadyExists { .. })
    ));
    assert!(!tmp.exists(), "failed publish removes its build directory");
    assert!(verify_full(&dir).is_ok(), "the first snapshot is untouched");
}

#[test]
fn builder_dropped_or_failing_leaves_nothing_visible() {
    let root = scratch();
    let b =
        SnapshotBuilder::begin(root.path(), SnapshotName::new("s").expect("name")).expect("begin");
    let tmp = b.dir().to_owned();
    assert!(
        tmp.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(".tmp-s-"))
    );
    std::fs::write(b.file(MEM_FILE), b"x").expect("write");
    drop(b);
    assert!(!tmp.exists());
    // Missing data file: publish fails, nothing published, build dir gone.
    let b =
        SnapshotBuilder::begin(root.path(), SnapshotName::new("s").expect("name")).expect("begin");
    std::fs::write(b.file(MEM_FILE), b"x").expect("write");
    assert!(matches!(
        b.publish(input()),
        Err(SnapshotError::MissingFile { .. })
    ));
    assert_eq!(std::fs::read_dir(root.path()).expect("read").count(), 0);
}

#[test]
fn cleanup_stale_tmp_treats_a_zombie_owner_as_dead() {
    let root = scratch();
    // A child that exited and is not reaped yet: its /proc entry stays, as a zombie's.
    let mut child = std::process::Command::new("true").spawn().expect("spawn");
    let stat = format!("/proc/{}/stat", child.id());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !std::fs::read_to_string(&stat)
        .expect("zombie's stat")
        .contains(") Z ")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "child never became a zombie"
        );
        std::thread::yield_now();
    }
    let tmp = root.path().join(format!(".tmp-warm-x-{}", child.id()));
    std::fs::create_dir(&tmp).expect("mkdir");
    assert_eq!(
        cleanup_stale_tmp(root.path()).expect("cleanup"),
        std::slice::from_ref(&tmp)
    );
    child.wait().expect("reap");
}

#[test]
fn cleanup_stale_tmp_removes_dead_pids_only() {
    let root = scratch();
    let dead = root.path().join(".tmp-a-b-999999999");
    let mine = root.path().join(format!(".tmp-c-{}", std::process::id()));
    let init = root.path().join(".tmp-d-1");
    let published = root.path().join("e-999999999");
    let odd = root.path().join(".tmp-noise");
    for d in [&dead, &mine, &init, &published, &odd] {
        std::fs::create_dir(d).expect("mkdir");
        std::fs::write(d.join("mem"), b"x").expect("write");
    }
    assert_eq!(
        cleanup_stale_tmp(root.path()).expect("cleanup"),
        std::slice::from_ref(&dead)
    );
    assert!(!dead.exists());
    for kept in [&mine, &init, &published, &odd] {
        assert!(kept.exists(), "{}", kept.display());
    }
    assert!(
        cleanup_stale_tmp(&root.path().join("missing"))
            .expect("missing root")
            .is_empty()
    );
}

#[test]
fn publish_seals_every_file_read_only_and_immutable_where_supported() {
    use std::os::unix::fs::PermissionsExt;
    let root = scratch();
    let b =
        SnapshotBuilder::begin(root.path(), SnapshotName::new("s").expect("name")).expect("begin");
    for f in DATA_FILES {
        std::fs::write(b.file(f), f).expect("write");
        std::fs::set_permissions(b.file(f), std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }
    std::fs::write(b.dir().join("origin.json"), "{}").expect("extra file");
    let (dir, _) = b.publish(input()).expect("publish");
    let flag = crate::is_immutable(&dir.join(MEM_FILE));
    for f in DATA_FILES
        .iter()
        .chain(&[MANIFEST_FILE, MANIFEST_SHA256_FILE, "origin.json"])
    {
        let path = dir.join(f);
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode & 0o222, 0, "{f} has no write bit ({mode:o})");
        assert_eq!(crate::is_immutable(&path), flag, "{f}: all sealed alike");
    }
    assert_eq!(
        std::fs::metadata(dir.join(MEM_FILE))
            .expect("stat")
            .permissions()
            .mode()
            & 0o777,
        0o400,
        "owner-only stays owner-only"
    );
    // As root (CAP_LINUX_IMMUTABLE) on a file system with the flag, even root cannot write;
    // otherwise the mode refuses anyone but root.
    let is_root = rustix::process::geteuid().is_root();
    if flag || !is_root {
        let err = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join(MEM_FILE))
            .expect_err("a published mem cannot be opened for writing");
        assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied, "{err}");
    }
    assert!(verify_full(&dir).is_ok());
    remove_tree(&dir).expect("removal clears the flags first");
    assert!(!dir.exists());
}

#[test]
fn cleanup_stale_tmp_removes_sealed_files_of_a_crashed_publish() {
    let root = scratch();
    // A publish that died after sealing, before its rename.
    let dead = root.path().join(".tmp-s-99999999");
    std::fs::create_dir(&dead).expect("mkdir");
    std::fs::write(dead.join(MEM_FILE), b"x").expect("write");
    seal_file(&dead.join(MEM_FILE)).expect("seal");
    let removed = cleanup_stale_tmp(root.path()).expect("cleanup");
    assert_eq!(removed, std::slice::from_ref(&dead));
    assert!(!dead.exists());
}

#[test]
fn writable_window_keeps_the_seal_unless_the_file_was_written_inside_it() {
    let root = scratch();
    let dir = publish_settled(root.path(), "s");
    let mem = dir.join(MEM_FILE);
    if !crate::is_immutable(&mem) {
        return; // No flag here (not root, or no inode flags): no window to open.
    }
    // Only the flag moved (ctime): no data file is hashed again.
    drop(WritableWindow::open(&mem).expect("open"));
    assert!(crate::is_immutable(&mem));
    let r = verify_cached(&dir).expect("verifies");
    assert!(r.hashed.is_empty(), "hashed {:?}", r.hashed);
    // Nor while a window is open (the next clone verifies while this one's QEMU starts).
    let open = WritableWindow::open(&mem).expect("open");
    let r = verify_cached(&dir).expect("verifies inside a window");
    assert!(r.hashed.is_empty(), "hashed inside a window {:?}", r.hashed);
    drop(open);
    let r = verify_cached(&dir).expect("verifies after it");
    assert!(r.hashed.is_empty(), "hashed after a window {:?}", r.hashed);
    // A write inside the window (it moves mtime) is caught by the next verify.
    let window = WritableWindow::open(&mem).expect("open");
    {
        use std::os::unix::fs::{FileExt, PermissionsExt};
        std::fs::set_permissions(&mem, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&mem)
            .expect("writable inside the window");
        // publish_settled waited past the clock tick since the file was last written, so
        // this write's mtime differs from the sealed one.
        f.write_all_at(b"!", 10).expect("write");
    }
    drop(window);
    match verify_cached(&dir) {
        Err(SnapshotError::DigestMismatch { path, .. }) => assert_eq!(path, mem),
        other => panic!("expected DigestMismatch, got {other:?}"),
    }
}
