//! Unit tests of the survey and the prune on hand-made homes (no QEMU, no daemon).

use super::*;
use kiln_api_types::{SandboxId, SandboxSpec, SandboxStatus, StartSource};
use std::io::{Seek, SeekFrom, Write};

fn row(id: &SandboxId, state: SandboxState, snapshot: Option<&str>, image_id: &str) -> SandboxInfo {
    SandboxInfo {
        id: id.clone(),
        spec: SandboxSpec::default(),
        status: SandboxStatus {
            network: None,
            state,
            image: "base".parse().unwrap(),
            image_id: image_id.into(),
            cpus: 1,
            memory_mib: 256,
            accel: "tcg".into(),
            created_unix: 1,
            boot_ms: None,
            error: None,
            warnings: Vec::new(),
            source: StartSource::Snapshot,
            snapshot: snapshot.map(str::to_owned),
            expires_unix: None,
        },
    }
}

/// An image manifest named `name` with id `id` and kernel `kernel`.
fn image(name: &str, id: &str, kernel: &str) -> ImageManifest {
    let recipe = kiln_image::builtin("base").unwrap();
    ImageManifest {
        schema: kiln_image::MANIFEST_SCHEMA,
        id: kiln_image::ImageId(id.to_owned()),
        name: name.to_owned(),
        inputs: kiln_image::FingerprintInputs::new(&recipe, "", kernel, "agent", "m", "s"),
        recipe,
        fingerprint: "f".into(),
        kernel_version: kernel.to_owned(),
        kernel_release: "r".into(),
        created_unix: 1,
        files: Vec::new(),
        rootfs_sha256: None,
        recipe_path: None,
        origin: None,
    }
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

/// A file of `len` apparent bytes with only `data` bytes written at its start (a hole
/// after them).
fn sparse(path: &Path, data: usize, len: u64) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(&vec![7u8; data]).unwrap();
    f.seek(SeekFrom::Start(len - 1)).unwrap();
    f.write_all(&[0]).unwrap();
}

/// What `du -s` would say of `paths`, in one invocation (each inode once).
fn du(paths: &[PathBuf]) -> Size {
    let mut w = Walker::default();
    let mut total = Size::default();
    for p in paths {
        total += w.measure(p, true).0;
    }
    total
}

fn facts<'a>(rows: &'a [SandboxInfo], images: &'a [ImageManifest]) -> Facts<'a> {
    Facts {
        rows,
        images,
        build_running: false,
        me: std::process::id(),
    }
}

fn entry<'a>(s: &'a Survey, rel: &str) -> &'a Entry {
    s.entries
        .iter()
        .find(|e| e.rel == Path::new(rel))
        .unwrap_or_else(|| panic!("no item {rel} in {:?}", s.entries))
}

#[test]
fn survey_sizes_count_holes_and_hard_links_once() {
    let tmp = tempfile::tempdir().unwrap();
    let home = Home::new(tmp.path().to_owned());
    home.ensure().unwrap();
    let root = tmp.path();
    // An image whose vmlinuz is a hard link of the kernel cache's file, and a sparse
    // root file system: 64 MiB apparent, 8 KiB written.
    write(&root.join("cache/kernel/6.1-1/vmlinuz"), &[1u8; 10_000]);
    write(&root.join("cache/kernel/6.1-1/modules/a.ko"), &[2u8; 5_000]);
    std::fs::create_dir_all(root.join("images/base")).unwrap();
    std::fs::hard_link(
        root.join("cache/kernel/6.1-1/vmlinuz"),
        root.join("images/base/vmlinuz"),
    )
    .unwrap();
    sparse(&root.join("images/base/rootfs.ext4"), 8192, 64 << 20);
    write(&root.join("kiln.db"), b"db");
    let images = [image("base", "aaaaaaaaaaaa", "6.1-1")];
    let s = survey(&home, &facts(&[], &images));
    let usage = s.usage();

    let img = entry(&s, "images/base");
    assert_eq!(img.size, du(&[root.join("images/base")]));
    let rootfs = std::fs::metadata(root.join("images/base/rootfs.ext4")).unwrap();
    assert!(
        rootfs.blocks() * 512 < 1 << 20,
        "the test file is not sparse here"
    );
    assert!(img.size.apparent >= (64 << 20) + 10_000, "{:?}", img.size);
    assert!(
        img.size.disk < 2 << 20,
        "holes counted as data: {:?}",
        img.size
    );
    // The kernel counts once, under the image that was walked first.
    let kernel = entry(&s, "cache/kernel/6.1-1");
    let kernel_alone = du(&[root.join("cache/kernel/6.1-1")]);
    let vmlinuz = std::fs::metadata(root.join("images/base/vmlinuz")).unwrap();
    assert_eq!(kernel.size.apparent, kernel_alone.apparent - vmlinuz.size());
    assert_eq!(kernel.size.disk, kernel_alone.disk - vmlinuz.blocks() * 512);
    assert_eq!(kernel.verdict, Verdict::Keep("kernel of image base".into()));
    // The whole report is exactly one pass over the home.
    let whole = du(&[root.to_owned()]);
    assert_eq!(
        (usage.apparent_bytes, usage.disk_bytes),
        (whole.apparent, whole.disk)
    );
    // Categories sum their items.
    for c in &usage.categories {
        let items: u64 = c.items.iter().map(|i| i.disk_bytes).sum();
        assert_eq!(items, c.disk_bytes, "{:?}", c.kind);
    }
    assert_eq!(usage.reclaimable_disk_bytes, 0, "{usage:#?}");
}

