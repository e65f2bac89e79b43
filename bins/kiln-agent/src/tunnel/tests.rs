//! Unit tests of the tunnel module's request validation. The end-to-end tunnel tests (real
//! agent, real host client) are in `tests/tunnel.rs`.

use tokio::sync::mpsc;

use kiln_agent_proto::ErrorCode;

use crate::AgentConfig;

#[test]
fn start_rejects_port_zero_and_windows_out_of_range() {
    use kiln_agent_proto::{MAX_WINDOW, RequestId, StreamId};

    let (tx, _rx) = mpsc::channel(1);
    let out = crate::outbound::Outbound::new(tx, 1);
    let stream = StreamId::FIRST;
    let too_big = u32::try_from(MAX_WINDOW).expect("fits") + 1;
    for (port, window) in [(0, 1024), (80, 0), (80, too_big)] {
        match super::start(
            &AgentConfig::default(),
            RequestId(1),
            stream,
            port,
            window,
            out.clone(),
        ) {
            Err(e) => assert_eq!(e.code, ErrorCode::BadRequest, "{port} {window}"),
            Ok(_) => panic!("port {port} window {window} accepted"),
        }
    }
    let max = u32::try_from(MAX_WINDOW).expect("fits");
    assert!(super::start(&AgentConfig::default(), RequestId(1), stream, 80, max, out).is_ok());
}
