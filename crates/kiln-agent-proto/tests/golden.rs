//! Golden byte fixtures: these pin the wire format. If one fails, the format changed: bump
//! the protocol version and update docs/protocol.md, don't just update the bytes.

use bytes::Bytes;
use kiln_agent_proto::{
    AgentInfo, DataChannel, Decoder, Entropy, ErrorBody, ErrorCode, Frame, GuestIdentity,
    GuestMessage, HostMessage, Hostname, IdentityAck, MachineId, Request, RequestId, Response,
    RestoreId, StreamId, SyncAckFrame, SyncFrame, UnixNanos,
};

fn unhex(s: &str) -> Vec<u8> {
    let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("fixture is hex"))
        .collect()
}

fn stream(id: u32) -> StreamId {
    StreamId::new(id).expect("non-zero")
}

fn assert_golden(frame: Frame, hex: &str) {
    let expected = unhex(hex);
    let encoded = frame.to_bytes().expect("fixture frame encodes");
    assert_eq!(
        encoded.as_ref(),
        expected.as_slice(),
        "encoding of {frame:?}"
    );
    let mut d = Decoder::new();
    d.feed(&expected);
    let decoded = d.next_frame().expect("fixture decodes").expect("complete");
    assert_eq!(decoded, frame);
    assert_eq!(d.buffered(), 0);
}

#[test]
fn golden_window_frame() {
    assert_golden(
        Frame::Window {
            stream: stream(7),
            increment: 65536,
        },
        "9f6b 04 00 07000000 04000000 00000100",
    );
}

#[test]
fn golden_stdout_frame() {
    assert_golden(
        Frame::Data {
            stream: stream(1),
            channel: DataChannel::Stdout,
            data: Bytes::from_static(b"hi\n"),
        },
        "9f6b 11 00 01000000 03000000 68690a",
    );
}

#[test]
fn golden_stderr_and_stdin_frames() {
    assert_golden(
        Frame::Data {
            stream: stream(0x0102),
            channel: DataChannel::Stderr,
            data: Bytes::from_static(b"e"),
        },
        "9f6b 12 00 02010000 01000000 65",
    );
    assert_golden(
        Frame::Data {
            stream: stream(2),
            channel: DataChannel::Stdin,
            data: Bytes::from_static(b"ab"),
        },
        "9f6b 10 00 02000000 02000000 6162",
    );
}

#[test]
fn golden_sync_frame() {
    assert_golden(
        Frame::Sync(SyncFrame {
            nonce: 0x0102_0304_0506_0708,
            versions: vec![1, 2],
        }),
        "9f6b 01 00 00000000 15000000 \
         4b494c4e2d53594e 0807060504030201 02 0100 0200",
    );
}

#[test]
fn golden_sync_ack_frame() {
    let json = br#"{"agent_version":"0.1.0","pid":1,"kernel_release":"6.1.0","features":["exec"]}"#;
    let mut hex = format!(
        "9f6b 02 00 00000000 {:08x} 4b494c4e2d41434b 2a00000000000000 0100",
        u32::try_from(18 + json.len()).expect("small").swap_bytes()
    );
    for b in json {
        hex.push_str(&format!("{b:02x}"));
    }
    assert_golden(
        Frame::SyncAck(SyncAckFrame {
            nonce: 42,
            version: 1,
            info: AgentInfo {
                agent_version: "0.1.0".into(),
                pid: 1,
                kernel_release: Some("6.1.0".into()),
                features: vec!["exec".into()],
            },
        }),
        &hex,
    );
}

#[test]
fn golden_control_ping_frame() {
    let frame = HostMessage::Request {
        id: RequestId(1),
        request: Request::Ping,
    }
    .to_frame()
    .expect("encodes");
    let json = br#"{"type":"request","id":1,"request":{"op":"ping"}}"#;
    let mut hex = format!("9f6b 03 00 00000000 {:02x}000000", json.len());
    for b in json {
        hex.push_str(&format!("{b:02x}"));
    }
    assert_golden(frame, &hex);
}

fn control_hex(json: &[u8]) -> String {
    let mut hex = format!(
        "9f6b 03 00 00000000 {:08x}",
        u32::try_from(json.len()).expect("small").swap_bytes()
    );
    for b in json {
        hex.push_str(&format!("{b:02x}"));
    }
    hex
}

fn restore_id() -> RestoreId {
    RestoreId::new("00112233445566778899aabbccddeeff").expect("valid")
}

