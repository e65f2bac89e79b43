//! The guest → host frame queue shared by the session loop and exec tasks.
//!
//! Owns: [`Outbound`] (a cloneable handle tagged with its session's epoch) and the writer loop
//! that drains the queue into the channel.
//!
//! Invariants: the queue is bounded (a producer waits when the host reads slowly); frames are
//! written whole and in queue order; a frame tagged with an older epoch than the current
//! session's is dropped, so nothing of a previous session reaches the host after the SYNC_ACK
//! that starts a new one.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use kiln_agent_proto::{Frame, GuestMessage};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

use crate::console::{error_chain, warn};

/// One queue entry.
pub(crate) enum OutItem {
    /// An encoded frame of session `epoch`.
    Frame { epoch: u64, bytes: Bytes },
    /// Flush everything queued before, then signal.
    Flush(oneshot::Sender<()>),
}

/// Producer handle for one session.
#[derive(Clone)]
pub(crate) struct Outbound {
    tx: mpsc::Sender<OutItem>,
    epoch: u64,
}

impl Outbound {
    pub(crate) fn new(tx: mpsc::Sender<OutItem>, epoch: u64) -> Outbound {
        Outbound { tx, epoch }
    }

    /// Queues a frame; `false` if the writer is gone (the connection ended).
    pub(crate) async fn send(&self, frame: &Frame) -> bool {
        match frame.to_bytes() {
            Ok(bytes) => self
                .tx
                .send(OutItem::Frame {
                    epoch: self.epoch,
                    bytes,
                })
                .await
                .is_ok(),
            Err(e) => {
                warn(format_args!(
                    "dropping unencodable frame: {}",
                    error_chain(&e)
                ));
                true
            }
        }
    }

    /// Queues a frame that is already encoded (a [`kiln_agent_proto::DataFrameBuf`] built in
    /// place); `false` if the writer is gone.
    pub(crate) async fn send_encoded(&self, bytes: Bytes) -> bool {
        self.tx
            .send(OutItem::Frame {
                epoch: self.epoch,
                bytes,
            })
            .await
            .is_ok()
    }

    /// Queues a control message; `false` if the writer is gone.
    pub(crate) async fn message(&self, msg: &GuestMessage) -> bool {
        match msg.to_frame() {
            Ok(frame) => self.send(&frame).await,
            Err(e) => {
                warn(format_args!(
                    "dropping unencodable message: {}",
                    error_chain(&e)
                ));
                true
            }
        }
    }

    /// Waits until everything queued so far has been written and flushed.
    pub(crate) async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(OutItem::Flush(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// Drains the queue into `wr` until every producer is gone or a write fails.
pub(crate) async fn write_loop<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: mpsc::Receiver<OutItem>,
    current_epoch: Arc<AtomicU64>,
) -> io::Result<()> {
    while let Some(item) = rx.recv().await {
        match item {
            OutItem::Frame { epoch, bytes } => {
                if epoch == current_epoch.load(Ordering::SeqCst) {
                    wr.write_all(&bytes).await?;
                }
            }
            OutItem::Flush(done) => {
                wr.flush().await?;
                let _ = done.send(());
            }
        }
        if rx.is_empty() {
            wr.flush().await?;
        }
    }
    Ok(())
}
