//! The host's TSC rate, for the guest kernel's command line under TCG.
//!
//! Under TCG a guest's TSC counts at the host's TSC rate (QEMU hands it the host's ticks), but
//! the guest kernel measures that rate at boot against the emulated PIT, and under a loaded
//! host that measurement can be off by an order of magnitude (measured: "PIT calibration
//! deviates from HPET: 57362 2595755", "Detected 57.362 MHz processor" on a 2.6 GHz host).
//! With `tsc=reliable` nothing corrects it later, so the guest's clocks run 45× fast — and a
//! warm snapshot captured from such a boot keeps that rate for every restore: `sleep 1` took
//! 22 ms and every command timeout fired early. `tsc_early_khz=<this>` skips the measurement;
//! the kernel's later refinement against the HPET still adjusts it within 1 %.
//!
//! Owns the measurement (once per process: the TSC against the monotonic clock over 3 × 20
//! ms, the median). Must not: be used when the host's TSC is not constant (`constant_tsc`).

use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The host's TSC rate in kHz, if the host has a constant-rate TSC (measured once).
pub fn host_tsc_khz() -> Option<u32> {
    static KHZ: OnceLock<Option<u32>> = OnceLock::new();
    *KHZ.get_or_init(measure)
}

/// The TSC now.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
fn rdtsc() -> u64 {
    // SAFETY: `rdtsc` only reads a counter, and every x86_64 CPU has it.
    unsafe { core::arch::x86_64::_rdtsc() }
}

#[cfg(target_arch = "x86_64")]
fn measure() -> Option<u32> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    if !constant_tsc(&cpuinfo) {
        return None;
    }
    let mut khz: Vec<u64> = (0..3)
        .filter_map(|_| {
            let (t0, c0) = (Instant::now(), rdtsc());
            std::thread::sleep(Duration::from_millis(20));
            let (c1, t1) = (rdtsc(), Instant::now());
            let us = t1.duration_since(t0).as_micros() as u64;
            (us > 0 && c1 > c0).then(|| (c1 - c0) * 1000 / us)
        })
        .collect();
    khz.sort_unstable();
    let median = *khz.get(khz.len() / 2)?;
    // A plausible rate only (100 MHz to 10 GHz).
    (100_000..=10_000_000)
        .contains(&median)
        .then_some(median as u32)
}

#[cfg(not(target_arch = "x86_64"))]
fn measure() -> Option<u32> {
    None
}

/// Whether `/proc/cpuinfo`'s flags say the TSC counts at a constant rate.
fn constant_tsc(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .is_some_and(|l| l.split_whitespace().any(|f| f == "constant_tsc"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_tsc_is_read_from_the_flags_line() {
        assert!(constant_tsc(
            "processor : 0\nflags : fpu tsc constant_tsc nonstop_tsc\n"
        ));
        assert!(!constant_tsc("processor : 0\nflags : fpu tsc\n"));
        assert!(!constant_tsc("processor : 0\n"));
    }

    /// The measured rate agrees with itself and, where the host names its nominal rate, with
    /// that within 10 % (a TSC counts at the nominal rate on CPUs with `constant_tsc`).
    #[test]
    fn host_rate_is_plausible_and_stable() {
        let Some(khz) = host_tsc_khz() else {
            return;
        };
        let again = measure().expect("measured once, measurable again");
        let diff = (i64::from(khz) - i64::from(again)).unsigned_abs();
        assert!(diff * 100 < u64::from(khz), "{khz} then {again}");
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
        let nominal = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.rsplit_once('@'))
            .and_then(|(_, ghz)| ghz.trim().trim_end_matches("GHz").parse::<f64>().ok());
        if let Some(ghz) = nominal {
            let ratio = f64::from(khz) / (ghz * 1e6);
            assert!((0.9..1.1).contains(&ratio), "{khz} kHz against {ghz} GHz");
        }
    }
}
