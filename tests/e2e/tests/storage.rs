//! `kiln df` and `kiln prune` against a real home: the sizes `df` reports are what `du`
//! measures, item by item; a dry run removes nothing; a prune removes exactly what nothing
//! uses, reports the bytes `du` measured before, and leaves the warm snapshot a running
//! sandbox was restored from (also once its image was rebuilt), and the images, alone. The
//! home has its own copy of `base` (other tests build into the shared images meanwhile).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use kiln_e2e::{Kiln, assert_success, stdout};

/// `du -s --block-size=1 [--apparent-size] PATHS` in one invocation (each inode counted
/// once, by the first path that reaches it, as `kiln df` does), run in `home`. A path whose
/// inodes were all counted before gets no line from `du`: 0.
fn du(home: &Path, paths: &[String], apparent: bool) -> Vec<u64> {
    let mut cmd = Command::new("du");
    cmd.args(["-s", "--block-size=1"]);
    if apparent {
        cmd.arg("--apparent-size");
    }
    let out = cmd
        .arg("--")
        .args(paths)
        .current_dir(home)
        .output()
        .expect("run du");
    assert_success(&out, "du");
    let sizes: BTreeMap<String, u64> = stdout(&out)
        .lines()
        .filter_map(|l| {
            let (n, p) = l.split_once('\t')?;
            Some((p.to_owned(), n.parse().ok()?))
        })
        .collect();
    paths
        .iter()
        .map(|p| sizes.get(p).copied().unwrap_or(0))
        .collect()
}

/// (path, category, apparent, on disk, reclaimable) of every item of `kiln df --json` but
/// the last `other` one (`.`: the directories' own entries, which `du` cannot single out).
type Item = (String, String, u64, u64, bool);

fn df(k: &Kiln) -> (serde_json::Value, Vec<Item>) {
    let out = k.run(&["df", "--json"]);
    assert_success(&out, "kiln df");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("df json");
    let mut items = Vec::new();
    for c in v["categories"].as_array().expect("categories") {
        let kind = c["kind"].as_str().expect("kind").to_owned();
        let mut sum = (0, 0);
        for i in c["items"].as_array().expect("items") {
            let (a, d) = (
                i["apparent_bytes"].as_u64().expect("apparent"),
                i["disk_bytes"].as_u64().expect("disk"),
            );
            sum = (sum.0 + a, sum.1 + d);
            let path = i["path"].as_str().expect("path").to_owned();
            if path != "." {
                let reclaimable = i["reclaimable"].as_bool().expect("reclaimable");
                items.push((path, kind.clone(), a, d, reclaimable));
            }
        }
        assert_eq!(
            (c["apparent_bytes"].as_u64(), c["disk_bytes"].as_u64()),
            (Some(sum.0), Some(sum.1)),
            "category {kind} is not the sum of its items"
        );
    }
    (v, items)
}

/// `kiln prune [--dry-run] --json` → (reclaimed (path, apparent, disk), kept paths, report).
fn prune(k: &Kiln, dry_run: bool) -> (Vec<(String, u64, u64)>, Vec<String>, serde_json::Value) {
    let mut args = vec!["prune", "--json"];
    if dry_run {
        args.push("--dry-run");
    }
    let out = k.run(&args);
    assert_success(&out, "kiln prune");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("prune json");
    assert_eq!(v["dry_run"], dry_run);
    assert_eq!(v["failed"], serde_json::json!([]), "{v:#}");
    let reclaimed = v["reclaimed"]
        .as_array()
        .expect("reclaimed")
        .iter()
        .map(|i| {
            (
                i["path"].as_str().expect("path").to_owned(),
                i["apparent_bytes"].as_u64().expect("apparent"),
                i["disk_bytes"].as_u64().expect("disk"),
            )
        })
        .collect();
    let kept = v["kept"]
        .as_array()
        .expect("kept")
        .iter()
        .map(|i| i["path"].as_str().expect("path").to_owned())
        .collect();
    (reclaimed, kept, v)
}

/// Names (and sizes) of everything in the images directory, to prove it untouched.
fn listing(dir: &Path) -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = std::fs::read_dir(dir)
        .expect("read images")
        .flatten()
        .map(|e| {
            let len = e.metadata().map(|m| m.len()).unwrap_or(0);
            (e.file_name().to_string_lossy().into_owned(), len)
        })
        .collect();
    out.sort();
    out
}

fn write(path: &Path, len: usize) {
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(path, vec![b'k'; len]).expect("write");
}

