//! TCP tunnels end to end: the real agent (session + tunnel tasks) and the real host client
//! (`kiln_agent_host::TcpTunnel`) over `tokio::io::duplex`, with the tunnelled servers on
//! this host's loopback. No VM, no root.

use std::net::SocketAddr;
use std::time::Duration;

use kiln_agent_host::{
    AgentClient, AgentError, ClientConfig, ErrorCode, ExecRequest, FEATURE_TCP_V1, TcpTunnel,
};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use kiln_agent::{Agent, AgentConfig, ReapMode, Reaper};

mod support;
use support::start_proxy;

const HANDSHAKE: Duration = Duration::from_secs(10);
/// Like a unix socket's buffer.
const PIPE: usize = 64 << 10;
/// Upper bound for any one step of these tests: turns a hang into a failure.
const GUARD: Duration = Duration::from_secs(60);

/// An agent serving every connection sent to it, one after another.
fn start_agent(config: AgentConfig) -> mpsc::UnboundedSender<DuplexStream> {
    let reaper = Reaper::start(ReapMode::RegisteredOnly).expect("sigchld listener");
    let agent = Agent::new(config, reaper);
    let (conns, mut rx) = mpsc::unbounded_channel::<DuplexStream>();
    tokio::spawn(async move {
        while let Some(io) = rx.recv().await {
            agent
                .serve(io)
                .await
                .expect("serve never fails on a duplex");
        }
    });
    conns
}

fn client_config() -> ClientConfig {
    ClientConfig {
        handshake_deadline: HANDSHAKE,
        tunnel_window: 64 << 10,
        ..ClientConfig::default()
    }
}

async fn connect_over(host: DuplexStream) -> AgentClient {
    let (client, info) = AgentClient::connect_with(host, client_config())
        .await
        .expect("handshake");
    assert!(info.features.iter().any(|f| f == FEATURE_TCP_V1));
    client
}

async fn connect(conns: &mpsc::UnboundedSender<DuplexStream>) -> AgentClient {
    let (host, guest) = tokio::io::duplex(PIPE);
    conns.send(guest).expect("agent task alive");
    connect_over(host).await
}

async fn guarded<F: std::future::Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(GUARD, f)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {GUARD:?}"))
}

async fn listener() -> (TcpListener, u16) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = l.local_addr().expect("local addr").port();
    (l, port)
}

async fn open(client: &AgentClient, port: u16) -> TcpTunnel {
    guarded("open_tcp", client.open_tcp(port))
        .await
        .expect("tunnel opens")
}

/// An echo server: every connection gets its bytes back, and EOF after the client's EOF.
async fn echo_server() -> u16 {
    let (l, port) = listener().await;
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut rd, mut wr) = conn.split();
                if tokio::io::copy(&mut rd, &mut wr).await.is_ok() {
                    let _ = wr.shutdown().await;
                }
            });
        }
    });
    port
}

/// Deterministic pseudo-random bytes (xorshift), so reordering or loss changes the hash.
fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Writes `data` and shuts down, while reading everything back; returns what was read.
async fn round_trip(tunnel: TcpTunnel, data: &[u8]) -> Vec<u8> {
    let (mut rd, mut wr) = tokio::io::split(tunnel);
    let send = async {
        wr.write_all(data).await.expect("tunnel write");
        wr.shutdown().await.expect("tunnel shutdown");
    };
    let receive = async {
        let mut got = Vec::new();
        rd.read_to_end(&mut got).await.expect("tunnel read");
        got
    };
    let ((), got) = guarded("round trip", async { tokio::join!(send, receive) }).await;
    got
}

#[tokio::test]
async fn tunnel_echo_moves_8_mib_each_way_intact() {
    const SIZE: usize = 8 << 20;
    let conns = start_agent(AgentConfig::default());
    let client = connect(&conns).await;
    let port = echo_server().await;
    let tunnel = open(&client, port).await;
    assert_eq!(tunnel.port(), port);
    let data = random_bytes(SIZE, 0x9E37_79B9_7F4A_7C15);
    let got = round_trip(tunnel, &data).await;
    // Both directions carried all 8 MiB (the echo only returns what arrived), and the read
    // side ended with EOF because the server shut down after the host did.
    assert_eq!(got.len(), SIZE);
    assert_eq!(Sha256::digest(&got), Sha256::digest(&data));
}

