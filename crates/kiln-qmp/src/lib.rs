//! QMP (QEMU Machine Protocol) client, hand-rolled on tokio + serde_json.
//!
//! Owns: one QMP connection ([`QmpClient`]): the greeting (QEMU's version), capability
//! negotiation, `id`-correlated replies with many commands in flight, and asynchronous events
//! fanned out on a [`tokio::sync::broadcast`] channel. Typed commands implement
//! [`QmpCommand`] ([`commands`]); anything else goes through [`QmpClient::execute_raw`].
//!
//! Must not: know about sandboxes, snapshots or how QEMU was started. The `qapi` crates are
//! not used because they are generated from a newer schema and fail on QEMU 7.2's replies.
//!
//! Wire format: JSON objects, one per line (QEMU ends lines with `\r\n`):
//!
//! ```text
//!  server → client   {"QMP": {"version": {"qemu": {"major":7,"minor":2,"micro":22}, ...}, "capabilities": [...]}}
//!  client → server   {"execute": "qmp_capabilities", "id": 1}
//!  server → client   {"return": {}, "id": 1}
//!  client → server   {"execute": "query-status", "id": 2}
//!  client → server   {"execute": "stop", "id": 3}               (several in flight)
//!  server → client   {"event": "STOP", "data": {}, "timestamp": {"seconds": .., "microseconds": ..}}
//!  server → client   {"return": {}, "id": 3}                    (replies in any order)
//!  server → client   {"error": {"class": "GenericError", "desc": ".."}, "id": 2}
//! ```
//!
//! Invariants:
//! - One reader task owns the read half; one writer task owns the write half. A caller that
//!   drops its `execute` future never leaves half a command on the wire (the writer task
//!   writes whole lines) and its pending slot is removed.
//! - Every line is bounded by [`MAX_LINE_BYTES`]: a hostile or buggy peer cannot make the
//!   client allocate without limit; an overlong line closes the connection.
//! - Once the connection closes (EOF, I/O error, protocol violation), every pending and
//!   every later command fails promptly with [`QmpError::Disconnected`]; nothing hangs.
//! - Dropping the last clone of a [`QmpClient`] stops both tasks and closes the socket.

mod client;
pub mod commands;
mod error;

pub use client::{MAX_LINE_BYTES, QmpClient, QmpEvent, QmpGreeting, QmpTimestamp, QmpVersion};
pub use commands::QmpCommand;
pub use error::QmpError;
