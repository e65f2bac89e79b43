//! Property tests: frame round trips under arbitrary chunking, identity, network and TCP tunnel
//! message round trips, hunting through garbage, and arbitrary bytes through the fuzz entry point.

use bytes::Bytes;
use kiln_agent_proto::identity::{MAX_WALL_CLOCK_NS, MIN_WALL_CLOCK_NS};
use std::net::Ipv4Addr;

use kiln_agent_proto::{
    AgentInfo, DataChannel, Decoder, Entropy, ErrorBody, ErrorCode, Frame, GuestIdentity,
    GuestMessage, HostMessage, Hostname, HuntTarget, IdentityAck, MAX_DATA_PAYLOAD, MachineId,
    Request, RequestId, Response, RestoreId, StreamId, SyncAckFrame, SyncFrame, UnixNanos,
    fuzz_decode,
};
use kiln_agent_proto::{InterfaceName, MacAddr, NetworkAck, NetworkConfig};
use proptest::prelude::*;

fn stream_id() -> impl Strategy<Value = StreamId> {
    (1u32..=u32::MAX).prop_map(|id| StreamId::new(id).expect("non-zero"))
}

fn frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        (any::<u64>(), prop::collection::vec(any::<u16>(), 1..=16))
            .prop_map(|(nonce, versions)| Frame::Sync(SyncFrame { nonce, versions })),
        (
            any::<u64>(),
            any::<u16>(),
            "[a-z0-9.]{0,20}",
            any::<u32>(),
            prop::collection::vec("[a-z_]{1,8}", 0..4)
        )
            .prop_map(|(nonce, version, agent_version, pid, features)| {
                Frame::SyncAck(SyncAckFrame {
                    nonce,
                    version,
                    info: AgentInfo {
                        agent_version,
                        pid,
                        kernel_release: None,
                        features,
                    },
                })
            }),
        prop::collection::vec(any::<u8>(), 1..512).prop_map(|b| Frame::Control(Bytes::from(b))),
        (stream_id(), 1u32..=u32::MAX)
            .prop_map(|(stream, increment)| Frame::Window { stream, increment }),
        (
            stream_id(),
            prop_oneof![
                Just(DataChannel::Stdin),
                Just(DataChannel::Stdout),
                Just(DataChannel::Stderr)
            ],
            prop::collection::vec(any::<u8>(), 1..2048)
        )
            .prop_map(|(stream, channel, data)| Frame::Data {
                stream,
                channel,
                data: Bytes::from(data),
            }),
    ]
}

fn identity() -> impl Strategy<Value = GuestIdentity> {
    (
        any::<[u8; 16]>(),
        prop::collection::vec(any::<u8>(), 32..=512),
        MIN_WALL_CLOCK_NS..=MAX_WALL_CLOCK_NS,
        "[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?",
        any::<[u8; 16]>().prop_filter("not all zero", |b| b.iter().any(|x| *x != 0)),
    )
        .prop_map(|(rid, entropy, ns, hostname, mid)| GuestIdentity {
            restore_id: RestoreId::from_bytes(rid),
            entropy: Entropy::new(entropy).expect("length in range"),
            wall_clock_unix_ns: UnixNanos::new(ns).expect("in range"),
            hostname: Hostname::new(hostname).expect("matches the label rule"),
            machine_id: MachineId::from_bytes(mid).expect("not zero"),
        })
}

fn unicast_mac() -> impl Strategy<Value = MacAddr> {
    any::<[u8; 6]>()
        .prop_map(|mut o| {
            o[0] &= 0xfe;
            o
        })
        .prop_filter("not all zero", |o| o.iter().any(|b| *b != 0))
        .prop_map(|o| MacAddr::new(o).expect("unicast, not zero"))
}

/// Valid configurations: a /prefix subnet under 10.0.0.0/8 (or wider), address and gateway
/// two distinct hosts of it.
fn network_config() -> impl Strategy<Value = NetworkConfig> {
    (
        unicast_mac(),
        1u8..=30,
        any::<u32>(),
        any::<u32>(),
        any::<u32>(),
        576u32..=65520,
        prop::collection::vec((1u8..=223, any::<[u8; 3]>()), 0..=3),
    )
        .prop_filter_map(
            "address and gateway must differ",
            |(mac, prefix, net, a, g, mtu, ns)| {
                let mask = u32::MAX << (32 - u32::from(prefix));
                let hosts = !mask - 1; // excluding network and broadcast
                let base = (0x0a00_0000 | (net & 0x00ff_ffff)) & mask;
                // Prefixes shorter than 8 need a base that is not loopback/multicast/zero.
                let base = if prefix < 8 { 0x0a00_0000 & mask } else { base };
                let address = Ipv4Addr::from(base + 1 + a % hosts);
                let gateway = Ipv4Addr::from(base + 1 + g % hosts);
                let nameservers = ns
                    .into_iter()
                    .filter(|(first, _)| *first != 127)
                    .map(|(first, [b, c, d])| Ipv4Addr::new(first, b, c, d))
                    .collect();
                NetworkConfig::new(mac, address, prefix, gateway, mtu, nameservers).ok()
            },
        )
}

