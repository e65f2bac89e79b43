//! Published ports: the daemon listens on `127.0.0.1:HOST_PORT` and tunnels each accepted
//! TCP connection to `127.0.0.1:GUEST_PORT` inside the guest through the agent channel.
//!
//! ```text
//!   client ──TCP──▶ kilnd listener ──accept──▶ agent.open_tcp(guest) ──virtio-serial──▶ guest socket
//!                                  copy_bidirectional (half-close passes through)
//! ```
//!
//! Invariants: ports are bound before the VM starts, so a port in use fails the start at
//! once, naming the port; accept loops hold only a weak reference to their sandbox and are
//! aborted at its shutdown; a tunnel that cannot open closes its client connection and
//! logs why. The tunnels ride the agent channel, so they keep working across a user
//! snapshot of the sandbox (the channel stays up) and need no network device in the guest.

use std::sync::{Arc, Weak};

use kiln_api_types::PortMapping;
use tokio::net::TcpListener;
use tracing::{debug, warn};

use crate::error::CoreError;
use crate::sandbox::Sandbox;

/// A bound, not yet serving, published port.
pub struct Bound {
    mapping: PortMapping,
    listener: std::net::TcpListener,
}

/// Binds every host port on 127.0.0.1; the first that cannot be bound is the error.
pub fn bind(maps: &[PortMapping]) -> Result<Vec<Bound>, CoreError> {
    maps.iter()
        .map(|m| {
            let listener = std::net::TcpListener::bind(("127.0.0.1", m.host)).map_err(|e| {
                CoreError::PortUnavailable {
                    port: m.host,
                    reason: e.to_string(),
                }
            })?;
            listener
                .set_nonblocking(true)
                .map_err(|e| CoreError::PortUnavailable {
                    port: m.host,
                    reason: e.to_string(),
                })?;
            Ok(Bound {
                mapping: *m,
                listener,
            })
        })
        .collect()
}

/// Starts serving the bound ports for `sb`.
pub fn serve(sb: &Arc<Sandbox>, bound: Vec<Bound>) -> Result<(), CoreError> {
    for b in bound {
        let listener =
            TcpListener::from_std(b.listener).map_err(|e| CoreError::PortUnavailable {
                port: b.mapping.host,
                reason: e.to_string(),
            })?;
        let weak = Arc::downgrade(sb);
        sb.add_forward(tokio::spawn(accept_loop(listener, b.mapping, weak)));
    }
    Ok(())
}

async fn accept_loop(listener: TcpListener, mapping: PortMapping, sb: Weak<Sandbox>) {
    loop {
        let (mut conn, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                warn!(port = mapping.host, error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(sandbox) = sb.upgrade() else {
            return;
        };
        tokio::spawn(async move {
            let _ = conn.set_nodelay(true);
            let mut tunnel = match sandbox.agent().open_tcp(mapping.guest).await {
                Ok(t) => t,
                Err(e) => {
                    // The guest decides whether its port accepts: rate-limited.
                    kiln_agent_host::rate_limited!(
                        sandbox.agent().log_limiter(),
                        "port_tunnel_refused",
                        warn!(sandbox_id = %sandbox.id(), port = %mapping, %peer, error = %crate::error::error_chain(&e), "cannot open a tunnel to the guest port")
                    );
                    return;
                }
            };
            // An open tunnel keeps the sandbox from going idle.
            let _busy = sandbox.activity.busy();
            let agent = sandbox.agent().clone();
            let limiter = agent.log_limiter();
            drop(sandbox);
            match tokio::io::copy_bidirectional(&mut conn, &mut tunnel).await {
                Ok((up, down)) => {
                    debug!(port = %mapping, %peer, up, down, "tunnel closed");
                }
                Err(e) => kiln_agent_host::rate_limited!(
                    limiter,
                    "port_tunnel_error",
                    debug!(port = %mapping, %peer, error = %e, "tunnel ended")
                ),
            }
        });
    }
}