#[tokio::test]
async fn tunnel_copy_bidirectional_splices_a_host_socket() {
    const SIZE: usize = 3 << 20;
    let conns = start_agent(AgentConfig::default());
    let client = connect(&conns).await;
    let guest_port = echo_server().await;
    // A host-side "published port": accept one client and splice it to a tunnel.
    let (front, front_port) = listener().await;
    let splice = tokio::spawn(async move {
        let (mut conn, _) = front.accept().await.expect("accept");
        let mut tunnel = client.open_tcp(guest_port).await.expect("tunnel opens");
        tokio::io::copy_bidirectional(&mut conn, &mut tunnel).await
    });
    let user = TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], front_port)))
        .await
        .expect("connect to the published port");
    let (mut rd, mut wr) = user.into_split();
    let data = random_bytes(SIZE, 7);
    let send = async {
        wr.write_all(&data).await.expect("write");
        wr.shutdown().await.expect("shutdown");
    };
    let receive = async {
        let mut got = Vec::new();
        rd.read_to_end(&mut got).await.expect("read");
        got
    };
    let ((), got) = guarded("splice", async { tokio::join!(send, receive) }).await;
    assert!(got == data, "bytes through the splice differ");
    let (up, down) = guarded("splice end", splice)
        .await
        .expect("splice task")
        .expect("copy_bidirectional succeeds");
    assert_eq!((up, down), (SIZE as u64, SIZE as u64));
}

#[tokio::test]
async fn tunnel_host_shutdown_reaches_guest_socket_as_eof() {
    let conns = start_agent(AgentConfig::default());
    let client = connect(&conns).await;
    // Reads to EOF, then answers with what it got and closes.
    let (l, port) = listener().await;
    tokio::spawn(async move {
        let (mut conn, _) = l.accept().await.expect("accept");
        let mut got = Vec::new();
        conn.read_to_end(&mut got).await.expect("server read");
        let answer = format!("got {} bytes: {}", got.len(), String::from_utf8_lossy(&got));
        conn.write_all(answer.as_bytes())
            .await
            .expect("server write");
    });
    let tunnel = open(&client, port).await;
    let got = round_trip(tunnel, b"hello").await;
    assert_eq!(String::from_utf8_lossy(&got), "got 5 bytes: hello");
}

#[tokio::test]
async fn tunnel_guest_eof_reads_zero_and_writes_still_flow() {
    let conns = start_agent(AgentConfig::default());
    let client = connect(&conns).await;
    let (l, port) = listener().await;
    let (got_tx, mut got_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let (mut conn, _) = l.accept().await.expect("accept");
        conn.write_all(b"banner").await.expect("server write");
        conn.shutdown().await.expect("server shutdown");
        let mut got = Vec::new();
        conn.read_to_end(&mut got).await.expect("server read");
        got_tx.send(got).expect("test alive");
    });
    let mut tunnel = open(&client, port).await;
    let mut banner = Vec::new();
    guarded("read to eof", tunnel.read_to_end(&mut banner))
        .await
        .expect("read");
    assert_eq!(banner, b"banner");
    // Still EOF on a second read, and the other direction is open.
    let mut buf = [0u8; 8];
    assert_eq!(tunnel.read(&mut buf).await.expect("read after eof"), 0);
    tunnel.write_all(b"after eof").await.expect("write");
    tunnel.shutdown().await.expect("shutdown");
    let got = guarded("server read", got_rx.recv())
        .await
        .expect("server done");
    assert_eq!(got, b"after eof");
}