#[test]
fn survey_follows_a_linked_images_dir_and_counts_it_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let shared = tmp.path().join("shared");
    write(&shared.join("base/rootfs.ext4"), &[3u8; 20_000]);
    let root = tmp.path().join("home");
    std::fs::create_dir(&root).unwrap();
    std::os::unix::fs::symlink(&shared, root.join("images")).unwrap();
    let home = Home::new(root.clone());
    home.ensure().unwrap();
    let s = survey(&home, &facts(&[], &[]));
    assert_eq!(entry(&s, "images/base").size, du(&[shared.join("base")]));
    let usage = s.usage();
    // `du -s HOME HOME/images/`: the link itself in the first, what it names in the second.
    let whole = du(&[root.clone(), shared.clone()]);
    assert_eq!(
        (usage.apparent_bytes, usage.disk_bytes),
        (whole.apparent, whole.disk)
    );
}

/// A home with: the warm snapshot of the current image (used by a sandbox), an orphan
/// warm snapshot, an orphan one still used by a sandbox, an unused kernel, a package, a
/// dead builder's directory, a live one's, logs of a removed and a present sandbox, and
/// a save of a removed sandbox.
fn planted() -> (
    tempfile::TempDir,
    Home,
    Vec<SandboxInfo>,
    Vec<ImageManifest>,
) {
    let tmp = tempfile::tempdir().unwrap();
    let home = Home::new(tmp.path().to_owned());
    home.ensure().unwrap();
    let root = tmp.path();
    let (live, user) = (SandboxId::random(), SandboxId::random());
    for snap in [
        "warm-aaaaaaaaaaaa-1c256m",
        "warm-bbbbbbbbbbbb-1c256m",
        "warm-cccccccccccc-1c256m",
    ] {
        write(
            &root.join("snapshots").join(snap).join("mem"),
            &[5u8; 30_000],
        );
    }
    write(&root.join("cache/kernel/6.1-1/vmlinuz"), &[1u8; 100]);
    write(&root.join("cache/kernel/5.0-1/vmlinuz"), &[1u8; 7000]);
    write(&root.join("cache/debs/linux.deb"), &[1u8; 9000]);
    write(
        &root.join("cache/apt/archives/python3_3.11_amd64.deb"),
        &[1u8; 6000],
    );
    write(
        &root.join("images/.tmp-base-99999999/rootfs.ext4"),
        &[1u8; 4000],
    );
    let mine = format!(".tmp-python-{}", std::process::id());
    write(
        &root.join("images").join(&mine).join("rootfs.ext4"),
        &[1u8; 4000],
    );
    write(
        &root.join("logs/sb-000000000001.console.log"),
        b"old console",
    );
    write(&root.join(format!("logs/{live}.console.log")), b"console");
    write(&root.join("saved/sb-000000000002/gen-1/mem"), &[1u8; 3000]);
    write(&root.join(format!("saved/{user}/gen-1/mem")), &[1u8; 3000]);
    let rows = vec![
        row(
            &live,
            SandboxState::Running,
            Some("warm-aaaaaaaaaaaa-1c256m"),
            "aaaaaaaaaaaa",
        ),
        row(
            &user,
            SandboxState::Stopped,
            Some("warm-cccccccccccc-1c256m"),
            "cccccccccccc",
        ),
    ];
    let images = vec![image("base", "aaaaaaaaaaaa", "6.1-1")];
    (tmp, home, rows, images)
}