/// Every tunnel message a host or guest can send.
fn tcp_messages() -> impl Strategy<Value = (HostMessage, GuestMessage)> {
    (
        any::<u64>(),
        stream_id(),
        any::<u16>(),
        any::<u32>(),
        0u8..3,
        0u8..4,
        prop::option::of(".{0,40}"),
    )
        .prop_map(|(id, stream, port, window, host_pick, guest_pick, error)| {
            let id = RequestId(id);
            let host = match host_pick {
                0 => HostMessage::Request {
                    id,
                    request: Request::TcpConnect {
                        stream,
                        port,
                        window,
                    },
                },
                1 => HostMessage::TcpShutdown { stream },
                _ => HostMessage::TcpClose { stream },
            };
            let guest = match guest_pick {
                0 => GuestMessage::Response {
                    id,
                    response: Response::TcpConnected,
                },
                1 => GuestMessage::Error {
                    id: Some(id),
                    error: ErrorBody {
                        code: ErrorCode::ConnectFailed,
                        message: error.clone().unwrap_or_default(),
                    },
                },
                2 => GuestMessage::TcpEof { stream },
                _ => GuestMessage::TcpClosed { stream, error },
            };
            (host, guest)
        })
}

proptest! {
    #[test]
    fn tcp_messages_round_trip((host, guest) in tcp_messages()) {
        let frame = host.to_frame().expect("encodes");
        let wire = frame.to_bytes().expect("fits a CONTROL frame");
        let mut d = Decoder::new();
        d.feed(&wire);
        let Some(Frame::Control(payload)) = d.next_frame().expect("valid") else {
            panic!("control frame")
        };
        prop_assert_eq!(HostMessage::from_payload(&payload).expect("parses"), host);

        let frame = guest.to_frame().expect("encodes");
        let Frame::Control(payload) = &frame else { panic!("control frame") };
        prop_assert_eq!(GuestMessage::from_payload(payload).expect("parses"), guest);
    }

    #[test]
    fn network_messages_round_trip(
        network in network_config(),
        id in any::<u64>(),
        interface in "[a-z][a-z0-9]{0,14}",
        ipv6_disabled in any::<bool>(),
    ) {
        let request = HostMessage::Request {
            id: RequestId(id),
            request: Request::ConfigureNetwork { network: network.clone() },
        };
        let frame = request.to_frame().expect("encodes");
        let Frame::Control(payload) = &frame else { panic!("control frame") };
        prop_assert_eq!(HostMessage::from_payload(payload).expect("parses"), request);

        let ack = GuestMessage::Response {
            id: RequestId(id),
            response: Response::NetworkConfigured(NetworkAck {
                interface: InterfaceName::new(interface).expect("valid name"),
                mac: network.mac(),
                address: network.address(),
                prefix_len: network.prefix_len(),
                gateway: network.gateway(),
                mtu: network.mtu(),
                ipv6_disabled,
                nameservers: network.nameservers().len() as u8,
            }),
        };
        let frame = ack.to_frame().expect("encodes");
        let Frame::Control(payload) = &frame else { panic!("control frame") };
        prop_assert_eq!(GuestMessage::from_payload(payload).expect("parses"), ack);
    }

    #[test]
    fn identity_messages_round_trip(
        identity in identity(),
        id in any::<u64>(),
        flags in any::<[bool; 5]>(),
        step in any::<i64>(),
    ) {
        let request = HostMessage::Request {
            id: RequestId(id),
            request: Request::ApplyIdentity { identity: identity.clone() },
        };
        let frame = request.to_frame().expect("encodes");
        let Frame::Control(payload) = &frame else { panic!("control frame") };
        prop_assert_eq!(HostMessage::from_payload(payload).expect("parses"), request);

        let ack = GuestMessage::Response {
            id: RequestId(id),
            response: Response::IdentityApplied(IdentityAck {
                restore_id: identity.restore_id,
                entropy_credited: flags[0],
                rng_reseeded: flags[1],
                clock_set: flags[2],
                clock_step_ns: step,
                hostname_set: flags[3],
                machine_id_written: flags[4],
            }),
        };
        let frame = ack.to_frame().expect("encodes");
        let Frame::Control(payload) = &frame else { panic!("control frame") };
        prop_assert_eq!(GuestMessage::from_payload(payload).expect("parses"), ack);
    }

    #[test]
    fn frames_round_trip_under_any_chunking(
        frames in prop::collection::vec(frame(), 1..8),
        chunk in 1usize..300,
    ) {
        let mut wire = Vec::new();
        for f in &frames {
            wire.extend_from_slice(&f.to_bytes().expect("generated frames are valid"));
        }
        let mut d = Decoder::new();
        let mut out = Vec::new();
        for piece in wire.chunks(chunk) {
            d.feed(piece);
            while let Some(f) = d.next_frame().expect("valid stream") {
                out.push(f);
            }
        }
        prop_assert_eq!(out, frames);
        prop_assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn hunting_finds_sync_after_garbage(
        garbage in prop::collection::vec(any::<u8>().prop_filter("no magic byte", |b| *b != 0x9f), 0..4096),
        nonce in any::<u64>(),
        chunk in 1usize..100,
    ) {
        let sync = Frame::Sync(SyncFrame { nonce, versions: vec![1] });
        let mut wire = garbage.clone();
        wire.extend_from_slice(&sync.to_bytes().expect("valid"));
        let mut d = Decoder::hunting(HuntTarget::Sync);
        let mut found = None;
        for piece in wire.chunks(chunk) {
            d.feed(piece);
            if let Some(f) = d.next_frame().expect("hunting never fails") {
                found = Some(f);
            }
        }
        prop_assert_eq!(found, Some(sync));
        prop_assert_eq!(d.discarded(), garbage.len() as u64);
    }

    #[test]
    fn fuzz_decode_never_panics_on_arbitrary_bytes(data in prop::collection::vec(any::<u8>(), 0..4096)) {
        fuzz_decode(&data);
    }

    #[test]
    fn fuzz_decode_never_panics_on_mutated_frames(
        frames in prop::collection::vec(frame(), 1..6),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
        lead in any::<u8>(),
    ) {
        let mut wire = vec![lead];
        for f in &frames {
            wire.extend_from_slice(&f.to_bytes().expect("valid"));
        }
        for (at, byte) in flips {
            let i = at.index(wire.len());
            wire[i] ^= byte;
        }
        fuzz_decode(&wire);
    }
}

#[test]
fn max_data_frame_round_trips() {
    let frame = Frame::Data {
        stream: StreamId::FIRST,
        channel: DataChannel::Stdout,
        data: Bytes::from(vec![0xAB; MAX_DATA_PAYLOAD]),
    };
    let mut d = Decoder::new();
    d.feed(&frame.to_bytes().expect("max size is allowed"));
    assert_eq!(d.next_frame().expect("valid").as_ref(), Some(&frame));
}

/// A file message a host or guest can send, from arbitrary (valid) values.
fn file_messages() -> impl Strategy<Value = (HostMessage, GuestMessage)> {
    (
        any::<u64>(),
        stream_id(),
        "/[a-z0-9/._-]{0,60}",
        "[a-z0-9._-]{1,40}",
        (any::<u64>(), any::<u32>(), any::<i64>(), any::<bool>()),
        0u8..9,
        0u8..5,
    )
        .prop_filter("entry names are not . or ..", |(_, _, _, name, _, _, _)| {
            name != "." && name != ".."
        })
        .prop_map(
            |(id, stream, path, name, (n, window, mtime, flag), host_pick, guest_pick)| {
                let id = RequestId(id);
                let path =
                    kiln_agent_proto::GuestPath::new(path).expect("strategy makes valid paths");
                let name =
                    kiln_agent_proto::EntryName::new(name).expect("strategy makes valid names");
                let request = match host_pick {
                    0 => Request::FileWrite {
                        stream,
                        path: path.clone(),
                        mode: flag.then_some(window & 0o7777),
                        tar: flag,
                    },
                    1 => Request::FileRead {
                        stream,
                        path: path.clone(),
                        tar: flag,
                        window,
                    },
                    2 => Request::FileStat { path: path.clone() },
                    3 => Request::FileList {
                        path: path.clone(),
                        after: flag.then(|| name.clone()),
                    },
                    4 => Request::FileMkdir {
                        path: path.clone(),
                        parents: flag,
                        mode: None,
                    },
                    5 => Request::FileRemove {
                        path: path.clone(),
                        recursive: flag,
                    },
                    _ => Request::FileRename {
                        from: path.clone(),
                        to: path.clone(),
                    },
                };
                let host = match host_pick {
                    7 => HostMessage::FileEnd { stream },
                    8 => HostMessage::FileAbort { stream },
                    _ => HostMessage::Request { id, request },
                };
                let stat = kiln_agent_proto::FileStat {
                    kind: kiln_agent_proto::FileKind::File,
                    size: n,
                    mode: window & 0o7777,
                    mtime_unix_ns: mtime,
                    uid: window,
                    gid: window,
                    symlink_target: None,
                };
                let response = match guest_pick {
                    0 => Response::FileWriteReady,
                    1 => Response::FileReadStarted {
                        size: flag.then_some(n),
                    },
                    2 => Response::FileStat(stat.clone()),
                    _ => Response::FileList(
                        kiln_agent_proto::FileList::new(
                            vec![kiln_agent_proto::FileEntry {
                                name: name.clone(),
                                stat,
                            }],
                            flag.then_some(name),
                        )
                        .expect("one entry"),
                    ),
                };
                let guest = match guest_pick {
                    4 => GuestMessage::FileDone {
                        stream,
                        bytes: n,
                        error: flag.then(|| ErrorBody {
                            code: ErrorCode::NotFound,
                            message: path.to_string(),
                        }),
                    },
                    _ => GuestMessage::Response { id, response },
                };
                (host, guest)
            },
        )
}

proptest! {
    #[test]
    fn file_messages_round_trip((host, guest) in file_messages()) {
        let frame = host.to_frame().expect("encodes");
        let Frame::Control(payload) = &frame else { panic!("control frame") };
        prop_assert_eq!(HostMessage::from_payload(payload).expect("parses"), host);
        let frame = guest.to_frame().expect("encodes");
        let Frame::Control(payload) = &frame else { panic!("control frame") };
        prop_assert_eq!(GuestMessage::from_payload(payload).expect("parses"), guest);
    }
}

proptest! {
    #[test]
    fn pty_messages_round_trip(
        rows in 1u32..=1000,
        cols in 1u32..=1000,
        term in proptest::option::of("[A-Za-z0-9._+-]{1,64}"),
        stream in 1u32..,
        id in any::<u64>(),
    ) {
        use kiln_agent_proto::{ExecRequest, TermName, TtyRequest, TtySize};
        let stream = StreamId::new(stream).expect("non-zero");
        let size = TtySize::new(rows, cols).expect("in range");
        let tty = TtyRequest {
            size,
            term: term.map(|t| TermName::new(t).expect("plain name")),
        };
        for msg in [
            HostMessage::Request {
                id: RequestId(id),
                request: Request::Exec {
                    stream,
                    output_window: 1,
                    exec: ExecRequest { tty: Some(tty.clone()), ..ExecRequest::new(["sh"]) },
                },
            },
            HostMessage::Request { id: RequestId(id), request: Request::ExecResize { stream, size } },
        ] {
            let frame = msg.to_frame().expect("encodes");
            let Frame::Control(payload) = &frame else { panic!("control frame") };
            prop_assert_eq!(HostMessage::from_payload(payload).expect("parses"), msg);
        }
    }

    #[test]
    fn exec_user_round_trips(
        user in "[a-z_][a-z0-9_.-]{0,31}|[0-9]{1,9}",
        group in proptest::option::of("[a-z_][a-z0-9_.-]{0,31}|[0-9]{1,9}"),
        id in any::<u64>(),
    ) {
        use kiln_agent_proto::{ExecRequest, ExecUser};
        let spec = match &group {
            Some(g) => format!("{user}:{g}"),
            None => user.clone(),
        };
        let user = ExecUser::new(spec).expect("valid form");
        let msg = HostMessage::Request {
            id: RequestId(id),
            request: Request::Exec {
                stream: StreamId::FIRST,
                output_window: 1,
                exec: ExecRequest { user: Some(user), ..ExecRequest::new(["id"]) },
            },
        };
        let frame = msg.to_frame().expect("encodes");
        let Frame::Control(payload) = &frame else { panic!("control frame") };
        prop_assert_eq!(HostMessage::from_payload(payload).expect("parses"), msg);
    }

    #[test]
    fn tty_size_out_of_range_never_parses(rows in 1001u32.., cols in 0u32..=1000) {
        let json = format!(r#"{{"type":"request","id":1,"request":{{"op":"exec_resize","stream":1,"rows":{rows},"cols":{cols}}}}}"#);
        prop_assert!(HostMessage::from_payload(json.as_bytes()).is_err());
        let json = format!(r#"{{"type":"request","id":1,"request":{{"op":"exec_resize","stream":1,"rows":{cols},"cols":{rows}}}}}"#);
        prop_assert!(HostMessage::from_payload(json.as_bytes()).is_err());
    }
}