#[test]
fn golden_control_apply_identity_frame() {
    let frame = HostMessage::Request {
        id: RequestId(2),
        request: Request::ApplyIdentity {
            identity: GuestIdentity {
                restore_id: restore_id(),
                entropy: Entropy::new(vec![0xa5; 32]).expect("valid"),
                wall_clock_unix_ns: UnixNanos::new(1_767_225_600_000_000_001).expect("valid"),
                hostname: Hostname::new("kiln-7").expect("valid"),
                machine_id: MachineId::new("0123456789abcdef0123456789abcdef").expect("valid"),
            },
        },
    }
    .to_frame()
    .expect("encodes");
    let json = concat!(
        r#"{"type":"request","id":2,"request":{"op":"apply_identity","identity":{"#,
        r#""restore_id":"00112233445566778899aabbccddeeff","#,
        r#""entropy":"a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5","#,
        r#""wall_clock_unix_ns":1767225600000000001,"hostname":"kiln-7","#,
        r#""machine_id":"0123456789abcdef0123456789abcdef"}}}"#
    );
    assert_golden(frame, &control_hex(json.as_bytes()));
}

#[test]
fn golden_control_identity_applied_frame() {
    let frame = GuestMessage::Response {
        id: RequestId(2),
        response: Response::IdentityApplied(IdentityAck {
            restore_id: restore_id(),
            entropy_credited: true,
            rng_reseeded: false,
            clock_set: true,
            clock_step_ns: 3_600_000_000_000,
            hostname_set: true,
            machine_id_written: true,
        }),
    }
    .to_frame()
    .expect("encodes");
    let json = concat!(
        r#"{"type":"response","id":2,"response":{"op":"identity_applied","#,
        r#""restore_id":"00112233445566778899aabbccddeeff","entropy_credited":true,"#,
        r#""rng_reseeded":false,"clock_set":true,"clock_step_ns":3600000000000,"#,
        r#""hostname_set":true,"machine_id_written":true}}"#
    );
    assert_golden(frame, &control_hex(json.as_bytes()));
}

#[test]
fn golden_control_tcp_connect_frame() {
    let frame = HostMessage::Request {
        id: RequestId(12),
        request: Request::TcpConnect {
            stream: stream(9),
            port: 5432,
            window: 262_144,
        },
    }
    .to_frame()
    .expect("encodes");
    let json = br#"{"type":"request","id":12,"request":{"op":"tcp_connect","stream":9,"port":5432,"window":262144}}"#;
    // The header spelled out: CONTROL, stream 0, 96 (0x60) payload bytes.
    let hex = control_hex(json);
    assert!(hex.starts_with("9f6b 03 00 00000000 60000000"), "{hex}");
    assert_golden(frame, &hex);
}

#[test]
fn golden_control_tcp_answers_and_events() {
    let cases: Vec<(Frame, &[u8])> = vec![
        (
            GuestMessage::Response {
                id: RequestId(12),
                response: Response::TcpConnected,
            }
            .to_frame()
            .expect("encodes"),
            br#"{"type":"response","id":12,"response":{"op":"tcp_connected"}}"#,
        ),
        (
            GuestMessage::Error {
                id: Some(RequestId(13)),
                error: ErrorBody {
                    code: ErrorCode::ConnectFailed,
                    message: "connection to 127.0.0.1:5433 refused".into(),
                },
            }
            .to_frame()
            .expect("encodes"),
            br#"{"type":"error","id":13,"error":{"code":"connect_failed","message":"connection to 127.0.0.1:5433 refused"}}"#,
        ),
        (
            HostMessage::TcpShutdown { stream: stream(9) }
                .to_frame()
                .expect("encodes"),
            br#"{"type":"tcp_shutdown","stream":9}"#,
        ),
        (
            HostMessage::TcpClose { stream: stream(9) }
                .to_frame()
                .expect("encodes"),
            br#"{"type":"tcp_close","stream":9}"#,
        ),
        (
            GuestMessage::TcpEof { stream: stream(9) }
                .to_frame()
                .expect("encodes"),
            br#"{"type":"tcp_eof","stream":9}"#,
        ),
        (
            GuestMessage::TcpClosed {
                stream: stream(9),
                error: None,
            }
            .to_frame()
            .expect("encodes"),
            br#"{"type":"tcp_closed","stream":9,"error":null}"#,
        ),
    ];
    for (frame, json) in cases {
        assert_golden(frame, &control_hex(json));
    }
}