fn paths(items: &[PruneItem]) -> Vec<&str> {
    items.iter().map(|i| i.path.as_str()).collect()
}

#[test]
fn prune_removes_only_what_nothing_uses_and_reports_measured_bytes() {
    let (tmp, home, rows, images) = planted();
    let root = tmp.path();
    let s = survey(&home, &facts(&rows, &images));
    let expected = [
        "snapshots/warm-bbbbbbbbbbbb-1c256m",
        "saved/sb-000000000002",
        "cache/kernel/5.0-1",
        "cache/debs/linux.deb",
        "cache/apt",
        "images/.tmp-base-99999999",
        "logs/sb-000000000001.console.log",
    ];
    let before: Vec<Size> = expected.iter().map(|p| du(&[root.join(p)])).collect();
    let report = prune(&s, false, &mut |e| match remove_entry(root, e) {
        Ok(()) => Outcome::Removed,
        Err(err) => Outcome::Failed(err),
    });
    assert_eq!(paths(&report.reclaimed), expected, "{report:#?}");
    assert!(report.failed.is_empty(), "{report:#?}");
    for (item, size) in report.reclaimed.iter().zip(&before) {
        assert_eq!(
            (item.apparent_bytes, item.disk_bytes),
            (size.apparent, size.disk),
            "{}",
            item.path
        );
        assert!(!root.join(&item.path).exists(), "{} still there", item.path);
    }
    assert_eq!(
        report.reclaimed_disk_bytes,
        before.iter().map(|s| s.disk).sum::<u64>()
    );
    // Held: the orphan snapshot a stopped sandbox was restored from, a live build.
    let mine = format!("images/.tmp-python-{}", std::process::id());
    assert_eq!(
        paths(&report.kept),
        ["snapshots/warm-cccccccccccc-1c256m", mine.as_str()]
    );
    assert!(
        report.kept[0].why.contains(rows[1].id.as_str()),
        "{}",
        report.kept[0].why
    );
    for kept in [
        "snapshots/warm-aaaaaaaaaaaa-1c256m",
        "snapshots/warm-cccccccccccc-1c256m",
        "cache/kernel/6.1-1",
        mine.as_str(),
    ] {
        assert!(root.join(kept).exists(), "{kept} was removed");
    }
    assert!(
        root.join(format!("logs/{}.console.log", rows[0].id))
            .exists()
    );
    assert!(root.join(format!("saved/{}", rows[1].id)).exists());
    // A second prune finds nothing more; df agrees.
    let again = survey(&home, &facts(&rows, &images));
    assert_eq!(again.usage().reclaimable_disk_bytes, 0);
}

#[test]
fn prune_dry_run_removes_nothing_and_lists_what_would_go() {
    let (tmp, home, rows, images) = planted();
    let s = survey(&home, &facts(&rows, &images));
    let usage = s.usage();
    let report = prune(&s, true, &mut |e| {
        panic!("dry run removed {}", e.rel.display())
    });
    assert!(report.dry_run);
    assert_eq!(report.reclaimed.len(), 7, "{report:#?}");
    assert_eq!(report.reclaimed_disk_bytes, usage.reclaimable_disk_bytes);
    assert_eq!(
        report.reclaimed_apparent_bytes,
        usage.reclaimable_apparent_bytes
    );
    for item in &report.reclaimed {
        assert!(
            tmp.path().join(&item.path).exists(),
            "{} removed",
            item.path
        );
    }
}

#[test]
fn prune_failed_removal_is_reported_and_not_reclaimed() {
    let (_tmp, home, rows, images) = planted();
    let s = survey(&home, &facts(&rows, &images));
    let report = prune(&s, false, &mut |e| {
        if e.kind == UsageKind::WarmSnapshots {
            Outcome::Failed("permission denied".into())
        } else if e.kind == UsageKind::Logs {
            Outcome::Held("in use by sandbox sb-000000000009".into())
        } else {
            Outcome::Removed
        }
    });
    assert_eq!(
        paths(&report.failed),
        ["snapshots/warm-bbbbbbbbbbbb-1c256m"]
    );
    assert_eq!(report.failed[0].why, "permission denied");
    assert!(paths(&report.kept).contains(&"logs/sb-000000000001.console.log"));
    assert!(!paths(&report.reclaimed).contains(&"snapshots/warm-bbbbbbbbbbbb-1c256m"));
    let sum: u64 = report.reclaimed.iter().map(|i| i.disk_bytes).sum();
    assert_eq!(report.reclaimed_disk_bytes, sum);
    assert_eq!(report.reclaimed.len(), 5);
}

