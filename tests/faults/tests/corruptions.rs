//! Byte flips and truncations at seeded offsets of every file of a warm snapshot, of a user
//! snapshot and of a stopped sandbox's save (`mem`, `state`, `disk.qcow2`, `manifest.json`,
//! `manifest.sha256`, `origin.json`). A corrupt snapshot must never be restored: a create over
//! a corrupt warm snapshot cold-boots (201, `source: cold`) and the snapshot is removed; a
//! create from a corrupt user snapshot is refused with 409 `snapshot_unusable` and the
//! snapshot stays listed; a start from a corrupt save is refused with 409 `snapshot_unusable`
//! and the sandbox stays `stopped`.
//! Never a 5xx, never a hang, nothing leaked (the invariants are checked after each one).
//!
//! One home serves every corruption: after each, the damaged file is put back from a pristine
//! copy (a removed warm snapshot is copied back whole and renamed into place), and at the end
//! of each round all three must restore again (the user snapshot and the save with their
//! file), which proves that each refusal was the corruption's doing.

use std::path::{Path, PathBuf};

use kiln_faults::corrupt::{Damage, copy_dir, remove_tree};
use kiln_faults::home::FaultHome;
use kiln_faults::rng::{Rng, round_rng, rounds, seeds};
use kiln_faults::{Tally, announce, invariants};

/// `POST /v1/sandboxes` with `body`: (status, parsed body).
fn create(home: &FaultHome, body: &str) -> (u16, serde_json::Value) {
    let (status, text) =
        kiln_e2e::api_request(home.path(), "POST", "/v1/sandboxes", body.as_bytes());
    (
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
    )
}

