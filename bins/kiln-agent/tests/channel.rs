//! The real agent (session + exec logic) and the real host client, end to end over
//! `tokio::io::duplex`, running real processes on the host. No VM, no root-only features.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use bytes::Bytes;
use kiln_agent::port::VirtioPort;
use kiln_agent::{Agent, AgentConfig, ReapMode, Reaper, ServeEnd};
use kiln_agent_host::{
    AgentClient, AgentError, ClientConfig, ErrorCode, ExecEvent, ExecOutput, ExecRequest,
};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncWriteExt, DuplexStream};
use tokio::sync::mpsc;

mod support;
use support::start_proxy;

const HANDSHAKE: Duration = Duration::from_secs(10);
/// Like a unix socket's buffer.
const PIPE: usize = 64 << 10;

struct TestAgent {
    conns: mpsc::UnboundedSender<DuplexStream>,
    ends: mpsc::UnboundedReceiver<ServeEnd>,
}

fn start_agent() -> TestAgent {
    let reaper = Reaper::start(ReapMode::RegisteredOnly).expect("sigchld listener");
    let agent = Agent::new(AgentConfig::default(), reaper);
    let (conns, mut rx) = mpsc::unbounded_channel::<DuplexStream>();
    let (end_tx, ends) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(io) = rx.recv().await {
            let end = agent
                .serve(io)
                .await
                .expect("serve never fails on a duplex");
            let _ = end_tx.send(end);
        }
    });
    TestAgent { conns, ends }
}

fn config(output_window: u32) -> ClientConfig {
    ClientConfig {
        handshake_deadline: HANDSHAKE,
        output_window,
        ..ClientConfig::default()
    }
}

impl TestAgent {
    /// A fresh host connection (like a new client of QEMU's chardev).
    async fn connect(&self, output_window: u32) -> AgentClient {
        let (host, guest) = tokio::io::duplex(PIPE);
        self.conns.send(guest).expect("agent task alive");
        let (client, info) = AgentClient::connect_with(host, config(output_window))
            .await
            .expect("handshake");
        assert!(info.features.iter().any(|f| f == "exec"));
        client
    }
}

fn sh(script: &str) -> ExecRequest {
    ExecRequest::new(["sh", "-c", script])
}

/// Upper bound for any single exec in these tests: turns a hang into a failure.
const EXEC_GUARD: Duration = Duration::from_secs(60);

async fn run(client: &AgentClient, req: ExecRequest) -> ExecOutput {
    let exec = async {
        client
            .exec(req)
            .await
            .expect("exec starts")
            .collect()
            .await
            .expect("exec completes")
    };
    tokio::time::timeout(EXEC_GUARD, exec)
        .await
        .expect("exec finished within the guard time")
}

fn text(b: &[u8]) -> &str {
    std::str::from_utf8(b).expect("utf-8 output")
}

