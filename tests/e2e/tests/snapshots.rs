//! User snapshots, published ports and secret handling against real VMs: a snapshot leaves
//! its source running and unchanged, restores and clones carry the saved files, no secret
//! reaches a snapshot file, ports keep working across snapshot and restore, and bad input
//! is refused with a clear error.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kiln_e2e::{Kiln, assert_success, free_port, http_get, stderr, stdout, wait_http};

fn create(k: &Kiln, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["create", "--json"];
    all.extend_from_slice(args);
    let out = k.run(&all);
    assert_success(&out, "kiln create");
    serde_json::from_slice(&out.stdout).expect("create json")
}

fn sh(k: &Kiln, id: &str, script: &str) -> String {
    let out = k.run(&["exec", id, "--", "sh", "-c", script]);
    assert_success(&out, script);
    stdout(&out)
}

fn snapshots(k: &Kiln) -> Vec<serde_json::Value> {
    let out = k.run(&["snapshot", "ls", "--json"]);
    assert_success(&out, "kiln snapshot ls");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ls json");
    v["snapshots"].as_array().expect("array").clone()
}

/// Every file under `dir`, recursively (symlinks not followed).
fn files_under(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let t = e.file_type().expect("file type");
        if t.is_dir() {
            files_under(&e.path(), out);
        } else if t.is_file() {
            out.push(e.path());
        }
    }
}

/// What a scan for a needle read: the files that hold it and every file read.
struct Scan {
    hits: Vec<PathBuf>,
    files: Vec<PathBuf>,
}

/// Reads every regular file under `root` (symlinks not followed) and notes those containing
/// `needle`. A missing or unreadable root or file fails the test (a scan that reads nothing
/// must not pass); only a file removed between listing and reading is skipped.
fn scan(root: &Path, needle: &[u8]) -> Scan {
    assert!(root.is_dir(), "nothing to scan at {}", root.display());
    let mut scan = Scan {
        hits: Vec::new(),
        files: Vec::new(),
    };
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && dir != root => continue,
            Err(e) => panic!("cannot list {}: {e}", dir.display()),
        };
        for e in entries {
            let e = e.expect("directory entry");
            let (path, ft) = (e.path(), e.file_type().expect("file type"));
            if ft.is_dir() {
                stack.push(path);
            } else if ft.is_file() {
                let data = match std::fs::read(&path) {
                    Ok(data) => data,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => panic!("cannot read {}: {e}", path.display()),
                };
                if data.windows(needle.len()).any(|w| w == needle) {
                    scan.hits.push(path.clone());
                }
                scan.files.push(path);
            }
        }
    }
    scan
}

impl Scan {
    /// Fails unless a file named `name` was read.
    fn read_a(&self, name: &str) -> &Self {
        assert!(
            self.files
                .iter()
                .any(|f| f.file_name().is_some_and(|n| n == name)),
            "the scan read no `{name}` (it read {:?})",
            self.files
        );
        self
    }
}

#[test]
#[ignore = "boots VMs: run by scripts/test"]
fn user_snapshot_leaves_source_running_and_restores_carry_its_files() {
    let k = Kiln::isolated();
    let a = create(&k, &["--image", "base"]);
    let a = a["id"].as_str().expect("id").to_owned();
    sh(&k, &a, "echo before > /root/before && sync");
    let out = k.run(&["snapshot", &a, "--name", "s1", "--json"]);
    assert_success(&out, "kiln snapshot");
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).expect("snapshot json");
    assert_eq!(info["name"], "s1");
    assert_eq!(info["kind"], "user");
    assert_eq!(info["origin"], a.as_str());
    // The source keeps running, unchanged, and keeps working.
    assert_eq!(sh(&k, &a, "cat /root/before").trim(), "before");
    sh(&k, &a, "echo after > /root/after");

    let b = create(&k, &["--snapshot", "s1"]);
    assert_eq!(b["source"], "snapshot");
    assert_eq!(b["snapshot"], "s1");
    let b = b["id"].as_str().expect("id").to_owned();
    assert_eq!(
        sh(
            &k,
            &b,
            "cat /root/before; test -e /root/after && echo leaked; hostname"
        )
        .trim(),
        format!("before\n{b}")
    );
    // Clones by snapshot name: each has the file, writes stay private.
    let out = k.run(&["clone", "s1", "--count", "2"]);
    assert_success(&out, "kiln clone s1");
    let clones: Vec<String> = stdout(&out).lines().map(str::to_owned).collect();
    assert_eq!(clones.len(), 2, "{}", stdout(&out));
    sh(&k, &clones[0], "echo mine > /root/before");
    assert_eq!(sh(&k, &clones[1], "cat /root/before").trim(), "before");
    assert_eq!(sh(&k, &a, "cat /root/before").trim(), "before");

    // In use: removal refused, naming a user; after removing users, it goes.
    let listed = snapshots(&k);
    let s1 = listed
        .iter()
        .find(|s| s["name"] == "s1")
        .expect("s1 listed");
    assert_eq!(s1["used_by"].as_array().expect("used_by").len(), 3, "{s1}");
    let out = k.run(&["snapshot", "rm", "s1"]);
    assert!(
        !out.status.success(),
        "removing a snapshot in use must fail"
    );
    assert!(
        stderr(&out).contains("in use") && stderr(&out).contains(&b),
        "{}",
        stderr(&out)
    );
    let mut rm = vec!["rm", b.as_str()];
    rm.extend(clones.iter().map(String::as_str));
    assert_success(&k.run(&rm), "kiln rm");
    assert_success(&k.run(&["snapshot", "rm", "s1"]), "kiln snapshot rm");
    assert!(snapshots(&k).iter().all(|s| s["name"] != "s1"));
    assert!(!k.home().join("snapshots/s1").exists());
}

