//! Human-readable agent messages on the console (stderr, which is /dev/console under init).
//!
//! Owns: [`say`] for one-off lifecycle lines and [`warn`] for lines the host can trigger,
//! which are rate-limited so a misbehaving host cannot flood the guest console.
//!
//! Invariants: nothing here panics, even if stderr is closed (unlike `eprintln!`).

use std::error::Error;
use std::fmt;
use std::io::Write;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Lines [`warn`] may print per window.
const WARN_BURST: u32 = 20;
/// The rate-limit window.
const WARN_WINDOW: Duration = Duration::from_secs(1);

struct Limiter {
    window_start: Option<Instant>,
    printed: u32,
    suppressed: u64,
}

static LIMITER: Mutex<Limiter> = Mutex::new(Limiter {
    window_start: None,
    printed: 0,
    suppressed: 0,
});

/// Prints `kiln-agent: <msg>` on stderr, ignoring write errors.
pub fn say(msg: fmt::Arguments<'_>) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "kiln-agent: {msg}");
    let _ = err.flush();
}

/// Like [`say`], but at most [`WARN_BURST`] lines per second; reports how many were dropped.
pub fn warn(msg: fmt::Arguments<'_>) {
    let now = Instant::now();
    let mut lim = LIMITER.lock().unwrap_or_else(PoisonError::into_inner);
    let expired = lim
        .window_start
        .is_none_or(|start| now.duration_since(start) >= WARN_WINDOW);
    if expired {
        if lim.suppressed > 0 {
            say(format_args!("({} warnings suppressed)", lim.suppressed));
        }
        lim.window_start = Some(now);
        lim.printed = 0;
        lim.suppressed = 0;
    }
    if lim.printed < WARN_BURST {
        lim.printed += 1;
        say(msg);
    } else {
        lim.suppressed += 1;
    }
}

/// `error: cause: cause ...` for an error and its whole source chain.
pub fn error_chain(err: &(dyn Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}
