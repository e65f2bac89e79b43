//! Replays QMP transcripts from a fake server over a unix socket pair.

use std::time::Duration;

use kiln_qmp::commands::{
    Cont, MigrateSetCapabilities, MigrationCapabilityStatus, QueryMigrateCapabilities, QueryStatus,
    RunState, Stop, X_IGNORE_SHARED,
};
use kiln_qmp::{MAX_LINE_BYTES, QmpClient, QmpError, QmpVersion};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, ReadHalf, WriteHalf};
use tokio::net::UnixStream;

/// Generous bound so a bug shows up as a failed test rather than a hung one.
const LIMIT: Duration = Duration::from_secs(10);

const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7+deb12u18+b3"}, "capabilities": ["oob"]}}"#;

struct FakeQmp {
    r: BufReader<ReadHalf<UnixStream>>,
    w: WriteHalf<UnixStream>,
}

impl FakeQmp {
    async fn send_line(&mut self, line: &str) {
        self.w.write_all(line.as_bytes()).await.expect("fake write");
        self.w.write_all(b"\r\n").await.expect("fake write");
    }

    async fn send(&mut self, v: Value) {
        self.send_line(&v.to_string()).await;
    }

    async fn recv(&mut self) -> Value {
        let mut line = String::new();
        let n = tokio::time::timeout(LIMIT, self.r.read_line(&mut line))
            .await
            .expect("client sent nothing")
            .expect("read");
        assert!(n > 0, "client closed the connection");
        serde_json::from_str(&line).expect("client sent json")
    }

    /// Reads one command, checks its name, returns (id, arguments).
    async fn expect(&mut self, name: &str) -> (Value, Value) {
        let m = self.recv().await;
        assert_eq!(m["execute"], name, "unexpected command {m}");
        (
            m["id"].clone(),
            m.get("arguments").cloned().unwrap_or(Value::Null),
        )
    }
}

async fn connect() -> (QmpClient, FakeQmp) {
    let (a, b) = UnixStream::pair().expect("socketpair");
    let (r, w) = tokio::io::split(b);
    let mut fake = FakeQmp {
        r: BufReader::new(r),
        w,
    };
    let server = async {
        fake.send_line(GREETING).await;
        let (id, args) = fake.expect("qmp_capabilities").await;
        assert_eq!(args, Value::Null);
        fake.send(json!({"return": {}, "id": id})).await;
        fake
    };
    let (client, fake) = tokio::time::timeout(LIMIT, async {
        tokio::join!(QmpClient::handshake(a), server)
    })
    .await
    .expect("handshake finished");
    (client.expect("handshake succeeds"), fake)
}

#[tokio::test]
async fn handshake_greeting_captures_version() {
    let (client, _fake) = connect().await;
    assert_eq!(
        client.version(),
        QmpVersion {
            major: 7,
            minor: 2,
            micro: 22
        }
    );
    assert_eq!(client.greeting().capabilities, vec!["oob".to_owned()]);
    assert!(!client.is_closed());
}

#[tokio::test]
async fn execute_replies_out_of_order_with_events_reach_their_callers() {
    let (client, mut fake) = connect().await;
    let mut events = client.events();
    let c1 = client.clone();
    let c2 = client.clone();
    let status = tokio::spawn(async move { c1.execute(&QueryStatus).await });
    let caps = tokio::spawn(async move { c2.execute(&QueryMigrateCapabilities).await });

    // Read both commands (in whatever order the tasks sent them), then answer in reverse.
    let mut ids = std::collections::HashMap::new();
    for _ in 0..2 {
        let m = fake.recv().await;
        ids.insert(
            m["execute"].as_str().expect("name").to_owned(),
            m["id"].clone(),
        );
    }
    fake.send(json!({"event": "RESUME", "data": {}, "timestamp": {"seconds": 1700000000, "microseconds": 5}}))
        .await;
    fake.send(json!({"return": [
        {"capability": "xbzrle", "state": false},
        {"capability": "x-ignore-shared", "state": false}
    ], "id": ids["query-migrate-capabilities"]}))
        .await;
    fake.send(json!({"event": "STOP", "timestamp": {"seconds": 1700000001, "microseconds": 0}}))
        .await;
    fake.send(json!({"return": {"status": "paused", "singlestep": false, "running": false}, "id": ids["query-status"]}))
        .await;

    let caps = tokio::time::timeout(LIMIT, caps)
        .await
        .expect("caps answered")
        .expect("join")
        .expect("caps ok");
    assert!(
        caps.iter()
            .any(|c| c.capability == X_IGNORE_SHARED && !c.state)
    );
    let status = tokio::time::timeout(LIMIT, status)
        .await
        .expect("status answered")
        .expect("join")
        .expect("ok");
    assert_eq!(status.status, RunState::Paused);
    assert!(!status.running);

    let e1 = events.recv().await.expect("first event");
    assert_eq!(e1.event, "RESUME");
    assert_eq!(e1.timestamp.seconds, 1_700_000_000);
    let e2 = events.recv().await.expect("second event");
    assert_eq!(e2.event, "STOP");
    assert_eq!(e2.data, json!({}));
}

