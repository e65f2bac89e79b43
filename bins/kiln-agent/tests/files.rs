//! File operations (`files-v1`) end to end: the real agent (session, stream table, file
//! tasks) and the real host client (`FileWriter`, `FileReader`, the one-shot operations) over
//! `tokio::io::duplex`. The "guest" filesystem is a temporary directory of this host. No VM,
//! no root.

use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::Path;
use std::time::Duration;

use kiln_agent_host::{
    AgentClient, AgentError, ClientConfig, EntryName, ErrorCode, FEATURE_FILES_V1, FileKind,
    FileReadRequest, FileWriteRequest, GuestPath, MAX_LIST_ENTRIES,
};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::mpsc;

use kiln_agent::{Agent, AgentConfig, ReapMode, Reaper};

mod support;
use support::start_proxy;

const HANDSHAKE: Duration = Duration::from_secs(10);
/// Like a unix socket's buffer.
const PIPE: usize = 64 << 10;
/// Upper bound for any one step of these tests: turns a hang into a failure.
const GUARD: Duration = Duration::from_secs(120);

fn start_agent() -> mpsc::UnboundedSender<DuplexStream> {
    let reaper = Reaper::start(ReapMode::RegisteredOnly).expect("sigchld listener");
    let agent = Agent::new(AgentConfig::default(), reaper);
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

async fn connect() -> AgentClient {
    let conns = start_agent();
    let (host, guest) = tokio::io::duplex(PIPE);
    conns.send(guest).expect("agent task alive");
    connect_over(host).await
}

async fn connect_over(host: DuplexStream) -> AgentClient {
    let config = ClientConfig {
        handshake_deadline: HANDSHAKE,
        ..ClientConfig::default()
    };
    let (client, info) = AgentClient::connect_with(host, config)
        .await
        .expect("handshake");
    assert!(info.features.iter().any(|f| f == FEATURE_FILES_V1));
    client
}

async fn guarded<F: std::future::Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(GUARD, f)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {GUARD:?}"))
}

fn gpath(p: &Path) -> GuestPath {
    GuestPath::new(p.to_str().expect("utf-8 temp path")).expect("absolute path")
}

fn remote_code(e: &AgentError) -> Option<ErrorCode> {
    match e {
        AgentError::Remote { code, .. } => Some(*code),
        _ => None,
    }
}

/// Names in `dir` on this host, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
        .collect();
    v.sort();
    v
}