#[test]
fn survey_holds_caches_while_a_build_runs_and_starting_sandboxes_snapshots() {
    let (_tmp, home, mut rows, images) = planted();
    let starting = SandboxId::random();
    rows.push(row(&starting, SandboxState::Creating, None, "bbbbbbbbbbbb"));
    let mut f = facts(&rows, &images);
    f.build_running = true;
    let s = survey(&home, &f);
    for rel in [
        "cache/kernel/5.0-1",
        "cache/debs/linux.deb",
        "cache/apt",
        "snapshots/warm-bbbbbbbbbbbb-1c256m",
    ] {
        assert!(
            matches!(entry(&s, rel).verdict, Verdict::Held(_)),
            "{rel}: {:?}",
            entry(&s, rel).verdict
        );
    }
    // A dead builder's directory is debris whatever runs now.
    assert!(matches!(
        entry(&s, "images/.tmp-base-99999999").verdict,
        Verdict::Reclaim(_)
    ));
}

#[test]
fn survey_stale_warm_snapshot_of_a_same_id_rebuild_is_reclaimable() {
    let tmp = tempfile::tempdir().unwrap();
    let home = Home::new(tmp.path().to_owned());
    home.ensure().unwrap();
    let mut img = image("base", "aaaaaaaaaaaa", "6.1-1");
    img.rootfs_sha256 = Some("new".into());
    let dir = tmp.path().join("snapshots/warm-aaaaaaaaaaaa-1c256m");
    std::fs::create_dir_all(&dir).unwrap();
    let mut manifest = serde_json::json!({"fingerprint": {"disk_digest": "old"}});
    // Only the digest matters here; a manifest that does not parse keeps the snapshot.
    write(&dir.join("manifest.json"), manifest.to_string().as_bytes());
    let images = [img];
    let s = survey(&home, &facts(&[], &images));
    assert!(matches!(
        entry(&s, "snapshots/warm-aaaaaaaaaaaa-1c256m").verdict,
        Verdict::Keep(_)
    ));
    manifest = serde_json::to_value(sample_manifest("old")).unwrap();
    write(&dir.join("manifest.json"), manifest.to_string().as_bytes());
    let s = survey(&home, &facts(&[], &images));
    let v = &entry(&s, "snapshots/warm-aaaaaaaaaaaa-1c256m").verdict;
    assert!(
        matches!(v, Verdict::Reclaim(w) if w.contains("rebuilt")),
        "{v:?}"
    );
}

fn sample_manifest(disk_digest: &str) -> kiln_snapshot::SnapshotManifest {
    kiln_snapshot::SnapshotManifest {
        magic: kiln_snapshot::MAGIC.into(),
        format_version: kiln_snapshot::FORMAT_VERSION,
        name: kiln_snapshot::SnapshotName::new("warm-aaaaaaaaaaaa-1c256m").unwrap(),
        created_unix: 1,
        image_id: "aaaaaaaaaaaa".into(),
        files: Vec::new(),
        fingerprint: kiln_snapshot::SnapshotFingerprint {
            qemu_version: "q".into(),
            machine: "m".into(),
            device_fingerprint: "d".into(),
            cpu_model: "c".into(),
            accel: "tcg".into(),
            cpus: 1,
            memory_mib: 256,
            kernel_digest: "k".into(),
            initramfs_digest: "i".into(),
            image_digest: "g".into(),
            disk_digest: disk_digest.into(),
            format_version: kiln_snapshot::FORMAT_VERSION,
        },
        capture: kiln_snapshot::CaptureInfo {
            pause_ms: 1,
            mode: kiln_snapshot::CaptureKind::IgnoreShared,
        },
    }
}

#[test]
fn survey_never_offers_runtime_dirs_images_or_user_snapshots() {
    let tmp = tempfile::tempdir().unwrap();
    let home = Home::new(tmp.path().to_owned());
    home.ensure().unwrap();
    write(&tmp.path().join("run/sb-000000000003/disk.qcow2"), b"x");
    write(&tmp.path().join("snapshots/mine/mem"), b"x");
    write(&tmp.path().join("images/gone/rootfs.ext4"), b"x");
    let s = survey(&home, &facts(&[], &[]));
    assert!(
        s.entries
            .iter()
            .all(|e| !matches!(e.verdict, Verdict::Reclaim(_))),
        "{:?}",
        s.entries
    );
    assert!(
        entry(&s, "run/sb-000000000003")
            .verdict
            .why()
            .contains("janitor")
    );
}

