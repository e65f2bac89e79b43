//! Real image builds: need root, network access to the Debian archive, mmdebstrap and
//! e2fsprogs. Ignored by default; run with
//! `cargo test -p kiln-image --test build_real -- --ignored --nocapture`.
//!
//! The agent binary is `$KILN_TEST_AGENT`, else `/bin/busybox` (busybox-static). Set
//! `KILN_TEST_HOME` to build into (and keep) a given directory instead of a temp dir.

use std::path::PathBuf;
use std::time::Instant;

use kiln_image::{BuildConfig, BuildEvent, BuildOutcome, lookup};

fn agent() -> PathBuf {
    std::env::var_os("KILN_TEST_AGENT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/bin/busybox"))
}

fn build_and_rebuild(recipe_name: &str) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let home = std::env::var_os("KILN_TEST_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| tmp.path().to_owned());
    let cfg = BuildConfig {
        home: home.clone(),
        agent_binary: agent(),
        mirror: None,
        force: false,
    };
    let recipe = lookup(recipe_name).expect("built-in recipe");
    let start = Instant::now();
    let mut stage_start = Instant::now();
    let mut log = |e: BuildEvent| match e {
        BuildEvent::Stage { index, total, name } => {
            eprintln!(
                "[{:>6.1}s] stage {index}/{total} {name} (previous took {:.1}s)",
                start.elapsed().as_secs_f64(),
                stage_start.elapsed().as_secs_f64()
            );
            stage_start = Instant::now();
        }
        BuildEvent::Log(line) => eprintln!("    {line}"),
        _ => {}
    };
    let outcome = kiln_image::build(&cfg, &recipe, &mut log).expect("build");
    let first = start.elapsed();
    let BuildOutcome::Built(m) = outcome else {
        // A kept KILN_TEST_HOME may already hold it.
        assert!(
            std::env::var_os("KILN_TEST_HOME").is_some(),
            "fresh home must build"
        );
        return;
    };
    eprintln!("built {} {} in {:.1}s", m.name, m.id, first.as_secs_f64());
    for f in &m.files {
        eprintln!(
            "  {:<16} apparent {:>12} allocated {:>12}",
            f.name, f.apparent_bytes, f.allocated_bytes
        );
    }
    let rootfs = m.file(kiln_image::ROOTFS_FILE).expect("rootfs recorded");
    assert!(rootfs.apparent_bytes >= kiln_image::MIN_ROOTFS_BYTES);
    assert!(rootfs.allocated_bytes < rootfs.apparent_bytes / 2);
    assert!(m.rootfs_path(&home).is_file());
    assert!(m.kernel_path(&home).is_file());
    assert!(m.initramfs_path(&home).is_file());
    assert_eq!(
        kiln_image::get(&home, recipe_name).expect("get"),
        Some(m.clone())
    );
    // The exact disk is recorded, and the published files are sealed.
    assert_eq!(
        m.rootfs_sha256.as_deref(),
        Some(
            kiln_image::sha256_sparse(&m.rootfs_path(&home))
                .expect("hash")
                .as_str()
        )
    );
    assert!(
        std::fs::OpenOptions::new()
            .write(true)
            .open(m.rootfs_path(&home))
            .is_err(),
        "a published rootfs cannot be opened for writing"
    );

    let start = Instant::now();
    let again = kiln_image::build(&cfg, &recipe, &mut |_| {}).expect("rebuild");
    eprintln!(
        "up-to-date check took {:.2}s",
        start.elapsed().as_secs_f64()
    );
    assert_eq!(again, BuildOutcome::UpToDate(m));
    let leftovers: Vec<_> = std::fs::read_dir(home.join("images"))
        .expect("readdir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    if std::env::var_os("KILN_TEST_HOME").is_none() {
        // Removal unseals first (and leaves the temp home removable).
        kiln_image::remove(&home, recipe_name).expect("remove the sealed image");
        assert_eq!(kiln_image::get(&home, recipe_name).expect("get"), None);
    }
}

#[test]
#[ignore = "needs root, network and mmdebstrap"]
fn build_base_fresh_home_builds_then_up_to_date() {
    build_and_rebuild("base");
}

#[test]
#[ignore = "needs root, network and mmdebstrap"]
fn build_python_fresh_home_builds_then_up_to_date() {
    build_and_rebuild("python");
}