#[test]
#[ignore = "boots VMs: run by scripts/test"]
fn secrets_never_reach_a_user_snapshot_and_come_back_to_the_source() {
    let k = Kiln::isolated();
    let value = format!("kiln-e2e-usersnap-{}", std::process::id());
    let secret = format!("TOKEN={value}");
    let a = create(
        &k,
        &["--image", "base", "--secret", &secret, "--secret-env"],
    );
    let a = a["id"].as_str().expect("id").to_owned();
    assert_eq!(sh(&k, &a, "echo $TOKEN").trim(), value, "secret as env");
    // Positive control: a value in the same tmpfs as the secrets, which the snapshot keeps.
    let marker = sh(
        &k,
        &a,
        "m=kiln-e2e-marker-$(od -An -tx1 -N8 /dev/urandom | tr -d ' \\n'); \
         echo $m > /run/kiln-e2e-marker; echo $m",
    );
    let marker = marker.trim();
    assert!(marker.len() > "kiln-e2e-marker-".len(), "marker {marker:?}");
    assert_success(&k.run(&["snapshot", &a, "--name", "nosecret"]), "snapshot");
    let dir = k.home().join("snapshots/nosecret");
    let found = scan(&dir, value.as_bytes());
    found
        .read_a("mem")
        .read_a("state")
        .read_a("disk.qcow2")
        .read_a("manifest.json");
    assert!(
        found.hits.is_empty(),
        "secret value found in {:?}",
        found.hits
    );
    let control = scan(&dir, marker.as_bytes());
    assert!(
        control.hits.iter().any(|f| f.ends_with("mem")),
        "the scan did not find the marker the guest kept in RAM (hits {:?})",
        control.hits
    );
    // The source has it back; a restore of the snapshot does not.
    assert_eq!(sh(&k, &a, "cat /run/secrets/TOKEN"), value);
    let b = create(&k, &["--snapshot", "nosecret"]);
    let b = b["id"].as_str().expect("id").to_owned();
    assert_eq!(
        sh(
            &k,
            &b,
            "test -e /run/secrets && echo present || echo absent"
        )
        .trim(),
        "absent"
    );

    // Rotation replaces the file and the environment of later execs.
    let rotated = format!("{value}-rotated");
    assert_success(
        &k.run(&["secret", "rotate", &a, &format!("TOKEN={rotated}")]),
        "kiln secret rotate",
    );
    assert_eq!(sh(&k, &a, "cat /run/secrets/TOKEN"), rotated);
    assert_eq!(sh(&k, &a, "echo $TOKEN").trim(), rotated);
    let out = k.run(&["secret", "rotate", &a, "../etc/passwd=x"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("invalid secret name"),
        "{}",
        stderr(&out)
    );
    // Nothing of either value in the state directory (logs, store, snapshots, layers).
    let found = scan(k.home(), value.as_bytes());
    found.read_a("mem").read_a("kiln.db");
    assert!(
        found.hits.is_empty(),
        "secret value found in {:?}",
        found.hits
    );
}

#[test]
#[ignore = "boots VMs: run by scripts/test"]
fn snapshot_bad_input_is_refused_with_the_reason() {
    let k = Kiln::isolated();
    let out = k.run(&["create", "--snapshot", "no-such-snap"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no snapshot \"no-such-snap\""),
        "{}",
        stderr(&out)
    );
    let a = create(&k, &["--image", "base"]);
    let a = a["id"].as_str().expect("id").to_owned();
    for (name, reason) in [
        ("Bad/Name", "invalid snapshot name"),
        ("warm-mine", "reserved"),
    ] {
        let out = k.run(&["snapshot", &a, "--name", name]);
        assert!(!out.status.success(), "{name} accepted");
        assert!(stderr(&out).contains(reason), "{name}: {}", stderr(&out));
    }
    assert_success(&k.run(&["snapshot", &a, "--name", "dup"]), "snapshot dup");
    let out = k.run(&["snapshot", &a, "--name", "dup"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("exists already"), "{}", stderr(&out));
    let out = k.run(&["snapshot", "sb-000000000000", "--name", "x"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("no sandbox"), "{}", stderr(&out));
    // A failed sandbox (its QEMU killed) cannot be snapshotted.
    let f = create(&k, &["--image", "base"]);
    let f = f["id"].as_str().expect("id").to_owned();
    kiln_e2e::signal(k.qemu_pid(&f), 9);
    let deadline = Instant::now() + Duration::from_secs(30);
    while k.state_of(&f).as_deref() != Some("failed") {
        assert!(Instant::now() < deadline, "sandbox never marked failed");
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = k.run(&["snapshot", &f, "--name", "of-failed"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not running"), "{}", stderr(&out));
    assert!(snapshots(&k).iter().all(|s| s["name"] != "of-failed"));
    // A stopped (removed) sandbox cannot be snapshotted either.
    assert_success(&k.run(&["rm", &a]), "rm");
    let out = k.run(&["snapshot", &a, "--name", "late"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("no sandbox"), "{}", stderr(&out));
}

#[test]
#[ignore = "boots VMs: run by scripts/test"]
fn disk_full_during_a_snapshot_leaves_no_snapshot_and_the_source_running() {
    let k = Kiln::isolated();
    let a = create(&k, &["--image", "base"]);
    let a = a["id"].as_str().expect("id").to_owned();
    // Fill the guest's page cache so the RAM stream cannot fit in 16 MiB.
    sh(&k, &a, "head -c 48M /dev/urandom > /root/big");
    let snaps = k.home().join("snapshots");
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=16m", "kiln-e2e-full"])
        .arg(&snaps)
        .status()
        .expect("run mount");
    assert!(mounted.success(), "mounting a small tmpfs needs root");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(snaps.clone());
    let out = k.run(&["snapshot", &a, "--name", "full"]);
    assert!(!out.status.success(), "a snapshot on a full disk must fail");
    let mut left = Vec::new();
    files_under(&snaps, &mut left);
    assert!(
        left.is_empty() && std::fs::read_dir(&snaps).expect("read").next().is_none(),
        "left behind: {left:?}"
    );
    assert!(snapshots(&k).iter().all(|s| s["name"] != "full"));
    assert_eq!(k.state_of(&a).as_deref(), Some("running"));
    assert_eq!(sh(&k, &a, "echo alive").trim(), "alive");
}

#[test]
#[ignore = "boots VMs: run by scripts/test"]
fn published_ports_tunnel_and_survive_snapshot_and_restore() {
    let k = Kiln::isolated();
    let (p1, p2) = (free_port(), free_port());
    let a = create(
        &k,
        &["--image", "python", "--publish", &format!("{p1}:8000")],
    );
    let a = a["id"].as_str().expect("id").to_owned();
    sh(
        &k,
        &a,
        "cd /root && echo served-by-kiln > index.html && python3 -m http.server 8000 --bind 127.0.0.1 >/dev/null 2>&1 &",
    );
    let body = wait_http(p1);
    assert!(
        body.contains("200") && body.contains("served-by-kiln"),
        "{body}"
    );
    // A port in use fails fast and names the port.
    let t = Instant::now();
    let out = k.run(&[
        "create",
        "--image",
        "python",
        "--publish",
        &format!("{p1}:8000"),
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains(&format!("host port {p1}")),
        "{}",
        stderr(&out)
    );
    assert!(t.elapsed() < Duration::from_secs(30));
    // Snapshot: the source's port keeps working; a restore serves on its own port, from the
    // server process saved in the snapshot.
    assert_success(&k.run(&["snapshot", &a, "--name", "web"]), "snapshot");
    assert!(wait_http(p1).contains("served-by-kiln"));
    let b = create(
        &k,
        &["--snapshot", "web", "--publish", &format!("{p2}:8000")],
    );
    assert_eq!(b["spec"]["publish"][0]["host"], p2);
    assert!(wait_http(p2).contains("served-by-kiln"));
    // Removing the sandbox closes its port.
    assert_success(&k.run(&["rm", b["id"].as_str().expect("id")]), "rm");
    assert!(http_get(p2).is_none(), "port {p2} still open after rm");
}

#[test]
#[ignore = "boots VMs: run by scripts/test"]
fn full_ram_mode_restores_warm_and_user_snapshots() {
    // The mode a QEMU without x-ignore-shared gets, forced here: RAM travels in the stream.
    let k = Kiln::isolated();
    let run = |args: &[&str]| {
        k.cmd(args)
            .env("KILN_SNAPSHOT_MODE", "full-ram")
            .output()
            .expect("spawn kiln")
    };
    let start = |args: &[&str]| {
        let mut all = vec!["create", "--json"];
        all.extend_from_slice(args);
        let out = run(&all);
        assert_success(&out, "kiln create");
        serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("json")
    };
    let a = start(&["--image", "base"]);
    let b = start(&["--image", "base"]);
    assert_eq!(b["source"], "snapshot");
    let warm = b["snapshot"].as_str().expect("snapshot name").to_owned();
    assert!(warm.ends_with("-fullram"), "{warm}");
    let mem = std::fs::metadata(k.home().join("snapshots").join(&warm).join("mem"))
        .expect("mem")
        .len();
    assert_eq!(mem, 0, "a full-RAM snapshot keeps RAM in its state stream");
    let a = a["id"].as_str().expect("id").to_owned();
    let b = b["id"].as_str().expect("id").to_owned();
    assert_eq!(sh(&k, &b, "hostname").trim(), b);
    sh(&k, &a, "echo kept > /root/kept");
    assert_success(&run(&["snapshot", &a, "--name", "fr"]), "snapshot");
    let c = start(&["--snapshot", "fr"]);
    let c = c["id"].as_str().expect("id").to_owned();
    assert_eq!(sh(&k, &c, "cat /root/kept").trim(), "kept");
    let log = std::fs::read_to_string(k.home().join("kilnd.log")).expect("log");
    assert!(
        log.contains("KILN_SNAPSHOT_MODE=full-ram"),
        "mode not announced"
    );
}

#[test]
#[ignore = "boots VMs: run by scripts/test"]
fn corrupt_snapshot_metadata_is_unusable_visible_and_removable() {
    let k = Kiln::isolated();
    let src = k.create("base");
    for name in ["bad-origin", "bad-manifest"] {
        assert_success(&k.run(&["snapshot", &src, "--name", name]), "snapshot");
    }
    assert_success(&k.run(&["rm", &src]), "rm");
    let dir = k.home().join("snapshots");
    // An origin.json naming no valid image: refused as unusable, naming the file (not a 500).
    kiln_e2e::unseal(&dir.join("bad-origin/origin.json"));
    std::fs::write(
        dir.join("bad-origin/origin.json"),
        r#"{"image":"../etc","sandbox":"sb-000000000000"}"#,
    )
    .expect("write origin");
    let out = k.run(&["create", "--snapshot", "bad-origin"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("cannot be used") && stderr(&out).contains("origin.json"),
        "{}",
        stderr(&out)
    );
    // A manifest that cannot be read: still listed, with the reason, and removable.
    kiln_e2e::unseal(&dir.join("bad-manifest/manifest.json"));
    std::fs::write(dir.join("bad-manifest/manifest.json"), b"{ not json").expect("write");
    let out = k.run(&["snapshot", "ls", "--json"]);
    assert_success(&out, "snapshot ls");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ls json");
    let bad = v["snapshots"]
        .as_array()
        .expect("snapshots")
        .iter()
        .find(|s| s["name"] == "bad-manifest")
        .expect("the corrupt snapshot is listed");
    assert!(
        bad["unusable"]
            .as_str()
            .unwrap_or_default()
            .contains("manifest"),
        "{bad}"
    );
    assert_success(
        &k.run(&["snapshot", "rm", "bad-manifest", "bad-origin"]),
        "rm both",
    );
    assert!(!dir.join("bad-manifest").exists() && !dir.join("bad-origin").exists());
}
