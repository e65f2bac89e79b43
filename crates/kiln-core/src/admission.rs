//! Admission control: the host's budget for sandboxes, so kiln never starts more than fits.
//!
//! The budget is guest memory plus a per-VM overhead (MiB) and vCPUs. What counts against it:
//! every VM kiln runs — sandboxes in the table (running, paused, unresponsive), pooled
//! sandboxes (ready or being restored) and starts in flight (a [`Reservation`] each, held
//! from the admission to the moment the sandbox is in the table or has failed). A start that
//! does not fit first shrinks the warm pools (they are the cheapest to give up), and is
//! refused with `over_capacity` (429 and `Retry-After`) if it still does not fit. The pool's
//! refill asks too, and waits rather than being refused.
//!
//! Owns the arithmetic and the in-flight reservations. Must not: know how a VM is started,
//! or hold its lock across an `.await`.
//!
//! Budget (daemon environment): `KILN_MEMORY_BUDGET_MIB` (default: the host's memory less a
//! reserve of a fifth, at least 1 GiB, for the host itself), `KILN_VCPU_BUDGET` (default:
//! sixteen per host CPU: an idle vCPU is a sleeping thread, and most sandboxes idle most of
//! the time — twenty clones of one snapshot at once must fit a 2-core host — while memory is
//! what a host runs out of first).

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use kiln_api_types::MachineSpec;

use crate::Engine;
use crate::error::CoreError;

/// Memory a VM takes beyond its guest RAM (QEMU itself, its page tables, the agent channel).
pub const VM_OVERHEAD_MIB: u64 = 64;
/// vCPUs per host CPU by default.
const VCPUS_PER_CPU: u32 = 16;
/// `Retry-After` of a refusal: about one sandbox's life in a burst of short jobs.
const RETRY_AFTER_SECS: u64 = 2;

/// What one VM costs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cost {
    /// Guest memory plus [`VM_OVERHEAD_MIB`].
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u64,
}

impl Cost {
    /// The cost of a VM of `machine`.
    pub fn of(machine: MachineSpec) -> Cost {
        Cost {
            memory_mib: u64::from(machine.memory_mib) + VM_OVERHEAD_MIB,
            vcpus: u64::from(machine.cpus),
        }
    }

    fn add(self, o: Cost) -> Cost {
        Cost {
            memory_mib: self.memory_mib + o.memory_mib,
            vcpus: self.vcpus + o.vcpus,
        }
    }
}

/// The budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// MiB for all VMs together.
    pub memory_mib: u64,
    /// vCPUs for all VMs together.
    pub vcpus: u64,
}

impl Budget {
    /// From the environment, else from the host's size.
    pub fn from_env() -> Result<Budget, CoreError> {
        let host_mib = host_memory_mib().unwrap_or(4096);
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
        Ok(Budget {
            memory_mib: positive_env("KILN_MEMORY_BUDGET_MIB")?
                .unwrap_or_else(|| default_memory(host_mib)),
            vcpus: positive_env("KILN_VCPU_BUDGET")?.unwrap_or_else(|| default_vcpus(cpus)),
        })
    }

    fn fits(&self, used: Cost, more: Cost) -> bool {
        let total = used.add(more);
        total.memory_mib <= self.memory_mib && total.vcpus <= self.vcpus
    }
}

/// [`VCPUS_PER_CPU`] per host CPU.
/// A positive number from the daemon's environment variable `name` (`None`: unset or empty);
/// anything else is refused naming the variable.
pub(crate) fn positive_env(name: &str) -> Result<Option<u64>, CoreError> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|n| *n > 0)
            .map(Some)
            .ok_or_else(|| {
                CoreError::HostSetup(format!("{name}={v:?}: expected a positive number"))
            }),
        _ => Ok(None),
    }
}

fn default_vcpus(host_cpus: u64) -> u64 {
    host_cpus * u64::from(VCPUS_PER_CPU)
}

/// The host's memory less a reserve of a fifth (at least 1 GiB).
fn default_memory(host_mib: u64) -> u64 {
    host_mib.saturating_sub((host_mib / 5).max(1024))
}

/// `MemTotal` of `/proc/meminfo`, in MiB.
fn host_memory_mib() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib / 1024)
}

/// The budget and the starts in flight.
pub(crate) struct Admission {
    pub budget: Budget,
    inflight: Mutex<HashMap<u64, Cost>>,
    next: AtomicU64,
}

/// A start's place in the budget until its VM is counted elsewhere (or is gone).
pub(crate) struct Reservation<'a> {
    admission: &'a Admission,
    key: u64,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.admission
            .inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.key);
    }
}

/// The answer of [`Admission::try_admit`].
pub(crate) enum Verdict<'a> {
    /// Admitted.
    Admitted(Reservation<'a>),
    /// Not without giving up this much (MiB, vCPUs) elsewhere.
    Short(Cost),
}

impl Admission {
    pub(crate) fn new(budget: Budget) -> Admission {
        Admission {
            budget,
            inflight: Mutex::new(HashMap::new()),
            next: AtomicU64::new(0),
        }
    }