#[tokio::test]
async fn execute_error_reply_maps_to_command_error() {
    let (client, mut fake) = connect().await;
    let call = tokio::spawn(async move {
        let r = client.execute(&Cont).await;
        (client, r)
    });
    let (id, _) = fake.expect("cont").await;
    fake.send(json!({"error": {"class": "GenericError", "desc": "Migration is not finalized yet"}, "id": id}))
        .await;
    let (client, r) = tokio::time::timeout(LIMIT, call)
        .await
        .expect("answered")
        .expect("join");
    match r {
        Err(QmpError::Command {
            command,
            class,
            desc,
        }) => {
            assert_eq!(command, "cont");
            assert_eq!(class, "GenericError");
            assert_eq!(desc, "Migration is not finalized yet");
        }
        other => panic!("expected a command error, got {other:?}"),
    }
    // The connection survives an error reply.
    let call = tokio::spawn(async move { client.execute(&Stop).await });
    let (id, _) = fake.expect("stop").await;
    fake.send(json!({"return": {}, "id": id})).await;
    tokio::time::timeout(LIMIT, call)
        .await
        .expect("answered")
        .expect("join")
        .expect("stop ok");
}

#[tokio::test]
async fn execute_arguments_are_sent_as_json_object() {
    let (client, mut fake) = connect().await;
    let call = tokio::spawn(async move {
        client
            .execute(&MigrateSetCapabilities {
                capabilities: vec![MigrationCapabilityStatus {
                    capability: X_IGNORE_SHARED.to_owned(),
                    state: true,
                }],
            })
            .await
    });
    let (id, args) = fake.expect("migrate-set-capabilities").await;
    assert_eq!(
        args,
        json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]})
    );
    fake.send(json!({"return": {}, "id": id})).await;
    tokio::time::timeout(LIMIT, call)
        .await
        .expect("answered")
        .expect("join")
        .expect("ok");
}

#[tokio::test]
async fn execute_server_closes_mid_command_fails_instead_of_hanging() {
    let (client, mut fake) = connect().await;
    let c = client.clone();
    let call = tokio::spawn(async move { c.execute(&QueryStatus).await });
    let _ = fake.expect("query-status").await;
    drop(fake);
    let r = tokio::time::timeout(LIMIT, call)
        .await
        .expect("did not hang")
        .expect("join");
    assert!(matches!(r, Err(QmpError::Disconnected { .. })), "{r:?}");
    tokio::time::timeout(LIMIT, client.closed())
        .await
        .expect("closed resolves");
    assert!(client.is_closed());
    // Later commands fail at once.
    let r = tokio::time::timeout(LIMIT, client.execute(&Stop))
        .await
        .expect("did not hang");
    assert!(matches!(r, Err(QmpError::Disconnected { .. })), "{r:?}");
}