fn files_of(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("snapshot dir")
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Whether a damage leaves the data a restore uses unchanged, so that refusing and restoring
/// are both right:
/// - `manifest.sha256` with the same tokens: the checksum's hex digits in another case
///   (`a` ^ 0x20 = `A`), or its final newline cut or turned into other white space;
/// - `origin.json` still valid JSON naming the same image: it is informational and not
///   hashed (the image is checked against the manifest's checksummed image id), so a damaged
///   `sandbox` field changes only what `snapshot ls` shows as the origin.
fn harmless(file: &str, before: &[u8], after: &[u8]) -> bool {
    match file {
        "manifest.sha256" => {
            let norm = |b: &[u8]| {
                let text = String::from_utf8_lossy(b).into_owned();
                let mut tokens: Vec<String> = text.split_whitespace().map(str::to_owned).collect();
                if let Some(sum) = tokens.first_mut() {
                    *sum = sum.to_ascii_lowercase();
                }
                tokens
            };
            norm(before) == norm(after)
        }
        "origin.json" => {
            let image = |b: &[u8]| {
                serde_json::from_slice::<serde_json::Value>(b)
                    .ok()
                    .and_then(|v| v["image"].as_str().map(str::to_owned))
            };
            image(after).is_some() && image(before) == image(after)
        }
        _ => false,
    }
}

/// The bytes of a file of at most 64 KiB (the metadata files), else nothing.
fn small_file(path: &Path) -> Vec<u8> {
    match std::fs::metadata(path) {
        Ok(m) if m.len() <= 64 * 1024 => std::fs::read(path).unwrap_or_default(),
        _ => Vec::new(),
    }
}

fn remove_sandbox(home: &FaultHome, body: &serde_json::Value) {
    if let Some(id) = body["id"].as_str() {
        let _ = home.run(&["rm", id]);
    }
}

struct Fixture {
    home: FaultHome,
    warm: String,
    pristine: PathBuf,
    payload_sha: String,
    /// The stopped sandbox whose save is corrupted, and its save's generation directory.
    stopped: String,
    save: PathBuf,
}

impl Fixture {
    fn new(label: &str, seed: u64) -> Fixture {
        let home = FaultHome::linked(label);
        let src = home
            .run_ok(&["create", "--image", "base"])
            .trim()
            .to_owned();
        let mut rng = Rng::new(seed);
        let bytes: Vec<u8> = (0..16 * 1024).map(|_| rng.next_u64() as u8).collect();
        let payload = home.path().join("faults-payload");
        std::fs::write(&payload, &bytes).expect("write payload");
        home.run_ok(&[
            "cp",
            &payload.display().to_string(),
            &format!("{src}:/root/acked"),
        ]);
        home.run_ok(&["snapshot", &src, "--name", "u"]);
        home.run_ok(&["stop", &src]);
        let warm = home
            .entries("snapshots")
            .into_iter()
            .find(|n| n.starts_with("warm-"))
            .expect("a warm snapshot was captured");
        let pristine = home.path().join("faults-pristine");
        for name in [warm.as_str(), "u"] {
            copy_dir(
                &home.path().join("snapshots").join(name),
                &pristine.join(name),
            )
            .expect("pristine copy");
        }
        let mut fx = Fixture {
            home,
            warm,
            pristine,
            payload_sha: kiln_e2e::sha256_hex(&bytes),
            stopped: src,
            save: PathBuf::new(),
        };
        fx.keep_save();
        fx
    }

    /// Finds the stopped sandbox's save and keeps a pristine copy of it.
    fn keep_save(&mut self) {
        let root = self.home.path().join("saved").join(&self.stopped);
        let gens: Vec<String> = self
            .home
            .entries(&format!("saved/{}", self.stopped))
            .into_iter()
            .filter(|g| g.starts_with("gen-"))
            .collect();
        assert_eq!(gens.len(), 1, "one save generation: {gens:?}");
        self.save = root.join(&gens[0]);
        let copy = self.pristine.join("save");
        remove_tree(&copy).expect("clear the old pristine save");
        copy_dir(&self.save, &copy).expect("pristine save");
    }

    fn snapshot_dir(&self, name: &str) -> PathBuf {
        self.home.path().join("snapshots").join(name)
    }

    /// Puts the pristine warm snapshot back: copied whole beside, then renamed into place.
    fn restore_warm(&self) {
        let dir = self.snapshot_dir(&self.warm);
        remove_tree(&dir).expect("remove damaged warm snapshot");
        let stage = self.home.path().join("faults-stage");
        remove_tree(&stage).expect("clear stage");
        copy_dir(&self.pristine.join(&self.warm), &stage).expect("copy warm back");
        std::fs::rename(&stage, &dir).expect("rename warm into place");
    }
}

fn check_invariants(fx: &Fixture, what: &str, tally: &mut Tally) {
    for v in invariants::check_serving(&fx.home) {
        tally.leaks.push(format!("{what}: {v}"));
    }
}

/// One corruption of one warm snapshot file; the next create must cold-boot.
fn corrupt_warm(fx: &Fixture, rng: &mut Rng, file: &str, tally: &mut Tally) {
    let path = fx.snapshot_dir(&fx.warm).join(file);
    let size = std::fs::metadata(&path).expect("stat").len();
    let damage = Damage::draw(rng, size);
    let what = format!("warm {file} ({damage})");
    let before = small_file(&path);
    damage.apply(&path).expect("damage");
    let benign = harmless(file, &before, &small_file(&path));
    tally.harmless += u32::from(benign);
    println!(
        "  {what}{}",
        if benign {
            ": harmless, either answer is right"
        } else {
            ""
        }
    );
    tally.injected += 1;
    let (status, body) = create(&fx.home, r#"{"source":{"kind":"image","image":"base"}}"#);
    match status {
        0 => tally.hangs.push(format!("{what}: create got no answer")),
        500.. => tally.server_errors.push(format!("{what}: {status} {body}")),
        201 if body["source"] == "snapshot" && !benign => tally.restored.push(what.clone()),
        201 if body["source"] == "snapshot" => {}
        201 => {
            if fx.snapshot_dir(&fx.warm).exists() {
                tally
                    .broken
                    .push(format!("{what}: refused but not removed"));
            }
        }
        _ => tally.broken.push(format!(
            "{what}: create answered {status} {body}, not a cold boot"
        )),
    }
    remove_sandbox(&fx.home, &body);
    check_invariants(fx, &what, tally);
    fx.restore_warm();
}

/// One corruption of one user snapshot file; a create from it must be refused.
fn corrupt_user(fx: &Fixture, rng: &mut Rng, file: &str, tally: &mut Tally) {
    let path = fx.snapshot_dir("u").join(file);
    let size = std::fs::metadata(&path).expect("stat").len();
    let damage = Damage::draw(rng, size);
    let what = format!("user {file} ({damage})");
    let before = small_file(&path);
    damage.apply(&path).expect("damage");
    let benign = harmless(file, &before, &small_file(&path));
    tally.harmless += u32::from(benign);
    println!(
        "  {what}{}",
        if benign {
            ": harmless, either answer is right"
        } else {
            ""
        }
    );
    tally.injected += 1;
    let (status, body) = create(&fx.home, r#"{"source":{"kind":"snapshot","snapshot":"u"}}"#);
    match status {
        0 => tally.hangs.push(format!("{what}: create got no answer")),
        500.. => tally.server_errors.push(format!("{what}: {status} {body}")),
        201 if !benign => tally.restored.push(what.clone()),
        201 => {}
        409 if body["code"] == "snapshot_unusable" => {}
        _ => tally
            .broken
            .push(format!("{what}: create answered {status} {body}")),
    }
    remove_sandbox(&fx.home, &body);
    let (status, text) = kiln_e2e::api_request(fx.home.path(), "GET", "/v1/snapshots", b"");
    let listed = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| {
            v["snapshots"]
                .as_array()
                .map(|a| a.iter().any(|s| s["name"] == "u"))
        });
    match (status, listed) {
        (0, _) => tally
            .hangs
            .push(format!("{what}: snapshot list got no answer")),
        (500.., _) => tally
            .server_errors
            .push(format!("{what}: list {status} {text}")),
        (200, Some(true)) => {}
        _ => tally.broken.push(format!(
            "{what}: snapshot list {status} does not show it: {text}"
        )),
    }
    check_invariants(fx, &what, tally);
    damage
        .repair(&path, &fx.pristine.join("u").join(file))
        .expect("repair");
}

/// One corruption of one file of a stopped sandbox's save; its start must be refused and
/// leave it stopped.
fn corrupt_saved(fx: &mut Fixture, rng: &mut Rng, file: &str, tally: &mut Tally) {
    let path = fx.save.join(file);
    let size = std::fs::metadata(&path).expect("stat").len();
    let damage = Damage::draw(rng, size);
    let what = format!("save {file} ({damage})");
    let before = small_file(&path);
    damage.apply(&path).expect("damage");
    let benign = harmless(file, &before, &small_file(&path));
    tally.harmless += u32::from(benign);
    println!(
        "  {what}{}",
        if benign {
            ": harmless, either answer is right"
        } else {
            ""
        }
    );
    tally.injected += 1;
    let (status, text) = kiln_e2e::api_request(
        fx.home.path(),
        "POST",
        &format!("/v1/sandboxes/{}/start", fx.stopped),
        b"{}",
    );
    let body: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    let started = status == 200;
    match status {
        0 => tally.hangs.push(format!("{what}: start got no answer")),
        500.. => tally.server_errors.push(format!("{what}: {status} {text}")),
        200 if benign => {}
        200 => tally.restored.push(what.clone()),
        409 if body["code"] == "snapshot_unusable" => {}
        _ => tally
            .broken
            .push(format!("{what}: start answered {status} {text}")),
    }
    let state = fx
        .home
        .ps()
        .into_iter()
        .find(|s| s.id == fx.stopped)
        .map(|s| s.state);
    if !started && state.as_deref() != Some("stopped") {
        tally
            .broken
            .push(format!("{what}: the sandbox is {state:?}, not stopped"));
    }
    check_invariants(fx, &what, tally);
    if started {
        // It ran from the damaged save: stop it again, which writes a fresh save.
        fx.home.run_ok(&["stop", &fx.stopped]);
        fx.keep_save();
    } else {
        damage
            .repair(&path, &fx.pristine.join("save").join(file))
            .expect("repair");
    }
}

/// Both snapshots restore again once repaired, the user one with its file.
fn check_repaired(fx: &mut Fixture, tally: &mut Tally) {
    let (status, body) = create(&fx.home, r#"{"source":{"kind":"image","image":"base"}}"#);
    if status != 201 || body["source"] != "snapshot" {
        tally.broken.push(format!(
            "the repaired warm snapshot did not restore: {status} {body}"
        ));
    }
    remove_sandbox(&fx.home, &body);
    let (status, body) = create(&fx.home, r#"{"source":{"kind":"snapshot","snapshot":"u"}}"#);
    match body["id"].as_str() {
        Some(id) if status == 201 => {
            let out = fx.home.run(&["exec", id, "--", "sha256sum", "/root/acked"]);
            let sha = kiln_e2e::stdout(&out);
            if !sha.starts_with(&fx.payload_sha) {
                tally
                    .broken
                    .push(format!("the repaired user snapshot lacks its file: {sha}"));
            }
        }
        _ => tally.broken.push(format!(
            "the repaired user snapshot did not restore: {status} {body}"
        )),
    }
    remove_sandbox(&fx.home, &body);
}

#[test]
#[ignore = "boots VMs: run by scripts/test and scripts/faults"]
fn snapshot_corruptions_are_never_restored_never_5xx_never_hang() {
    let test = "snapshot_corruptions";
    let seeds = seeds();
    let mut tally = Tally::new("corruptions");
    for &seed in &seeds {
        let mut fx = Fixture::new(test, seed);
        let warm_files = files_of(&fx.snapshot_dir(&fx.warm));
        let user_files = files_of(&fx.snapshot_dir("u"));
        let save_files = files_of(&fx.save);
        assert!(
            warm_files.len() >= 5 && user_files.contains(&"origin.json".to_owned()),
            "{warm_files:?} {user_files:?}"
        );
        for round in 0..rounds() {
            announce(test, seed, round);
            let mut rng = round_rng(test, seed, round);
            for f in &warm_files {
                corrupt_warm(&fx, &mut rng, f, &mut tally);
            }
            for f in &user_files {
                corrupt_user(&fx, &mut rng, f, &mut tally);
            }
            for f in &save_files {
                corrupt_saved(&mut fx, &mut rng, f, &mut tally);
            }
            check_repaired(&mut fx, &mut tally);
        }
        let _ = fx.home.run(&["daemon", "stop", "--all"]);
        for v in invariants::check_stopped(&fx.home) {
            tally.leaks.push(format!("at the end: {v}"));
        }
    }
    tally.finish(&seeds);
}

#[test]
fn harmless_only_for_checksum_case_and_origin_metadata() {
    let f = b"ab12  manifest.json\n";
    assert!(harmless("manifest.sha256", f, b"Ab12  manifest.json\n"));
    assert!(harmless("manifest.sha256", f, b"ab12  manifest.json"));
    assert!(!harmless("manifest.sha256", f, b"ab13  manifest.json\n"));
    assert!(!harmless("manifest.sha256", f, b"ab12  manifest.jsoN\n"));
    assert!(!harmless("manifest.json", f, b"Ab12  manifest.json\n"));
    let o = br#"{"image":"base","sandbox":"sb-1"}"#;
    assert!(harmless(
        "origin.json",
        o,
        br#"{"image":"base","sandbox":"sb-3"}"#
    ));
    assert!(!harmless(
        "origin.json",
        o,
        br#"{"image":"bASe","sandbox":"sb-1"}"#
    ));
    assert!(!harmless(
        "origin.json",
        o,
        br#"{"image":"base","sandbox":"sb-1""#
    ));
}
