//! The exec WebSocket (`GET /v1/sandboxes/{id}/exec`, `exec_ws.rs`) of the real `kilnd`
//! binary, driven with the real client library, on a sandbox the daemon re-attached at start,
//! with fakes where a VM would be:
//!
//! - "QEMU" is a `sleep` process: its pidfile and `vm.json` are what a daemon leaves in the
//!   sandbox's runtime directory, so the daemon's janitor hands the sandbox to re-attach;
//! - its QMP socket is a fake QMP server in this test (greeting, then `{"return": {}}` to
//!   everything, `query-status` answered `running`);
//! - its agent socket is served by the real guest agent (`kiln_agent`), run by this test
//!   binary as a helper process in a private mount namespace with a tmpfs on `/run` (the
//!   commands run on this host: the namespace keeps them off its `/run`). Needs root and
//!   util-linux `unshare`, like the other root-only integration tests.
//!
//! What is checked is the handler's part: the first message is the request, output comes
//! tagged by stream, stdin bytes and `stdin_close` reach the command, a signal message
//! reaches its process group, the exit status ends the stream, and a client that goes away
//! gets its command killed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use kiln_api_types::{
    ExecClientMessage, ExecRequest, ExecServerMessage, ExitStatus, STREAM_STDERR, STREAM_STDOUT,
    SandboxId, SandboxInfo, SandboxSpec, SandboxState, SandboxStatus, StartSource,
};
use kiln_client::{Client, WsStream};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio_tungstenite::tungstenite::Message;

const AGENT_SOCKET_ENV: &str = "KILN_TEST_AGENT_SOCKET";
const IMAGE_ID: &str = "0123456789ab";

/// The guest side, run by [`start_agent`] in its own process: the real agent serving every
/// connection to the socket named by `$KILN_TEST_AGENT_SOCKET`.
#[tokio::test]
#[ignore = "helper of the exec WebSocket tests: run by them in a private mount namespace"]
async fn agent_helper() {
    let socket = std::env::var_os(AGENT_SOCKET_ENV).expect("run by the rotation test");
    let listener = UnixListener::bind(&socket).expect("bind the agent socket");
    let reaper =
        kiln_agent::Reaper::start(kiln_agent::ReapMode::RegisteredOnly).expect("sigchld listener");
    let agent = kiln_agent::Agent::new(kiln_agent::AgentConfig::default(), reaper);
    loop {
        let (conn, _) = listener.accept().await.expect("accept");
        let _ = agent.serve(conn).await;
    }
}

/// Starts [`agent_helper`] in a private mount namespace with a tmpfs on `/run`.
fn start_agent(socket: &Path) -> tokio::process::Child {
    let exe = std::env::current_exe().expect("this test binary");
    tokio::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg("mount -t tmpfs kiln-test-run /run && exec \"$0\" agent_helper --exact --ignored --nocapture")
        .arg(exe)
        .env(AGENT_SOCKET_ENV, socket)
        .kill_on_drop(true)
        .spawn()
        .expect("unshare (util-linux) runs; the test needs root")
}

