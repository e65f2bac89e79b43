//! Writes the seed corpus (`corpus/<target>/seed-*`) from the protocol crate's own types, so
//! the seeds stay valid frames and messages as the crate evolves.
//!
//! Run from `fuzz/`: `cargo run --example gen_corpus`. Overwrites existing seeds; leaves the
//! inputs libFuzzer added alone.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use bytes::Bytes;
use kiln_agent_proto::{
    AgentInfo, DataChannel, EntryName, ErrorBody, ErrorCode, ExecRequest, ExecUser, ExitStatus, FileEntry,
    FileKind, FileList, FileStat, Frame, GuestMessage, GuestPath, HostMessage, InterfaceName,
    LinkTarget, MacAddr, NetworkAck, NetworkConfig, Request,
    RequestId, Response, StreamId, SyncAckFrame, SyncFrame, TermName, TtyRequest, TtySize,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let stream = StreamId::new(3).ok_or("stream 3 is non-zero")?;

    let host = host_messages(stream)?;
    let guest = guest_messages(stream)?;
    let sync = Frame::Sync(SyncFrame {
        nonce: 0x0123_4567_89ab_cdef,
        versions: vec![1],
    });
    let sync_many = Frame::Sync(SyncFrame {
        nonce: 7,
        versions: vec![0, 1, 2, 0xffff],
    });
    let ack = Frame::SyncAck(SyncAckFrame {
        nonce: 0x0123_4567_89ab_cdef,
        version: 1,
        info: AgentInfo {
            agent_version: "0.1.0".into(),
            pid: 1,
            kernel_release: Some("6.1.0-kiln".into()),
            features: vec!["exec".into()],
        },
    });
    let window = Frame::Window {
        stream,
        increment: 256 << 10,
    };
    let data = |channel, bytes: &'static [u8]| Frame::Data {
        stream,
        channel,
        data: Bytes::from_static(bytes),
    };

    // frame_decoder: byte streams.
    let dir = root.join("frame_decoder");
    let mut session = Vec::new();
    for frame in [&sync, &ack] {
        session.extend_from_slice(&frame.to_bytes()?);
    }
    for msg in &host {
        session.extend_from_slice(&msg.to_frame()?.to_bytes()?);
    }
    session.extend_from_slice(&window.to_bytes()?);
    session.extend_from_slice(&data(DataChannel::Stdin, b"input\n").to_bytes()?);
    session.extend_from_slice(&data(DataChannel::Stdout, b"hi\n").to_bytes()?);
    session.extend_from_slice(&data(DataChannel::Stderr, b"oops\n").to_bytes()?);
    for msg in &guest {
        session.extend_from_slice(&msg.to_frame()?.to_bytes()?);
    }
    write(&dir, "session", &session)?;
    write(&dir, "sync", &sync.to_bytes()?)?;
    write(&dir, "sync-ack", &ack.to_bytes()?)?;
    // Boot noise before the handshake, a frame cut short, then a resync.
    let mut noisy = b"[    0.000000] Linux version 6.1\r\n\x9f\x9fk".to_vec();
    noisy.extend_from_slice(&ack.to_bytes()?[..20]);
    noisy.extend_from_slice(&sync_many.to_bytes()?);
    noisy.extend_from_slice(&ack.to_bytes()?);
    noisy.extend_from_slice(&window.to_bytes()?);
    write(&dir, "noise-then-handshake", &noisy)?;
    // A header announcing more than the cap, then a valid frame.
    let mut oversized = data(DataChannel::Stdout, b"x").to_bytes()?.to_vec();
    oversized[8..12].copy_from_slice(&(1u32 << 20).to_le_bytes());
    oversized.extend_from_slice(&sync.to_bytes()?);
    write(&dir, "oversized-then-sync", &oversized)?;

    // control_messages: CONTROL payloads.
    let dir = root.join("control_messages");
    for (i, msg) in host.iter().enumerate() {
        write(&dir, &format!("host-{i}"), &payload(&msg.to_frame()?)?)?;
    }
    for (i, msg) in guest.iter().enumerate() {
        write(&dir, &format!("guest-{i}"), &payload(&msg.to_frame()?)?)?;
    }
    write(
        &dir,
        "unknown-op",
        br#"{"type":"request","id":5,"request":{"op":"file_put","path":"/x"}}"#,
    )?;
    write(
        &dir,
        "tcp-closed-defaults",
        br#"{"type":"tcp_closed","stream":3}"#,
    )?;
    // files-v1: defaults, and hostile values a guest may send (each must fail to parse).
    write(
        &dir,
        "file-write-defaults",
        br#"{"type":"request","id":7,"request":{"op":"file_write","stream":3,"path":"/a"}}"#,
    )?;
    write(
        &dir,
        "file-list-bad-names",
        br#"{"type":"response","id":8,"response":{"op":"file_list","entries":[{"name":"a/b","stat":{"kind":"file","size":4294967296,"mode":420,"mtime_unix_ns":0,"uid":0,"gid":0}},{"name":"x\u0000","stat":{"kind":"dir","size":0,"mode":493,"mtime_unix_ns":-1,"uid":0,"gid":0}}]}}"#,
    )?;
    write(
        &dir,
        "file-stat-relative-path",
        br#"{"type":"request","id":9,"request":{"op":"file_stat","path":"etc/passwd"}}"#,
    )?;
    write(
        &dir,
        "file-done-huge-claim",
        br#"{"type":"file_done","stream":3,"bytes":18446744073709551615}"#,
    )?;
    write(
        &dir,
        "exec-defaults",
        br#"{"type":"request","id":6,"request":{"op":"exec","stream":1,"output_window":1,"exec":{"argv":["ls"]}}}"#,
    )?;

    // handshake: selector byte (bit 0: SYNC_ACK, bit 1: prepend body magic) + payload.
    let dir = root.join("handshake");
    let body = |frame: &Frame| -> Result<Vec<u8>, Box<dyn std::error::Error>> {
        Ok(frame.to_bytes()?[12..].to_vec())
    };
    write(&dir, "sync", &[&[0u8][..], &body(&sync)?].concat())?;
    write(
        &dir,
        "sync-many",
        &[&[0u8][..], &body(&sync_many)?].concat(),
    )?;
    write(
        &dir,
        "sync-after-magic",
        &[&[2u8][..], &body(&sync)?[8..]].concat(),
    )?;
    write(&dir, "sync-ack", &[&[1u8][..], &body(&ack)?].concat())?;
    write(
        &dir,
        "sync-ack-after-magic",
        &[&[3u8][..], &body(&ack)?[8..]].concat(),
    )?;
    let mut minimal_ack = vec![3u8];
    minimal_ack.extend_from_slice(&[0; 10]);
    minimal_ack.extend_from_slice(br#"{"agent_version":"","pid":0,"future":[1,{"a":null}]}"#);
    write(&dir, "sync-ack-unknown-field", &minimal_ack)?;
    Ok(())
}