    /// Admits `cost` if `used` (what the VMs kiln runs cost, in flight starts aside) plus
    /// the starts in flight leave room for it.
    pub(crate) fn try_admit(&self, used: Cost, cost: Cost) -> Verdict<'_> {
        let mut inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        let used = inflight.values().fold(used, |a, c| a.add(*c));
        if self.budget.fits(used, cost) {
            let key = self.next.fetch_add(1, Ordering::Relaxed);
            inflight.insert(key, cost);
            Verdict::Admitted(Reservation {
                admission: self,
                key,
            })
        } else {
            let total = used.add(cost);
            Verdict::Short(Cost {
                memory_mib: total.memory_mib.saturating_sub(self.budget.memory_mib),
                vcpus: total.vcpus.saturating_sub(self.budget.vcpus),
            })
        }
    }

    /// The refusal of a start of `cost` while `used` is taken.
    pub(crate) fn refusal(&self, what: String, used: Cost, cost: Cost) -> CoreError {
        CoreError::OverCapacity {
            what,
            why: format!(
                "sandboxes use {} of {} MiB and {} of {} vCPUs, this one needs {} MiB ({} MiB \
                 of guest memory and {VM_OVERHEAD_MIB} MiB per VM) and {} vCPUs \
                 (KILN_MEMORY_BUDGET_MIB, KILN_VCPU_BUDGET)",
                used.memory_mib,
                self.budget.memory_mib,
                used.vcpus,
                self.budget.vcpus,
                cost.memory_mib,
                cost.memory_mib - VM_OVERHEAD_MIB,
                cost.vcpus
            ),
            retry_after_secs: RETRY_AFTER_SECS,
        }
    }
}

impl Engine {
    /// What the VMs kiln runs cost now: sandboxes in the table and pooled ones (starts in
    /// flight are the reservations).
    pub(crate) fn used(&self) -> Cost {
        let table = self.table();
        let sandboxes = table.values().fold(Cost::default(), |acc, (_, sb)| {
            let c = sb.vm().config();
            acc.add(Cost::of(MachineSpec {
                cpus: c.cpus,
                memory_mib: c.memory_mib,
                screen: None,
            }))
        });
        drop(table);
        sandboxes.add(self.pools.cost())
    }

    /// Admits a start of `machine`, giving up pooled sandboxes for it if needed; refuses it
    /// with `over_capacity` (`what` says which start) when it does not fit even so.
    pub(crate) async fn admit(
        &self,
        machine: MachineSpec,
        what: String,
    ) -> Result<Reservation<'_>, CoreError> {
        let cost = Cost::of(machine);
        loop {
            let used = self.used();
            match self.admission.try_admit(used, cost) {
                Verdict::Admitted(r) => return Ok(r),
                Verdict::Short(short) => {
                    let victims = self.pools.shrink(short);
                    if victims.is_empty() {
                        return Err(self.admission.refusal(what, used, cost));
                    }
                    crate::pool::discard(self, victims, "its room was needed by a start").await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(cpus: u32, memory_mib: u32) -> MachineSpec {
        MachineSpec {
            cpus,
            memory_mib,
            screen: None,
        }
    }

    #[test]
    fn admits_until_the_budget_and_counts_reservations_in_flight() {
        let a = Admission::new(Budget {
            memory_mib: 3 * (256 + VM_OVERHEAD_MIB),
            vcpus: 8,
        });
        let one = Cost::of(m(1, 256));
        let used = one;
        let Verdict::Admitted(r1) = a.try_admit(used, one) else {
            panic!("room for a second");
        };
        let Verdict::Admitted(r2) = a.try_admit(used, one) else {
            panic!("room for a third");
        };
        // Two in flight and one running: the budget is full.
        let Verdict::Short(short) = a.try_admit(used, one) else {
            panic!("a fourth does not fit");
        };
        assert_eq!(short.memory_mib, 256 + VM_OVERHEAD_MIB);
        assert_eq!(short.vcpus, 0);
        drop(r1);
        assert!(matches!(a.try_admit(used, one), Verdict::Admitted(_)));
        drop(r2);
    }

    #[test]
    fn vcpus_limit_too_and_the_refusal_names_the_numbers() {
        let a = Admission::new(Budget {
            memory_mib: 1 << 20,
            vcpus: 4,
        });
        let used = Cost::of(m(3, 256));
        assert!(
            matches!(a.try_admit(used, Cost::of(m(2, 256))), Verdict::Short(c) if c.vcpus == 1)
        );
        let e = a
            .refusal("to start a sandbox".into(), used, Cost::of(m(2, 256)))
            .to_string();
        assert!(e.contains("3 of 4 vCPUs"), "{e}");
        assert!(e.contains("320 MiB (256 MiB of guest memory"), "{e}");
        assert!(e.contains("retry in 2 s"), "{e}");
    }

    #[test]
    fn default_vcpus_fit_twenty_one_vcpu_clones_on_two_cores() {
        // `kiln bench snapshot` starts 20 clones at once (docs/benchmarks.md).
        let budget = Budget {
            memory_mib: 1 << 20,
            vcpus: default_vcpus(2),
        };
        let clone = Cost::of(m(1, 256));
        let nineteen = Cost {
            memory_mib: 19 * clone.memory_mib,
            vcpus: 19,
        };
        assert!(budget.fits(nineteen, clone));
    }

    #[test]
    fn default_memory_keeps_a_reserve_for_the_host() {
        assert_eq!(default_memory(24 * 1024), 24 * 1024 - 24 * 1024 / 5);
        assert_eq!(
            default_memory(2048),
            1024,
            "at least 1 GiB stays with the host"
        );
        assert_eq!(default_memory(512), 0);
    }
}