#[tokio::test]
async fn reader_overlong_line_closes_the_connection() {
    let (client, mut fake) = connect().await;
    let c = client.clone();
    let call = tokio::spawn(async move { c.execute(&QueryStatus).await });
    let _ = fake.expect("query-status").await;
    let writer = tokio::spawn(async move {
        let chunk = vec![b'x'; 64 * 1024];
        let mut sent = 0;
        // Stop once the client hangs up: it must not wait for the end of the line.
        while sent <= MAX_LINE_BYTES + chunk.len() {
            if fake.w.write_all(&chunk).await.is_err() {
                return true;
            }
            sent += chunk.len();
        }
        false
    });
    let r = tokio::time::timeout(LIMIT, call)
        .await
        .expect("did not hang")
        .expect("join");
    match r {
        Err(QmpError::Disconnected { reason }) => {
            assert!(reason.contains("longer than"), "{reason}")
        }
        other => panic!("expected disconnect, got {other:?}"),
    }
    drop(client);
    let _ = tokio::time::timeout(LIMIT, writer)
        .await
        .expect("writer finished");
}

#[tokio::test]
async fn execute_after_cancelled_command_still_matches_ids() {
    let (client, mut fake) = connect().await;
    // A caller gives up on a command; its late reply must not be delivered to the next one.
    let r = tokio::time::timeout(Duration::from_millis(1), client.execute(&QueryStatus)).await;
    assert!(r.is_err(), "nobody answered, so it must time out");
    let (stale_id, _) = fake.expect("query-status").await;
    let c = client.clone();
    let call = tokio::spawn(async move { c.execute(&QueryStatus).await });
    let (id, _) = fake.expect("query-status").await;
    assert_ne!(id, stale_id);
    fake.send(json!({"return": {"status": "prelaunch", "running": false}, "id": stale_id}))
        .await;
    fake.send(json!({"return": {"status": "running", "running": true}, "id": id}))
        .await;
    let s = tokio::time::timeout(LIMIT, call)
        .await
        .expect("answered")
        .expect("join")
        .expect("ok");
    assert_eq!(s.status, RunState::Running);
}

#[tokio::test]
async fn execute_unexpected_reply_shape_is_a_decode_error() {
    let (client, mut fake) = connect().await;
    let call = tokio::spawn(async move { client.execute(&QueryStatus).await });
    let (id, _) = fake.expect("query-status").await;
    fake.send(json!({"return": [1, 2, 3], "id": id})).await;
    let r = tokio::time::timeout(LIMIT, call)
        .await
        .expect("answered")
        .expect("join");
    assert!(
        matches!(r, Err(QmpError::Decode { ref command, .. }) if command == "query-status"),
        "{r:?}"
    );
}

#[tokio::test]
async fn handshake_malformed_greeting_is_an_error() {
    let (a, b) = UnixStream::pair().expect("socketpair");
    let (_r, mut w) = tokio::io::split(b);
    w.write_all(b"{\"hello\": 1}\r\n").await.expect("write");
    let r = tokio::time::timeout(LIMIT, QmpClient::handshake(a))
        .await
        .expect("did not hang");
    assert!(matches!(r, Err(QmpError::Greeting { .. })), "{r:?}");
}

#[tokio::test]
async fn handshake_server_closes_before_greeting_is_disconnected() {
    let (a, b) = UnixStream::pair().expect("socketpair");
    drop(b);
    let r = tokio::time::timeout(LIMIT, QmpClient::handshake(a))
        .await
        .expect("did not hang");
    assert!(matches!(r, Err(QmpError::Disconnected { .. })), "{r:?}");
}

#[tokio::test]
async fn handshake_capabilities_refused_is_an_error() {
    let (a, b) = UnixStream::pair().expect("socketpair");
    let (r, w) = tokio::io::split(b);
    let mut fake = FakeQmp {
        r: BufReader::new(r),
        w,
    };
    let server = async {
        fake.send_line(GREETING).await;
        let (id, _) = fake.expect("qmp_capabilities").await;
        fake.send(json!({"error": {"class": "CommandNotFound", "desc": "nope"}, "id": id}))
            .await;
    };
    let (r, ()) = tokio::time::timeout(LIMIT, async {
        tokio::join!(QmpClient::handshake(a), server)
    })
    .await
    .expect("did not hang");
    let e = r.expect_err("handshake must fail");
    assert!(e.is_command_class("CommandNotFound"), "{e:?}");
}
