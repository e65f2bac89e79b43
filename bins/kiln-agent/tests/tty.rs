//! Terminal execs (`pty-v1`): the real agent and the real host client over
//! `tokio::io::duplex`, running real processes on real ptys of the test machine. Also raw
//! frames for the values a well-behaved host client cannot even express.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use kiln_agent::{Agent, AgentConfig, ReapMode, Reaper};
use kiln_agent_host::{
    AgentClient, AgentError, ClientConfig, ErrorCode, ExecEvent, ExecRequest, ExecSession,
    ExitStatus, FEATURE_PTY_V1, TermName, TtyRequest, TtySize,
};
use kiln_agent_proto::{Decoder, Frame, GuestMessage, RequestId, SyncFrame};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

const PIPE: usize = 64 << 10;
/// Upper bound for any wait in these tests: turns a hang into a failure.
const GUARD: Duration = Duration::from_secs(60);

fn start_agent() -> tokio::sync::mpsc::UnboundedSender<DuplexStream> {
    let reaper = Reaper::start(ReapMode::RegisteredOnly).expect("sigchld listener");
    let agent = Agent::new(AgentConfig::default(), reaper);
    let (conns, mut rx) = tokio::sync::mpsc::unbounded_channel::<DuplexStream>();
    tokio::spawn(async move {
        while let Some(io) = rx.recv().await {
            let _ = agent.serve(io).await;
        }
    });
    conns
}

async fn connect() -> AgentClient {
    let conns = start_agent();
    let (host, guest) = tokio::io::duplex(PIPE);
    conns.send(guest).expect("agent task alive");
    let config = ClientConfig {
        handshake_deadline: GUARD,
        ..ClientConfig::default()
    };
    let (client, info) = AgentClient::connect_with(host, config)
        .await
        .expect("handshake");
    assert!(info.features.iter().any(|f| f == FEATURE_PTY_V1));
    client
}

fn tty_sh(script: &str, rows: u32, cols: u32) -> ExecRequest {
    ExecRequest {
        stdin: true,
        tty: Some(TtyRequest {
            size: TtySize::new(rows, cols).expect("valid size"),
            term: Some(TermName::new("xterm").expect("valid")),
        }),
        ..ExecRequest::new(["sh", "-c", script])
    }
}

/// Output so far, kept to wait for markers.
struct Screen {
    seen: Vec<u8>,
}

impl Screen {
    /// Reads events until the output contains `marker` (a stderr event fails: a pty has
    /// only one output). Panics on exit or after the guard time.
    async fn wait_for(&mut self, session: &mut ExecSession, marker: &str) {
        let wait = async {
            while !String::from_utf8_lossy(&self.seen).contains(marker) {
                match session.next_event().await {
                    Some(ExecEvent::Stdout(b)) => self.seen.extend_from_slice(&b),
                    other => panic!(
                        "waiting for {marker:?}, got {other:?} after {:?}",
                        self.text()
                    ),
                }
            }
        };
        tokio::time::timeout(GUARD, wait)
            .await
            .expect("marker within the guard time");
    }

    /// Reads the rest of the output and the exit.
    async fn finish(&mut self, session: &mut ExecSession) -> ExitStatus {
        let wait = async {
            loop {
                match session.next_event().await {
                    Some(ExecEvent::Stdout(b)) => self.seen.extend_from_slice(&b),
                    Some(ExecEvent::Exit(status)) => return status,
                    other => panic!("unexpected {other:?} after {:?}", self.text()),
                }
            }
        };
        tokio::time::timeout(GUARD, wait)
            .await
            .expect("exit within the guard time")
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.seen).into_owned()
    }
}

#[tokio::test]
async fn tty_exec_stdio_are_terminals_and_output_is_stdout_only() {
    let client = connect().await;
    let mut session = client
        .exec(tty_sh(
            r#"[ -t 0 ] && [ -t 1 ] && [ -t 2 ] && echo all-ttys; tty; echo "term=$TERM"; echo oops >&2; exit 7"#,
            24,
            80,
        ))
        .await
        .expect("exec starts");
    let mut screen = Screen { seen: Vec::new() };
    let status = screen.finish(&mut session).await;
    let text = screen.text();
    assert!(text.contains("all-ttys"), "{text:?}");
    assert!(text.contains("/dev/pts/"), "{text:?}");
    assert!(text.contains("term=xterm\r\n"), "{text:?}");
    // stderr went through the pty: it arrived as stdout.
    assert!(text.contains("oops"), "{text:?}");
    assert_eq!(status.code, Some(7));
}

