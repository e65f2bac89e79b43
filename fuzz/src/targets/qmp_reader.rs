//! Fuzz target `qmp_reader`: arbitrary bytes as everything QEMU sends on a QMP socket.
//!
//! Checks, for every input:
//! - [`QmpClient::handshake_parts`] over the input (the greeting line, then whatever follows as
//!   the answer to `qmp_capabilities`, replies and events) never panics and always finishes;
//! - once a handshake succeeds, a command sent after it (`query-status`) returns, with a value
//!   or an error, and the client then reports the connection closed: the end of the input is
//!   the end of the stream, so nothing may wait for a reply that cannot come;
//! - neither takes longer than [`HANG_LIMIT`] (a hang is a finding, not a slow input).
//!
//! Input layout: the whole input is the byte stream from QEMU; what the client writes goes to
//! a sink. No memory budget here: the reader holds at most one line (capped by
//! `kiln_qmp::MAX_LINE_BYTES`) and the runtime's own allocations are not the input's.

use std::io::Cursor;
use std::sync::OnceLock;
use std::time::Duration;

use kiln_qmp::QmpClient;

/// Time allowed for one input: the stream is in memory, so anything close to this is a hang.
pub const HANG_LIMIT: Duration = Duration::from_secs(10);

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a current-thread runtime builds")
    })
}

/// Checks one input (see the module docs); panics on a finding.
pub fn run(data: &[u8]) {
    let stream = Cursor::new(data.to_vec());
    runtime().block_on(async {
        let session = async {
            let Ok(client) = QmpClient::handshake_parts(stream, tokio::io::sink()).await else {
                return;
            };
            let _ = client.execute_raw("query-status", None).await;
            client.closed().await;
            assert!(
                client.is_closed(),
                "the client must see the end of the stream"
            );
        };
        tokio::time::timeout(HANG_LIMIT, session)
            .await
            .unwrap_or_else(|_| panic!("the QMP client hung on a {}-byte stream", data.len()));
    });
}
