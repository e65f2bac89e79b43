//! The exec WebSocket (`GET /v1/sandboxes/{id}/exec`, `exec_ws.rs`) of the real `kilnd`
//! binary, driven with the real client library, on a sandbox the daemon re-attached at start,
//! with fakes where a VM would be: a `sleep` for QEMU, a fake QMP server, and the real guest agent in a private mount
//! namespace (the commands run on this host: the namespace keeps them off its `/run`), all
//! from `kiln_testkit`. Needs root and util-linux `unshare`, like the other root-only
//! integration tests.
//!
//! What is checked is the handler's part: the first message is the request, output comes
//! tagged by stream, stdin bytes and `stdin_close` reach the command, a signal message
//! reaches its process group, the exit status ends the stream, and a client that goes away
//! gets its command killed.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use kiln_api_types::{
    ExecClientMessage, ExecRequest, ExecServerMessage, ExitStatus, STREAM_STDERR, STREAM_STDOUT,
    SandboxId,
};
use kiln_client::{Client, WsStream};
use tokio_tungstenite::tungstenite::Message;

/// The guest side, run by `kiln_testkit::start_agent` in its own process.
#[tokio::test]
#[ignore = "helper of the exec WebSocket tests: run by them in a private mount namespace"]
async fn agent_helper() {
    kiln_testkit::serve_agent().await;
}

/// A daemon serving a re-attached sandbox; everything it stands on ends with it.
struct Daemon {
    _tmp: tempfile::TempDir,
    _kilnd: tokio::process::Child,
    _agent: tokio::process::Child,
    _qemu: kiln_testkit::FakeQemu,
    client: Client,
    id: SandboxId,
}