/// Waits (bounded) until `pid` has terminated (gone or a zombie).
async fn wait_dead(pid: u32) {
    for _ in 0..1000 {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => return,
            Ok(stat) if stat.rsplit(") ").next().is_some_and(|s| s.starts_with('Z')) => return,
            Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    panic!("process {pid} is still running");
}

#[tokio::test]
async fn ping_round_trip_succeeds() {
    let agent = start_agent();
    let client = agent.connect(64 << 10).await;
    let rtt = client.ping().await.expect("pong");
    assert!(rtt < HANDSHAKE);
}

#[tokio::test]
async fn exec_echo_returns_stdout_and_exit_zero() {
    let agent = start_agent();
    let client = agent.connect(64 << 10).await;
    let out = run(&client, ExecRequest::new(["echo", "hello", "kiln"])).await;
    assert_eq!(text(&out.stdout), "hello kiln\n");
    assert!(out.stderr.is_empty());
    assert_eq!(out.status.code, Some(0));
    assert_eq!(out.status.signal, None);
    assert!(!out.status.timed_out && !out.status.output_truncated);
}

#[tokio::test]
async fn exec_stdout_and_stderr_are_separated() {
    let agent = start_agent();
    let client = agent.connect(64 << 10).await;
    let out = run(
        &client,
        sh("echo out1; echo err1 >&2; echo out2; echo err2 >&2"),
    )
    .await;
    assert_eq!(text(&out.stdout), "out1\nout2\n");
    assert_eq!(text(&out.stderr), "err1\nerr2\n");
}

#[tokio::test]
async fn exec_exit_code_is_reported() {
    let agent = start_agent();
    let client = agent.connect(64 << 10).await;
    let out = run(&client, sh("exit 42")).await;
    assert_eq!(out.status.code, Some(42));
    assert_eq!(out.status.signal, None);
}

#[tokio::test]
async fn exec_killed_by_signal_reports_signal() {
    let agent = start_agent();
    let client = agent.connect(64 << 10).await;
    let out = run(&client, sh("kill -TERM $$")).await;
    assert_eq!(out.status.code, None);
    assert_eq!(out.status.signal, Some(15));
}

#[tokio::test]
async fn exec_signal_request_reaches_process_group() {
    let agent = start_agent();
    let client = agent.connect(64 << 10).await;
    // The child of sh is in the same group: both must die for the pipes to close.
    let mut session = client
        .exec(sh("echo ready; sleep 60 & wait"))
        .await
        .expect("exec starts");
    assert_eq!(
        session.next_event().await,
        Some(ExecEvent::Stdout(Bytes::from_static(b"ready\n")))
    );
    session.signal(15).await.expect("signal delivered");
    match session.next_event().await {
        Some(ExecEvent::Exit(status)) => assert_eq!(status.signal, Some(15)),
        other => panic!("expected exit, got {other:?}"),
    }
}

#[tokio::test]
async fn exec_stdin_round_trips_through_cat() {
    let agent = start_agent();
    let client = agent.connect(32 << 10).await;
    let mut req = ExecRequest::new(["cat"]);
    req.stdin = true;
    let mut session = client.exec(req).await.expect("exec starts");
    // Larger than the agent's stdin window and the host's output window: both directions
    // must be flow-controlled while running concurrently.
    let input: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let stdin = session.stdin();
    let send = async {
        stdin.write(input.clone()).await.expect("stdin accepted");
        stdin.close().await.expect("stdin closed");
    };
    let receive = async {
        let mut got = Vec::new();
        loop {
            match session.next_event().await {
                Some(ExecEvent::Stdout(b)) => got.extend_from_slice(&b),
                Some(ExecEvent::Stderr(b)) => panic!("unexpected stderr {b:?}"),
                Some(ExecEvent::Exit(status)) => return (got, status),
                None => panic!("channel died: {:?}", session.close_reason()),
            }
        }
    };
    let ((), (got, status)) = tokio::join!(send, receive);
    assert_eq!(status.code, Some(0));
    assert_eq!(got.len(), input.len());
    assert!(got == input, "cat output differs from its input");
}

#[tokio::test]
async fn exec_stdin_write_without_stdin_is_rejected() {
    let agent = start_agent();
    let client = agent.connect(64 << 10).await;
    let session = client
        .exec(ExecRequest::new(["true"]))
        .await
        .expect("exec starts");
    let err = session
        .stdin()
        .write(&b"x"[..])
        .await
        .expect_err("no stdin pipe");
    assert!(matches!(err, AgentError::NoStdin), "{err:?}");
}

#[tokio::test]
async fn exec_env_overlays_base_environment() {
    let agent = start_agent();
    let client = agent.connect(64 << 10).await;
    let mut req = sh("echo \"$FOO|$PATH|$HOME|$LANG|$TERM|${KILN_UNSET-unset}\"");
    req.env = BTreeMap::from([("FOO".to_owned(), "bar baz".to_owned())]);
    let out = run(&client, req).await;
    assert_eq!(
        text(&out.stdout),
        "bar baz|/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin|/root|C.UTF-8|dumb|unset\n"
    );
    let mut req = sh("echo $TERM");
    req.env = BTreeMap::from([("TERM".to_owned(), "xterm".to_owned())]);
    assert_eq!(text(&run(&client, req).await.stdout), "xterm\n");
}

#[tokio::test]
async fn exec_cwd_is_used_and_defaults_to_root() {
    let agent = start_agent();
    let client = agent.connect(64 << 10).await;
    let dir = std::env::temp_dir().canonicalize().expect("temp dir");
    let mut req = ExecRequest::new(["pwd"]);
    req.cwd = Some(dir.display().to_string());
    assert_eq!(
        text(&run(&client, req).await.stdout),
        format!("{}\n", dir.display())
    );
    if std::path::Path::new("/root").is_dir() {
        let out = run(&client, ExecRequest::new(["pwd"])).await;
        assert_eq!(text(&out.stdout), "/root\n");
    }
}

#[tokio::test]
async fn exec_bad_cwd_is_a_clear_error() {
    let agent = start_agent();
    let client = agent.connect(64 << 10).await;
    let mut req = ExecRequest::new(["pwd"]);
    req.cwd = Some("/nonexistent/kiln-test-dir".to_owned());
    match client.exec(req).await {
        Err(AgentError::Remote { code, message, .. }) => {
            assert_eq!(code, ErrorCode::BadCwd);
            assert!(message.contains("/nonexistent/kiln-test-dir"), "{message}");
        }
        Err(e) => panic!("unexpected error {e:?}"),
        Ok(_) => panic!("exec with a bad cwd must fail"),
    }
    // The session is still usable.
    client.ping().await.expect("pong");
}

#[tokio::test]
async fn exec_command_not_found_exits_127() {
    let agent = start_agent();
    let client = agent.connect(64 << 10).await;
    let session = client
        .exec(ExecRequest::new(["kiln-no-such-command"]))
        .await
        .expect("exec answered");
    assert_eq!(session.pid(), None);
    let out = session.collect().await.expect("completes");
    assert_eq!(out.status.code, Some(127));
    assert_eq!(
        text(&out.stderr),
        "kiln-agent: kiln-no-such-command: command not found\n"
    );
}

#[tokio::test]
async fn exec_permission_denied_exits_126() {
    let agent = start_agent();
    let client = agent.connect(64 << 10).await;
    let path = std::env::temp_dir().join(format!("kiln-noexec-{}", std::process::id()));
    std::fs::File::create(&path)
        .and_then(|mut f| f.write_all(b"#!/bin/sh\necho hi\n"))
        .expect("write script");
    let out = run(&client, ExecRequest::new([path.display().to_string()])).await;
    std::fs::remove_file(&path).expect("cleanup");
    // Root may execute files without x bits only if some x bit is set; none is.
    assert_eq!(out.status.code, Some(126));
    assert!(
        text(&out.stderr).ends_with(": permission denied\n"),
        "{:?}",
        text(&out.stderr)
    );
}

#[tokio::test]
async fn exec_timeout_kills_process_group() {
    let agent = start_agent();
    let client = agent.connect(64 << 10).await;
    let mut req = sh("echo started; sleep 60 & sleep 60");
    req.timeout_ms = Some(300);
    let out = run(&client, req).await;
    assert_eq!(text(&out.stdout), "started\n");
    assert!(out.status.timed_out);
    assert_eq!(out.status.signal, Some(9));
    assert!(!out.status.output_truncated);
}

#[tokio::test]
async fn exec_huge_timeout_is_no_timeout() {
    let agent = start_agent();
    let client = agent.connect(64 << 10).await;
    let mut req = ExecRequest::new(["echo", "ok"]);
    req.timeout_ms = Some(u64::MAX);
    let out = run(&client, req).await;
    assert_eq!(text(&out.stdout), "ok\n");
    assert!(!out.status.timed_out);
}

#[tokio::test]
async fn exec_output_cap_truncates_and_kills() {
    let agent = start_agent();
    let client = agent.connect(64 << 10).await;
    let mut req = ExecRequest::new(["yes", "kiln"]);
    req.max_output_bytes = Some(100_000);
    let out = run(&client, req).await;
    assert_eq!(out.stdout.len(), 100_000);
    assert!(out.stdout.starts_with(b"kiln\nkiln\n"));
    assert!(out.status.output_truncated);
    assert_eq!(out.status.signal, Some(9));
    assert!(!out.status.timed_out);
}

#[tokio::test]
async fn exec_silent_stderr_does_not_starve_stdout_of_credit() {
    // Regression: the stderr pump must not hold the shared credit while waiting for data.
    let agent = start_agent();
    let client = agent.connect(1024).await;
    let out = run(
        &client,
        ExecRequest::new(["head", "-c", "300000", "/dev/zero"]),
    )
    .await;
    assert_eq!(out.stdout.len(), 300_000);
    assert_eq!(out.status.code, Some(0));
}

#[tokio::test]
async fn exec_output_exactly_at_cap_is_not_truncated() {
    let agent = start_agent();
    let client = agent.connect(64 << 10).await;
    let mut req = sh("printf 12345");
    req.max_output_bytes = Some(5);
    let out = run(&client, req).await;
    assert_eq!(text(&out.stdout), "12345");
    assert!(!out.status.output_truncated);
    assert_eq!(out.status.code, Some(0));
}

#[tokio::test]
async fn exec_ten_concurrent_execs_keep_their_output_apart() {
    let agent = start_agent();
    let client = agent.connect(16 << 10).await;
    let runs = (0..10).map(|i| {
        let client = client.clone();
        async move {
            let script = format!("i=0; while [ $i -lt 2000 ]; do echo {i}-$i; i=$((i+1)); done; echo e{i} >&2; exit {i}");
            (i, run(&client, sh(&script)).await)
        }
    });
    for (i, out) in futures_join_all(runs).await {
        let expected: String = (0..2000).map(|n| format!("{i}-{n}\n")).collect();
        assert!(text(&out.stdout) == expected, "exec {i} output mixed up");
        assert_eq!(text(&out.stderr), format!("e{i}\n"));
        assert_eq!(out.status.code, Some(i));
    }
}

/// `join_all` without pulling in the futures crate: spawn and await in order.
async fn futures_join_all<F, T>(futs: impl Iterator<Item = F>) -> Vec<T>
where
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.expect("task completes"));
    }
    out
}

