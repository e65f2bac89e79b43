//! Warm snapshots against real VMs: restore by default, a fresh identity per restore, and a
//! cold-boot fallback when the snapshot is corrupt or `--cold` is asked for.

use std::time::{Duration, Instant};

use kiln_e2e::{Kiln, assert_success, scan, stdout};

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

/// How far outside the host's bracket a restored guest clock may read, in seconds: the host
/// reads the time it sends just before the restore's identity message, so the guest lags by
/// that message's delivery (milliseconds); the rest is margin.
const CLOCK_SLACK: f64 = 1.0;

/// Host wall clock as seconds since the epoch.
fn host_clock() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after the epoch")
        .as_secs_f64()
}

/// (host time before, guest time, host time after) around one `date` in the guest.
fn guest_clock(k: &Kiln, id: &str) -> (f64, f64, f64) {
    let before = host_clock();
    let out = sh(k, id, "date +%s.%N");
    let after = host_clock();
    let guest = out.trim().parse().expect("guest date +%s.%N");
    (before, guest, after)
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
    let probe = "hostname; cat /etc/machine-id; echo $KILN_RESTORE_ID; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo";
    let (oa, ob) = (sh(&k, &a, probe), sh(&k, &b, probe));
    let (la, lb): (Vec<&str>, Vec<&str>) = (oa.lines().collect(), ob.lines().collect());
    assert_eq!(la.len(), 4, "{oa}");
    assert_eq!(la[0], a, "hostname is the sandbox id");
    assert_eq!(lb[0], b);
    for i in 1..4 {
        assert_ne!(la[i], lb[i], "line {i} equal in two restores:\n{oa}\n{ob}");
        assert!(!la[i].is_empty());
    }
    // The restored clock is the host's: the guest's reading lies between host readings taken
    // just before and just after the exec (so a slow exec under TCG cannot fail it), within
    // `CLOCK_SLACK` for the delivery of the time at restore. A clock left at the capture's
    // time is behind by the seconds between capture and restore.
    for id in [&a, &b] {
        let (before, guest, after) = guest_clock(&k, id);
        assert!(
            guest >= before - CLOCK_SLACK && guest <= after + CLOCK_SLACK,
            "guest clock {guest:.3} outside the host's [{before:.3}, {after:.3}] ± {CLOCK_SLACK} s"
        );
    }
    // The restored clock runs at the host's rate: the guest's uptime advances between two
    // execs by no more than the host's time around both and no less than the host's time
    // between them (a guest whose TSC was measured wrong at the capture's boot ran 45×
    // fast). The guest boots with the host's TSC rate under TCG.
    let uptime = |id: &str| -> f64 {
        let out = sh(&k, id, "cut -d' ' -f1 /proc/uptime");
        out.trim().parse().expect("guest uptime")
    };
    let h0 = Instant::now();
    let u1 = uptime(&a);
    let h1 = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    let h2 = Instant::now();
    let u2 = uptime(&a);
    let h3 = Instant::now();
    let (guest, inner, outer) = (
        u2 - u1,
        h2.duration_since(h1).as_secs_f64(),
        h3.duration_since(h0).as_secs_f64(),
    );
    assert!(
        guest >= inner - 0.05 && guest <= outer + 0.05,
        "the guest's uptime advanced {guest:.2} s while the host's took {inner:.2}–{outer:.2} s"
    );
    let accel = k.ps()["sandboxes"]
        .as_array()
        .expect("sandboxes array")
        .iter()
        .find(|s| s["id"] == a.as_str())
        .and_then(|s| s["accel"].as_str().map(str::to_owned))
        .expect("the sandbox's accelerator");
    if accel == "tcg" {
        assert!(
            sh(&k, &a, "cat /proc/cmdline").contains("tsc_early_khz="),
            "a TCG guest boots with the host's TSC rate"
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
    let found = scan(k.home(), secret.as_bytes());
    // The scan read the warm snapshot's files and the store: it looked where a leak would be.
    found
        .read_a("mem")
        .read_a("state")
        .read_a("disk.qcow2")
        .read_a("kiln.db");
    assert!(
        found.hits.is_empty(),
        "secret found on the host in {:?}",
        found.hits
    );
    // Positive control: a value the guest writes to its console reaches a host file (the
    // console log), and the same scan finds it.
    let marker = sh(
        &k,
        &restored,
        "m=kiln-e2e-marker-$(od -An -tx1 -N8 /dev/urandom | tr -d ' \\n'); \
         echo $m > /dev/console; echo $m",
    );
    let marker = marker.trim();
    assert!(marker.len() > "kiln-e2e-marker-".len(), "marker {marker:?}");
    // Once the daemon has logged it (one cheap poll), one scan of the whole home must find it.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !stdout(&k.run(&["logs", &restored])).contains(marker) {
        assert!(
            Instant::now() < deadline,
            "the console log never showed the marker {marker}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let found = scan(k.home(), marker.as_bytes());
    assert!(
        !found.hits.is_empty(),
        "the scan did not find the planted marker {marker} in {} files",
        found.files.len()
    );
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
