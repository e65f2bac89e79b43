//! Rate limiting of the log lines a guest can trigger.
//!
//! Owns: [`LogLimiter`] (per kind of line: at most `burst` lines per `window`, then silence
//! until the window ends, then one line saying how many were suppressed) and the
//! [`rate_limited!`](crate::rate_limited) macro every such line goes through.
//!
//! A hostile guest controls how often the host sees bad frames, refused requests, messages for
//! unknown streams or failing tunnels; without a limit each is a line in `kilnd.log`, and a
//! flood of them fills the host's disk as surely as a console flood. One limiter belongs to
//! each agent connection ([`crate::AgentClient::log_limiter`]), so it is per sandbox, and
//! the engine's own guest-triggered lines (published-port tunnels) use the same one.
//!
//! Invariants: memory is one small entry per distinct kind (kinds are `&'static str`, a closed
//! set written in the code); no line is delayed, only dropped; every dropped line is counted
//! and the count is reported with the next line of its kind that gets through.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Default lines per kind per window.
pub const DEFAULT_BURST: u32 = 10;

/// Default window.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(60);

/// Counts log lines per kind and says which may be written.
#[derive(Debug)]
pub struct LogLimiter {
    burst: u32,
    window: Duration,
    kinds: Mutex<HashMap<&'static str, Window>>,
}

#[derive(Debug)]
struct Window {
    start: Instant,
    emitted: u32,
    suppressed: u64,
}

impl Default for LogLimiter {
    fn default() -> Self {
        LogLimiter::new(DEFAULT_BURST, DEFAULT_WINDOW)
    }
}

impl LogLimiter {
    /// A limiter letting `burst` lines of each kind through per `window`.
    pub fn new(burst: u32, window: Duration) -> LogLimiter {
        LogLimiter {
            burst,
            window,
            kinds: Mutex::new(HashMap::new()),
        }
    }

    /// Whether a line of `kind` may be written now: `Some(k)` yes, after reporting the `k`
    /// lines of this kind suppressed before it (0: none); `None` suppressed (and counted).
    pub fn admit(&self, kind: &'static str) -> Option<u64> {
        self.admit_at(kind, Instant::now())
    }

    fn admit_at(&self, kind: &'static str, now: Instant) -> Option<u64> {
        let mut kinds = self.kinds.lock().unwrap_or_else(|e| e.into_inner());
        let w = kinds.entry(kind).or_insert(Window {
            start: now,
            emitted: 0,
            suppressed: 0,
        });
        if now.saturating_duration_since(w.start) >= self.window {
            w.start = now;
            w.emitted = 0;
        }
        if w.emitted < self.burst {
            w.emitted += 1;
            Some(std::mem::take(&mut w.suppressed))
        } else {
            w.suppressed += 1;
            None
        }
    }
}

/// Writes a `tracing` line through a [`LogLimiter`]:
/// `rate_limited!(limiter, "kind", warn!(field = value, "message"))`. When lines of that kind
/// were suppressed before, a line saying how many precedes it.
#[macro_export]
macro_rules! rate_limited {
    ($limiter:expr, $kind:expr, $level:ident!($($arg:tt)*)) => {
        if let Some(suppressed) = $limiter.admit($kind) {
            if suppressed > 0 {
                ::tracing::$level!(kind = $kind, suppressed, "suppressed {suppressed} similar lines");
            }
            ::tracing::$level!($($arg)*);
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admit_lets_a_burst_through_then_counts_until_the_window_ends() {
        let limiter = LogLimiter::new(3, Duration::from_secs(60));
        let t0 = Instant::now();
        let got: Vec<_> = (0..10).map(|_| limiter.admit_at("bad_frame", t0)).collect();
        assert_eq!(got[..3], [Some(0), Some(0), Some(0)]);
        assert!(got[3..].iter().all(Option::is_none));
        // Still inside the window.
        assert_eq!(
            limiter.admit_at("bad_frame", t0 + Duration::from_secs(59)),
            None
        );
        // The next window's first line reports the 8 suppressed ones, once.
        let t1 = t0 + Duration::from_secs(60);
        assert_eq!(limiter.admit_at("bad_frame", t1), Some(8));
        assert_eq!(limiter.admit_at("bad_frame", t1), Some(0));
    }

    #[test]
    fn admit_counts_kinds_apart() {
        let limiter = LogLimiter::new(1, Duration::from_secs(60));
        let t0 = Instant::now();
        assert_eq!(limiter.admit_at("a", t0), Some(0));
        assert_eq!(limiter.admit_at("a", t0), None);
        assert_eq!(limiter.admit_at("b", t0), Some(0));
    }

    #[test]
    fn rate_limited_macro_writes_only_admitted_lines() {
        let limiter = LogLimiter::new(2, Duration::from_secs(3600));
        let mut written = 0;
        for _ in 0..1000 {
            if limiter.admit("flood").is_some() {
                written += 1;
            }
            rate_limited!(limiter, "flood2", debug!("a flooding line"));
        }
        assert_eq!(written, 2);
        // The macro used its own kind and left "flood2" exhausted too.
        assert_eq!(limiter.admit("flood2"), None);
    }
}
