//! `apply_identity` end to end: the real agent (with a recording [`FakeIdentity`], so the
//! host's clock, hostname, RNG and machine id are never touched) and the real host client
//! over `tokio::io::duplex`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use kiln_agent::identity::{IdentityCall, IdentityStep, RESTORE_ID_ENV};
use kiln_agent::{Agent, AgentConfig, FakeIdentity, IdentitySink, ReapMode, Reaper};
use kiln_agent_host::{
    AgentClient, AgentError, ClientConfig, Entropy, ErrorCode, ExecRequest, FEATURE_IDENTITY_V1,
    GuestIdentity, Hostname, MachineId, RestoreId, UnixNanos,
};
use tokio::io::DuplexStream;
use tokio::sync::mpsc;

const HANDSHAKE: Duration = Duration::from_secs(10);
const EXEC_GUARD: Duration = Duration::from_secs(60);

/// An agent serving every connection sent to it, one after another.
fn start_agent(sink: Option<Arc<dyn IdentitySink>>) -> mpsc::UnboundedSender<DuplexStream> {
    let reaper = Reaper::start(ReapMode::RegisteredOnly).expect("sigchld listener");
    let mut agent = Agent::new(AgentConfig::default(), reaper);
    if let Some(sink) = sink {
        agent = agent.with_identity_sink(sink);
    }
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

fn config() -> ClientConfig {
    ClientConfig {
        handshake_deadline: HANDSHAKE,
        ..ClientConfig::default()
    }
}

fn pipe(conns: &mpsc::UnboundedSender<DuplexStream>) -> DuplexStream {
    let (host, guest) = tokio::io::duplex(64 << 10);
    conns.send(guest).expect("agent task alive");
    host
}

fn identity(seed: u8) -> GuestIdentity {
    GuestIdentity {
        restore_id: RestoreId::from_bytes([seed; 16]),
        entropy: Entropy::new(vec![seed; 64]).expect("valid"),
        wall_clock_unix_ns: UnixNanos::now().expect("host clock is sane"),
        hostname: Hostname::new(format!("sbx-{seed}")).expect("valid"),
        machine_id: MachineId::from_bytes([seed.wrapping_add(1); 16]).expect("valid"),
    }
}

fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "kiln-agent-identity-e2e-{name}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir is writable");
    dir
}

/// Runs `script` with `sh -c` and returns its stdout.
async fn sh(client: &AgentClient, script: &str) -> String {
    let exec = async {
        client
            .exec(ExecRequest::new(["sh", "-c", script]))
            .await
            .expect("exec starts")
            .collect()
            .await
            .expect("exec completes")
    };
    let out = tokio::time::timeout(EXEC_GUARD, exec)
        .await
        .expect("exec finished within the guard time");
    assert_eq!(out.status.code, Some(0), "{script}");
    String::from_utf8(out.stdout).expect("utf-8 output")
}

#[tokio::test]
async fn identity_applied_in_order_and_visible_to_later_execs() {
    let dir = scratch_dir("applied");
    let fake = Arc::new(FakeIdentity::new().with_files_dir(&dir));
    let conns = start_agent(Some(Arc::clone(&fake) as Arc<dyn IdentitySink>));
    let ident = identity(7);

    let (client, info, ack) = AgentClient::connect_restored(pipe(&conns), config(), &ident)
        .await
        .expect("restored connection");
    assert!(info.features.iter().any(|f| f == FEATURE_IDENTITY_V1));
    assert_eq!(ack.restore_id, ident.restore_id);
    assert!(ack.entropy_credited && ack.rng_reseeded);
    assert!(ack.clock_set && ack.hostname_set && ack.machine_id_written);
    assert_eq!(
        fake.calls(),
        vec![
            IdentityCall::Rng { len: 64 },
            IdentityCall::Clock(ident.wall_clock_unix_ns),
            IdentityCall::Hostname(ident.hostname.clone()),
            IdentityCall::MachineId(ident.machine_id.clone()),
            IdentityCall::RestoreId(ident.restore_id.clone()),
        ]
    );

    let script = format!(
        "echo \"${RESTORE_ID_ENV}\"; cat {}/restore-id {}/machine-id",
        dir.display(),
        dir.display()
    );
    let expected = format!(
        "{id}\n{id}\n{mid}\n",
        id = ident.restore_id,
        mid = ident.machine_id
    );
    assert_eq!(sh(&client, &script).await, expected);

    // A new host connection (new session) keeps the identity: it belongs to the guest.
    drop(client);
    let (client, _) = AgentClient::connect_with(pipe(&conns), config())
        .await
        .expect("reconnect");
    let env = format!("echo \"${RESTORE_ID_ENV}\"");
    assert_eq!(sh(&client, &env).await, format!("{}\n", ident.restore_id));

    // The next restore replaces it.
    let next = identity(9);
    client.apply_identity(&next).await.expect("second identity");
    assert_eq!(sh(&client, &env).await, format!("{}\n", next.restore_id));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn identity_failed_step_is_an_error_and_no_restore_id_is_exported() {
    let fake = Arc::new(FakeIdentity::new().failing_at(IdentityStep::Hostname));
    let conns = start_agent(Some(Arc::clone(&fake) as Arc<dyn IdentitySink>));
    let (client, _) = AgentClient::connect_with(pipe(&conns), config())
        .await
        .expect("handshake");
    let err = client
        .apply_identity(&identity(3))
        .await
        .expect_err("the hostname step fails");
    match err {
        AgentError::Remote { op, code, message } => {
            assert_eq!(op, "apply_identity");
            assert_eq!(code, ErrorCode::IdentityFailed);
            assert!(message.contains("set the hostname"), "{message}");
            assert!(message.contains("already applied"), "{message}");
        }
        other => panic!("expected a remote error, got {other:?}"),
    }
    let steps: Vec<IdentityStep> = fake.calls().iter().map(IdentityCall::step).collect();
    assert_eq!(
        steps,
        [
            IdentityStep::Rng,
            IdentityStep::Clock,
            IdentityStep::Hostname
        ]
    );
    let env = format!("echo \"${{{RESTORE_ID_ENV}-unset}}\"");
    assert_eq!(sh(&client, &env).await, "unset\n");
}

#[tokio::test]
async fn identity_without_sink_is_unsupported_and_not_advertised() {
    let conns = start_agent(None);
    let (client, info) = AgentClient::connect_with(pipe(&conns), config())
        .await
        .expect("handshake");
    assert!(!info.features.iter().any(|f| f == FEATURE_IDENTITY_V1));
    let err = client
        .apply_identity(&identity(4))
        .await
        .expect_err("no sink");
    assert!(
        matches!(
            err,
            AgentError::Remote {
                code: ErrorCode::Unsupported,
                ..
            }
        ),
        "{err:?}"
    );
    // The session is still usable.
    client.ping().await.expect("pong");
}
