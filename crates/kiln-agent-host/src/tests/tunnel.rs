//! Host side of TCP tunnels against a scripted fake guest: what a hostile or broken guest can
//! do (credit overruns, STDERR or bytes after EOF on a tunnel, oversized grants) and the exact
//! frames the host sends (credit respected, shutdown after queued bytes, close on drop).
//! The real agent end to end is tested in `bins/kiln-agent/tests/tunnel.rs`.

use std::io;

use bytes::Bytes;
use kiln_agent_proto::{
    DataChannel, ErrorBody, ErrorCode, Frame, GuestMessage, HostMessage, MAX_WINDOW, Request,
    Response, StreamId,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{DEADLINE, FakeGuest};
use crate::{AgentClient, AgentError, ClientConfig, ClosedReason, TcpTunnel};

fn config(tunnel_window: u32) -> ClientConfig {
    ClientConfig {
        handshake_deadline: DEADLINE,
        tunnel_window,
        ..ClientConfig::default()
    }
}

async fn connected(tunnel_window: u32) -> (AgentClient, FakeGuest) {
    super::connected_with(config(tunnel_window)).await
}

impl FakeGuest {
    /// Answers the next request, which must be `tcp_connect` to `port`, by granting
    /// `credit` and connecting. Returns the tunnel's stream and the window it was offered.
    async fn accept_tcp(&mut self, port: u16, credit: u32) -> (StreamId, u32) {
        let (id, req) = self.request().await;
        let Request::TcpConnect {
            stream,
            port: p,
            window,
        } = req
        else {
            panic!("expected tcp_connect, got {req:?}");
        };
        assert_eq!(p, port);
        if credit > 0 {
            self.send(Frame::Window {
                stream,
                increment: credit,
            })
            .await;
        }
        self.respond(id, Response::TcpConnected).await;
        (stream, window)
    }

    async fn data(&mut self, stream: StreamId, channel: DataChannel, bytes: &[u8]) {
        self.send(Frame::Data {
            stream,
            channel,
            data: Bytes::copy_from_slice(bytes),
        })
        .await;
    }

    async fn message(&mut self, msg: GuestMessage) {
        self.send(msg.to_frame().expect("encodes")).await;
    }

    /// The next frame that is not a WINDOW grant.
    async fn next_non_window(&mut self) -> Option<Frame> {
        loop {
            match self.frame().await {
                Some(Frame::Window { .. }) => continue,
                other => return other,
            }
        }
    }
}

async fn open(client: &AgentClient, guest: &mut FakeGuest, credit: u32) -> (TcpTunnel, StreamId) {
    let (tunnel, (stream, _)) = tokio::join!(client.open_tcp(8080), guest.accept_tcp(8080, credit));
    (tunnel.expect("tunnel opens"), stream)
}

#[tokio::test]
async fn open_tcp_request_carries_port_and_window() {
    let (client, mut guest) = connected(4096).await;
    let (tunnel, (stream, window)) =
        tokio::join!(client.open_tcp(8080), guest.accept_tcp(8080, 10));
    let tunnel = tunnel.expect("tunnel opens");
    assert_eq!(tunnel.stream(), stream);
    assert_eq!(tunnel.port(), 8080);
    assert_eq!(window, 4096);
}

#[tokio::test]
async fn open_tcp_refused_is_a_connect_failed_error_and_sends_no_close() {
    let (client, mut guest) = connected(4096).await;
    let answer = async {
        let (id, _) = guest.request().await;
        let msg = GuestMessage::Error {
            id: Some(id),
            error: ErrorBody {
                code: ErrorCode::ConnectFailed,
                message: "connection to 127.0.0.1:8080 refused".into(),
            },
        };
        guest.message(msg).await;
    };
    let (result, ()) = tokio::join!(client.open_tcp(8080), answer);
    match result {
        Err(AgentError::Remote { op, code, message }) => {
            assert_eq!(op, "tcp_connect");
            assert_eq!(code, ErrorCode::ConnectFailed);
            assert_eq!(message, "connection to 127.0.0.1:8080 refused");
        }
        other => panic!("expected a remote error, got {other:?}"),
    }
    // The guest opened nothing, so the next frame is the ping, not a tcp_close.
    let (pong, ()) = tokio::join!(client.ping(), async {
        let Some(Frame::Control(p)) = guest.next_non_window().await else {
            panic!("expected a control frame");
        };
        let msg = HostMessage::from_payload(&p).expect("json");
        let HostMessage::Request {
            id,
            request: Request::Ping,
        } = msg
        else {
            panic!("expected the ping, got {msg:?}");
        };
        guest.respond(id, Response::Pong).await;
    });
    pong.expect("pong");
}

#[tokio::test]
async fn open_tcp_on_an_agent_without_tunnels_is_unsupported() {
    let (client, mut guest) = connected(4096).await;
    let answer = async {
        let (id, _) = guest.request().await;
        let msg = GuestMessage::Error {
            id: Some(id),
            error: ErrorBody {
                code: ErrorCode::Unsupported,
                message: "unsupported request".into(),
            },
        };
        guest.message(msg).await;
    };
    let (result, ()) = tokio::join!(client.open_tcp(5432), answer);
    assert!(
        matches!(
            result,
            Err(AgentError::Remote {
                code: ErrorCode::Unsupported,
                ..
            })
        ),
        "{result:?}"
    );
}

#[tokio::test]
async fn tunnel_credit_overrun_closes_channel_and_fails_reads() {
    let (client, mut guest) = connected(16).await;
    let (mut tunnel, stream) = open(&client, &mut guest, 0).await;
    guest.data(stream, DataChannel::Stdout, &[b'a'; 17]).await;
    client.closed().await;
    assert!(matches!(
        client.close_reason(),
        Some(ClosedReason::Violation { .. })
    ));
    let mut buf = [0u8; 32];
    let err = tunnel.read(&mut buf).await.expect_err("channel is dead");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted, "{err}");
    let err = tunnel.write_all(b"x").await.expect_err("channel is dead");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted, "{err}");
}