#[test]
fn survey_recordings_reclaimable_once_gone_and_unpinned_and_exports_never() {
    use crate::desktop::redact::Redactor;
    use crate::desktop::review::{Recorder, TimelineEvent};
    use std::time::{Duration, SystemTime};
    let tmp = tempfile::tempdir().unwrap();
    let home = Home::new(tmp.path().to_owned());
    home.ensure().unwrap();
    let root = tmp.path();
    let live: SandboxId = "sb-00000000000a".parse().unwrap();
    let rows = [row(&live, SandboxState::Running, None, "x")];
    let record = |id: &str, pin: Option<SystemTime>| {
        let id: SandboxId = id.parse().unwrap();
        let rec = Recorder::open(&home.recording_dir(&id), &id, Redactor::none()).unwrap();
        rec.record(TimelineEvent::Note {
            text: "x".repeat(5000),
        })
        .unwrap();
        if let Some(until) = pin {
            rec.pin_until(until).unwrap();
        }
        rec.close().unwrap();
    };
    record("sb-00000000000a", None);
    record("sb-00000000000b", None);
    record(
        "sb-00000000000c",
        Some(SystemTime::now() + Duration::from_secs(600)),
    );
    record(
        "sb-00000000000d",
        Some(SystemTime::now() - Duration::from_secs(1)),
    );
    write(&root.join("recordings/notes.txt"), b"mine");
    write(
        &root.join("exports/sb-00000000000b-20261130T000000000Z/index.html"),
        &[1u8; 3000],
    );
    write(
        &root.join("exports/.tmp-export-x-0-4000000000/index.html"),
        b"half",
    );

    let s = survey(&home, &facts(&rows, &[]));
    let verdict = |rel: &str| entry(&s, rel).verdict.clone();
    assert!(
        matches!(verdict("recordings/sb-00000000000a"), Verdict::Keep(w) if w.contains("running"))
    );
    assert!(matches!(
        verdict("recordings/sb-00000000000b"),
        Verdict::Reclaim(_)
    ));
    assert!(
        matches!(verdict("recordings/sb-00000000000c"), Verdict::Held(w) if w.contains("pinned"))
    );
    assert!(matches!(
        verdict("recordings/sb-00000000000d"),
        Verdict::Reclaim(_)
    ));
    assert!(matches!(verdict("recordings/notes.txt"), Verdict::Keep(_)));
    assert!(matches!(
        verdict("exports/sb-00000000000b-20261130T000000000Z"),
        Verdict::Keep(_)
    ));
    assert!(matches!(
        verdict("exports/.tmp-export-x-0-4000000000"),
        Verdict::Reclaim(_)
    ));

    let usage = s.usage();
    let cat = |k: UsageKind| usage.categories.iter().find(|c| c.kind == k).unwrap();
    let recordings = cat(UsageKind::Recordings);
    let all = du(&[root.join("recordings")]);
    let own = std::fs::metadata(root.join("recordings")).unwrap();
    assert_eq!(
        (recordings.apparent_bytes, recordings.disk_bytes),
        (all.apparent - own.size(), all.disk - own.blocks() * 512),
        "every recording counted (the directory's own entry is other's)"
    );
    let gone = du(&[
        root.join("recordings/sb-00000000000b"),
        root.join("recordings/sb-00000000000d"),
    ]);
    assert_eq!(recordings.reclaimable_disk_bytes, gone.disk);
    assert!(gone.apparent > 10_000, "{gone:?}");
    assert!(cat(UsageKind::Exports).apparent_bytes >= 3004);
    // Totals still equal du of the whole home.
    let whole = du(&[root.to_owned()]);
    assert_eq!(
        (usage.apparent_bytes, usage.disk_bytes),
        (whole.apparent, whole.disk)
    );

    let report = prune(&s, false, &mut |e| match remove_entry(root, e) {
        Ok(()) => Outcome::Removed,
        Err(err) => Outcome::Failed(err),
    });
    assert_eq!(
        paths(&report.reclaimed),
        [
            "recordings/sb-00000000000b",
            "recordings/sb-00000000000d",
            "exports/.tmp-export-x-0-4000000000"
        ]
    );
    assert_eq!(paths(&report.kept), ["recordings/sb-00000000000c"]);
    for kept in [
        "recordings/sb-00000000000a",
        "recordings/sb-00000000000c",
        "exports/sb-00000000000b-20261130T000000000Z/index.html",
    ] {
        assert!(root.join(kept).exists(), "{kept} removed");
    }
}
