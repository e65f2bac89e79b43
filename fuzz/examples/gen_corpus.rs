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
    AgentInfo, DataChannel, EntryName, ErrorBody, ErrorCode, ExecRequest, ExecUser, ExitStatus,
    FileEntry, FileKind, FileList, FileStat, Frame, GuestMessage, GuestPath, HostMessage,
    InterfaceName, LinkTarget, MacAddr, NetworkAck, NetworkConfig, Request, RequestId, Response,
    StreamId, SyncAckFrame, SyncFrame, TermName, TtyRequest, TtySize,
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

    qmp_seeds(&root.join("qmp_reader"))?;
    manifest_seeds(&root.join("snapshot_manifest"))?;
    api_request_seeds(&root.join("api_request"))?;
    Ok(())
}

/// What QEMU 7.2 says on a QMP socket: the greeting, replies, events, errors.
fn qmp_seeds(dir: &Path) -> std::io::Result<()> {
    const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7+deb12u18"}, "capabilities": ["oob"]}}"#;
    let lines = |ls: &[&str]| ls.iter().map(|l| format!("{l}\r\n")).collect::<String>();
    write(dir, "greeting-only", lines(&[GREETING]).as_bytes())?;
    write(
        dir,
        "session",
        lines(&[
            GREETING,
            r#"{"return": {}, "id": 1}"#,
            r#"{"timestamp": {"seconds": 1796024734, "microseconds": 1}, "event": "RESUME"}"#,
            r#"{"return": {"status": "running", "singlestep": false, "running": true}, "id": 2}"#,
        ])
        .as_bytes(),
    )?;
    write(
        dir,
        "error-reply",
        lines(&[
            GREETING,
            r#"{"return": {}, "id": 1}"#,
            r#"{"error": {"class": "GenericError", "desc": "Migration is disabled"}, "id": 2}"#,
        ])
        .as_bytes(),
    )?;
    write(
        dir,
        "unknown-id-and-garbage",
        lines(&[
            GREETING,
            r#"{"return": {}, "id": 99}"#,
            "not json",
            r#"{"id": 1}"#,
        ])
        .as_bytes(),
    )?;
    write(dir, "no-newline", GREETING.as_bytes())?;
    Ok(())
}

/// `manifest.json` bodies (byte 0 = 0: the target writes the right checksum line).
fn manifest_seeds(dir: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let file = |name: &str, size: u64| serde_json::json!({ "name": name, "size": size, "sha256": "ab".repeat(32) });
    let manifest = serde_json::json!({
        "magic": kiln_snapshot::MAGIC,
        "format_version": kiln_snapshot::FORMAT_VERSION,
        "name": "warm-0a20286ea769-1c256m",
        "created_unix": 1_796_024_734u64,
        "image_id": "0a20286ea769",
        "files": [file("mem", 268_435_456), file("state", 393_523), file("disk.qcow2", 786_432)],
        "fingerprint": {
            "qemu_version": "QEMU emulator version 7.2.22",
            "machine": "q35,smm=off",
            "device_fingerprint": "0".repeat(64),
            "cpu_model": "max",
            "accel": "tcg",
            "cpus": 1,
            "memory_mib": 256,
            "kernel_digest": "6.1.0",
            "initramfs_digest": "1".repeat(64),
            "image_digest": "1".repeat(64),
            "disk_digest": "2".repeat(64),
            "format_version": kiln_snapshot::FORMAT_VERSION
        },
        "capture": { "pause_ms": 11, "mode": "ignore-shared" }
    });
    let body = |v: &serde_json::Value| -> Result<Vec<u8>, serde_json::Error> {
        let mut b = vec![0u8];
        b.extend_from_slice(&serde_json::to_vec_pretty(v)?);
        b.push(b'\n');
        Ok(b)
    };
    write(dir, "manifest", &body(&manifest)?)?;
    let mut other = manifest.clone();
    other["magic"] = "kiln-snapshot-2".into();
    write(dir, "wrong-magic", &body(&other)?)?;
    let mut future = manifest.clone();
    future["format_version"] = 2.into();
    write(dir, "future-format", &body(&future)?)?;
    let mut unknown = manifest.clone();
    unknown["files"][1]["name"] = "../state".into();
    write(dir, "unknown-file", &body(&unknown)?)?;
    // Byte 0 = 1: the manifest, a NUL, then a checksum line of the wrong case and length.
    let mut bad_sum = vec![1u8];
    bad_sum.extend_from_slice(&serde_json::to_vec(&manifest)?);
    bad_sum.push(0);
    bad_sum.extend_from_slice(b"ABCDEF  manifest.json\n");
    write(dir, "bad-checksum-line", &bad_sum)?;
    Ok(())
}

/// Request bodies as the CLI sends them (byte 0 picks the type; see `api_request.rs`).
fn api_request_seeds(dir: &Path) -> Result<(), Box<dyn std::error::Error>> {
    use kiln_api_types::{ExecRequest, SandboxSpec};
    let seed = |pick: u8, json: Vec<u8>| [vec![pick], json].concat();
    write(
        dir,
        "spec-default",
        &seed(0, serde_json::to_vec(&SandboxSpec::default())?),
    )?;
    let full = br#"{"source":{"kind":"image","image":"python","machine":{"cpus":2,"memory_mib":512},"cold":true},"name":"web","labels":{"tier":"db"},"secrets":{"TOKEN":"x"},"secret_env":true,"publish":[{"host":8080,"guest":80}],"lifetime":{"ttl_secs":60}}"#;
    // A seed that decodes reaches the round trip and validation, not just the parser.
    serde_json::from_slice::<SandboxSpec>(full)?;
    write(dir, "spec-full", &seed(0, full.to_vec()))?;
    let exec = ExecRequest::new(vec!["sh".into(), "-c".into(), "echo hi".into()]);
    write(dir, "exec", &seed(1, serde_json::to_vec(&exec)?))?;
    write(
        dir,
        "run",
        &seed(
            2,
            format!(r#"{{"exec":{}}}"#, serde_json::to_string(&exec)?).into_bytes(),
        ),
    )?;
    write(
        dir,
        "snapshot-create",
        &seed(3, br#"{"name":"s1"}"#.to_vec()),
    )?;
    write(
        dir,
        "secrets",
        &seed(4, br#"{"secrets":{"TOKEN":"v","../x":"y"}}"#.to_vec()),
    )?;
    write(dir, "ttl", &seed(6, br#"{"ttl_secs":3600}"#.to_vec()))?;
    write(dir, "prune", &seed(13, br#"{"dry_run":true}"#.to_vec()))?;
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
