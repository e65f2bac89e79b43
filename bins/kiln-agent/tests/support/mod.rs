//! Helpers shared by the agent's end-to-end tests.

use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::mpsc;

/// Forwards bytes between one persistent agent-side stream and the latest host client, like
/// QEMU's chardev: the agent never sees a client go away, and switching to a new client
/// abandons the old one mid-stream (bytes in flight go to whoever is connected).
pub fn start_proxy(agent_side: DuplexStream) -> mpsc::UnboundedSender<DuplexStream> {
    let (tx, mut rx) = mpsc::unbounded_channel::<DuplexStream>();
    tokio::spawn(async move {
        let (mut agent_rd, mut agent_wr) = tokio::io::split(agent_side);
        let mut a = vec![0u8; 4096];
        let mut h = vec![0u8; 4096];
        let Some(mut host) = rx.recv().await else {
            return;
        };
        loop {
            let (mut host_rd, mut host_wr) = tokio::io::split(host);
            let mut host_open = true;
            let next = loop {
                tokio::select! {
                    next = rx.recv() => break next,
                    r = agent_rd.read(&mut a) => match r {
                        Ok(0) | Err(_) => return,
                        // A vanished client loses the bytes, like QEMU drops them.
                        Ok(n) => drop(host_wr.write_all(&a[..n]).await),
                    },
                    r = host_rd.read(&mut h), if host_open => match r {
                        Ok(0) | Err(_) => host_open = false,
                        Ok(n) => if agent_wr.write_all(&h[..n]).await.is_err() { return },
                    },
                }
            };
            match next {
                Some(next) => host = next,
                None => return,
            }
        }
    });
    tx
}