/// Sets up the home, the fakes and the agent, then starts `kilnd` and waits until it serves.
async fn daemon() -> Daemon {
    let tmp = tempfile::tempdir().expect("tempdir");
    let home = tmp.path().join("home");
    std::fs::create_dir_all(home.join("run")).expect("home");
    kiln_testkit::write_image(&home, None, false);
    let id = SandboxId::random();
    kiln_store::Store::open(&home.join("kiln.db"))
        .expect("store")
        .sandbox_insert(&kiln_testkit::running_row(&id, serde_json::json!({})))
        .expect("row");
    let run = home.join("run").join(id.as_str());
    let qemu = kiln_testkit::write_run_dir(&run);
    kiln_testkit::start_qmp(&run.join("qmp.sock"));
    let agent = kiln_testkit::start_agent(&run.join("agent.sock"), "agent_helper");
    wait_for("the agent helper's socket", || {
        run.join("agent.sock").exists()
    })
    .await;
    let kilnd = tokio::process::Command::new(env!("CARGO_BIN_EXE_kilnd"))
        .env("KILN_HOME", &home)
        .kill_on_drop(true)
        .spawn()
        .expect("start kilnd");
    let client = Client::unix(home.join("kilnd.sock"));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let health = loop {
        match client.health().await {
            Ok(h) => break h,
            Err(e) => assert!(
                tokio::time::Instant::now() < deadline,
                "kilnd does not answer: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(health.janitor.sandboxes_reattached, 1, "{health:?}");
    Daemon {
        _tmp: tmp,
        _kilnd: kilnd,
        _agent: agent,
        _qemu: qemu,
        client,
        id,
    }
}

/// Polls `cond` every 20 ms for up to 20 s.
async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Opens the exec socket, sends the request for `sh -c script` (with stdin from the client
/// when `stdin`) and reads `started`.
async fn exec(d: &Daemon, script: &str, stdin: bool) -> WsStream {
    let mut ws = d.client.sandbox_exec(&d.id).await.expect("exec socket");
    let mut req = ExecRequest::new(vec!["/bin/sh".into(), "-c".into(), script.into()]);
    req.stdin = stdin;
    ws.send(Message::Text(
        serde_json::to_string(&req).expect("json").into(),
    ))
    .await
    .expect("send the request");
    match next_message(&mut ws).await {
        Message::Text(t) => match serde_json::from_str(&t).expect("server message") {
            ExecServerMessage::Started { sandbox, .. } => assert_eq!(sandbox, d.id),
            other => panic!("expected started, got {other:?}"),
        },
        other => panic!("expected started, got {other:?}"),
    }
    ws
}

async fn send(ws: &mut WsStream, msg: &ExecClientMessage) {
    ws.send(Message::Text(
        serde_json::to_string(msg).expect("json").into(),
    ))
    .await
    .expect("send");
}

/// The next data or text message (pings skipped), within 30 s.
async fn next_message(ws: &mut WsStream) -> Message {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .expect("a message within 30 s")
            .expect("the stream goes on")
            .expect("a message");
        if !matches!(msg, Message::Ping(_) | Message::Pong(_)) {
            return msg;
        }
    }
}

/// Reads to the end: (stdout, stderr, exit status).
async fn collect(ws: &mut WsStream) -> (String, String, ExitStatus) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    loop {
        match next_message(ws).await {
            Message::Binary(b) => match b.first() {
                Some(&STREAM_STDOUT) => out.extend_from_slice(&b[1..]),
                Some(&STREAM_STDERR) => err.extend_from_slice(&b[1..]),
                other => panic!("output tagged {other:?}"),
            },
            Message::Text(t) => match serde_json::from_str(&t).expect("server message") {
                ExecServerMessage::Exit(status) => {
                    return (
                        String::from_utf8(out).expect("utf-8"),
                        String::from_utf8(err).expect("utf-8"),
                        status,
                    );
                }
                other => panic!("unexpected {other:?}"),
            },
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_ws_stdin_reaches_the_command_and_output_and_exit_code_come_back() {
    let d = daemon().await;
    let mut ws = exec(&d, "cat; echo to-stderr >&2; exit 3", true).await;
    ws.send(Message::Binary(b"hello ".to_vec().into()))
        .await
        .expect("stdin");
    ws.send(Message::Binary(b"kiln".to_vec().into()))
        .await
        .expect("stdin");
    send(&mut ws, &ExecClientMessage::StdinClose).await;
    let (out, err, status) = collect(&mut ws).await;
    assert_eq!(out, "hello kiln");
    assert_eq!(err, "to-stderr\n");
    assert_eq!(status.code, Some(3), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_ws_signal_message_reaches_the_command() {
    let d = daemon().await;
    let mut ws = exec(
        &d,
        "trap 'echo got-term; exit 7' TERM; echo ready; while :; do sleep 0.05; done",
        false,
    )
    .await;
    // The trap is set once "ready" is out; then the signal.
    match next_message(&mut ws).await {
        Message::Binary(b) => assert_eq!(&b[..], b"\x01ready\n"),
        other => panic!("expected ready, got {other:?}"),
    }
    send(&mut ws, &ExecClientMessage::Signal { signo: 15 }).await;
    let (out, _, status) = collect(&mut ws).await;
    assert_eq!(out, "got-term\n");
    assert_eq!(status.code, Some(7), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_ws_client_gone_kills_the_command() {
    let d = daemon().await;
    let mut ws = exec(&d, "echo $$; exec sleep 120", false).await;
    let pid: u32 = match next_message(&mut ws).await {
        Message::Binary(b) => std::str::from_utf8(&b[1..])
            .expect("utf-8")
            .trim()
            .parse()
            .expect("the command's pid"),
        other => panic!("expected the pid, got {other:?}"),
    };
    let alive = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|s| !s.rsplit(") ").next().is_some_and(|r| r.starts_with('Z')))
    };
    assert!(alive(pid), "the command {pid} runs");
    drop(ws);
    wait_for("the command to be killed after its client left", || {
        !alive(pid)
    })
    .await;
}
