//! kiln's guest agent: the initramfs `/init` and the server side of the agent channel.
//!
//! Owns: PID 1 boot duties ([`init`]), child reaping ([`reaper`]), the protocol loop and
//! session state ([`session`]), the per-session stream registry every kind of stream shares
//! (`streams`: ids, caps, credit, host-byte queues, stream tasks), exec handling, TCP tunnels
//! to guest loopback ports, file transfers and file operations (`files`, feature
//! `files-v1`), resolving an exec's user against the guest's account files (`user`, feature
//! `user-v1`), applying
//! a restored guest's new identity ([`identity`]), configuring the guest's network interface,
//! routes and resolver ([`network`], feature `net-v1`), the virtio-serial port ([`port`]) and the
//! only `unsafe` code of the agent ([`sys`]). The binary (`main.rs`) only wires these
//! together, so tests can run the real session and exec logic in-process over
//! `tokio::io::duplex`.
//!
//! Must not: depend on anything beyond tokio (current-thread), serde_json, libc and the
//! protocol crate (it is linked statically into every guest); block the runtime thread for
//! long; trust the byte stream (it hunts for SYNC after any framing error).
//!
//! Invariants: one session per SYNC; execs run in their own process group and are killed with
//! their session, and tunnel sockets are closed with it; every child is reaped by
//! [`reaper::Reaper`], never by tokio.

pub mod console;
mod exec;
mod files;
pub mod identity;
pub mod init;
pub mod network;
mod outbound;
pub mod port;
pub mod reaper;
pub mod session;
mod streams;
pub mod sys;
mod tunnel;
mod user;

pub use exec::BASE_ENV;
pub use identity::{FakeIdentity, IdentitySink, SystemIdentity};
pub use network::SystemNetwork;
pub use reaper::{ReapMode, Reaper};
pub use session::{Agent, AgentConfig, ServeEnd, ServeError};
