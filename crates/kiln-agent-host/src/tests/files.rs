//! Host side of `files-v1` against a scripted hostile guest: credit overruns on a read,
//! bytes after `file_done`, byte counts that do not match what was sent (4 GiB claims),
//! listings with too many entries or bad names. Each must end in a clean error, never a
//! hang, a short file passed off as complete, or an allocation sized by the guest.
//! The real agent end to end is tested in `bins/kiln-agent/tests/files.rs`.

use bytes::Bytes;
use kiln_agent_proto::{
    DataChannel, ErrorBody, ErrorCode, Frame, GuestMessage, GuestPath, HostMessage, Request,
    Response, StreamId,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{DEADLINE, FakeGuest};
use crate::{
    AgentClient, AgentError, ClientConfig, ClosedReason, FileReadRequest, FileWriteRequest,
};

const FOUR_GIB: u64 = 4 << 30;

fn config(file_window: u32) -> ClientConfig {
    ClientConfig {
        handshake_deadline: DEADLINE,
        file_window,
        ..ClientConfig::default()
    }
}

fn path() -> GuestPath {
    GuestPath::new("/root/f").expect("valid")
}

impl FakeGuest {
    /// Answers the next request, which must be `file_read`, with `size`; returns the stream
    /// and the window it was offered.
    async fn accept_read(&mut self, size: Option<u64>) -> (StreamId, u32) {
        let (id, req) = self.request().await;
        let Request::FileRead { stream, window, .. } = req else {
            panic!("expected file_read, got {req:?}");
        };
        self.respond(id, Response::FileReadStarted { size }).await;
        (stream, window)
    }

    async fn read_data(&mut self, stream: StreamId, data: &'static [u8]) {
        self.send(Frame::Data {
            stream,
            channel: DataChannel::Stdout,
            data: Bytes::from_static(data),
        })
        .await;
    }

    async fn done(&mut self, stream: StreamId, bytes: u64, error: Option<ErrorBody>) {
        let msg = GuestMessage::FileDone {
            stream,
            bytes,
            error,
        };
        self.send(msg.to_frame().expect("encodes")).await;
    }

    /// Answers the next request with a raw JSON response body (no validation by this side).
    async fn respond_raw(&mut self, response_json: &str) {
        let (id, _) = self.request().await;
        let json = format!(r#"{{"type":"response","id":{id},"response":{response_json}}}"#);
        self.send(Frame::Control(Bytes::from(json))).await;
    }
}

async fn open_read(
    client: &AgentClient,
    guest: &mut FakeGuest,
    size: Option<u64>,
) -> (crate::FileReader, StreamId) {
    let (reader, (stream, _)) = tokio::join!(
        client.file_read(FileReadRequest::new(path())),
        guest.accept_read(size)
    );
    (reader.expect("read starts"), stream)
}

#[tokio::test]
async fn file_read_credit_overrun_closes_channel_and_fails_the_read() {
    let (client, mut guest) = super::connected_with(config(8)).await;
    let (mut reader, stream) = open_read(&client, &mut guest, Some(9)).await;
    guest.read_data(stream, b"123456789").await;
    client.closed().await;
    assert!(matches!(
        client.close_reason(),
        Some(ClosedReason::Violation { .. })
    ));
    let mut buf = Vec::new();
    let err = reader
        .read_to_end(&mut buf)
        .await
        .expect_err("no clean end");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionAborted, "{err}");
    assert!(buf.is_empty(), "overrun bytes were never queued");
}

#[tokio::test]
async fn file_read_bytes_after_file_done_close_the_channel() {
    let (client, mut guest) = super::connected_with(config(1024)).await;
    let (mut reader, stream) = open_read(&client, &mut guest, Some(3)).await;
    guest.read_data(stream, b"abc").await;
    guest.done(stream, 3, None).await;
    guest.read_data(stream, b"late").await;
    client.closed().await;
    match client.close_reason() {
        Some(ClosedReason::Violation { what }) => {
            assert!(what.contains("after file_done"), "{what}")
        }
        other => panic!("expected a violation, got {other:?}"),
    }
    // What arrived before the end is still delivered, and the late bytes are not.
    let mut buf = [0u8; 16];
    let n = reader.read(&mut buf).await.expect("buffered bytes");
    assert_eq!(&buf[..n], b"abc");
}

#[tokio::test]
async fn file_read_4_gib_claims_end_in_an_error_not_a_short_file() {
    let (client, mut guest) = super::connected_with(config(1024)).await;
    let (mut reader, stream) = open_read(&client, &mut guest, Some(FOUR_GIB)).await;
    // The size is a claim, reported but never used to size a buffer.
    assert_eq!(reader.size(), Some(FOUR_GIB));
    guest.read_data(stream, b"tiny").await;
    guest.done(stream, FOUR_GIB, None).await;
    let mut buf = Vec::new();
    let err = reader.read_to_end(&mut buf).await.expect_err("truncated");
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData, "{err}");
    assert_eq!(buf, b"tiny");
    assert!(buf.capacity() < 1 << 20, "no allocation sized by the claim");
    // The channel itself is fine: the lie only fails this read.
    assert!(client.close_reason().is_none(), "channel still open");
}