#[tokio::test]
async fn exec_large_output_small_window_arrives_intact() {
    const SIZE: usize = 20 << 20;
    const WINDOW: u32 = 16 << 10;
    let agent = start_agent();
    let client = agent.connect(WINDOW).await;
    // Random content, so any reordering, loss or duplication changes the hash.
    let path = std::env::temp_dir().join(format!("kiln-large-{}", std::process::id()));
    let mut data = vec![0u8; SIZE];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    std::fs::write(&path, &data).expect("write fixture");
    let expected = Sha256::digest(&data);
    drop(data);

    let mut session = client
        .exec(ExecRequest::new([
            "head",
            "-c",
            &SIZE.to_string(),
            &path.display().to_string(),
        ]))
        .await
        .expect("exec starts");
    // While the exec is stalled on credit, the channel keeps serving other requests.
    client
        .ping()
        .await
        .expect("pong while an exec waits for credit");
    let mut hasher = Sha256::new();
    let mut received = 0usize;
    let status = loop {
        match session.next_event().await {
            Some(ExecEvent::Stdout(b)) => {
                // The host never holds more than the window for one exec.
                assert!(b.len() <= WINDOW as usize, "event of {} bytes", b.len());
                received += b.len();
                hasher.update(&b);
            }
            Some(ExecEvent::Stderr(b)) => panic!("stderr: {b:?}"),
            Some(ExecEvent::Exit(status)) => break status,
            None => panic!("channel died: {:?}", session.close_reason()),
        }
    };
    std::fs::remove_file(&path).expect("cleanup");
    assert_eq!(status.code, Some(0));
    assert_eq!(received, SIZE);
    assert_eq!(hasher.finalize(), expected);
}