fn host_messages(stream: StreamId) -> Result<Vec<HostMessage>, Box<dyn std::error::Error>> {
    let request = |id, request| HostMessage::Request {
        id: RequestId(id),
        request,
    };
    let path = GuestPath::new("/root/data.bin")?;
    Ok(vec![
        request(7, Request::Ping),
        request(
            8,
            Request::Exec {
                stream,
                output_window: 262_144,
                exec: ExecRequest {
                    argv: vec!["sh".into(), "-c".into(), "echo hi".into()],
                    env: BTreeMap::from([("A".into(), "b".into())]),
                    cwd: Some("/tmp".into()),
                    stdin: true,
                    timeout_ms: Some(5000),
                    max_output_bytes: Some(1 << 20),
                    tty: None,
                    user: None,
                },
            },
        ),
        request(9, Request::Signal { stream, signo: 15 }),
        request(10, Request::Shutdown),
        HostMessage::StdinClose { stream },
        // TCP tunnels (feature tcp-v1).
        request(
            12,
            Request::TcpConnect {
                stream,
                port: 5432,
                window: 262_144,
            },
        ),
        HostMessage::TcpShutdown { stream },
        HostMessage::TcpClose { stream },
        // Terminal execs (feature pty-v1).
        request(
            30,
            Request::Exec {
                stream,
                output_window: 262_144,
                exec: ExecRequest {
                    stdin: true,
                    tty: Some(TtyRequest {
                        size: TtySize::new(24, 80)?,
                        term: Some(TermName::new("xterm-256color")?),
                    }),
                    ..ExecRequest::new(["bash", "-l"])
                },
            },
        ),
        request(
            31,
            Request::ExecResize {
                stream,
                size: TtySize::new(1000, 1)?,
            },
        ),
        // Execs as a user (feature user-v1).
        request(
            32,
            Request::Exec {
                stream,
                output_window: 262_144,
                exec: ExecRequest {
                    user: Some(ExecUser::new("nobody:65534")?),
                    ..ExecRequest::new(["id"])
                },
            },
        ),
        // File operations (feature files-v1).
        request(
            13,
            Request::FileWrite {
                stream,
                path: path.clone(),
                mode: Some(0o644),
                tar: false,
            },
        ),
        request(
            14,
            Request::FileRead {
                stream,
                path: GuestPath::new("/root")?,
                tar: true,
                window: 262_144,
            },
        ),
        request(15, Request::FileStat { path: path.clone() }),
        request(
            16,
            Request::FileList {
                path: GuestPath::new("/etc")?,
                after: Some(EntryName::new("hosts")?),
            },
        ),
        request(
            17,
            Request::FileMkdir {
                path: GuestPath::new("/a/b/c")?,
                parents: true,
                mode: Some(0o700),
            },
        ),
        request(
            18,
            Request::FileRemove {
                path: path.clone(),
                recursive: true,
            },
        ),
        request(
            19,
            Request::FileRename {
                from: path.clone(),
                to: GuestPath::new("/root/renamed.bin")?,
            },
        ),
        HostMessage::FileEnd { stream },
        HostMessage::FileAbort { stream },
        // Network configuration (feature net-v1).
        request(
            40,
            Request::ConfigureNetwork {
                network: NetworkConfig::new(
                    MacAddr::parse("52:54:00:12:34:56")?,
                    "10.0.2.15".parse()?,
                    24,
                    "10.0.2.2".parse()?,
                    1500,
                    vec!["10.0.2.3".parse()?, "1.1.1.1".parse()?],
                )?,
            },
        ),
        request(
            41,
            Request::ConfigureNetwork {
                network: NetworkConfig::new(
                    MacAddr::parse("02:00:00:00:00:01")?,
                    "172.16.0.2".parse()?,
                    30,
                    "172.16.0.1".parse()?,
                    65520,
                    vec![],
                )?,
            },
        ),
    ])
}

