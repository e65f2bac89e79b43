//! A guest that breaks the protocol closes the channel, and the reason says what it did:
//! callers and the sandbox's failure reason see "guest protocol violation: ...", not just
//! "channel closed".

use super::*;

/// The whole `source()` chain of `e`, as the daemon prints it.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Sends `bytes` as a guest would while a ping waits; answers the ping's error chain and the
/// channel's close reason.
async fn violate_during_ping(bytes: Vec<u8>) -> (String, ClosedReason) {
    let (client, mut guest) = connected(1024).await;
    let ping = client.ping();
    let hostile = async {
        let _ = guest.request().await;
        guest.raw(&bytes).await;
        guest
    };
    let (result, _guest) = tokio::time::timeout(DEADLINE, async { tokio::join!(ping, hostile) })
        .await
        .expect("the ping fails promptly");
    let err = result.expect_err("the channel died");
    let reason = client.close_reason().expect("closed");
    (chain(&err), reason)
}

#[tokio::test]
async fn violation_oversized_header_is_named_with_its_length() {
    let mut frame = GuestMessage::Response {
        id: RequestId(1),
        response: Response::Pong,
    }
    .to_frame()
    .expect("encodes")
    .to_bytes()
    .expect("encodes")
    .to_vec();
    frame[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    let (err, reason) = violate_during_ping(frame[..12].to_vec()).await;
    assert!(reason.is_violation(), "{reason:?}");
    assert!(
        err.contains("guest protocol violation") && err.contains("announces 4294967295"),
        "{err}"
    );
}

#[tokio::test]
async fn violation_garbage_is_named() {
    let (err, reason) = violate_during_ping(b"\xde\xadnot a frame at all....".to_vec()).await;
    assert!(reason.is_violation(), "{reason:?}");
    assert!(
        err.contains("guest protocol violation: bad frame magic"),
        "{err}"
    );
}

#[tokio::test]
async fn violation_malformed_control_message_is_named() {
    let frame = Frame::Control(Bytes::from_static(b"{\"not\": \"a message\"}"))
        .to_bytes()
        .expect("encodes")
        .to_vec();
    let (err, reason) = violate_during_ping(frame).await;
    assert!(reason.is_violation(), "{reason:?}");
    assert!(err.contains("guest protocol violation"), "{err}");
}

#[tokio::test]
async fn violation_output_on_a_stream_never_opened_is_named() {
    let frame = Frame::Data {
        stream: StreamId::FIRST,
        channel: DataChannel::Stdout,
        data: Bytes::from_static(b"hello"),
    }
    .to_bytes()
    .expect("encodes")
    .to_vec();
    let (err, reason) = violate_during_ping(frame).await;
    assert!(reason.is_violation(), "{reason:?}");
    assert!(
        err.contains("guest protocol violation: sent output on stream")
            && err.contains("which the host never opened"),
        "{err}"
    );
}

/// Output for a stream the host opened and let go of is in flight, not hostile.
#[tokio::test]
async fn output_on_a_released_stream_is_not_a_violation() {
    let (client, mut guest) = connected(1024).await;
    let (session, stream) = tokio::join!(client.exec(ExecRequest::new(["x"])), guest.accept_exec());
    drop(session.expect("exec starts"));
    guest
        .send(Frame::Data {
            stream,
            channel: DataChannel::Stdout,
            data: Bytes::from_static(b"late"),
        })
        .await;
    let ping = client.ping();
    let answer = async {
        loop {
            let (id, req) = guest.request().await;
            if matches!(req, Request::Ping) {
                guest.respond(id, Response::Pong).await;
                return;
            }
        }
    };
    let (pong, ()) = tokio::time::timeout(DEADLINE, async { tokio::join!(ping, answer) })
        .await
        .expect("no hang");
    pong.expect("the channel is still up");
    assert!(client.close_reason().is_none());
}
