//! A counting allocator that holds each fuzz input to a memory budget.
//!
//! Owns: [`CappedAlloc`] (wraps [`System`]) and [`Budget`], the guard a target opens for one
//! input. Invariants: outside a budget nothing is limited; inside one,
//! - a single allocation larger than [`Budget::single_limit`] is refused (returns null, so Rust
//!   aborts with "memory allocation of N bytes failed", which libFuzzer reports as a crash and
//!   saves the input), after a line on stderr naming the budget. The budget then closes so the
//!   crash path can allocate, and [`Budget::finish`] fails in case the caller survived the
//!   refusal (`try_reserve`);
//! - the net growth of live heap bytes is tracked, and [`Budget::finish`] panics if its peak
//!   passed [`Budget::live_limit`].
//!
//! libFuzzer runs one input at a time on one thread (`-jobs=N` forks processes), so plain
//! atomics with relaxed ordering are enough; they are atomics only because the allocator is a
//! `static`.

#![allow(unsafe_code)] // A `GlobalAlloc` impl is unsafe by definition.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicIsize, AtomicUsize, Ordering::Relaxed};

/// Fixed allowance for one input besides its length: error values, small vectors, the panic
/// machinery. Far below the smallest cap that matters (SYNC_ACK, 8 KiB).
const SINGLE_SLACK: usize = 4 << 10;
/// Fixed allowance for live heap growth during one input.
const LIVE_SLACK: usize = 64 << 10;
/// Bytes one allocation may take per input byte. Legitimate worst cases are near 16: a vector
/// of ~100-byte decoded frames from 13-byte frames, grown by doubling; a JSON array of one-byte
/// strings (24-byte `String`s from 4 input bytes, grown by doubling).
const SINGLE_PER_INPUT_BYTE: usize = 32;
/// Net live heap growth allowed per input byte (a few decoders and their frames at once).
const LIVE_PER_INPUT_BYTE: usize = 64;

static ACTIVE: AtomicBool = AtomicBool::new(false);
static SINGLE_LIMIT: AtomicUsize = AtomicUsize::new(usize::MAX);
static LIVE: AtomicIsize = AtomicIsize::new(0);
static PEAK: AtomicIsize = AtomicIsize::new(0);
static BIGGEST: AtomicUsize = AtomicUsize::new(0);
/// Size of the first allocation refused under the current budget; 0 if none.
static REFUSED: AtomicUsize = AtomicUsize::new(0);

/// The global allocator of the fuzz targets: [`System`] plus the budget checks.
pub struct CappedAlloc;

impl CappedAlloc {
    /// Accounts for `grow` new bytes; false if the allocation must be refused.
    fn admit(size: usize, grow: isize) -> bool {
        if !ACTIVE.load(Relaxed) {
            return true;
        }
        let limit = SINGLE_LIMIT.load(Relaxed);
        if size > limit {
            ACTIVE.store(false, Relaxed);
            REFUSED.store(size, Relaxed);
            report_refusal(size, limit);
            return false;
        }
        BIGGEST.fetch_max(size, Relaxed);
        let live = LIVE.fetch_add(grow, Relaxed) + grow;
        PEAK.fetch_max(live, Relaxed);
        true
    }

    fn release(size: usize) {
        if ACTIVE.load(Relaxed) {
            LIVE.fetch_sub(isize::try_from(size).unwrap_or(isize::MAX), Relaxed);
        }
    }
}

// SAFETY: every method forwards to `System` with the caller's layout and pointer unchanged;
// refusing an allocation returns null, which `GlobalAlloc` allows.
unsafe impl GlobalAlloc for CappedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !Self::admit(layout.size(), to_isize(layout.size())) {
            return std::ptr::null_mut();
        }
        // SAFETY: same contract as ours; the caller upholds it.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !Self::admit(layout.size(), to_isize(layout.size())) {
            return std::ptr::null_mut();
        }
        // SAFETY: same contract as ours; the caller upholds it.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        Self::release(layout.size());
        // SAFETY: `ptr` was allocated by `System` (through us) with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let grow = to_isize(new_size) - to_isize(layout.size());
        if !Self::admit(new_size, grow) {
            return std::ptr::null_mut();
        }
        // SAFETY: `ptr` was allocated by `System` (through us) with `layout`; the caller upholds
        // the rest of the contract.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if new.is_null() {
            // The old block is still live: undo the growth we counted.
            LIVE.fetch_sub(grow, Relaxed);
        }
        new
    }
}

