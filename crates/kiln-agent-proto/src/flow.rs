//! Per-stream, per-direction credit flow control (pure bookkeeping, no waiting).
//!
//! Owns: [`SendCredit`] (how many data bytes a sender may still send) and [`RecvWindow`]
//! (how many bytes a receiver has promised to accept, and when to grant more).
//!
//! ```text
//!   receiver                                   sender
//!   RecvWindow::new(W)  ── initial credit W ─▶  SendCredit::new(W)   (Exec.output_window, or
//!                                                                     the guest's first WINDOW)
//!   on_data(n)         ◀── STDOUT n bytes ───   take(n)
//!   on_consumed(n) ─▶ Some(g) ── WINDOW g ───▶  grant(g)
//! ```
//!
//! Invariants (per stream and direction):
//! - The sender never has more than [`MAX_WINDOW`] bytes of credit and never sends a data
//!   byte it has no credit for.
//! - The receiver's buffered-but-unconsumed bytes plus its outstanding credit never exceed its
//!   window `W`, so a well-behaved peer can never make it hold more than `W` bytes; a peer that
//!   overruns its credit is detected by [`RecvWindow::on_data`].
//! - Grants are batched: a receiver grants once consumed-but-ungranted bytes reach `W / 4`, so
//!   a receiver that consumes everything always ends up granting (no stall).

use crate::MAX_WINDOW;

/// A peer broke the credit rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FlowError {
    /// More data arrived than credit was granted.
    #[error("peer sent {len} bytes with only {available} bytes of credit")]
    Overrun {
        /// Bytes in the offending frame.
        len: u64,
        /// Credit that was left.
        available: u64,
    },
    /// A grant would raise the credit above [`MAX_WINDOW`].
    #[error("grant of {increment} bytes would raise credit to {total}, above the {max}-byte limit")]
    WindowTooLarge {
        /// The increment granted.
        increment: u32,
        /// Credit after the grant.
        total: u64,
        /// The limit.
        max: u64,
    },
}

/// Sender side: the credit left on one stream and direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendCredit {
    available: u64,
}

impl SendCredit {
    /// Credit starting at `initial` bytes (capped at [`MAX_WINDOW`]).
    pub fn new(initial: u32) -> SendCredit {
        SendCredit {
            available: u64::from(initial).min(MAX_WINDOW),
        }
    }

    /// Bytes that may be sent now.
    pub fn available(&self) -> u64 {
        self.available
    }

    /// Adds a WINDOW grant.
    pub fn grant(&mut self, increment: u32) -> Result<(), FlowError> {
        let total = self.available + u64::from(increment);
        if total > MAX_WINDOW {
            return Err(FlowError::WindowTooLarge {
                increment,
                total,
                max: MAX_WINDOW,
            });
        }
        self.available = total;
        Ok(())
    }

    /// Takes up to `max` bytes of credit, returning how many were taken (0 if none is left).
    pub fn take(&mut self, max: usize) -> usize {
        let n = self.available.min(max as u64);
        self.available -= n;
        // Cannot truncate: n <= max, which is a usize.
        n as usize
    }

    /// Returns credit taken with [`SendCredit::take`] but not used.
    pub fn give_back(&mut self, n: usize) {
        self.available = (self.available + n as u64).min(MAX_WINDOW);
    }
}

/// Receiver side: what was promised to the peer on one stream and direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecvWindow {
    window: u32,
    /// Credit the peer still holds.
    outstanding: u64,
    /// Bytes consumed locally but not yet granted back.
    unacked: u64,
}

impl RecvWindow {
    /// A window of `window` bytes (at least 1), all of it initially granted to the peer.
    pub fn new(window: u32) -> RecvWindow {
        let window = window.max(1);
        RecvWindow {
            window,
            outstanding: u64::from(window),
            unacked: 0,
        }
    }

    /// The window size.
    pub fn window(&self) -> u32 {
        self.window
    }

    /// Credit the peer still holds.
    pub fn outstanding(&self) -> u64 {
        self.outstanding
    }

    /// Accounts `len` received bytes; fails if the peer had less credit than that.
    pub fn on_data(&mut self, len: usize) -> Result<(), FlowError> {
        let len = len as u64;
        if len > self.outstanding {
            return Err(FlowError::Overrun {
                len,
                available: self.outstanding,
            });
        }
        self.outstanding -= len;
        Ok(())
    }

    /// Accounts `len` bytes the local consumer has taken; returns a grant to send to the peer
    /// once enough has accumulated.
    pub fn on_consumed(&mut self, len: usize) -> Option<u32> {
        self.unacked += len as u64;
        if self.unacked >= u64::from((self.window / 4).max(1)) {
            self.flush()
        } else {
            None
        }
    }

    /// Returns every consumed-but-ungranted byte as a grant now (if any).
    pub fn flush(&mut self) -> Option<u32> {
        if self.unacked == 0 {
            return None;
        }
        // Cannot truncate: unacked <= window, a u32, when the caller only consumes bytes it
        // received; clamp anyway so a caller bug cannot wrap.
        let grant = u32::try_from(self.unacked).unwrap_or(u32::MAX);
        self.unacked -= u64::from(grant);
        self.outstanding += u64::from(grant);
        Some(grant)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recv_window_overrun_is_detected() {
        let mut w = RecvWindow::new(10);
        assert!(w.on_data(6).is_ok());
        assert_eq!(
            w.on_data(5),
            Err(FlowError::Overrun {
                len: 5,
                available: 4
            })
        );
    }

    #[test]
    fn recv_window_grants_after_quarter_consumed() {
        let mut w = RecvWindow::new(100);
        w.on_data(100).expect("within credit");
        assert_eq!(w.on_consumed(10), None);
        assert_eq!(w.on_consumed(15), Some(25));
        assert_eq!(w.outstanding(), 25);
        assert_eq!(w.on_consumed(75), Some(75));
        assert_eq!(w.outstanding(), 100);
    }

    #[test]
    fn recv_window_consuming_everything_always_grants() {
        // Whatever the chunking, a consumer that drains all data returns the full window.
        for chunk in [1usize, 3, 7, 24, 25, 99] {
            let mut w = RecvWindow::new(100);
            let mut received = 0;
            while received < 100 {
                let n = chunk.min(100 - received);
                w.on_data(n).expect("within credit");
                received += n;
                w.on_consumed(n);
            }
            w.flush();
            assert_eq!(w.outstanding(), 100, "chunk {chunk}");
        }
    }

    #[test]
    fn send_credit_take_and_grant() {
        let mut c = SendCredit::new(10);
        assert_eq!(c.take(4), 4);
        assert_eq!(c.take(100), 6);
        assert_eq!(c.take(1), 0);
        c.grant(5).expect("small grant");
        c.give_back(2);
        assert_eq!(c.available(), 7);
    }

    #[test]
    fn send_credit_grant_above_max_window_fails() {
        let mut c = SendCredit::new(u32::MAX);
        assert_eq!(c.available(), MAX_WINDOW);
        assert!(matches!(c.grant(1), Err(FlowError::WindowTooLarge { .. })));
    }
}