#[tokio::test]
async fn tunnel_connection_refused_is_a_clear_error() {
    let conns = start_agent(AgentConfig::default());
    let client = connect(&conns).await;
    // A port nothing listens on: bind one, then let it go.
    let (l, port) = listener().await;
    drop(l);
    match guarded("open_tcp", client.open_tcp(port)).await {
        Err(AgentError::Remote { op, code, message }) => {
            assert_eq!(op, "tcp_connect");
            assert_eq!(code, ErrorCode::ConnectFailed);
            assert_eq!(message, format!("connection to 127.0.0.1:{port} refused"));
        }
        other => panic!("expected connect_failed, got {other:?}"),
    }
    // Port 0 is rejected before any connect.
    match client.open_tcp(0).await {
        Err(AgentError::Remote { code, .. }) => assert_eq!(code, ErrorCode::BadRequest),
        other => panic!("expected bad_request, got {other:?}"),
    }
    // The session is still usable.
    client.ping().await.expect("pong");
}

#[tokio::test]
async fn tunnel_twenty_concurrent_tunnels_keep_bytes_apart() {
    const SIZE: usize = 256 << 10;
    let conns = start_agent(AgentConfig::default());
    let client = connect(&conns).await;
    let port = echo_server().await;
    let mut handles = Vec::new();
    for i in 0..20u64 {
        let client = client.clone();
        handles.push(tokio::spawn(async move {
            let tunnel = client.open_tcp(port).await.expect("tunnel opens");
            let data = random_bytes(SIZE, i + 1);
            let got = round_trip(tunnel, &data).await;
            (data, got)
        }));
    }
    for (i, h) in handles.into_iter().enumerate() {
        let (data, got) = guarded("tunnel", h).await.expect("task");
        assert!(got == data, "tunnel {i} bytes differ ({} bytes)", got.len());
    }
}

#[tokio::test]
async fn tunnel_reset_by_server_fails_reads_with_connection_reset() {
    let conns = start_agent(AgentConfig::default());
    let client = connect(&conns).await;
    let (l, port) = listener().await;
    let (go_tx, mut go_rx) = mpsc::unbounded_channel::<()>();
    tokio::spawn(async move {
        let (conn, _) = l.accept().await.expect("accept");
        go_rx.recv().await;
        // SO_LINGER 0: close sends RST instead of FIN.
        conn.set_zero_linger().expect("linger");
        drop(conn);
    });
    let mut tunnel = open(&client, port).await;
    go_tx.send(()).expect("server alive");
    let mut buf = [0u8; 16];
    let err = guarded("read", tunnel.read(&mut buf))
        .await
        .expect_err("a reset is an error, not EOF");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
    assert!(
        err.to_string().contains("connection reset by peer"),
        "{err}"
    );
    let err = tunnel.write_all(b"x").await.expect_err("writes fail too");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
}

#[tokio::test]
async fn tunnel_dropped_by_host_closes_guest_socket() {
    let conns = start_agent(AgentConfig::default());
    let client = connect(&conns).await;
    let (l, port) = listener().await;
    let (got_tx, mut got_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let (mut conn, _) = l.accept().await.expect("accept");
        let mut got = Vec::new();
        // EOF or a reset: either way the guest closed its socket.
        let end = conn.read_to_end(&mut got).await.map(|_| ());
        got_tx.send((got, end)).expect("test alive");
    });
    let mut tunnel = open(&client, port).await;
    tunnel.write_all(b"last words").await.expect("write");
    drop(tunnel);
    let (got, _end) = guarded("server sees the close", got_rx.recv())
        .await
        .expect("server done");
    assert!(b"last words".starts_with(&got), "{got:?}");
    client.ping().await.expect("pong");
}