fn to_isize(n: usize) -> isize {
    isize::try_from(n).unwrap_or(isize::MAX)
}

/// Writes one line to stderr without allocating (we are inside the allocator).
fn report_refusal(size: usize, limit: usize) {
    let mut line = [0u8; 160];
    let mut cursor: &mut [u8] = &mut line;
    let _ = writeln!(
        cursor,
        "kiln-fuzz: refusing an allocation of {size} bytes: this input's budget is {limit} bytes per allocation"
    );
    let used = 160 - cursor.len();
    let _ = std::io::stderr().write_all(&line[..used]);
}

/// The memory budget for one fuzz input; open with [`Budget::for_input`], close with
/// [`Budget::finish`]. Dropping it without `finish` (a panic in the target) just closes it.
#[must_use = "call finish() to check the live-heap budget"]
pub struct Budget {
    input_len: usize,
}

impl Budget {
    /// Opens the budget for an input of `input_len` bytes.
    pub fn for_input(input_len: usize) -> Budget {
        LIVE.store(0, Relaxed);
        PEAK.store(0, Relaxed);
        BIGGEST.store(0, Relaxed);
        REFUSED.store(0, Relaxed);
        SINGLE_LIMIT.store(Self::single_limit(input_len), Relaxed);
        ACTIVE.store(true, Relaxed);
        Budget { input_len }
    }

    /// Largest single allocation allowed while handling an input of `input_len` bytes.
    pub fn single_limit(input_len: usize) -> usize {
        input_len
            .saturating_mul(SINGLE_PER_INPUT_BYTE)
            .saturating_add(SINGLE_SLACK)
    }

    /// Largest net growth of live heap bytes allowed for an input of `input_len` bytes.
    pub fn live_limit(input_len: usize) -> usize {
        input_len
            .saturating_mul(LIVE_PER_INPUT_BYTE)
            .saturating_add(LIVE_SLACK)
    }

    /// Closes the budget. Panics if an allocation was refused or live heap growth peaked above
    /// [`Budget::live_limit`].
    pub fn finish(self) {
        ACTIVE.store(false, Relaxed);
        let refused = REFUSED.load(Relaxed);
        assert!(
            refused == 0,
            "an allocation of {refused} bytes was refused for a {}-byte input (budget {})",
            self.input_len,
            Self::single_limit(self.input_len),
        );
        let peak = usize::try_from(PEAK.load(Relaxed)).unwrap_or(0);
        let limit = Self::live_limit(self.input_len);
        assert!(
            peak <= limit,
            "live heap grew by {peak} bytes for a {}-byte input (budget {limit}; biggest \
             single allocation {})",
            self.input_len,
            BIGGEST.load(Relaxed),
        );
    }
}

impl Drop for Budget {
    fn drop(&mut self) {
        ACTIVE.store(false, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // One test so no other test of this binary allocates concurrently under the budget.
    #[test]
    fn budget_refuses_big_allocations_and_flags_live_growth() {
        let budget = Budget::for_input(0);
        let too_big = Layout::from_size_align(Budget::single_limit(0) + 1, 1).expect("valid");
        // SAFETY: the layout has a non-zero size (a non-null result would leak; the test fails).
        let ptr = unsafe { CappedAlloc.alloc(too_big) };
        assert!(
            ptr.is_null(),
            "allocation over the single limit must be refused"
        );
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| budget.finish()));
        assert!(caught.is_err(), "a refused allocation must fail finish()");

        let budget = Budget::for_input(0);
        let chunks: Vec<Vec<u8>> = (0..(Budget::live_limit(0) / 1000 + 1))
            .map(|_| Vec::with_capacity(1000))
            .collect();
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| budget.finish()));
        drop(chunks);
        assert!(
            caught.is_err(),
            "live growth over the budget must fail finish()"
        );
    }
}
