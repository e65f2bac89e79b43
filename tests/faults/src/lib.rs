//! Harness of kiln's reliability suite: faults injected into real daemons and VMs, with the
//! invariants checked after each one.
//!
//! The tests (`tests/*.rs`) are `#[ignore]`d like the end-to-end ones: they need QEMU, root
//! and the images of `$KILN_E2E_HOME`. `scripts/faults` runs them by hand with any seed and
//! number of rounds; `scripts/test` runs the fixed CI seeds after the e2e suite.
//!
//! - [`rng`]: the seeded generator every choice comes from (`KILN_FAULTS_SEED`,
//!   `KILN_FAULTS_ROUNDS`); each test prints its seed first.
//! - [`home`]: one isolated `$KILN_HOME` per test, removed (immutable flags cleared) when done,
//!   and `kiln` commands with a deadline, so a hang is a finding rather than a stuck test.
//! - [`procs`]: the QEMU and `kilnd` processes of one home, found by command line and
//!   environment; nothing else on the machine is ever signalled.
//! - [`invariants`]: what must hold after every fault (no leaked process, directory, socket,
//!   build directory or save; the store agrees with reality).
//! - [`corrupt`]: byte flips and truncations of snapshot files, and their repair.
//! - [`Tally`]: the one-line summary each test prints, which the issue notes quote.

pub mod corrupt;
pub mod home;
pub mod invariants;
pub mod procs;
pub mod rng;

/// Counters of one test, printed as one line (`faults: 24 injected, 0 leaks, ...`) and
/// asserted at its end: every list must be empty.
#[derive(Debug, Default)]
pub struct Tally {
    /// What was counted (`faults`, `corruptions`).
    pub what: &'static str,
    /// Faults injected.
    pub injected: u32,
    /// Of which landed while the faulted operation was still running.
    pub mid_op: u32,
    /// Corruptions that left every byte a restore uses intact (either answer is right).
    pub harmless: u32,
    /// Invariant violations (leaked processes, directories, sockets; store disagreeing).
    pub leaks: Vec<String>,
    /// Acknowledged data not found after the fault.
    pub lost: Vec<String>,
    /// Corrupt snapshots restored.
    pub restored: Vec<String>,
    /// 5xx answers.
    pub server_errors: Vec<String>,
    /// Commands or requests that did not finish by their deadline.
    pub hangs: Vec<String>,
    /// Answers other than the expected one (a corruption), or a plain run failing after a
    /// fault.
    pub broken: Vec<String>,
}

impl Tally {
    /// An empty tally for `what`.
    pub fn new(what: &'static str) -> Tally {
        Tally {
            what,
            ..Tally::default()
        }
    }

    /// The one-line summary.
    pub fn line(&self) -> String {
        if self.what == "corruptions" {
            format!(
                "corruptions: {} injected ({} harmless), {} restored, {} 5xx, {} hangs, {} wrong answers, {} leaks",
                self.injected,
                self.harmless,
                self.restored.len(),
                self.server_errors.len(),
                self.hangs.len(),
                self.broken.len(),
                self.leaks.len()
            )
        } else {
            format!(
                "{}: {} injected ({} mid-operation), {} leaks, {} data lost, {} hangs, {} runs failed after",
                self.what,
                self.injected,
                self.mid_op,
                self.leaks.len(),
                self.lost.len(),
                self.hangs.len(),
                self.broken.len()
            )
        }
    }

    /// Prints the line and panics listing every finding if any list is non-empty.
    pub fn finish(&self, seeds: &[u64]) {
        println!(
            "{} (seeds {seeds:?}, {} rounds)",
            self.line(),
            rng::rounds()
        );
        let mut findings = Vec::new();
        for (name, list) in [
            ("leak", &self.leaks),
            ("data lost", &self.lost),
            ("corrupt snapshot restored", &self.restored),
            ("5xx", &self.server_errors),
            ("hang", &self.hangs),
            ("wrong answer or failed run after a fault", &self.broken),
        ] {
            findings.extend(list.iter().map(|f| format!("{name}: {f}")));
        }
        assert!(
            findings.is_empty(),
            "{}\n{}",
            self.line(),
            findings.join("\n")
        );
    }
}

/// Prints the seed and round a test is about to run, so that a failure can be replayed with
/// `scripts/faults --seed N --only NAME`.
pub fn announce(test: &str, seed: u64, round: u32) {
    println!(
        "faults: {test} seed {seed} round {round} (reproduce: scripts/faults --seed {seed} --rounds {} --only {test})",
        round + 1
    );
}