#[test]
fn golden_tunnel_data_frames() {
    // A tunnel's bytes use the STDIN (toward the guest socket) and STDOUT (from it) kinds.
    assert_golden(
        Frame::Data {
            stream: stream(9),
            channel: DataChannel::Stdin,
            data: Bytes::from_static(b"GET"),
        },
        "9f6b 10 00 09000000 03000000 474554",
    );
    assert_golden(
        Frame::Data {
            stream: stream(9),
            channel: DataChannel::Stdout,
            data: Bytes::from_static(b"OK"),
        },
        "9f6b 11 00 09000000 02000000 4f4b",
    );
}

#[test]
fn golden_control_file_messages() {
    let path = |p: &str| kiln_agent_proto::GuestPath::new(p).expect("valid path");
    let cases: [(Frame, &[u8]); 5] = [
        (
            HostMessage::Request {
                id: RequestId(20),
                request: Request::FileWrite {
                    stream: stream(11),
                    path: path("/root/a.txt"),
                    mode: Some(0o600),
                    tar: false,
                },
            }
            .to_frame()
            .expect("encodes"),
            br#"{"type":"request","id":20,"request":{"op":"file_write","stream":11,"path":"/root/a.txt","mode":384,"tar":false}}"#,
        ),
        (
            HostMessage::FileEnd { stream: stream(11) }
                .to_frame()
                .expect("encodes"),
            br#"{"type":"file_end","stream":11}"#,
        ),
        (
            HostMessage::FileAbort { stream: stream(11) }
                .to_frame()
                .expect("encodes"),
            br#"{"type":"file_abort","stream":11}"#,
        ),
        (
            GuestMessage::Response {
                id: RequestId(21),
                response: Response::FileReadStarted { size: Some(5) },
            }
            .to_frame()
            .expect("encodes"),
            br#"{"type":"response","id":21,"response":{"op":"file_read_started","size":5}}"#,
        ),
        (
            GuestMessage::FileDone {
                stream: stream(11),
                bytes: 5,
                error: Some(ErrorBody {
                    code: ErrorCode::NoSpace,
                    message: "no space left on device".into(),
                }),
            }
            .to_frame()
            .expect("encodes"),
            br#"{"type":"file_done","stream":11,"bytes":5,"error":{"code":"no_space","message":"no space left on device"}}"#,
        ),
    ];
    for (frame, json) in cases {
        assert_golden(frame, &control_hex(json));
    }
}

#[test]
fn golden_file_data_frames() {
    // A write's bytes travel in STDIN frames, a read's in STDOUT frames, like exec's.
    assert_golden(
        Frame::Data {
            stream: stream(11),
            channel: DataChannel::Stdin,
            data: Bytes::from_static(b"file"),
        },
        "9f6b 10 00 0b000000 04000000 66696c65",
    );
    assert_golden(
        Frame::Data {
            stream: stream(11),
            channel: DataChannel::Stdout,
            data: Bytes::from_static(b"file"),
        },
        "9f6b 11 00 0b000000 04000000 66696c65",
    );
}

#[test]
fn golden_control_pty_frames() {
    use kiln_agent_proto::{ExecRequest, TermName, TtyRequest, TtySize};
    let exec = HostMessage::Request {
        id: RequestId(20),
        request: Request::Exec {
            stream: stream(4),
            output_window: 65_536,
            exec: ExecRequest {
                stdin: true,
                tty: Some(TtyRequest {
                    size: TtySize::new(24, 80).expect("valid"),
                    term: Some(TermName::new("xterm").expect("valid")),
                }),
                ..ExecRequest::new(["sh"])
            },
        },
    };
    let json: &[u8] = br#"{"type":"request","id":20,"request":{"op":"exec","stream":4,"output_window":65536,"exec":{"argv":["sh"],"env":{},"cwd":null,"stdin":true,"timeout_ms":null,"max_output_bytes":null,"tty":{"rows":24,"cols":80,"term":"xterm"}}}}"#;
    assert_golden(exec.to_frame().expect("encodes"), &control_hex(json));
    let resize = HostMessage::Request {
        id: RequestId(21),
        request: Request::ExecResize {
            stream: stream(4),
            size: TtySize::new(40, 100).expect("valid"),
        },
    };
    let json: &[u8] =
        br#"{"type":"request","id":21,"request":{"op":"exec_resize","stream":4,"rows":40,"cols":100}}"#;
    let hex = control_hex(json);
    // CONTROL, stream 0, 89 (0x59) payload bytes.
    assert!(hex.starts_with("9f6b 03 00 00000000 59000000"), "{hex}");
    assert_golden(resize.to_frame().expect("encodes"), &hex);
    let resized = GuestMessage::Response {
        id: RequestId(21),
        response: Response::Resized,
    };
    let json: &[u8] = br#"{"type":"response","id":21,"response":{"op":"resized"}}"#;
    assert_golden(resized.to_frame().expect("encodes"), &control_hex(json));
}

