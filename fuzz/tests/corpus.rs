//! Replays every committed seed (`corpus/<target>/seed-*`) through its target's checks, on a
//! stable toolchain and without libFuzzer: what CI runs of the fuzz targets. A longer,
//! coverage-guided run is a manual step (README.md).
//!
//! One test for all targets: the memory budget is process-global, so no two targets may run
//! at once (the test harness would run separate tests on separate threads).

use std::path::Path;

#[test]
fn corpus_every_seed_of_every_target_passes_its_checks() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for (name, run) in kiln_fuzz::targets::ALL {
        let dir = root.join(name);
        let mut seeds: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("no corpus for target {name} at {}: {e}", dir.display()))
            .map(|e| e.expect("corpus entry").path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("seed-"))
            })
            .collect();
        seeds.sort();
        assert!(
            seeds.len() >= 3,
            "target {name} has only {} seeds in {}",
            seeds.len(),
            dir.display()
        );
        for seed in &seeds {
            let data = std::fs::read(seed).expect("read seed");
            let outcome = std::panic::catch_unwind(|| run(&data));
            assert!(outcome.is_ok(), "{name}: seed {} failed", seed.display());
        }
        eprintln!("{name}: {} seeds", seeds.len());
    }
}