#[tokio::test]
async fn file_read_guest_error_fails_the_read_with_its_code() {
    let (client, mut guest) = super::connected_with(config(1024)).await;
    let (mut reader, stream) = open_read(&client, &mut guest, Some(10)).await;
    guest.read_data(stream, b"part").await;
    let error = ErrorBody {
        code: ErrorCode::Io,
        message: "input/output error".into(),
    };
    guest.done(stream, 4, Some(error)).await;
    let mut buf = Vec::new();
    let err = reader
        .read_to_end(&mut buf)
        .await
        .expect_err("guest failed");
    let inner = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<AgentError>())
        .expect("wraps the agent error");
    assert!(
        matches!(
            inner,
            AgentError::Remote {
                code: ErrorCode::Io,
                ..
            }
        ),
        "{inner:?}"
    );
}

#[tokio::test]
async fn file_list_hostile_answers_close_the_channel() {
    let entry = |name: &str| {
        format!(
            r#"{{"name":"{name}","stat":{{"kind":"file","size":{FOUR_GIB},"mode":420,"mtime_unix_ns":0,"uid":0,"gid":0}}}}"#
        )
    };
    let too_many = vec![entry("a"); kiln_agent_proto::MAX_LIST_ENTRIES + 1].join(",");
    let long = "n".repeat(256);
    for entries in [
        too_many,
        entry("a\\u0000b"),
        entry("a/b"),
        entry(".."),
        entry(""),
        entry(&long),
    ] {
        let (client, mut guest) = super::connected_with(config(1024)).await;
        let body = format!(r#"{{"op":"file_list","entries":[{entries}],"next_after":null}}"#);
        let p = path();
        let (list, ()) = tokio::join!(client.file_list(&p, None), guest.respond_raw(&body));
        let err = list.expect_err("hostile list refused");
        assert!(
            matches!(err, AgentError::ChannelClosed(ClosedReason::Decode(_))),
            "{err:?}"
        );
    }
    // A well-formed answer with a 4 GiB size claim is just metadata.
    let (client, mut guest) = super::connected_with(config(1024)).await;
    let body = format!(
        r#"{{"op":"file_list","entries":[{}],"next_after":null}}"#,
        entry("big")
    );
    let p = path();
    let (list, ()) = tokio::join!(client.file_list(&p, None), guest.respond_raw(&body));
    let list = list.expect("valid list");
    assert_eq!(list.entries()[0].stat.size, FOUR_GIB);
}

#[tokio::test]
async fn file_write_respects_credit_and_drop_sends_abort() {
    let (client, mut guest) = super::connected_with(config(1024)).await;
    let accept = async {
        let (id, req) = guest.request().await;
        let Request::FileWrite { stream, .. } = req else {
            panic!("expected file_write, got {req:?}");
        };
        guest
            .send(Frame::Window {
                stream,
                increment: 5,
            })
            .await;
        guest.respond(id, Response::FileWriteReady).await;
        stream
    };
    let (writer, stream) = tokio::join!(client.file_write(FileWriteRequest::new(path())), accept);
    let mut writer = writer.expect("write starts");
    // Only 5 bytes of credit: the first write takes them, the rest waits.
    let n = writer.write(b"0123456789").await.expect("within credit");
    assert_eq!(n, 5);
    match guest.frame().await {
        Some(Frame::Data {
            stream: s, data, ..
        }) => {
            assert_eq!((s, &data[..]), (stream, &b"01234"[..]));
        }
        other => panic!("expected data, got {other:?}"),
    }
    drop(writer);
    match guest.frame().await {
        Some(Frame::Control(p)) => assert_eq!(
            HostMessage::from_payload(&p).expect("json"),
            HostMessage::FileAbort { stream }
        ),
        other => panic!("expected file_abort, got {other:?}"),
    }
}

#[tokio::test]
async fn file_write_guest_failure_is_reported_by_finish() {
    let (client, mut guest) = super::connected_with(config(1024)).await;
    let accept = async {
        let (id, req) = guest.request().await;
        let Request::FileWrite { stream, .. } = req else {
            panic!("expected file_write, got {req:?}");
        };
        guest.respond(id, Response::FileWriteReady).await;
        stream
    };
    let (writer, stream) = tokio::join!(client.file_write(FileWriteRequest::new(path())), accept);
    let writer = writer.expect("write starts");
    let error = ErrorBody {
        code: ErrorCode::NoSpace,
        message: "no space left on device".into(),
    };
    guest.done(stream, 0, Some(error)).await;
    let err = writer.finish().await.expect_err("guest failed");
    assert!(
        matches!(
            err,
            AgentError::Remote {
                code: ErrorCode::NoSpace,
                ..
            }
        ),
        "{err:?}"
    );
}