#[tokio::test]
async fn exec_stalled_on_credit_does_not_block_other_execs() {
    let agent = start_agent();
    let client = agent.connect(4 << 10).await;
    let mut stalled = client
        .exec(ExecRequest::new(["yes", "stalled"]))
        .await
        .expect("exec starts");
    let out = run(&client, ExecRequest::new(["echo", "independent"])).await;
    assert_eq!(text(&out.stdout), "independent\n");
    assert!(matches!(
        stalled.next_event().await,
        Some(ExecEvent::Stdout(_))
    ));
    stalled.signal(9).await.expect("signal");
    while let Some(ev) = stalled.next_event().await {
        if let ExecEvent::Exit(status) = ev {
            assert_eq!(status.signal, Some(9));
        }
    }
}

#[tokio::test]
async fn exec_background_holder_of_stdout_does_not_block_exit() {
    let agent = start_agent();
    let client = agent.connect(64 << 10).await;
    // The background sleep holds stdout far longer than `run`'s guard (60 s): the exec ends
    // within the guard only if the agent stops draining once the pipe lingers silent after the
    // leader exited.
    let out = run(&client, sh("sleep 600 & echo $!; echo done")).await;
    let stdout = text(&out.stdout);
    let mut lines = stdout.lines();
    let holder: i32 = lines
        .next()
        .and_then(|l| l.parse().ok())
        .expect("the background pid first");
    assert_eq!(lines.collect::<Vec<_>>(), ["done"]);
    assert_eq!(out.status.code, Some(0));
    // The holder outlived the exec (so the exec really ended while stdout was still held).
    let alive = std::fs::read_to_string(format!("/proc/{holder}/stat"))
        .is_ok_and(|stat| !stat.rsplit(") ").next().is_some_and(|s| s.starts_with('Z')));
    let _ = std::process::Command::new("kill")
        .args(["-KILL", &holder.to_string()])
        .status();
    assert!(alive, "the background holder {holder} was still running");
}