#[tokio::test]
async fn tunnel_stderr_frame_is_a_violation() {
    let (client, mut guest) = connected(1024).await;
    let (_tunnel, stream) = open(&client, &mut guest, 0).await;
    guest.data(stream, DataChannel::Stderr, b"huh").await;
    client.closed().await;
    match client.close_reason() {
        Some(ClosedReason::Violation { what }) => assert!(what.contains("STDERR"), "{what}"),
        other => panic!("expected a violation, got {other:?}"),
    }
}

#[tokio::test]
async fn tunnel_bytes_after_eof_are_a_violation() {
    let (client, mut guest) = connected(1024).await;
    let (mut tunnel, stream) = open(&client, &mut guest, 0).await;
    guest.data(stream, DataChannel::Stdout, b"one").await;
    guest.message(GuestMessage::TcpEof { stream }).await;
    guest.data(stream, DataChannel::Stdout, b"two").await;
    client.closed().await;
    match client.close_reason() {
        Some(ClosedReason::Violation { what }) => assert!(what.contains("tcp_eof"), "{what}"),
        other => panic!("expected a violation, got {other:?}"),
    }
    // What arrived before is still delivered first.
    let mut buf = [0u8; 8];
    let n = tunnel.read(&mut buf).await.expect("buffered bytes");
    assert_eq!(&buf[..n], b"one");
}

#[tokio::test]
async fn tunnel_grant_above_max_window_is_a_violation() {
    let (client, mut guest) = connected(1024).await;
    let (_tunnel, stream) = open(&client, &mut guest, 0).await;
    let increment = u32::try_from(MAX_WINDOW).expect("fits") + 1;
    guest.send(Frame::Window { stream, increment }).await;
    client.closed().await;
    assert!(matches!(
        client.close_reason(),
        Some(ClosedReason::Violation { .. })
    ));
}

#[tokio::test]
async fn tunnel_read_bytes_are_granted_back_and_eof_reads_zero() {
    let (client, mut guest) = connected(64).await;
    let (mut tunnel, stream) = open(&client, &mut guest, 0).await;
    guest.data(stream, DataChannel::Stdout, &[b'o'; 64]).await;
    let mut got = [0u8; 64];
    tunnel.read_exact(&mut got).await.expect("read");
    match guest.frame().await {
        Some(Frame::Window {
            stream: s,
            increment,
        }) => assert_eq!((s, increment), (stream, 64)),
        other => panic!("expected a window grant, got {other:?}"),
    }
    guest.message(GuestMessage::TcpEof { stream }).await;
    let mut buf = [0u8; 4];
    assert_eq!(tunnel.read(&mut buf).await.expect("eof"), 0);
    assert_eq!(tunnel.read(&mut buf).await.expect("still eof"), 0);
}