/// A fake QMP server on `socket`: QEMU's greeting, `running` for `query-status`, an empty
/// return for every other command.
fn start_qmp(socket: &Path) {
    let listener = UnixListener::bind(socket).expect("bind the QMP socket");
    tokio::spawn(async move {
        loop {
            let Ok((conn, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (rd, mut wr) = conn.into_split();
                let greeting = r#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": ""}, "capabilities": []}}"#;
                if wr
                    .write_all(format!("{greeting}\r\n").as_bytes())
                    .await
                    .is_err()
                {
                    return;
                }
                let mut lines = BufReader::new(rd).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let Ok(cmd) = serde_json::from_str::<serde_json::Value>(&line) else {
                        return;
                    };
                    let ret = match cmd["execute"].as_str() {
                        Some("query-status") => serde_json::json!({
                            "status": "running", "running": true, "singlestep": false
                        }),
                        _ => serde_json::json!({}),
                    };
                    let reply = serde_json::json!({ "return": ret, "id": cmd["id"] });
                    if wr
                        .write_all(format!("{reply}\r\n").as_bytes())
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
}

/// An image `fake` (the base recipe).
fn write_image(home: &Path) {
    let dir = home.join("images/fake");
    std::fs::create_dir_all(&dir).expect("image dir");
    let recipe = kiln_image::builtin("base").expect("the base recipe");
    let manifest = kiln_image::ImageManifest {
        schema: kiln_image::MANIFEST_SCHEMA,
        id: kiln_image::ImageId(IMAGE_ID.to_owned()),
        name: "fake".to_owned(),
        inputs: kiln_image::FingerprintInputs::new(&recipe, "", "6.1.0", "agent", "m", "s"),
        recipe,
        fingerprint: "f".into(),
        kernel_version: "6.1.0".into(),
        kernel_release: "6.1.0-test".into(),
        created_unix: 1,
        files: Vec::new(),
        rootfs_sha256: None,
        recipe_path: None,
        origin: None,
    };
    std::fs::write(
        dir.join("manifest.json"),
        serde_json::to_vec_pretty(&manifest).expect("manifest json"),
    )
    .expect("manifest");
}

/// A `running` row for `id`, as a previous daemon recorded it.
fn row(id: &SandboxId) -> SandboxInfo {
    let spec: SandboxSpec = serde_json::from_value(serde_json::json!({
        "source": { "kind": "image", "image": "fake" }
    }))
    .expect("spec");
    SandboxInfo {
        id: id.clone(),
        spec,
        status: SandboxStatus {
            network: None,
            state: SandboxState::Running,
            image: "fake".parse().expect("image name"),
            image_id: IMAGE_ID.into(),
            cpus: 1,
            memory_mib: 256,
            accel: "tcg".into(),
            created_unix: 1,
            boot_ms: Some(1),
            error: None,
            warnings: Vec::new(),
            source: StartSource::Cold,
            snapshot: None,
            expires_unix: None,
        },
    }
}

/// The stand-in QEMU process, killed however the test ends.
struct FakeQemu(std::process::Child);

impl Drop for FakeQemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What a daemon leaves in a running sandbox's runtime directory: `vm.json` and the pidfile
/// of its "QEMU" (a `sleep`).
fn write_run_dir(run: &Path) -> FakeQemu {
    std::fs::create_dir_all(run).expect("run dir");
    let cfg = kiln_vmm::VmConfig {
        nic: None,
        qemu: PathBuf::from("/nonexistent/qemu-system-x86_64"),
        accel: kiln_vmm::Accel::Tcg,
        cpus: 1,
        memory_mib: 256,
        kernel: run.join("vmlinuz"),
        initramfs: run.join("initramfs.cpio"),
        extra_cmdline: String::new(),
        disk: None,
        memory_file: run.join("mem"),
        memory_shared: false,
        run_dir: run.to_owned(),
        incoming: None,
    };
    std::fs::write(
        run.join("vm.json"),
        serde_json::to_vec(&cfg).expect("vm.json"),
    )
    .expect("write vm.json");
    let qemu = std::process::Command::new("sleep")
        .arg("600")
        .spawn()
        .expect("sleep");
    kiln_vmm::procid::ProcessIdentity::of_pid(qemu.id())
        .expect("identity")
        .write(&run.join("qemu.pid"))
        .expect("pidfile");
    FakeQemu(qemu)
}

/// A daemon serving a re-attached sandbox; everything it stands on ends with it.
struct Daemon {
    _tmp: tempfile::TempDir,
    _kilnd: tokio::process::Child,
    _agent: tokio::process::Child,
    _qemu: FakeQemu,
    client: Client,
    id: SandboxId,
}

/// Sets up the home, the fakes and the agent, then starts `kilnd` and waits until it serves.
async fn daemon() -> Daemon {
    let tmp = tempfile::tempdir().expect("tempdir");
    let home = tmp.path().join("home");
    std::fs::create_dir_all(home.join("run")).expect("home");
    write_image(&home);
    let id = SandboxId::random();
    kiln_store::Store::open(&home.join("kiln.db"))
        .expect("store")
        .sandbox_insert(&row(&id))
        .expect("row");
    let run = home.join("run").join(id.as_str());
    let qemu = write_run_dir(&run);
    start_qmp(&run.join("qmp.sock"));
    let agent = start_agent(&run.join("agent.sock"));
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