#[test]
#[ignore = "boots VMs: run by scripts/test"]
fn df_matches_du_and_prune_removes_exactly_the_unused() {
    // Its own copy of `base`: the shared images directory changes while other tests build.
    let k = Kiln::isolated_with_images(&["base"]);
    let home = k.home().to_owned();
    // One sandbox: the warm snapshot is captured, then restored for it.
    let (id, source) = k.create_json(&["--image", "base"]);
    assert_eq!(source, "snapshot");
    let warm = k.warm_dir();
    let warm_rel = format!(
        "snapshots/{}",
        warm.file_name().expect("name").to_string_lossy()
    );
    // Paused, its disk layer and console do not change under the measurements.
    assert_success(&k.run(&["pause", &id]), "kiln pause");

    // What nothing uses: a warm snapshot of an image that does not exist (a copy of the
    // real one), the console and save of a removed sandbox, a kernel no image uses, and a
    // dead kernel extraction's directory.
    let orphan = "snapshots/warm-000000000000-1c256m";
    let out = Command::new("cp")
        .args(["-a", "--sparse=always"])
        .arg(&warm)
        .arg(home.join(orphan))
        .output()
        .expect("cp");
    assert_success(&out, "copy the warm snapshot");
    write(&home.join("logs/sb-0000000000ff.console.log"), 5000);
    write(&home.join("saved/sb-0000000000fe/gen-1/mem"), 70_000);
    write(&home.join("cache/kernel/0.0-test/vmlinuz"), 20_000);
    write(&home.join("cache/kernel/.tmp-0.0-test-99999999/x"), 3000);
    let mut planted = vec![
        orphan.to_owned(),
        "saved/sb-0000000000fe".to_owned(),
        "cache/kernel/0.0-test".to_owned(),
        "cache/kernel/.tmp-0.0-test-99999999".to_owned(),
        "logs/sb-0000000000ff.console.log".to_owned(),
    ];
    planted.sort();
    let own_images = home.join("images");
    let images_before = listing(&own_images);

    // df, bracketed by two du passes: where nothing changed between them, df must equal du
    // exactly (each item, both measures).
    let (_, probe) = df(&k);
    let paths: Vec<String> = probe.iter().map(|i| i.0.clone()).collect();
    let before = (du(&home, &paths, false), du(&home, &paths, true));
    let started = Instant::now();
    let (usage, items) = df(&k);
    let df_ms = started.elapsed().as_millis();
    let after = (du(&home, &paths, false), du(&home, &paths, true));
    assert_eq!(
        items.iter().map(|i| &i.0).collect::<Vec<_>>(),
        paths.iter().collect::<Vec<_>>(),
        "the items changed between two df runs"
    );
    let mut compared = BTreeMap::<String, usize>::new();
    for (n, (path, kind, apparent, disk, _)) in items.iter().enumerate() {
        if before.0[n] != after.0[n] || before.1[n] != after.1[n] {
            // Written while measured (the daemon's log, the database): no exact answer.
            assert!(
                ["logs", "other"].contains(&kind.as_str()),
                "{path} ({kind}) changed while the sandbox was paused"
            );
            continue;
        }
        assert_eq!(*disk, before.0[n], "{path}: on-disk bytes differ from du");
        assert_eq!(
            *apparent, before.1[n],
            "{path}: apparent bytes differ from du --apparent-size"
        );
        *compared.entry(kind.clone()).or_default() += 1;
    }
    for kind in [
        "images",
        "warm_snapshots",
        "sandboxes",
        "stopped_sandboxes",
        "build_caches",
    ] {
        assert!(
            compared.contains_key(kind),
            "no {kind} item compared: {compared:?}"
        );
    }
    // The items in use are there and kept; the planted ones are the reclaimable ones.
    let item = |p: &str| {
        items
            .iter()
            .find(|i| i.0 == p)
            .unwrap_or_else(|| panic!("no item {p}: {paths:?}"))
    };
    assert!(
        !item(&warm_rel).4,
        "the running sandbox's warm snapshot is reclaimable"
    );
    assert!(!item(&format!("run/{id}")).4);
    assert!(!item("images/base").4);
    let mut reclaimable: Vec<String> = items
        .iter()
        .filter(|i| i.4 && !i.0.starts_with("images/.tmp-"))
        .map(|i| i.0.clone())
        .collect();
    reclaimable.sort();
    assert_eq!(reclaimable, planted, "{usage:#}");
    let measured: BTreeMap<&str, (u64, u64)> = planted
        .iter()
        .map(|p| {
            let n = paths.iter().position(|q| q == p).expect("planted item");
            (p.as_str(), (before.1[n], before.0[n]))
        })
        .collect();

    // A dry run lists exactly that and removes nothing.
    let (would, _, _) = prune(&k, true);
    let mut would_paths: Vec<String> = would
        .iter()
        .map(|i| i.0.clone())
        .filter(|p| !p.starts_with("images/.tmp-"))
        .collect();
    would_paths.sort();
    assert_eq!(would_paths, planted);
    for p in &planted {
        assert!(home.join(p).exists(), "the dry run removed {p}");
    }

    // The prune removes exactly that, reporting the bytes du measured before.
    let started = Instant::now();
    let (removed, kept, report) = prune(&k, false);
    let prune_ms = started.elapsed().as_millis();
    for (path, apparent, disk) in &removed {
        assert!(
            !path.starts_with("images/") || path.starts_with("images/.tmp-"),
            "prune removed {path} from the images"
        );
        assert!(
            !home.join(path).exists(),
            "{path} reported removed but still there"
        );
        if let Some(&(a, d)) = measured.get(path.as_str()) {
            assert_eq!(
                (*apparent, *disk),
                (a, d),
                "{path}: reported bytes differ from du"
            );
        }
    }
    let mut removed_paths: Vec<String> = removed
        .iter()
        .map(|i| i.0.clone())
        .filter(|p| !p.starts_with("images/.tmp-"))
        .collect();
    removed_paths.sort();
    assert_eq!(removed_paths, planted, "{report:#}");
    assert!(!kept.contains(&warm_rel) || warm.is_dir());
    assert!(warm.is_dir(), "the warm snapshot in use was removed");
    assert_eq!(listing(&own_images), images_before, "the images changed");

    // The sandbox is unharmed, and nothing is left to reclaim.
    assert_success(&k.run(&["resume", &id]), "kiln resume");
    let out = k.run(&["exec", &id, "--", "echo", "still here"]);
    assert_success(&out, "exec after prune");
    assert_eq!(stdout(&out), "still here\n");
    let (usage, _) = df(&k);
    let left: Vec<&serde_json::Value> = usage["categories"]
        .as_array()
        .expect("categories")
        .iter()
        .flat_map(|c| c["items"].as_array().expect("items"))
        .filter(|i| i["reclaimable"] == true)
        .collect();
    assert!(left.is_empty(), "still reclaimable after prune: {left:?}");
    println!(
        "kiln df: {df_ms} ms, kiln prune: {prune_ms} ms ({} items, {} bytes on disk)",
        removed.len(),
        report["reclaimed_disk_bytes"]
    );

    // The image rebuilt under the same id (what a rebuild changes: the recorded root disk
    // digest, here in the home's own copy of the manifest): the warm snapshot is stale, but
    // the running sandbox was restored from it, so it is held, and goes once the sandbox
    // does.
    let manifest_path = own_images.join("base/manifest.json");
    kiln_e2e::unseal(&manifest_path);
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&manifest_path).expect("read manifest"))
            .expect("manifest json");
    manifest["rootfs_sha256"] = "0".repeat(64).into();
    std::fs::write(
        home.join("images/base/manifest.json"),
        serde_json::to_vec(&manifest).expect("encode"),
    )
    .expect("write manifest");
    let (_, items) = df(&k);
    assert!(
        !item_of(&items, &warm_rel).4,
        "a snapshot in use is reclaimable"
    );
    let (removed, kept, report) = prune(&k, false);
    assert!(removed.is_empty(), "{report:#}");
    assert_eq!(kept, std::slice::from_ref(&warm_rel), "{report:#}");
    let why = report["kept"][0]["why"].as_str().expect("why");
    assert!(
        why.contains(&id),
        "the reason does not name the sandbox: {why}"
    );
    assert!(warm.is_dir(), "the warm snapshot in use was removed");
    let measured = (
        du(&home, std::slice::from_ref(&warm_rel), true)[0],
        du(&home, std::slice::from_ref(&warm_rel), false)[0],
    );
    assert_success(&k.run(&["rm", &id]), "kiln rm");
    let (removed, _, report) = prune(&k, false);
    assert_eq!(
        removed,
        [(warm_rel.clone(), measured.0, measured.1)],
        "{report:#}"
    );
    assert!(
        !warm.exists(),
        "the stale snapshot was reported removed but is there"
    );
    assert_eq!(listing(&own_images), images_before, "the images changed");
}

fn item_of<'a>(items: &'a [Item], path: &str) -> &'a Item {
    items
        .iter()
        .find(|i| i.0 == path)
        .unwrap_or_else(|| panic!("no item {path}"))
}