#[tokio::test]
async fn tunnel_writes_respect_guest_credit_and_shutdown_follows_them() {
    let (client, mut guest) = connected(1024).await;
    let (tunnel, stream) = open(&client, &mut guest, 10).await;
    let (mut rd, mut wr) = tokio::io::split(tunnel);
    let writer = tokio::spawn(async move {
        wr.write_all(b"0123456789abcdefghijklmno")
            .await
            .expect("write");
        wr.shutdown().await.expect("shutdown");
        wr
    });
    let mut stdin = Vec::new();
    while stdin.len() < 10 {
        match guest.frame().await {
            Some(Frame::Data {
                stream: s,
                channel: DataChannel::Stdin,
                data,
            }) => {
                assert_eq!(s, stream);
                stdin.extend_from_slice(&data);
            }
            other => panic!("expected tunnel bytes, got {other:?}"),
        }
    }
    // Exactly the credit: the rest waits for a grant.
    assert_eq!(stdin, b"0123456789");
    assert!(!writer.is_finished());
    guest
        .send(Frame::Window {
            stream,
            increment: 100,
        })
        .await;
    loop {
        match guest.frame().await {
            Some(Frame::Data {
                channel: DataChannel::Stdin,
                data,
                ..
            }) => stdin.extend_from_slice(&data),
            Some(Frame::Control(p)) => {
                assert_eq!(
                    HostMessage::from_payload(&p).expect("json"),
                    HostMessage::TcpShutdown { stream }
                );
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(stdin, b"0123456789abcdefghijklmno");
    let mut wr = writer.await.expect("writer task");
    // Writing after the shutdown fails; reading goes on.
    let err = wr.write_all(b"late").await.expect_err("shut down");
    assert_eq!(err.kind(), io::ErrorKind::BrokenPipe, "{err}");
    guest.data(stream, DataChannel::Stdout, b"reply").await;
    let mut buf = [0u8; 5];
    rd.read_exact(&mut buf).await.expect("read after shutdown");
    assert_eq!(&buf, b"reply");
}

#[tokio::test]
async fn tunnel_drop_sends_tcp_close_but_not_after_guest_closed_it() {
    let (client, mut guest) = connected(1024).await;
    let (first, first_stream) = open(&client, &mut guest, 0).await;
    let (second, second_stream) = open(&client, &mut guest, 0).await;
    guest
        .message(GuestMessage::TcpClosed {
            stream: second_stream,
            error: None,
        })
        .await;
    // Wait until the host has seen the close: a write then fails.
    let mut second = second;
    let err = second.write_all(b"x").await.expect_err("closed by guest");
    assert_eq!(err.kind(), io::ErrorKind::BrokenPipe, "{err}");
    drop(second);
    drop(first);
    match guest.next_non_window().await {
        Some(Frame::Control(p)) => assert_eq!(
            HostMessage::from_payload(&p).expect("json"),
            HostMessage::TcpClose {
                stream: first_stream
            }
        ),
        other => panic!("expected tcp_close, got {other:?}"),
    }
    // Nothing for the second: the next frame is the ping.
    let (pong, ()) = tokio::join!(client.ping(), async {
        let Some(Frame::Control(p)) = guest.next_non_window().await else {
            panic!("expected a control frame");
        };
        let msg = HostMessage::from_payload(&p).expect("json");
        let HostMessage::Request {
            id,
            request: Request::Ping,
        } = msg
        else {
            panic!("expected the ping, got {msg:?}");
        };
        guest.respond(id, Response::Pong).await;
    });
    pong.expect("pong");
}

#[tokio::test]
async fn tunnel_guest_error_fails_reads_after_buffered_bytes() {
    let (client, mut guest) = connected(1024).await;
    let (mut tunnel, stream) = open(&client, &mut guest, 0).await;
    guest.data(stream, DataChannel::Stdout, b"xy").await;
    guest
        .message(GuestMessage::TcpClosed {
            stream,
            error: Some("connection reset by peer".into()),
        })
        .await;
    let mut buf = [0u8; 2];
    tunnel
        .read_exact(&mut buf)
        .await
        .expect("buffered bytes first");
    assert_eq!(&buf, b"xy");
    let err = tunnel.read(&mut buf).await.expect_err("then the error");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    assert!(
        err.to_string().contains("connection reset by peer"),
        "{err}"
    );
    let err = tunnel.write_all(b"x").await.expect_err("writes fail");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    // Shutting down a tunnel the guest already closed is a no-op.
    tunnel.shutdown().await.expect("nothing to shut down");
}

#[tokio::test]
async fn tunnel_channel_death_wakes_a_pending_read() {
    let (client, mut guest) = connected(1024).await;
    let (mut tunnel, _stream) = open(&client, &mut guest, 0).await;
    let reader = tokio::spawn(async move {
        let mut buf = [0u8; 8];
        tunnel.read(&mut buf).await
    });
    drop(guest);
    let err = reader
        .await
        .expect("reader task")
        .expect_err("channel died");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted, "{err}");
    assert!(
        matches!(client.close_reason(), Some(ClosedReason::Eof)),
        "{:?}",
        client.close_reason()
    );
}

#[tokio::test]
async fn tunnel_frames_for_a_dropped_tunnel_are_ignored() {
    let (client, mut guest) = connected(16).await;
    let (tunnel, stream) = open(&client, &mut guest, 0).await;
    drop(tunnel);
    // In flight when the host dropped it: more than the window, an EOF, a close.
    guest.data(stream, DataChannel::Stdout, &[1; 64]).await;
    guest.message(GuestMessage::TcpEof { stream }).await;
    guest
        .message(GuestMessage::TcpClosed {
            stream,
            error: None,
        })
        .await;
    let (pong, ()) = tokio::join!(client.ping(), async {
        loop {
            let Some(Frame::Control(p)) = guest.next_non_window().await else {
                panic!("expected a control frame");
            };
            match HostMessage::from_payload(&p).expect("json") {
                HostMessage::TcpClose { stream: s } => assert_eq!(s, stream),
                HostMessage::Request {
                    id,
                    request: Request::Ping,
                } => {
                    guest.respond(id, Response::Pong).await;
                    return;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    });
    pong.expect("the channel is still up");
    assert!(client.close_reason().is_none());
}

/// Polls `fut` exactly once.
async fn poll_once<F: std::future::Future + Unpin>(fut: &mut F) {
    tokio::select! {
        biased;
        _ = fut => panic!("no answer was sent, the future cannot be done"),
        () = std::future::ready(()) => {}
    }
}

#[tokio::test]
async fn open_tcp_cancelled_sends_close_after_the_connect() {
    let (client, mut guest) = connected(1024).await;
    // Without yielding to the writer task: queue two pings, then the tcp_connect, then give
    // up on the open. The close must not overtake the still-queued tcp_connect.
    let mut pings = [Box::pin(client.ping()), Box::pin(client.ping())];
    for p in &mut pings {
        poll_once(p).await;
    }
    let mut open = Box::pin(client.open_tcp(9000));
    poll_once(&mut open).await;
    drop(open);
    let mut seen = Vec::new();
    let stream = loop {
        let Some(Frame::Control(p)) = guest.next_non_window().await else {
            panic!("expected control frames");
        };
        match HostMessage::from_payload(&p).expect("json") {
            HostMessage::Request {
                request: Request::Ping,
                ..
            } => seen.push("ping"),
            HostMessage::Request {
                request: Request::TcpConnect { stream, .. },
                ..
            } => {
                seen.push("tcp_connect");
                break stream;
            }
            other => panic!("unexpected {other:?} after {seen:?}"),
        }
    };
    assert_eq!(seen, ["ping", "ping", "tcp_connect"]);
    // The guest may have connected: the host closes what it may have opened.
    match guest.next_non_window().await {
        Some(Frame::Control(p)) => assert_eq!(
            HostMessage::from_payload(&p).expect("json"),
            HostMessage::TcpClose { stream }
        ),
        other => panic!("expected tcp_close, got {other:?}"),
    }
    drop(pings);
}
