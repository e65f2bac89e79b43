//! Host-client tests against a scripted fake guest (frames written by hand), for behaviour the
//! real agent never exhibits: stale acknowledgements, hostile credit overruns, sudden death,
//! identity and network acknowledgements that do not match the request. TCP tunnels: [`tunnel`]; file
//! transfers and listings: [`files`].
//! The real agent end to end is tested in `bins/kiln-agent/tests/`.

mod files;
mod tunnel;
mod violations;

use std::time::Duration;

use bytes::Bytes;
use kiln_agent_proto::{
    AgentInfo, DataChannel, Decoder, Entropy, ErrorBody, ErrorCode, ExecRequest, ExitStatus, Frame,
    GuestIdentity, GuestMessage, HostMessage, Hostname, IdentityAck, MachineId, Request, RequestId,
    Response, RestoreId, StreamId, SyncAckFrame, UnixNanos,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

use crate::{AgentClient, AgentError, ClientConfig, ClosedReason, ExecEvent};

const DEADLINE: Duration = Duration::from_secs(10);

struct FakeGuest {
    io: DuplexStream,
    decoder: Decoder,
}

impl FakeGuest {
    fn new(io: DuplexStream) -> FakeGuest {
        FakeGuest {
            io,
            decoder: Decoder::new(),
        }
    }

    async fn frame(&mut self) -> Option<Frame> {
        let mut buf = [0u8; 4096];
        loop {
            if let Some(f) = self.decoder.next_frame().expect("host sends valid frames") {
                return Some(f);
            }
            let n = self.io.read(&mut buf).await.expect("read");
            if n == 0 {
                return None;
            }
            self.decoder.feed(&buf[..n]);
        }
    }

    async fn send(&mut self, frame: Frame) {
        let bytes = frame.to_bytes().expect("valid frame");
        self.io.write_all(&bytes).await.expect("write");
    }

    async fn raw(&mut self, bytes: &[u8]) {
        self.io.write_all(bytes).await.expect("write");
    }

    async fn sync_nonce(&mut self) -> u64 {
        match self.frame().await {
            Some(Frame::Sync(s)) => s.nonce,
            other => panic!("expected sync, got {other:?}"),
        }
    }

    async fn ack(&mut self, nonce: u64, version: u16) {
        self.send(Frame::SyncAck(SyncAckFrame {
            nonce,
            version,
            info: info(),
        }))
        .await;
    }

    /// The next request, skipping WINDOW frames.
    async fn request(&mut self) -> (RequestId, Request) {
        loop {
            match self.frame().await {
                Some(Frame::Control(p)) => match HostMessage::from_payload(&p).expect("json") {
                    HostMessage::Request { id, request } => return (id, request),
                    other => panic!("expected a request, got {other:?}"),
                },
                Some(Frame::Window { .. }) => continue,
                other => panic!("expected a request, got {other:?}"),
            }
        }
    }

    async fn respond(&mut self, id: RequestId, response: Response) {
        let msg = GuestMessage::Response { id, response };
        self.send(msg.to_frame().expect("encodes")).await;
    }

    /// Completes a handshake and answers the first exec request; returns its stream.
    async fn accept_exec(&mut self) -> StreamId {
        let (id, req) = self.request().await;
        let Request::Exec { stream, .. } = req else {
            panic!("expected exec, got {req:?}");
        };
        self.respond(id, Response::ExecStarted { pid: Some(42) })
            .await;
        stream
    }
}

fn info() -> AgentInfo {
    AgentInfo {
        agent_version: "test".into(),
        pid: 1,
        kernel_release: None,
        features: vec![],
    }
}

fn config(output_window: u32) -> ClientConfig {
    ClientConfig {
        handshake_deadline: DEADLINE,
        output_window,
        ..ClientConfig::default()
    }
}

async fn connected(output_window: u32) -> (AgentClient, FakeGuest) {
    connected_with(config(output_window)).await
}

/// A client with `config`, handshaken with a fresh fake guest.
async fn connected_with(config: ClientConfig) -> (AgentClient, FakeGuest) {
    let (host, guest) = tokio::io::duplex(1 << 20);
    let mut guest = FakeGuest::new(guest);
    let connect = AgentClient::connect_with(host, config);
    let accept = async {
        let nonce = guest.sync_nonce().await;
        guest.ack(nonce, 1).await;
    };
    let (client, ()) = tokio::join!(connect, accept);
    let (client, _) = client.expect("handshake");
    (client, guest)
}

#[tokio::test]
async fn connect_stale_bytes_and_old_acks_are_skipped() {
    let (host, guest) = tokio::io::duplex(1 << 20);
    let mut guest = FakeGuest::new(guest);
    let connect = AgentClient::connect_with(host, config(1024));
    let accept = async {
        let nonce = guest.sync_nonce().await;
        // Leftovers of a previous session, an ack for someone else's nonce, garbage.
        guest
            .send(Frame::Data {
                stream: StreamId::FIRST,
                channel: DataChannel::Stdout,
                data: Bytes::from_static(b"stale"),
            })
            .await;
        guest.ack(nonce.wrapping_add(1), 1).await;
        guest.raw(b"\x9fk\x02garbage\x9f").await;
        guest.ack(nonce, 1).await;
    };
    let (client, ()) = tokio::join!(connect, accept);
    let (client, info) = client.expect("handshake succeeds");
    assert_eq!(info, self::info());
    drop(client);
}

#[tokio::test]
async fn connect_without_answer_times_out() {
    let (host, _guest) = tokio::io::duplex(1 << 20);
    let cfg = ClientConfig {
        handshake_deadline: Duration::from_millis(100),
        sync_interval: Duration::from_millis(20),
        ..ClientConfig::default()
    };
    let err = AgentClient::connect_with(host, cfg)
        .await
        .err()
        .expect("no guest, no session");
    assert!(
        matches!(err, AgentError::HandshakeTimeout { .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn connect_version_zero_is_a_mismatch() {
    let (host, guest) = tokio::io::duplex(1 << 20);
    let mut guest = FakeGuest::new(guest);
    let connect = AgentClient::connect_with(host, config(1024));
    let accept = async {
        let nonce = guest.sync_nonce().await;
        guest.ack(nonce, 0).await;
    };
    let (client, ()) = tokio::join!(connect, accept);
    let err = client.err().expect("no common version");
    assert!(
        matches!(err, AgentError::VersionMismatch { chosen: 0, .. }),
        "{err:?}"
    );
}

#[tokio::test]
async fn exec_output_overrun_closes_channel() {
    let (client, mut guest) = connected(16).await;
    let (session, stream) = tokio::join!(client.exec(ExecRequest::new(["x"])), guest.accept_exec());
    let mut session = session.expect("exec starts");
    guest
        .send(Frame::Data {
            stream,
            channel: DataChannel::Stdout,
            data: Bytes::from(vec![b'a'; 17]),
        })
        .await;
    client.closed().await;
    assert!(matches!(
        client.close_reason(),
        Some(ClosedReason::Violation { .. })
    ));
    assert_eq!(session.next_event().await, None);
    assert!(matches!(
        session.close_reason(),
        Some(AgentError::ChannelClosed(ClosedReason::Violation { .. }))
    ));
}

#[tokio::test]
async fn exec_channel_death_delivers_buffered_output_then_none() {
    let (client, mut guest) = connected(1024).await;
    let (session, stream) = tokio::join!(client.exec(ExecRequest::new(["x"])), guest.accept_exec());
    let mut session = session.expect("exec starts");
    guest
        .send(Frame::Data {
            stream,
            channel: DataChannel::Stderr,
            data: Bytes::from_static(b"partial"),
        })
        .await;
    drop(guest);
    assert_eq!(
        session.next_event().await,
        Some(ExecEvent::Stderr(Bytes::from_static(b"partial")))
    );
    assert_eq!(session.next_event().await, None);
    assert!(matches!(
        session.close_reason(),
        Some(AgentError::ChannelClosed(ClosedReason::Eof))
    ));
    let err = client.ping().await.expect_err("channel is dead");
    assert!(matches!(err, AgentError::ChannelClosed(_)), "{err:?}");
}

#[tokio::test]
async fn exec_consumed_output_is_granted_back() {
    let (client, mut guest) = connected(64).await;
    let (session, stream) = tokio::join!(client.exec(ExecRequest::new(["x"])), guest.accept_exec());
    let mut session = session.expect("exec starts");
    guest
        .send(Frame::Data {
            stream,
            channel: DataChannel::Stdout,
            data: Bytes::from(vec![b'o'; 64]),
        })
        .await;
    assert!(matches!(session.next_event().await, Some(ExecEvent::Stdout(b)) if b.len() == 64));
    match guest.frame().await {
        Some(Frame::Window {
            stream: s,
            increment,
        }) => {
            assert_eq!(s, stream);
            assert_eq!(increment, 64);
        }
        other => panic!("expected a window grant, got {other:?}"),
    }
    let exit = GuestMessage::Exit {
        stream,
        status: ExitStatus {
            code: Some(3),
            ..ExitStatus::default()
        },
    };
    guest.send(exit.to_frame().expect("encodes")).await;
    assert!(matches!(
        session.next_event().await,
        Some(ExecEvent::Exit(ExitStatus { code: Some(3), .. }))
    ));
    assert_eq!(session.next_event().await, None);
    assert!(session.close_reason().is_none());
}

#[tokio::test]
async fn exec_dropped_session_is_killed_and_credited() {
    let (client, mut guest) = connected(64).await;
    let (session, stream) = tokio::join!(client.exec(ExecRequest::new(["x"])), guest.accept_exec());
    let session = session.expect("exec starts");
    guest
        .send(Frame::Data {
            stream,
            channel: DataChannel::Stdout,
            data: Bytes::from(vec![b'o'; 10]),
        })
        .await;
    // Whether the output arrives before or after the drop, it must be credited back.
    drop(session);
    let mut saw_kill = false;
    let mut credited = 0;
    while !(saw_kill && credited >= 10) {
        match guest.frame().await {
            Some(Frame::Window { increment, .. }) => credited += increment,
            Some(Frame::Control(p)) => match HostMessage::from_payload(&p).expect("json") {
                HostMessage::Request {
                    request: Request::Signal { stream: s, signo },
                    ..
                } => {
                    assert_eq!((s, signo), (stream, 9));
                    saw_kill = true;
                }
                HostMessage::Request {
                    id,
                    request: Request::Ping,
                } => {
                    guest.respond(id, Response::Pong).await;
                }
                other => panic!("unexpected {other:?}"),
            },
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn exec_rejected_request_reports_remote_error() {
    let (client, mut guest) = connected(64).await;
    let answer = async {
        let (id, _) = guest.request().await;
        let msg = GuestMessage::Error {
            id: Some(id),
            error: kiln_agent_proto::ErrorBody {
                code: kiln_agent_proto::ErrorCode::BadCwd,
                message: "working directory /nope does not exist".into(),
            },
        };
        guest.send(msg.to_frame().expect("encodes")).await;
    };
    let (result, ()) = tokio::join!(client.exec(ExecRequest::new(["x"])), answer);
    match result {
        Err(AgentError::Remote { op, code, message }) => {
            assert_eq!(op, "exec");
            assert_eq!(code, kiln_agent_proto::ErrorCode::BadCwd);
            assert!(message.contains("/nope"));
        }
        Err(e) => panic!("unexpected error {e:?}"),
        Ok(_) => panic!("exec should fail"),
    }
}

fn identity() -> GuestIdentity {
    GuestIdentity {
        restore_id: RestoreId::from_bytes([0x5a; 16]),
        entropy: Entropy::new(vec![0x33; 48]).expect("valid"),
        wall_clock_unix_ns: UnixNanos::now().expect("host clock is sane"),
        hostname: Hostname::new("sbx-restored").expect("valid"),
        machine_id: MachineId::from_bytes([0x77; 16]).expect("valid"),
    }
}

fn full_ack(restore_id: RestoreId) -> IdentityAck {
    IdentityAck {
        restore_id,
        entropy_credited: true,
        rng_reseeded: true,
        clock_set: true,
        clock_step_ns: 42,
        hostname_set: true,
        machine_id_written: true,
    }
}

impl FakeGuest {
    /// Receives the next request, which must be `apply_identity` with `expected`.
    async fn expect_identity(&mut self, expected: &GuestIdentity) -> RequestId {
        let (id, req) = self.request().await;
        match req {
            Request::ApplyIdentity { identity } => assert_eq!(&identity, expected),
            other => panic!("expected apply_identity, got {other:?}"),
        }
        id
    }
}

#[tokio::test]
async fn apply_identity_confirmed_ack_is_returned() {
    let (client, mut guest) = connected(64).await;
    let ident = identity();
    let answer = async {
        let id = guest.expect_identity(&ident).await;
        let ack = full_ack(ident.restore_id.clone());
        guest.respond(id, Response::IdentityApplied(ack)).await;
    };
    let (ack, ()) = tokio::join!(client.apply_identity(&ident), answer);
    let ack = ack.expect("identity applied");
    assert_eq!(ack, full_ack(ident.restore_id.clone()));
}

#[tokio::test]
async fn an_unanswered_request_is_nudged_and_answered_with_the_next_message() {
    // The guest handles the identity only once another message reaches it (the notification
    // of the first was lost): the client's nudge is that message.
    let cfg = ClientConfig {
        nudge_after: Duration::from_millis(50),
        ..config(64)
    };
    let (client, mut guest) = connected_with(cfg).await;
    let ident = identity();
    let answer = async {
        let id = guest.expect_identity(&ident).await;
        let (nudge, req) = guest.request().await;
        assert_eq!(req, Request::Ping, "the nudge is a ping");
        let ack = full_ack(ident.restore_id.clone());
        guest.respond(id, Response::IdentityApplied(ack)).await;
        guest.respond(nudge, Response::Pong).await;
    };
    let both = async { tokio::join!(client.apply_identity(&ident), answer) };
    let (ack, ()) = tokio::time::timeout(DEADLINE, both)
        .await
        .expect("answered after the nudge");
    assert_eq!(ack.expect("identity applied").restore_id, ident.restore_id);
    // The nudge's answer went nowhere and the channel still works (any later nudges are
    // pings too, answered like the client's own).
    let ping = client.ping();
    tokio::pin!(ping);
    loop {
        tokio::select! {
            pong = &mut ping => {
                pong.expect("pong");
                break;
            }
            (id, req) = guest.request() => {
                assert_eq!(req, Request::Ping);
                guest.respond(id, Response::Pong).await;
            }
        }
    }
}

#[tokio::test]
async fn a_prompt_answer_is_never_nudged() {
    let (client, mut guest) = connected(64).await; // nudges after the default 1 s
    let ident = identity();
    let answer = async {
        let id = guest.expect_identity(&ident).await;
        let ack = full_ack(ident.restore_id.clone());
        guest.respond(id, Response::IdentityApplied(ack)).await;
        id
    };
    let (ack, first) = tokio::join!(client.apply_identity(&ident), answer);
    ack.expect("identity applied");
    let (pong, ()) = tokio::join!(client.ping(), async {
        let (id, req) = guest.request().await;
        assert_eq!(req, Request::Ping);
        // No request id went to a nudge in between.
        assert_eq!(id, RequestId(first.0 + 1), "a nudge was sent");
        guest.respond(id, Response::Pong).await;
    });
    pong.expect("pong");
}

#[tokio::test]
async fn apply_identity_wrong_echo_is_rejected() {
    let (client, mut guest) = connected(64).await;
    let ident = identity();
    let other = RestoreId::from_bytes([0x01; 16]);
    let answer = async {
        let id = guest.expect_identity(&ident).await;
        guest
            .respond(id, Response::IdentityApplied(full_ack(other.clone())))
            .await;
    };
    let (result, ()) = tokio::join!(client.apply_identity(&ident), answer);
    match result {
        Err(AgentError::RestoreIdMismatch { sent, echoed }) => {
            assert_eq!(sent, ident.restore_id);
            assert_eq!(echoed, other);
        }
        other => panic!("expected a restore id mismatch, got {other:?}"),
    }
}

#[tokio::test]
async fn apply_identity_unconfirmed_step_is_rejected() {
    let (client, mut guest) = connected(64).await;
    let ident = identity();
    let answer = async {
        let id = guest.expect_identity(&ident).await;
        let ack = IdentityAck {
            machine_id_written: false,
            ..full_ack(ident.restore_id.clone())
        };
        guest.respond(id, Response::IdentityApplied(ack)).await;
    };
    let (result, ()) = tokio::join!(client.apply_identity(&ident), answer);
    assert!(
        matches!(
            result,
            Err(AgentError::IdentityIncomplete {
                step: "write the machine id",
                ..
            })
        ),
        "{result:?}"
    );
}

#[tokio::test]
async fn apply_identity_failed_step_is_a_remote_error() {
    let (client, mut guest) = connected(64).await;
    let ident = identity();
    let answer = async {
        let id = guest.expect_identity(&ident).await;
        let msg = GuestMessage::Error {
            id: Some(id),
            error: ErrorBody {
                code: ErrorCode::IdentityFailed,
                message: "failed to set the wall clock: operation not permitted".into(),
            },
        };
        guest.send(msg.to_frame().expect("encodes")).await;
    };
    let (result, ()) = tokio::join!(client.apply_identity(&ident), answer);
    match result {
        Err(AgentError::Remote { op, code, .. }) => {
            assert_eq!(op, "apply_identity");
            assert_eq!(code, ErrorCode::IdentityFailed);
        }
        other => panic!("expected a remote error, got {other:?}"),
    }
}

#[tokio::test]
async fn apply_identity_wrong_answer_kind_is_unexpected() {
    let (client, mut guest) = connected(64).await;
    let ident = identity();
    let answer = async {
        let id = guest.expect_identity(&ident).await;
        guest.respond(id, Response::Pong).await;
    };
    let (result, ()) = tokio::join!(client.apply_identity(&ident), answer);
    assert!(
        matches!(
            result,
            Err(AgentError::UnexpectedResponse {
                op: "apply_identity"
            })
        ),
        "{result:?}"
    );
}

#[tokio::test]
async fn connect_restored_identity_is_the_first_request() {
    let (host, guest) = tokio::io::duplex(1 << 20);
    let mut guest = FakeGuest::new(guest);
    let ident = identity();
    let connect = AgentClient::connect_restored(host, config(64), &ident);
    let accept = async {
        let nonce = guest.sync_nonce().await;
        guest.ack(nonce, 1).await;
        // The very next frame must be the identity request.
        let Some(Frame::Control(p)) = guest.frame().await else {
            panic!("expected a control frame");
        };
        let HostMessage::Request { id, request } = HostMessage::from_payload(&p).expect("json")
        else {
            panic!("expected a request");
        };
        assert_eq!(
            request,
            Request::ApplyIdentity {
                identity: ident.clone()
            }
        );
        guest
            .respond(
                id,
                Response::IdentityApplied(full_ack(ident.restore_id.clone())),
            )
            .await;
    };
    let (connected, ()) = tokio::join!(connect, accept);
    let (client, _info, ack) = connected.expect("restored connection");
    assert_eq!(ack.restore_id, ident.restore_id);
    // The client is usable afterwards.
    let (pong, ()) = tokio::join!(client.ping(), async {
        let (id, req) = guest.request().await;
        assert_eq!(req, Request::Ping);
        guest.respond(id, Response::Pong).await;
    });
    pong.expect("pong");
}

#[tokio::test]
async fn exec_with_tty_on_agent_without_pty_v1_fails_before_sending() {
    // The fake guest advertises no features (an agent that would ignore `tty`).
    let (client, mut guest) = connected(1024).await;
    let req = ExecRequest {
        tty: Some(kiln_agent_proto::TtyRequest {
            size: kiln_agent_proto::TtySize::new(24, 80).expect("valid"),
            term: None,
        }),
        ..ExecRequest::new(["sh"])
    };
    match client.exec(req).await {
        Err(e @ AgentError::MissingFeature { feature, .. }) => {
            assert_eq!(feature, "pty-v1");
            assert!(e.to_string().contains("tty"), "{e}");
        }
        other => panic!("expected a missing feature, got {:?}", other.err()),
    }
    // Nothing reached the guest: the next request it sees is this ping.
    let ping = async { client.ping().await };
    let answer = async {
        let (id, req) = guest.request().await;
        assert_eq!(req, Request::Ping);
        guest.respond(id, Response::Pong).await;
    };
    let (pinged, ()) = tokio::join!(ping, answer);
    pinged.expect("pong");
}

#[tokio::test]
async fn exec_with_user_on_agent_without_user_v1_fails_before_sending() {
    // The fake guest advertises no features (an agent that would ignore `user` and run the
    // command as root).
    let (client, mut guest) = connected(1024).await;
    let req = ExecRequest {
        user: Some(kiln_agent_proto::ExecUser::new("nobody").expect("valid")),
        ..ExecRequest::new(["id"])
    };
    match client.exec(req).await {
        Err(e @ AgentError::MissingFeature { feature, .. }) => {
            assert_eq!(feature, "user-v1");
            assert!(e.to_string().contains("another user"), "{e}");
        }
        other => panic!("expected a missing feature, got {:?}", other.err()),
    }
    // Nothing reached the guest: the next request it sees is this ping.
    let ping = async { client.ping().await };
    let answer = async {
        let (id, req) = guest.request().await;
        assert_eq!(req, Request::Ping);
        guest.respond(id, Response::Pong).await;
    };
    let (pinged, ()) = tokio::join!(ping, answer);
    pinged.expect("pong");
}

/// A client handshaken with a fake guest that advertises `net-v1`.
async fn connected_with_net() -> (AgentClient, FakeGuest) {
    let (host, guest) = tokio::io::duplex(1 << 20);
    let mut guest = FakeGuest::new(guest);
    let connect = AgentClient::connect_with(host, config(64));
    let accept = async {
        let nonce = guest.sync_nonce().await;
        let mut info = info();
        info.features
            .push(kiln_agent_proto::FEATURE_NET_V1.to_owned());
        guest
            .send(Frame::SyncAck(SyncAckFrame {
                nonce,
                version: 1,
                info,
            }))
            .await;
    };
    let (client, ()) = tokio::join!(connect, accept);
    let (client, _) = client.expect("handshake");
    (client, guest)
}

fn network() -> kiln_agent_proto::NetworkConfig {
    kiln_agent_proto::NetworkConfig::new(
        kiln_agent_proto::MacAddr::parse("52:54:00:00:00:09").expect("valid"),
        "10.9.0.2".parse().expect("ip"),
        24,
        "10.9.0.1".parse().expect("ip"),
        1500,
        vec!["10.9.0.1".parse().expect("ip")],
    )
    .expect("valid")
}

fn network_ack(net: &kiln_agent_proto::NetworkConfig) -> kiln_agent_proto::NetworkAck {
    kiln_agent_proto::NetworkAck {
        interface: kiln_agent_proto::InterfaceName::new("eth0").expect("valid"),
        mac: net.mac(),
        address: net.address(),
        prefix_len: net.prefix_len(),
        gateway: net.gateway(),
        mtu: net.mtu(),
        ipv6_disabled: true,
        nameservers: 1,
    }
}

#[tokio::test]
async fn configure_network_matching_ack_is_returned() {
    let (client, mut guest) = connected_with_net().await;
    let net = network();
    let answer = async {
        let (id, req) = guest.request().await;
        match req {
            Request::ConfigureNetwork { network } => assert_eq!(network, net),
            other => panic!("expected configure_network, got {other:?}"),
        }
        guest
            .respond(id, Response::NetworkConfigured(network_ack(&net)))
            .await;
    };
    let (ack, ()) = tokio::join!(client.configure_network(&net), answer);
    assert_eq!(ack.expect("configured"), network_ack(&net));
}

#[tokio::test]
async fn configure_network_ack_for_another_config_is_rejected() {
    let (client, mut guest) = connected_with_net().await;
    let net = network();
    let answer = async {
        let (id, _) = guest.request().await;
        let mut ack = network_ack(&net);
        ack.gateway = "10.9.0.254".parse().expect("ip");
        guest.respond(id, Response::NetworkConfigured(ack)).await;
    };
    let (result, ()) = tokio::join!(client.configure_network(&net), answer);
    match result {
        Err(AgentError::NetworkAckMismatch { field }) => assert_eq!(field, "gateway"),
        other => panic!("expected a mismatch, got {other:?}"),
    }
}

#[tokio::test]
async fn configure_network_without_the_feature_sends_nothing() {
    // The default fake guest advertises no features.
    let (client, mut guest) = connected(64).await;
    let err = client
        .configure_network(&network())
        .await
        .expect_err("refused");
    assert!(
        matches!(
            err,
            AgentError::MissingFeature {
                feature: "net-v1",
                ..
            }
        ),
        "{err:?}"
    );
    // Nothing reached the guest: the next request it sees is a ping.
    let ping = async {
        let (id, req) = guest.request().await;
        assert_eq!(req, Request::Ping);
        guest.respond(id, Response::Pong).await;
    };
    let (pong, ()) = tokio::join!(client.ping(), ping);
    pong.expect("pong");
}