#[tokio::test]
async fn tty_exec_stty_size_follows_the_request_then_a_resize() {
    let client = connect().await;
    let mut session = client
        .exec(tty_sh(
            "stty size; echo first-done; read line; stty size",
            24,
            80,
        ))
        .await
        .expect("exec starts");
    let mut screen = Screen { seen: Vec::new() };
    screen.wait_for(&mut session, "first-done").await;
    assert!(screen.text().contains("24 80\r\n"), "{:?}", screen.text());
    session.resize(40, 100).await.expect("resized");
    session.stdin().write(&b"\n"[..]).await.expect("typed");
    let status = screen.finish(&mut session).await;
    assert!(screen.text().contains("40 100\r\n"), "{:?}", screen.text());
    assert_eq!(status.code, Some(0));
}

#[tokio::test]
async fn tty_exec_ctrl_c_byte_interrupts_the_foreground_group() {
    let client = connect().await;
    let mut session = client
        .exec(tty_sh(
            // "ready" comes from the foreground child, so the Ctrl-C cannot land before it
            // runs (a trap that fires between commands would wait for the next one to end).
            r#"trap "echo INT; exit 5" INT; sh -c "echo ready; exec sleep 100"; echo not-reached"#,
            24,
            80,
        ))
        .await
        .expect("exec starts");
    let mut screen = Screen { seen: Vec::new() };
    screen.wait_for(&mut session, "ready").await;
    // What a terminal in raw mode sends for Ctrl-C: the line discipline turns it into
    // SIGINT for the foreground process group (sh and its sleep).
    session
        .stdin()
        .write(Bytes::from_static(b"\x03"))
        .await
        .expect("typed");
    let status = screen.finish(&mut session).await;
    let text = screen.text();
    assert!(text.contains("INT"), "{text:?}");
    assert!(!text.contains("not-reached"), "{text:?}");
    assert_eq!(status.code, Some(5));
}

#[tokio::test]
async fn tty_exec_killed_by_a_signal_reports_it() {
    let client = connect().await;
    let mut session = client
        .exec(tty_sh("echo ready; kill -TERM $$; sleep 100", 24, 80))
        .await
        .expect("exec starts");
    let mut screen = Screen { seen: Vec::new() };
    let status = screen.finish(&mut session).await;
    assert_eq!(status.signal, Some(15), "{:?}", screen.text());
}