#[tokio::test]
async fn connect_after_client_dropped_starts_clean_session() {
    let mut agent = start_agent();
    let first = agent.connect(64 << 10).await;
    let session = first
        .exec(sh("echo ready; exec sleep 60"))
        .await
        .expect("exec starts");
    let pid = session.pid().expect("spawned");
    drop(session);
    drop(first);
    assert_eq!(agent.ends.recv().await, Some(ServeEnd::HostGone));
    wait_dead(pid).await;
    let second = agent.connect(64 << 10).await;
    second.ping().await.expect("pong");
    let out = run(&second, ExecRequest::new(["echo", "again"])).await;
    assert_eq!(text(&out.stdout), "again\n");
}

#[tokio::test]
async fn connect_on_same_stream_skips_stale_session() {
    let agent = start_agent();
    let (agent_side, proxy_side) = tokio::io::duplex(PIPE);
    agent.conns.send(agent_side).expect("agent alive");
    let proxy = start_proxy(proxy_side);

    let (host1, proxy1) = tokio::io::duplex(PIPE);
    proxy.send(proxy1).expect("proxy alive");
    let (first, _) = AgentClient::connect_with(host1, config(8 << 10))
        .await
        .expect("first handshake");
    // An endless producer, partially consumed: the agent has output queued and in flight.
    let mut noisy = first
        .exec(ExecRequest::new(["yes", "stale"]))
        .await
        .expect("exec");
    let pid = noisy.pid().expect("spawned");
    assert!(matches!(
        noisy.next_event().await,
        Some(ExecEvent::Stdout(_))
    ));

    // A new client takes over the same agent stream without the agent seeing an EOF; the
    // first client is still alive but cut off, so it sends no kill: the SYNC must clean up.
    let (host2, proxy2) = tokio::io::duplex(PIPE);
    proxy.send(proxy2).expect("proxy alive");
    let (second, _) = AgentClient::connect_with(host2, config(8 << 10))
        .await
        .expect("second handshake");
    wait_dead(pid).await;
    second.ping().await.expect("pong");
    let out = run(&second, ExecRequest::new(["echo", "fresh"])).await;
    assert_eq!(text(&out.stdout), "fresh\n");
    assert!(out.stderr.is_empty());
    first.closed().await;
    drop(noisy);
}

#[tokio::test]
async fn connect_skips_garbage_before_sync() {
    let agent = start_agent();
    let (mut host, guest) = tokio::io::duplex(PIPE);
    agent.conns.send(guest).expect("agent alive");
    // Junk, a frame-looking header, and a SYNC header with a corrupt body.
    host.write_all(b"\x00\xffnot a frame\x9f\x6b\x03\x00\x00\x00\x00\x00\x05\x00\x00\x00{}")
        .await
        .expect("write junk");
    host.write_all(b"\x9f\x6b\x01\x00\x00\x00\x00\x00\x13\x00\x00\x00KILN-XXX")
        .await
        .expect("write junk");
    let (client, _) = AgentClient::connect_with(host, config(64 << 10))
        .await
        .expect("handshake after garbage");
    client.ping().await.expect("pong");
}

#[tokio::test]
async fn virtio_port_over_socketpair_serves_client() {
    // The production port wrapper (edge-triggered readiness) under the real protocol.
    let (a, b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    a.set_nonblocking(true).expect("nonblocking");
    b.set_nonblocking(true).expect("nonblocking");
    let port =
        VirtioPort::from_file(std::fs::File::from(std::os::fd::OwnedFd::from(a))).expect("port");
    let reaper = Reaper::start(ReapMode::RegisteredOnly).expect("sigchld listener");
    let agent = Agent::new(AgentConfig::default(), reaper);
    let serve = tokio::spawn(async move { agent.serve(port).await });
    let host = tokio::net::UnixStream::from_std(b).expect("tokio stream");
    let (client, _) = AgentClient::connect_with(host, config(8 << 10))
        .await
        .expect("handshake");
    client.ping().await.expect("pong");
    let out = run(
        &client,
        ExecRequest::new(["head", "-c", "3000000", "/dev/zero"]),
    )
    .await;
    assert_eq!(out.stdout.len(), 3_000_000);
    drop(client);
    let end = serve.await.expect("serve task").expect("serve");
    assert_eq!(end, ServeEnd::HostGone);
}

#[tokio::test]
async fn shutdown_is_acknowledged_and_ends_serve() {
    let mut agent = start_agent();
    let client = agent.connect(64 << 10).await;
    client.shutdown().await.expect("shutdown acknowledged");
    assert_eq!(agent.ends.recv().await, Some(ServeEnd::Shutdown));
    client.closed().await;
}
