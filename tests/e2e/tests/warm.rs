//! Warm snapshots against real VMs: restore by default, a fresh identity per restore, and a
//! cold-boot fallback when the snapshot is corrupt or `--cold` is asked for.

use kiln_e2e::{Kiln, assert_success, stdout};

/// `kiln create --json` → (id, source).
fn create(k: &Kiln, extra: &[&str]) -> (String, String) {
    let mut args = vec!["create", "--image", "base", "--json"];
    args.extend_from_slice(extra);
    let out = k.run(&args);
    assert_success(&out, "kiln create");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("create json");
    (
        v["id"].as_str().expect("id").to_owned(),
        v["source"].as_str().expect("source").to_owned(),
    )
}

fn sh(k: &Kiln, id: &str, script: &str) -> String {
    let out = k.run(&["exec", id, "--", "sh", "-c", script]);
    assert_success(&out, script);
    stdout(&out)
}

#[test]
#[ignore = "boots VMs: run by scripts/test"]
fn restores_by_default_with_fresh_identity_each_time() {
    let k = Kiln::isolated();
    // The first start captures the warm snapshot (and then restores it); later ones restore.
    let (first, _) = create(&k, &[]);
    let (a, source_a) = create(&k, &[]);
    let (b, source_b) = create(&k, &[]);
    assert_eq!(
        (source_a.as_str(), source_b.as_str()),
        ("snapshot", "snapshot")
    );
    let probe = "hostname; cat /etc/machine-id; echo $KILN_RESTORE_ID; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; date +%s";
    let (oa, ob) = (sh(&k, &a, probe), sh(&k, &b, probe));
    let (la, lb): (Vec<&str>, Vec<&str>) = (oa.lines().collect(), ob.lines().collect());
    assert_eq!(la.len(), 5, "{oa}");
    assert_eq!(la[0], a, "hostname is the sandbox id");
    assert_eq!(lb[0], b);
    for i in 1..4 {
        assert_ne!(la[i], lb[i], "line {i} equal in two restores:\n{oa}\n{ob}");
        assert!(!la[i].is_empty());
    }
    let host_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    for l in [&la, &lb] {
        let guest: i64 = l[4].parse().expect("guest date");
        assert!(
            (guest - host_now).abs() <= 2,
            "guest clock {guest}, host {host_now}"
        );
    }
    // Ten execs issued at once right after a restore all succeed.
    let (c, source_c) = create(&k, &[]);
    assert_eq!(source_c, "snapshot");
    let children: Vec<_> = (0..10)
        .map(|i| {
            k.cmd(&["exec", &c, "--", "echo", &i.to_string()])
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("spawn")
        })
        .collect();
    for (i, child) in children.into_iter().enumerate() {
        let out = child.wait_with_output().expect("wait");
        assert_success(&out, "exec after restore");
        assert_eq!(stdout(&out), format!("{i}\n"));
    }
    // Clones' writes stay private.
    sh(&k, &a, "echo mine > /root/private");
    assert_eq!(
        sh(&k, &b, "cat /root/private 2>/dev/null || echo absent"),
        "absent\n"
    );
    for id in [&first, &a, &b, &c] {
        assert_success(&k.run(&["rm", id]), "kiln rm");
    }
}

#[test]
#[ignore = "boots VMs: run by scripts/test"]
fn corrupt_snapshot_falls_back_to_cold_boot_then_recaptures() {
    let k = Kiln::isolated();
    let (first, _) = create(&k, &[]);
    let snapshots = k.home().join("snapshots");
    let dir = std::fs::read_dir(&snapshots)
        .expect("snapshots dir")
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with("warm-"))
        .expect("warm snapshot")
        .path();
    // Truncate the device state: detected before use.
    let state = dir.join("state");
    let len = std::fs::metadata(&state).expect("state").len();
    kiln_e2e::unseal(&state);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&state)
        .expect("open state")
        .set_len(len / 2)
        .expect("truncate");
    let (second, source) = create(&k, &[]);
    assert_eq!(source, "cold", "a truncated snapshot must not be used");
    assert_eq!(sh(&k, &second, "echo ok"), "ok\n");
    assert!(!dir.exists(), "the unusable snapshot was not removed");
    let (third, source) = create(&k, &[]);
    assert_eq!(
        source, "snapshot",
        "the next start re-captures and restores"
    );
    let (fourth, source) = create(&k, &["--cold"]);
    assert_eq!(source, "cold");
    for id in [&first, &second, &third, &fourth] {
        assert_success(&k.run(&["rm", id]), "kiln rm");
    }
}