#[tokio::test]
async fn resize_of_an_exec_without_tty_is_refused() {
    let client = connect().await;
    let mut req = ExecRequest::new(["sh", "-c", "read x"]);
    req.stdin = true;
    let session = client.exec(req).await.expect("exec starts");
    match session.resize(40, 100).await {
        Err(AgentError::Remote { code, message, .. }) => {
            assert_eq!(code, ErrorCode::BadRequest);
            assert!(message.contains("no tty"), "{message}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // Out-of-range sizes never leave the host.
    assert!(matches!(
        session.resize(0, 80).await,
        Err(AgentError::BadTtySize(_))
    ));
    assert!(matches!(
        session.resize(1001, 80).await,
        Err(AgentError::BadTtySize(_))
    ));
    session.stdin().close().await.expect("closed");
}

/// A host speaking raw frames, to send what the typed client refuses to build.
struct RawHost {
    io: DuplexStream,
    decoder: Decoder,
}

impl RawHost {
    async fn connect() -> RawHost {
        let conns = start_agent();
        let (host, guest) = tokio::io::duplex(PIPE);
        conns.send(guest).expect("agent task alive");
        let mut raw = RawHost {
            io: host,
            decoder: Decoder::new(),
        };
        let sync = Frame::Sync(SyncFrame {
            nonce: 42,
            versions: vec![1],
        });
        raw.io
            .write_all(&sync.to_bytes().expect("encodes"))
            .await
            .expect("written");
        match raw.next_frame().await {
            Frame::SyncAck(ack) => assert_eq!(ack.nonce, 42),
            other => panic!("expected sync_ack, got {other:?}"),
        }
        raw
    }

    async fn next_frame(&mut self) -> Frame {
        let mut buf = BytesMut::with_capacity(PIPE);
        let read = async {
            loop {
                if let Some(frame) = self.decoder.next_frame().expect("valid frames") {
                    return frame;
                }
                buf.clear();
                let n = self.io.read_buf(&mut buf).await.expect("readable");
                assert!(n > 0, "agent closed the channel");
                self.decoder.feed(&buf);
            }
        };
        tokio::time::timeout(GUARD, read)
            .await
            .expect("a frame within the guard time")
    }

    async fn send(&mut self, json: &str) {
        let frame = Frame::Control(Bytes::copy_from_slice(json.as_bytes()));
        self.io
            .write_all(&frame.to_bytes().expect("encodes"))
            .await
            .expect("written");
    }

    /// The answer to request `id` (other frames are skipped).
    async fn answer(&mut self, id: u64) -> GuestMessage {
        loop {
            if let Frame::Control(payload) = self.next_frame().await {
                let msg = GuestMessage::from_payload(&payload).expect("valid message");
                match &msg {
                    GuestMessage::Response { id: got, .. } if *got == RequestId(id) => {
                        return msg;
                    }
                    GuestMessage::Error { id: Some(got), .. } if *got == RequestId(id) => {
                        return msg;
                    }
                    _ => {}
                }
            }
        }
    }
}

fn error_code(msg: &GuestMessage) -> ErrorCode {
    match msg {
        GuestMessage::Error { error, .. } => error.code,
        other => panic!("expected an error, got {other:?}"),
    }
}

#[tokio::test]
async fn hostile_tty_values_are_refused_and_the_session_lives_on() {
    let mut raw = RawHost::connect().await;
    let exec = |id: u32, tty: &str| {
        format!(
            r#"{{"type":"request","id":{id},"request":{{"op":"exec","stream":{id},"output_window":65536,"exec":{{"argv":["true"],"tty":{tty}}}}}}}"#
        )
    };
    for (id, tty) in [
        (1, r#"{"rows":0,"cols":80}"#),
        (2, r#"{"rows":100000,"cols":80}"#),
        (
            3,
            r#"{"rows":24,"cols":80,"term":"xterm\u001b]0;pwned\u0007"}"#,
        ),
        (4, r#"{"rows":24}"#),
    ] {
        raw.send(&exec(id, tty)).await;
        assert_eq!(
            error_code(&raw.answer(u64::from(id)).await),
            ErrorCode::BadRequest
        );
    }
    // A resize for a stream nothing runs on.
    raw.send(r#"{"type":"request","id":10,"request":{"op":"exec_resize","stream":77,"rows":24,"cols":80}}"#)
        .await;
    assert_eq!(error_code(&raw.answer(10).await), ErrorCode::NoSuchStream);
    // A resize of a running exec without a tty.
    raw.send(r#"{"type":"request","id":11,"request":{"op":"exec","stream":5,"output_window":65536,"exec":{"argv":["sleep","100"]}}}"#)
        .await;
    assert!(matches!(
        raw.answer(11).await,
        GuestMessage::Response { .. }
    ));
    raw.send(r#"{"type":"request","id":12,"request":{"op":"exec_resize","stream":5,"rows":24,"cols":80}}"#)
        .await;
    assert_eq!(error_code(&raw.answer(12).await), ErrorCode::BadRequest);
    // Out-of-range resizes of it.
    for (id, size) in [
        (13, r#""rows":0,"cols":80"#),
        (14, r#""rows":24,"cols":100000"#),
    ] {
        raw.send(&format!(
            r#"{{"type":"request","id":{id},"request":{{"op":"exec_resize","stream":5,{size}}}}}"#
        ))
        .await;
        assert_eq!(error_code(&raw.answer(id).await), ErrorCode::BadRequest);
    }
    // The session still answers.
    raw.send(r#"{"type":"request","id":20,"request":{"op":"ping"}}"#)
        .await;
    assert!(matches!(
        raw.answer(20).await,
        GuestMessage::Response { .. }
    ));
}

#[tokio::test]
async fn tty_exec_output_cap_and_timeout_still_apply() {
    let client = connect().await;
    let mut req = tty_sh("yes", 24, 80);
    req.max_output_bytes = Some(1000);
    let mut session = client.exec(req).await.expect("exec starts");
    let mut screen = Screen { seen: Vec::new() };
    let status = screen.finish(&mut session).await;
    assert!(status.output_truncated);
    assert_eq!(screen.seen.len(), 1000);

    let mut req = tty_sh("exec sleep 100", 24, 80);
    req.timeout_ms = Some(200);
    let mut session = client.exec(req).await.expect("exec starts");
    let status = screen.finish(&mut session).await;
    assert!(status.timed_out);
    assert_eq!(status.signal, Some(9));
}