fn guest_messages(stream: StreamId) -> Result<Vec<GuestMessage>, Box<dyn std::error::Error>> {
    let response = |id, response| GuestMessage::Response {
        id: RequestId(id),
        response,
    };
    let stat = FileStat {
        kind: FileKind::Symlink,
        size: 11,
        mode: 0o777,
        mtime_unix_ns: 1_767_225_600_000_000_000,
        uid: 0,
        gid: 0,
        symlink_target: Some(LinkTarget::new("../lib/x.so")?),
    };
    let list = FileList::new(
        vec![FileEntry {
            name: EntryName::new("hosts")?,
            stat: FileStat {
                kind: FileKind::File,
                symlink_target: None,
                ..stat.clone()
            },
        }],
        Some(EntryName::new("hosts")?),
    )?;
    Ok(vec![
        response(7, Response::Pong),
        response(8, Response::ExecStarted { pid: Some(231) }),
        response(9, Response::Signaled),
        response(10, Response::ShuttingDown),
        GuestMessage::Error {
            id: Some(RequestId(8)),
            error: ErrorBody {
                code: ErrorCode::BadCwd,
                message: "working directory /x does not exist".into(),
            },
        },
        GuestMessage::Error {
            id: None,
            error: ErrorBody {
                code: ErrorCode::BadRequest,
                message: "invalid host message json".into(),
            },
        },
        GuestMessage::Exit {
            stream,
            status: ExitStatus {
                code: None,
                signal: Some(9),
                timed_out: true,
                output_truncated: false,
            },
        },
        // TCP tunnels (feature tcp-v1).
        response(12, Response::TcpConnected),
        // Terminal execs (feature pty-v1).
        response(31, Response::Resized),
        // Execs as a user (feature user-v1).
        GuestMessage::Error {
            id: Some(RequestId(32)),
            error: ErrorBody {
                code: ErrorCode::BadUser,
                message: "unknown user app: no /etc/passwd".into(),
            },
        },
        GuestMessage::Error {
            id: Some(RequestId(12)),
            error: ErrorBody {
                code: ErrorCode::ConnectFailed,
                message: "connection to 127.0.0.1:5432 refused".into(),
            },
        },
        GuestMessage::TcpEof { stream },
        GuestMessage::TcpClosed {
            stream,
            error: Some("connection reset by peer".into()),
        },
        GuestMessage::TcpClosed {
            stream,
            error: None,
        },
        // File operations (feature files-v1).
        response(13, Response::FileWriteReady),
        response(
            14,
            Response::FileReadStarted {
                size: Some(1 << 26),
            },
        ),
        response(15, Response::FileStat(stat)),
        response(16, Response::FileList(list)),
        response(17, Response::FileOk),
        GuestMessage::FileDone {
            stream,
            bytes: 1 << 26,
            error: None,
        },
        GuestMessage::FileDone {
            stream,
            bytes: 0,
            error: Some(ErrorBody {
                code: ErrorCode::NotFound,
                message: "cannot read /x: no such file or directory".into(),
            }),
        },
        // Network configuration (feature net-v1).
        response(
            40,
            Response::NetworkConfigured(NetworkAck {
                interface: InterfaceName::new("eth0")?,
                mac: MacAddr::parse("52:54:00:12:34:56")?,
                address: "10.0.2.15".parse()?,
                prefix_len: 24,
                gateway: "10.0.2.2".parse()?,
                mtu: 1500,
                ipv6_disabled: true,
                nameservers: 2,
            }),
        ),
        GuestMessage::Error {
            id: Some(RequestId(41)),
            error: ErrorBody {
                code: ErrorCode::NetworkFailed,
                message: "failed to find the interface: no ethernet interface \
                          (already done: nothing)"
                    .into(),
            },
        },
    ])
}

fn payload(frame: &Frame) -> Result<Vec<u8>, Box<dyn std::error::Error>> {
    match frame {
        Frame::Control(json) => Ok(json.to_vec()),
        other => Err(format!("expected a CONTROL frame, got {other:?}").into()),
    }
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    fs::create_dir_all(dir)?;
    fs::write(dir.join(format!("seed-{name}")), bytes)
}