/// Every file under the state directory that contains `needle`.
fn files_containing(root: &std::path::Path, needle: &[u8]) -> Vec<std::path::PathBuf> {
    let mut hits = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let (path, ft) = (e.path(), e.file_type().expect("file type"));
            if ft.is_dir() {
                stack.push(path);
            } else if ft.is_file() {
                let data = std::fs::read(&path).unwrap_or_default();
                if data.windows(needle.len()).any(|w| w == needle) {
                    hits.push(path);
                }
            }
        }
    }
    hits
}

#[test]
#[ignore = "boots VMs: run by scripts/test"]
fn secrets_reach_the_guest_and_no_file_on_the_host() {
    let k = Kiln::isolated();
    let secret = format!("kiln-e2e-secret-{}", std::process::id());
    let arg = format!("DB_PASSWORD={secret}");
    let (restored, source) = create(&k, &["--secret", &arg]);
    let (cold, cold_source) = create(&k, &["--secret", &arg, "--cold"]);
    assert_eq!(source, "snapshot", "first create captures, then restores");
    assert_eq!(cold_source, "cold");
    for id in [&restored, &cold] {
        assert_eq!(sh(&k, id, "cat /run/secrets/DB_PASSWORD"), secret);
        assert_eq!(sh(&k, id, "stat -c %a /run/secrets/DB_PASSWORD"), "400\n");
    }
    // While both run: not in snapshot files, disk layers, memory files, logs or the store.
    let hits = files_containing(k.home(), secret.as_bytes());
    assert!(hits.is_empty(), "secret found on the host in {hits:?}");
    let out = k.run(&["create", "--image", "base", "--secret", "../x=1"]);
    assert!(!out.status.success());
    assert!(
        kiln_e2e::stderr(&out).contains("invalid secret name"),
        "{}",
        kiln_e2e::stderr(&out)
    );
    for id in [&restored, &cold] {
        assert_success(&k.run(&["rm", id]), "kiln rm");
    }
}

#[test]
#[ignore = "boots VMs: run by scripts/test"]
fn clone_starts_n_sandboxes_from_one_snapshot() {
    let k = Kiln::isolated();
    let out = k.run(&["clone", "--image", "base", "--count", "4"]);
    assert_success(&out, "kiln clone");
    let ids: Vec<String> = stdout(&out).lines().map(str::to_owned).collect();
    assert_eq!(ids.len(), 4, "{}", stdout(&out));
    let listed = k.ps();
    for id in &ids {
        let s = listed["sandboxes"]
            .as_array()
            .expect("array")
            .iter()
            .find(|s| s["id"] == id.as_str())
            .expect("listed")
            .clone();
        assert_eq!(s["state"], "running");
        assert_eq!(s["source"], "snapshot");
    }
    let hosts: std::collections::BTreeSet<String> =
        ids.iter().map(|id| sh(&k, id, "hostname")).collect();
    assert_eq!(hosts.len(), 4, "hostnames not distinct: {hosts:?}");
    for bad in ["0", "65"] {
        let out = k.run(&["clone", "--image", "base", "--count", bad]);
        assert!(!out.status.success());
        assert!(kiln_e2e::stderr(&out).contains("--count must be between 1 and 64"));
    }
    let mut rm = vec!["rm"];
    rm.extend(ids.iter().map(String::as_str));
    assert_success(&k.run(&rm), "kiln rm");
}

#[test]
#[ignore = "boots VMs: run by scripts/test"]
fn image_warm_captures_before_the_first_start() {
    let k = Kiln::isolated();
    let out = k.run(&["image", "warm", "base"]);
    assert_success(&out, "kiln image warm");
    assert!(
        kiln_e2e::stderr(&out).contains("warm snapshot of base ready"),
        "{}",
        kiln_e2e::stderr(&out)
    );
    let warm: Vec<_> = std::fs::read_dir(k.home().join("snapshots"))
        .expect("snapshots dir")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("warm-"))
        .collect();
    assert_eq!(warm.len(), 1);
    assert_eq!(
        k.ps()["sandboxes"].as_array().map(Vec::len),
        Some(0),
        "warm left a sandbox"
    );
    let (id, source) = create(&k, &[]);
    assert_eq!(source, "snapshot");
    assert_success(&k.run(&["rm", &id]), "kiln rm");
}