/// Deterministic, incompressible-looking bytes (xorshift), `len` of them, in chunks.
fn pattern_chunk(state: &mut u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_write_then_read_64_mib_round_trips_with_equal_sha256_and_mode() {
    const TOTAL: usize = 64 << 20;
    const CHUNK: usize = 1 << 20;
    let dir = tempfile::tempdir().expect("tempdir");
    let target = dir.path().join("big.bin");
    let client = connect().await;

    let mut req = FileWriteRequest::new(gpath(&target));
    req.mode = Some(0o640);
    let mut writer = guarded("file_write", client.file_write(req))
        .await
        .expect("write starts");
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut sent = Sha256::new();
    let mut written = 0;
    while written < TOTAL {
        let chunk = pattern_chunk(&mut state, CHUNK);
        sent.update(&chunk);
        guarded("write", writer.write_all(&chunk))
            .await
            .expect("bytes go out");
        written += CHUNK;
    }
    let bytes = guarded("finish", writer.finish())
        .await
        .expect("write completes");
    assert_eq!(bytes, TOTAL as u64);
    let meta = std::fs::metadata(&target).expect("file exists");
    assert_eq!(meta.len(), TOTAL as u64);
    assert_eq!(meta.mode() & 0o7777, 0o640);
    assert_eq!(
        names(dir.path()),
        vec!["big.bin".to_owned()],
        "no temp file left"
    );

    let mut reader = guarded(
        "file_read",
        client.file_read(FileReadRequest::new(gpath(&target))),
    )
    .await
    .expect("read starts");
    assert_eq!(reader.size(), Some(TOTAL as u64));
    let mut got = Sha256::new();
    let mut buf = vec![0u8; 256 << 10];
    let mut received = 0usize;
    loop {
        let n = guarded("read", reader.read(&mut buf))
            .await
            .expect("bytes come in");
        if n == 0 {
            break;
        }
        got.update(&buf[..n]);
        received += n;
    }
    assert_eq!(received, TOTAL);
    assert_eq!(got.finalize(), sent.finalize());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_write_dropped_before_finish_leaves_no_file_and_no_temp() {
    let dir = tempfile::tempdir().expect("tempdir");
    let target = dir.path().join("partial.txt");
    let client = connect().await;
    let mut writer = guarded(
        "file_write",
        client.file_write(FileWriteRequest::new(gpath(&target))),
    )
    .await
    .expect("write starts");
    guarded("write", writer.write_all(&[7u8; 100_000]))
        .await
        .expect("bytes go out");
    // While the write is open, only the temporary file exists.
    let during = names(dir.path());
    assert_eq!(during.len(), 1, "{during:?}");
    assert!(during[0].starts_with(".kiln-write-"), "{during:?}");
    drop(writer);
    // The abort is asynchronous: ask the guest until the temp file is gone (each question
    // is a round trip through the same agent, not a timed wait).
    let listed = guarded("abort cleanup", async {
        loop {
            let list = client
                .file_list(&gpath(dir.path()), None)
                .await
                .expect("list works");
            if list.entries().is_empty() {
                return list;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(listed.entries().is_empty());
    assert!(names(dir.path()).is_empty());
    let missing = client
        .file_stat(&gpath(&target))
        .await
        .expect_err("nothing at the target");
    assert_eq!(remote_code(&missing), Some(ErrorCode::NotFound));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_read_missing_path_is_typed_not_found() {
    let dir = tempfile::tempdir().expect("tempdir");
    let client = connect().await;
    let err = guarded(
        "file_read",
        client.file_read(FileReadRequest::new(gpath(&dir.path().join("nope")))),
    )
    .await
    .expect_err("missing file");
    assert_eq!(remote_code(&err), Some(ErrorCode::NotFound), "{err}");
    // A directory without `tar` is refused with its own code.
    let err = guarded(
        "file_read",
        client.file_read(FileReadRequest::new(gpath(dir.path()))),
    )
    .await
    .expect_err("a directory");
    assert_eq!(remote_code(&err), Some(ErrorCode::IsADirectory), "{err}");
}

/// A directory tree with modes, nesting, a symlink and an empty directory.
fn make_tree(root: &Path) {
    std::fs::create_dir_all(root.join("a/b/c")).expect("mkdir");
    std::fs::create_dir(root.join("empty")).expect("mkdir");
    std::fs::write(root.join("top.txt"), b"top\n").expect("write");
    std::fs::write(root.join("a/b/c/deep.sh"), b"#!/bin/sh\necho deep\n").expect("write");
    std::fs::write(root.join("a/secret"), b"s3cret").expect("write");
    std::fs::set_permissions(root.join("a/b/c/deep.sh"), PermissionsExt::from_mode(0o755))
        .expect("chmod");
    std::fs::set_permissions(root.join("a/secret"), PermissionsExt::from_mode(0o600))
        .expect("chmod");
    std::fs::set_permissions(root.join("a/b"), PermissionsExt::from_mode(0o750)).expect("chmod");
    symlink("b/c/deep.sh", root.join("a/link")).expect("symlink");
}

fn check_tree(root: &Path) {
    let mode = |p: &str| {
        std::fs::symlink_metadata(root.join(p))
            .unwrap_or_else(|e| panic!("{p}: {e}"))
            .mode()
            & 0o7777
    };
    assert_eq!(std::fs::read(root.join("top.txt")).expect("top"), b"top\n");
    assert_eq!(
        std::fs::read(root.join("a/b/c/deep.sh")).expect("deep"),
        b"#!/bin/sh\necho deep\n"
    );
    assert_eq!(mode("a/b/c/deep.sh"), 0o755);
    assert_eq!(mode("a/secret"), 0o600);
    assert_eq!(mode("a/b"), 0o750);
    let link = std::fs::symlink_metadata(root.join("a/link")).expect("link");
    assert!(link.file_type().is_symlink());
    assert_eq!(
        std::fs::read_link(root.join("a/link")).expect("readlink"),
        Path::new("b/c/deep.sh")
    );
    assert!(
        std::fs::read_dir(root.join("empty"))
            .expect("empty dir")
            .next()
            .is_none()
    );
}

fn pack(root: &Path) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    b.append_dir_all(".", root).expect("pack");
    b.into_inner().expect("finish")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_tar_directory_round_trip_keeps_modes_nesting_symlinks_and_empty_dirs() {
    let work = tempfile::tempdir().expect("tempdir");
    let src = work.path().join("src");
    make_tree(&src);
    let archive = pack(&src);
    let client = connect().await;

    let dst = work.path().join("dst");
    let mut req = FileWriteRequest::new(gpath(&dst));
    req.tar = true;
    let mut writer = guarded("file_write", client.file_write(req))
        .await
        .expect("tar write starts");
    guarded("write", writer.write_all(&archive))
        .await
        .expect("archive goes out");
    let bytes = guarded("finish", writer.finish()).await.expect("unpacked");
    assert_eq!(bytes, archive.len() as u64);
    check_tree(&dst);

    let mut req = FileReadRequest::new(gpath(&dst));
    req.tar = true;
    let mut reader = guarded("file_read", client.file_read(req))
        .await
        .expect("tar read starts");
    assert_eq!(reader.size(), None);
    let mut packed = Vec::new();
    guarded("read", reader.read_to_end(&mut packed))
        .await
        .expect("archive comes in");
    let back = work.path().join("back");
    std::fs::create_dir(&back).expect("mkdir");
    let mut unpack = tar::Archive::new(&packed[..]);
    unpack.set_preserve_permissions(true);
    unpack
        .unpack(&back)
        .expect("host unpacks the guest's archive");
    check_tree(&back);
}

/// A tar archive with one regular-file entry whose name is written raw into the header
/// (`tar::Builder` itself refuses `..`).
fn archive_with_raw_name(name: &[u8]) -> Vec<u8> {
    let data = b"pwned\n";
    let mut header = tar::Header::new_old();
    header.as_old_mut().name[..name.len()].copy_from_slice(name);
    header.set_size(data.len() as u64);
    header.set_mode(0o644);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_cksum();
    let mut out = header.as_bytes().to_vec();
    out.extend_from_slice(data);
    out.resize(512 + 512, 0);
    // End-of-archive: two zero blocks.
    out.extend_from_slice(&[0u8; 1024]);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_tar_entry_escaping_the_target_is_refused_and_leaves_nothing() {
    let work = tempfile::tempdir().expect("tempdir");
    let dst = work.path().join("dst");
    let client = connect().await;
    for name in [&b"../evil"[..], b"./a/../../evil", b"/tmp/evil-kiln-abs"] {
        let mut req = FileWriteRequest::new(gpath(&dst));
        req.tar = true;
        let mut writer = guarded("file_write", client.file_write(req))
            .await
            .expect("tar write starts");
        // The guest may refuse before every byte is in: a failed write is fine here.
        let _ = guarded("write", writer.write_all(&archive_with_raw_name(name))).await;
        let err = guarded("finish", writer.finish())
            .await
            .expect_err("escaping entry refused");
        assert_eq!(
            remote_code(&err),
            Some(ErrorCode::InvalidPath),
            "{}: {err}",
            String::from_utf8_lossy(name)
        );
        assert!(names(work.path()).is_empty(), "nothing left behind");
    }
    assert!(!Path::new("/tmp/evil-kiln-abs").exists());

    // A symlink entry pointing outside, then an entry through it.
    let outside = tempfile::tempdir().expect("tempdir");
    let mut b = tar::Builder::new(Vec::new());
    let mut link = tar::Header::new_gnu();
    link.set_entry_type(tar::EntryType::Symlink);
    link.set_size(0);
    link.set_mode(0o777);
    b.append_link(&mut link, "l", outside.path())
        .expect("symlink entry");
    let mut file = tar::Header::new_gnu();
    file.set_size(3);
    file.set_mode(0o644);
    b.append_data(&mut file, "l/evil", &b"bad"[..])
        .expect("entry through the symlink");
    let archive = b.into_inner().expect("finish");
    let mut req = FileWriteRequest::new(gpath(&dst));
    req.tar = true;
    let mut writer = guarded("file_write", client.file_write(req))
        .await
        .expect("tar write starts");
    let _ = guarded("write", writer.write_all(&archive)).await;
    let err = guarded("finish", writer.finish())
        .await
        .expect_err("entry through a symlink refused");
    assert_eq!(remote_code(&err), Some(ErrorCode::InvalidPath), "{err}");
    assert!(names(outside.path()).is_empty(), "nothing written outside");
    assert!(names(work.path()).is_empty(), "nothing left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_list_pages_past_the_per_reply_cap() {
    const COUNT: usize = MAX_LIST_ENTRIES + 44;
    let dir = tempfile::tempdir().expect("tempdir");
    for i in 0..COUNT {
        std::fs::write(dir.path().join(format!("f{i:04}")), b"x").expect("write");
    }
    let client = connect().await;
    let path = gpath(dir.path());
    let first = client.file_list(&path, None).await.expect("first page");
    assert_eq!(first.entries().len(), MAX_LIST_ENTRIES);
    let after = first.next_after().cloned().expect("more to come");
    assert_eq!(
        after,
        EntryName::new(format!("f{:04}", MAX_LIST_ENTRIES - 1)).expect("name")
    );
    let second = client
        .file_list(&path, Some(&after))
        .await
        .expect("second page");
    assert_eq!(second.entries().len(), COUNT - MAX_LIST_ENTRIES);
    assert!(second.next_after().is_none());
    let all: Vec<String> = first
        .entries()
        .iter()
        .chain(second.entries())
        .map(|e| e.name.as_str().to_owned())
        .collect();
    let expected: Vec<String> = (0..COUNT).map(|i| format!("f{i:04}")).collect();
    assert_eq!(all, expected);
    assert!(
        first
            .entries()
            .iter()
            .all(|e| e.stat.kind == FileKind::File && e.stat.size == 1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_remove_non_recursive_on_non_empty_dir_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(tree.join("sub")).expect("mkdir");
    std::fs::write(tree.join("sub/f"), b"x").expect("write");
    let client = connect().await;
    let err = client
        .file_remove(&gpath(&tree), false)
        .await
        .expect_err("not empty");
    assert_eq!(remote_code(&err), Some(ErrorCode::NotEmpty), "{err}");
    assert!(tree.join("sub/f").exists());
    client
        .file_remove(&gpath(&tree), true)
        .await
        .expect("recursive remove");
    assert!(!tree.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_rename_mkdir_and_stat_behave_like_the_syscalls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let client = connect().await;
    let nested = dir.path().join("x/y/z");
    let err = client
        .file_mkdir(&gpath(&nested), false, None)
        .await
        .expect_err("missing parents");
    assert_eq!(remote_code(&err), Some(ErrorCode::NotFound), "{err}");
    client
        .file_mkdir(&gpath(&nested), true, Some(0o700))
        .await
        .expect("mkdir -p");
    let stat = client.file_stat(&gpath(&nested)).await.expect("stat");
    assert_eq!((stat.kind, stat.mode), (FileKind::Dir, 0o700));

    let from = dir.path().join("x/old");
    let to = dir.path().join("x/new");
    std::fs::write(&from, b"payload").expect("write");
    symlink("new", dir.path().join("x/link")).expect("symlink");
    client
        .file_rename(&gpath(&from), &gpath(&to))
        .await
        .expect("rename");
    let old = client
        .file_stat(&gpath(&from))
        .await
        .expect_err("old name gone");
    assert_eq!(remote_code(&old), Some(ErrorCode::NotFound));
    let new = client.file_stat(&gpath(&to)).await.expect("new name");
    assert_eq!((new.kind, new.size), (FileKind::File, 7));
    let link = client
        .file_stat(&gpath(&dir.path().join("x/link")))
        .await
        .expect("lstat");
    assert_eq!(link.kind, FileKind::Symlink);
    assert_eq!(
        link.symlink_target.map(|t| t.as_str().to_owned()),
        Some("new".to_owned())
    );
    let err = client
        .file_write(FileWriteRequest::new(gpath(&nested)))
        .await
        .expect_err("a directory is not a file target");
    assert_eq!(remote_code(&err), Some(ErrorCode::IsADirectory), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_read_dropped_early_frees_the_guest_transfer() {
    // More early drops than the guest's 64-transfer cap: if an abort did not end the guest's
    // transfer (stuck waiting for credit), a later read would fail with too_many_streams.
    let dir = tempfile::tempdir().expect("tempdir");
    let big = dir.path().join("big");
    std::fs::write(&big, vec![5u8; 1 << 20]).expect("write");
    let client = connect().await;
    for i in 0..AgentConfig::default().max_file_transfers + 6 {
        let mut reader = guarded(
            "file_read",
            client.file_read(FileReadRequest::new(gpath(&big))),
        )
        .await
        .unwrap_or_else(|e| panic!("read {i} refused: {e}"));
        let mut buf = [0u8; 4096];
        let n = guarded("read", reader.read(&mut buf)).await.expect("bytes");
        assert!(n > 0);
        drop(reader);
    }
    // The connection is still healthy and the file untouched.
    let stat = client.file_stat(&gpath(&big)).await.expect("stat");
    assert_eq!(stat.size, 1 << 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_write_cut_off_by_a_resync_leaves_no_file_and_no_temp() {
    let dir = tempfile::tempdir().expect("tempdir");
    let target = dir.path().join("cut.txt");
    let conns = start_agent();
    let (agent_side, proxy_side) = tokio::io::duplex(PIPE);
    conns.send(agent_side).expect("agent alive");
    let proxy = start_proxy(proxy_side);

    let (host1, proxy1) = tokio::io::duplex(PIPE);
    proxy.send(proxy1).expect("proxy alive");
    let first = connect_over(host1).await;
    let mut writer = guarded(
        "file_write",
        first.file_write(FileWriteRequest::new(gpath(&target))),
    )
    .await
    .expect("write starts");
    guarded("write", writer.write_all(&[1u8; 50_000]))
        .await
        .expect("bytes go out");
    // A round trip after the bytes: they have all reached the agent, so the switch below
    // does not cut a frame in half (the proxy would hand the rest of it to the new host's
    // SYNCs, which the agent would read as payload).
    first
        .file_stat(&gpath(dir.path()))
        .await
        .expect("round trip");
    assert_eq!(names(dir.path()).len(), 1, "the temp file exists");
    // A new host takes over without the agent seeing EOF; the first client is cut off, so no
    // file_abort is sent: dropping the session alone must remove the temp file.
    let (host2, proxy2) = tokio::io::duplex(PIPE);
    proxy.send(proxy2).expect("proxy alive");
    let second = connect_over(host2).await;
    guarded("temp removed after the resync", async {
        loop {
            let list = second
                .file_list(&gpath(dir.path()), None)
                .await
                .expect("list works");
            if list.entries().is_empty() {
                return;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(!target.exists());
    drop(writer);
}