#[tokio::test]
async fn tunnel_sockets_are_closed_on_resync() {
    let conns = start_agent(AgentConfig::default());
    let (agent_side, proxy_side) = tokio::io::duplex(PIPE);
    conns.send(agent_side).expect("agent alive");
    let proxy = start_proxy(proxy_side);

    let (l, port) = listener().await;
    let (closed_tx, mut closed_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = l.accept().await {
            let closed_tx = closed_tx.clone();
            tokio::spawn(async move {
                let mut sink = Vec::new();
                let _ = conn.read_to_end(&mut sink).await;
                let _ = closed_tx.send(sink.len());
            });
        }
    });

    let (host1, proxy1) = tokio::io::duplex(PIPE);
    proxy.send(proxy1).expect("proxy alive");
    let first = connect_over(host1).await;
    let mut tunnels = Vec::new();
    for _ in 0..3 {
        let mut t = open(&first, port).await;
        t.write_all(b"x").await.expect("write");
        tunnels.push(t);
    }
    // A new host takes over the agent stream without the agent seeing an EOF; the first
    // client is cut off, so it sends no tcp_close: the SYNC alone must close the sockets.
    let (host2, proxy2) = tokio::io::duplex(PIPE);
    proxy.send(proxy2).expect("proxy alive");
    let second = connect_over(host2).await;
    for _ in 0..3 {
        guarded("guest socket closed by the resync", closed_rx.recv())
            .await
            .expect("server alive");
    }
    // The new session tunnels normally.
    let port = echo_server().await;
    let t = open(&second, port).await;
    assert_eq!(round_trip(t, b"fresh").await, b"fresh");
    drop(tunnels);
}

#[tokio::test]
async fn tunnel_busy_tunnels_do_not_block_execs() {
    let conns = start_agent(AgentConfig::default());
    let client = connect(&conns).await;
    // One guest server never reads (its tunnel stalls on credit toward the guest), one
    // streams forever (its tunnel stalls on the host's credit: nobody reads it).
    let (l, port) = listener().await;
    tokio::spawn(async move {
        let (silent, _) = l.accept().await.expect("accept");
        let (mut firehose, _) = l.accept().await.expect("accept");
        let chunk = vec![0x5a; 64 << 10];
        while firehose.write_all(&chunk).await.is_ok() {}
        drop(silent);
    });
    let mut stalled = open(&client, port).await;
    let flooding = open(&client, port).await;
    let stuck_writer = tokio::spawn(async move {
        let chunk = vec![0xa5; 64 << 10];
        while stalled.write_all(&chunk).await.is_ok() {}
    });
    // A third tunnel is busy moving bytes the whole time.
    let echo_port = echo_server().await;
    let busy = {
        let client = client.clone();
        tokio::spawn(async move {
            let data = random_bytes(4 << 20, 99);
            let t = client.open_tcp(echo_port).await.expect("tunnel opens");
            round_trip(t, &data).await == data
        })
    };
    let out = guarded("exec beside busy tunnels", async {
        client
            .exec(ExecRequest::new(["echo", "independent"]))
            .await
            .expect("exec starts")
            .collect()
            .await
            .expect("exec completes")
    })
    .await;
    assert_eq!(out.stdout, b"independent\n");
    assert_eq!(out.status.code, Some(0));
    assert!(
        guarded("busy tunnel", busy).await.expect("task"),
        "busy tunnel bytes differ"
    );
    guarded("ping", client.ping()).await.expect("pong");
    stuck_writer.abort();
    drop(flooding);
}

#[tokio::test]
async fn tunnel_cap_is_enforced() {
    let conns = start_agent(AgentConfig {
        max_tunnels: 2,
        ..AgentConfig::default()
    });
    let client = connect(&conns).await;
    let port = echo_server().await;
    let a = open(&client, port).await;
    let b = open(&client, port).await;
    match client.open_tcp(port).await {
        Err(AgentError::Remote { code, message, .. }) => {
            assert_eq!(code, ErrorCode::TooManyStreams);
            assert!(message.contains("at most 2 tcp tunnels"), "{message}");
        }
        other => panic!("expected too_many_streams, got {other:?}"),
    }
    // Execs are counted apart.
    let out = guarded("exec", async {
        client
            .exec(ExecRequest::new(["true"]))
            .await
            .expect("exec starts")
            .collect()
            .await
            .expect("exec completes")
    })
    .await;
    assert_eq!(out.status.code, Some(0));
    drop((a, b));
}