#[test]
fn golden_control_exec_with_user() {
    use kiln_agent_proto::{ExecRequest, ExecUser};
    let exec = HostMessage::Request {
        id: RequestId(22),
        request: Request::Exec {
            stream: stream(5),
            output_window: 65_536,
            exec: ExecRequest {
                user: Some(ExecUser::new("nobody:nogroup").expect("valid")),
                ..ExecRequest::new(["id"])
            },
        },
    };
    let json: &[u8] = br#"{"type":"request","id":22,"request":{"op":"exec","stream":5,"output_window":65536,"exec":{"argv":["id"],"env":{},"cwd":null,"stdin":false,"timeout_ms":null,"max_output_bytes":null,"user":"nobody:nogroup"}}}"#;
    assert_golden(exec.to_frame().expect("encodes"), &control_hex(json));
    let refused = GuestMessage::Error {
        id: Some(RequestId(22)),
        error: kiln_agent_proto::ErrorBody {
            code: kiln_agent_proto::ErrorCode::BadUser,
            message: "unknown user app: no /etc/passwd".into(),
        },
    };
    let json: &[u8] = br#"{"type":"error","id":22,"error":{"code":"bad_user","message":"unknown user app: no /etc/passwd"}}"#;
    assert_golden(refused.to_frame().expect("encodes"), &control_hex(json));
}

fn network_config() -> kiln_agent_proto::NetworkConfig {
    kiln_agent_proto::NetworkConfig::new(
        kiln_agent_proto::MacAddr::parse("52:54:00:ab:cd:ef").expect("valid"),
        "10.77.0.2".parse().expect("ip"),
        24,
        "10.77.0.1".parse().expect("ip"),
        1500,
        vec![
            "10.77.0.1".parse().expect("ip"),
            "9.9.9.9".parse().expect("ip"),
        ],
    )
    .expect("valid")
}

#[test]
fn golden_control_configure_network_frame() {
    let frame = HostMessage::Request {
        id: RequestId(5),
        request: Request::ConfigureNetwork {
            network: network_config(),
        },
    }
    .to_frame()
    .expect("encodes");
    let json = concat!(
        r#"{"type":"request","id":5,"request":{"op":"configure_network","network":{"#,
        r#""mac":"52:54:00:ab:cd:ef","address":"10.77.0.2","prefix_len":24,"#,
        r#""gateway":"10.77.0.1","mtu":1500,"nameservers":["10.77.0.1","9.9.9.9"]}}}"#
    );
    assert_golden(frame, &control_hex(json.as_bytes()));
}

#[test]
fn golden_control_network_configured_frame() {
    let frame = GuestMessage::Response {
        id: RequestId(5),
        response: Response::NetworkConfigured(kiln_agent_proto::NetworkAck {
            interface: kiln_agent_proto::InterfaceName::new("eth0").expect("valid"),
            mac: kiln_agent_proto::MacAddr::parse("52:54:00:ab:cd:ef").expect("valid"),
            address: "10.77.0.2".parse().expect("ip"),
            prefix_len: 24,
            gateway: "10.77.0.1".parse().expect("ip"),
            mtu: 1500,
            ipv6_disabled: true,
            nameservers: 2,
        }),
    }
    .to_frame()
    .expect("encodes");
    let json = concat!(
        r#"{"type":"response","id":5,"response":{"op":"network_configured","#,
        r#""interface":"eth0","mac":"52:54:00:ab:cd:ef","address":"10.77.0.2","#,
        r#""prefix_len":24,"gateway":"10.77.0.1","mtu":1500,"ipv6_disabled":true,"#,
        r#""nameservers":2}}"#
    );
    assert_golden(frame, &control_hex(json.as_bytes()));
}

#[test]
fn golden_control_network_failed_frame() {
    let frame = GuestMessage::Error {
        id: Some(RequestId(5)),
        error: ErrorBody {
            code: ErrorCode::NetworkFailed,
            message: "failed to set the mtu of eth0: invalid argument (already done: find the \
                      interface, take the link down, disable ipv6, set the mac)"
                .to_owned(),
        },
    }
    .to_frame()
    .expect("encodes");
    let json = concat!(
        r#"{"type":"error","id":5,"error":{"code":"network_failed","message":"#,
        r#""failed to set the mtu of eth0: invalid argument (already done: find the "#,
        r#"interface, take the link down, disable ipv6, set the mac)"}}"#
    );
    assert_golden(frame, &control_hex(json.as_bytes()));
}
