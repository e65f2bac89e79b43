//! The viewer listener served by [`crate::listen::serve`] on a loopback port, with a fake VNC
//! server on a unix socket where QEMU would be: static files and their refusals, links, and
//! the relay's filtering, closing and sharing. Real QEMU and a real browser are in
//! `tests_real.rs`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use kiln_api_types::SandboxId;
use kiln_core::CoreError;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use super::*;

/// A bound against a hang, not a speed: a test that waits this long has failed.
pub(super) const HANG: Duration = Duration::from_secs(60);

/// Finds every sandbox's screen at one socket.
pub(super) struct FixedLocator(pub PathBuf);

impl VncLocator for FixedLocator {
    fn vnc_socket(&self, _id: &SandboxId) -> Result<PathBuf, CoreError> {
        Ok(self.0.clone())
    }
}

/// A viewer listener on a loopback port, serving `novnc_dir` and finding screens at
/// `socket`; links live `ttl`.
pub(super) async fn serve(novnc_dir: PathBuf, socket: PathBuf, ttl: Duration) -> Viewers {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let viewers = Viewers::new(
        ViewConfig {
            addr: listener.local_addr().unwrap(),
            ttl,
            novnc_dir,
        },
        Arc::new(FixedLocator(socket)),
    );
    let app = viewers.router();
    tokio::spawn(async move {
        let settings = crate::listen::tests::test_settings();
        crate::listen::serve(listener, app, &settings, std::future::pending()).await
    });
    viewers
}

/// The token and the path part (`/view/...`) of a link's URL.
pub(super) fn split_url(url: &str) -> (String, String) {
    let path = url.split_once("//").unwrap().1;
    let path = &path[path.find('/').unwrap()..];
    let token = path.split('/').nth(2).unwrap().to_owned();
    (token, path.to_owned())
}

/// One raw HTTP/1.1 request: the status and the body.
async fn http(v: &Viewers, method: &str, path: &str) -> (u16, Vec<u8>, String) {
    let mut s = tokio::net::TcpStream::connect(v.0.config.addr)
        .await
        .unwrap();
    s.write_all(
        format!("{method} {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(HANG, s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let head_end = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&out[..head_end]).to_lowercase();
    let status = head[9..12].parse().unwrap();
    (status, out[head_end + 4..].to_vec(), head)
}

/// A noVNC directory with a page, a script, a symlink inside it and one leading out.
fn novnc_dir(root: &std::path::Path) -> PathBuf {
    let dir = root.join("novnc");
    std::fs::create_dir_all(dir.join("app")).unwrap();
    std::fs::write(dir.join("vnc.html"), "<html>page</html>").unwrap();
    std::fs::write(dir.join("app/ui.js"), "export default 1;").unwrap();
    std::fs::write(dir.join(".hidden"), "hidden").unwrap();
    std::fs::write(root.join("secret"), "secret").unwrap();
    std::os::unix::fs::symlink(root.join("secret"), dir.join("evil.js")).unwrap();
    std::os::unix::fs::symlink("vnc.html", dir.join("alias.html")).unwrap();
    dir
}

fn sandbox() -> SandboxId {
    "sb-0123456789ab".parse().unwrap()
}

#[tokio::test]
async fn static_files_serve_novnc_and_refuse_every_way_out() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = novnc_dir(tmp.path());
    let v = serve(dir, tmp.path().join("none.sock"), HANG).await;
    let link = v.mint(&sandbox(), false).unwrap();
    let (token, page) = split_url(&link.url);
    let (status, body, head) = http(&v, "GET", &page).await;
    assert_eq!((status, body.as_slice()), (200, &b"<html>page</html>"[..]));
    assert!(head.contains("content-type: text/html"), "{head}");
    assert!(head.contains("referrer-policy: no-referrer"), "{head}");
    let (status, body, head) = http(&v, "GET", &format!("/view/{token}/app/ui.js")).await;
    assert_eq!((status, body.as_slice()), (200, &b"export default 1;"[..]));
    assert!(head.contains("content-type: text/javascript"), "{head}");
    // A symlink that stays inside is followed.
    let (status, _, _) = http(&v, "GET", &format!("/view/{token}/alias.html")).await;
    assert_eq!(status, 200);
    for path in [
        "evil.js",
        "../secret",
        "..%2fsecret",
        "%2e%2e/secret",
        "app/../../secret",
        "app/%2e%2e/%2e%2e/secret",
        ".hidden",
        "app",
        "app/",
        "app//ui.js",
        "./vnc.html",
        "nosuch.html",
        "%00",
    ] {
        let (status, body, _) = http(&v, "GET", &format!("/view/{token}/{path}")).await;
        assert_eq!(status, 404, "{path}");
        assert!(!String::from_utf8_lossy(&body).contains("secret"), "{path}");
    }
    // Only GET.
    for method in ["POST", "PUT", "DELETE"] {
        let (status, _, _) = http(&v, method, &page).await;
        assert_eq!(status, 405, "{method}");
    }
    // Another token, or none, sees nothing.
    let other = "0".repeat(64);
    let (status, _, _) = http(&v, "GET", &format!("/view/{other}/vnc.html")).await;
    assert_eq!(status, 404);
    let (status, _, _) = http(&v, "GET", "/vnc.html").await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn links_expire_and_are_revoked_with_their_sandbox() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = novnc_dir(tmp.path());
    let v = serve(dir.clone(), tmp.path().join("none.sock"), Duration::ZERO).await;
    let (_, page) = split_url(&v.mint(&sandbox(), true).unwrap().url);
    let (status, _, _) = http(&v, "GET", &page).await;
    assert_eq!(status, 404, "a link past its TTL still works");

    let v = serve(dir, tmp.path().join("none.sock"), HANG).await;
    let (_, a) = split_url(&v.mint(&sandbox(), false).unwrap().url);
    let other: SandboxId = "sb-ba9876543210".parse().unwrap();
    let (_, b) = split_url(&v.mint(&other, false).unwrap().url);
    v.revoke(&sandbox());
    assert_eq!(http(&v, "GET", &a).await.0, 404);
    assert_eq!(http(&v, "GET", &b).await.0, 200);
}

#[tokio::test]
async fn link_urls_connect_by_themselves_and_differ_each_time() {
    let tmp = tempfile::tempdir().unwrap();
    let v = serve(novnc_dir(tmp.path()), tmp.path().join("x.sock"), HANG).await;
    let a = v.mint(&sandbox(), false).unwrap();
    let b = v.mint(&sandbox(), true).unwrap();
    let (ta, _) = split_url(&a.url);
    let (tb, _) = split_url(&b.url);
    assert_ne!(ta, tb);
    assert_eq!(ta.len(), 64);
    assert!(ta.bytes().all(|c| c.is_ascii_hexdigit()));
    for part in [
        "autoconnect=1",
        "resize=scale",
        "reconnect=1",
        "view_only=1",
        &format!("path=view/{ta}/websockify"),
    ] {
        assert!(a.url.contains(part), "{} lacks {part}", a.url);
    }
    assert!(b.url.contains("view_only=0"), "{}", b.url);
    assert!(
        a.url
            .starts_with(&format!("http://{}/view/", v.0.config.addr))
    );
    assert!(a.expires_at_unix_ms > kiln_core::unix_now_ms());
}

#[tokio::test]
async fn mint_without_novnc_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let v = serve(tmp.path().join("nope"), tmp.path().join("x.sock"), HANG).await;
    let err = v.mint(&sandbox(), false).unwrap_err();
    assert!(matches!(err, ViewError::NoNovnc { .. }), "{err}");
    assert!(err.to_string().contains("novnc"), "{err}");
}

/// A fake VNC server: each connection gets QEMU's version line and `greeting`, and what it
/// receives until the client closes is sent on the channel.
fn fake_vnc(
    listener: UnixListener,
    greeting: Vec<u8>,
) -> tokio::sync::mpsc::UnboundedReceiver<Vec<u8>> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let (tx, greeting) = (tx.clone(), greeting.clone());
            tokio::spawn(async move {
                s.write_all(b"RFB 003.008\n").await.unwrap();
                s.write_all(&greeting).await.unwrap();
                let mut got = Vec::new();
                let _ = s.read_to_end(&mut got).await;
                let _ = tx.send(got);
            });
        }
    });
    rx
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(v: &Viewers, token: &str) -> Ws {
    let url = format!("ws://{}/view/{token}/websockify", v.0.config.addr);
    tokio_tungstenite::connect_async(url).await.unwrap().0
}

/// Reads binary messages until `n` bytes came.
async fn recv_bytes(ws: &mut Ws, n: usize) -> Vec<u8> {
    let mut got = Vec::new();
    while got.len() < n {
        match tokio::time::timeout(HANG, ws.next()).await.unwrap() {
            Some(Ok(WsMessage::Binary(b))) => got.extend_from_slice(&b),
            other => panic!("expected bytes, got {other:?}"),
        }
    }
    got
}

/// Waits for the server's close frame; its code.
async fn closed(ws: &mut Ws) -> Option<u16> {
    loop {
        match tokio::time::timeout(HANG, ws.next()).await.unwrap() {
            Some(Ok(WsMessage::Close(frame))) => return frame.map(|f| f.code.into()),
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return None,
        }
    }
}

/// A client stream: the handshake (asking for exclusive access), then an update request, a
/// pointer event, a key event, a clipboard text and another update request.
fn client_stream() -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let handshake = b"RFB 003.008\n\x01\x00".to_vec();
    let update = [3u8, 1, 0, 0, 0, 0, 2, 128, 1, 224];
    let pointer = [5u8, 1, 0, 10, 0, 20];
    let key = [4u8, 1, 0, 0, 0, 0, 0, 0x61];
    let mut cut = vec![6u8, 0, 0, 0, 0, 0, 0, 3];
    cut.extend_from_slice(b"abc");
    let mut all = handshake.clone();
    for m in [&update[..], &pointer, &key, &cut, &update] {
        all.extend_from_slice(m);
    }
    let mut view_only = b"RFB 003.008\n\x01\x01".to_vec();
    view_only.extend_from_slice(&update);
    view_only.extend_from_slice(&update);
    let mut control = b"RFB 003.008\n\x01\x01".to_vec();
    control.extend_from_slice(&all[14..]);
    (all, view_only, control)
}

async fn relay_once(control: bool) -> Vec<u8> {
    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("vnc.sock");
    let mut server = fake_vnc(UnixListener::bind(&socket).unwrap(), b"\x01\x01".to_vec());
    let v = serve(novnc_dir(tmp.path()), socket, HANG).await;
    let (token, _) = split_url(&v.mint(&sandbox(), control).unwrap().url);
    let mut ws = connect(&v, &token).await;
    // Server → browser bytes arrive untouched.
    assert_eq!(recv_bytes(&mut ws, 14).await, b"RFB 003.008\n\x01\x01");
    let (all, _, _) = client_stream();
    // In odd pieces, so that messages straddle WebSocket messages.
    for piece in all.chunks(5) {
        ws.send(WsMessage::Binary(piece.to_vec().into()))
            .await
            .unwrap();
    }
    ws.close(None).await.unwrap();
    tokio::time::timeout(HANG, server.recv())
        .await
        .unwrap()
        .unwrap()
}

#[tokio::test]
async fn relay_view_only_drops_input_and_forces_the_shared_flag() {
    let (_, view_only, _) = client_stream();
    assert_eq!(relay_once(false).await, view_only);
}

#[tokio::test]
async fn relay_control_forwards_input_untouched_but_the_shared_flag() {
    let (_, _, control) = client_stream();
    assert_eq!(relay_once(true).await, control);
}

#[tokio::test]
async fn relay_unknown_message_closes_both_sides() {
    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("vnc.sock");
    let mut server = fake_vnc(UnixListener::bind(&socket).unwrap(), Vec::new());
    let v = serve(novnc_dir(tmp.path()), socket, HANG).await;
    let (token, _) = split_url(&v.mint(&sandbox(), true).unwrap().url);
    let mut ws = connect(&v, &token).await;
    recv_bytes(&mut ws, 12).await;
    ws.send(WsMessage::Binary(
        b"RFB 003.008\n\x01\x01\x09\x00".to_vec().into(),
    ))
    .await
    .unwrap();
    assert_eq!(closed(&mut ws).await, Some(1008));
    // Nothing of the WebSocket message holding the refused one reaches the server, which
    // sees its connection end.
    let got = tokio::time::timeout(HANG, server.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, b"");
}

#[tokio::test]
async fn relay_ends_when_the_server_closes_or_the_sandbox_is_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("vnc.sock");
    // A server that says its version and hangs up.
    let listener = UnixListener::bind(&socket).unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let _ = s.write_all(b"RFB 003.008\n").await;
        }
    });
    let v = serve(novnc_dir(tmp.path()), socket.clone(), HANG).await;
    let (token, _) = split_url(&v.mint(&sandbox(), false).unwrap().url);
    let mut ws = connect(&v, &token).await;
    recv_bytes(&mut ws, 12).await;
    assert_eq!(closed(&mut ws).await, Some(1000));

    // A server that stays: removing the sandbox ends its viewer, and its link.
    let socket2 = tmp.path().join("vnc2.sock");
    let _server = fake_vnc(UnixListener::bind(&socket2).unwrap(), Vec::new());
    let v = serve(novnc_dir(&tmp.path().join("b")), socket2, HANG).await;
    let (token, _) = split_url(&v.mint(&sandbox(), false).unwrap().url);
    let mut ws = connect(&v, &token).await;
    recv_bytes(&mut ws, 12).await;
    v.revoke(&sandbox());
    assert_eq!(closed(&mut ws).await, Some(1000));
    let url = format!("ws://{}/view/{token}/websockify", v.0.config.addr);
    assert!(tokio_tungstenite::connect_async(url).await.is_err());

    // Stopping the daemon ends every viewer.
    let (token, _) = split_url(&v.mint(&sandbox(), false).unwrap().url);
    let mut ws = connect(&v, &token).await;
    recv_bytes(&mut ws, 12).await;
    v.close_all();
    assert_eq!(closed(&mut ws).await, Some(1001));
}

#[tokio::test]
async fn removed_event_revokes_links() {
    let tmp = tempfile::tempdir().unwrap();
    let v = serve(novnc_dir(tmp.path()), tmp.path().join("x.sock"), HANG).await;
    let (tx, rx) = tokio::sync::broadcast::channel(4);
    v.watch_events(rx);
    let (_, page) = split_url(&v.mint(&sandbox(), false).unwrap().url);
    assert_eq!(http(&v, "GET", &page).await.0, 200);
    tx.send(Event {
        time_unix_ms: 0,
        sandbox: sandbox(),
        kind: EventKind::Removed {
            reason: "removed".to_owned(),
        },
    })
    .unwrap();
    tokio::time::timeout(HANG, async {
        while http(&v, "GET", &page).await.0 != 404 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the link outlived its sandbox");
}

#[tokio::test]
async fn two_viewers_get_a_connection_each() {
    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("vnc.sock");
    let mut server = fake_vnc(UnixListener::bind(&socket).unwrap(), Vec::new());
    let v = serve(novnc_dir(tmp.path()), socket, HANG).await;
    let (t1, _) = split_url(&v.mint(&sandbox(), false).unwrap().url);
    let (t2, _) = split_url(&v.mint(&sandbox(), true).unwrap().url);
    let mut a = connect(&v, &t1).await;
    let mut b = connect(&v, &t1).await;
    let mut c = connect(&v, &t2).await;
    for ws in [&mut a, &mut b, &mut c] {
        assert_eq!(recv_bytes(ws, 12).await, b"RFB 003.008\n");
        ws.send(WsMessage::Binary(
            b"RFB 003.008\n\x01\x00\x05\x00\x00\x01\x00\x02"
                .to_vec()
                .into(),
        ))
        .await
        .unwrap();
        ws.close(None).await.unwrap();
    }
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(
            tokio::time::timeout(HANG, server.recv())
                .await
                .unwrap()
                .unwrap(),
        );
    }
    got.sort();
    let view = b"RFB 003.008\n\x01\x01".to_vec();
    let mut control = view.clone();
    control.extend_from_slice(&[5, 0, 0, 1, 0, 2]);
    assert_eq!(got, vec![view.clone(), view, control]);
}

#[tokio::test]
async fn websocket_to_an_unreachable_screen_is_refused_before_the_upgrade() {
    let tmp = tempfile::tempdir().unwrap();
    let v = serve(novnc_dir(tmp.path()), tmp.path().join("none.sock"), HANG).await;
    let (token, _) = split_url(&v.mint(&sandbox(), false).unwrap().url);
    let url = format!("ws://{}/view/{token}/websockify", v.0.config.addr);
    let err = tokio_tungstenite::connect_async(url).await.unwrap_err();
    assert!(err.to_string().contains("502"), "{err}");
}

/// Finds a sandbox's screen as the engine would, but without a live VM: the sandbox must be
/// in the store, and its run directory must hold `vnc.sock`.
struct RunDirLocator {
    engine: Arc<kiln_core::Engine>,
}

impl VncLocator for RunDirLocator {
    fn vnc_socket(&self, id: &SandboxId) -> Result<PathBuf, CoreError> {
        self.engine.sandbox_get(id)?;
        let socket = self.engine.home().sandbox_dir(id).join("vnc.sock");
        if !socket.exists() {
            return Err(CoreError::NotADesktop(format!(
                "sandbox {id} has no screen"
            )));
        }
        Ok(socket)
    }
}

/// A test engine with one `running` row (no VM), its API on a unix socket with `locator`
/// behind the viewers, and the viewer listener on a loopback port.
async fn api_daemon(
    tmp: &std::path::Path,
    locator: impl FnOnce(Arc<kiln_core::Engine>) -> Arc<dyn VncLocator>,
) -> (kiln_client::Client, Viewers, SandboxId, PathBuf) {
    let home = tmp.join("home");
    let engine = kiln_core::Engine::start(kiln_core::Home::new(home.clone()))
        .await
        .unwrap();
    let id = SandboxId::random();
    kiln_store::Store::open(&home.join("kiln.db"))
        .unwrap()
        .sandbox_insert(&kiln_testkit::running_row(&id, serde_json::json!({})))
        .unwrap();
    let settings = crate::listen::tests::test_settings();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let viewers = Viewers::new(
        ViewConfig {
            addr: listener.local_addr().unwrap(),
            ttl: HANG,
            novnc_dir: novnc_dir(tmp),
        },
        locator(Arc::clone(&engine)),
    );
    let app = viewers.router();
    let s = settings.clone();
    tokio::spawn(
        async move { crate::listen::serve(listener, app, &s, std::future::pending()).await },
    );
    let socket = tmp.join("api.sock");
    let unix = tokio::net::UnixListener::bind(&socket).unwrap();
    let app = crate::listen::unix_app(Arc::clone(&engine), &settings, &viewers);
    tokio::spawn(async move {
        crate::listen::serve(unix, app, &settings, std::future::pending()).await
    });
    let run = home.join("run").join(id.as_str());
    (kiln_client::Client::unix(socket), viewers, id, run)
}

fn api_code(e: kiln_client::ClientError) -> (u16, String) {
    match e {
        kiln_client::ClientError::Api { status, body } => (status, body.code),
        other => panic!("expected an API error, got {other:?}"),
    }
}

/// With the engine as the locator (as in the daemon), a sandbox the engine has no live VM
/// for gets no link, nor does one that does not exist.
#[tokio::test]
async fn api_link_needs_a_running_sandbox() {
    let tmp = tempfile::tempdir().unwrap();
    let (client, _, id, _) = api_daemon(tmp.path(), |e| e).await;
    let req = kiln_api_types::DesktopViewRequest { control: false };
    let (status, code) = api_code(client.desktop_view(&id, &req).await.unwrap_err());
    assert_eq!((status, code.as_str()), (409, "sandbox_not_running"));
    let other = SandboxId::random();
    let err = client.desktop_view(&other, &req).await.unwrap_err();
    assert_eq!(api_code(err), (404, "sandbox_not_found".to_owned()));
}

/// The whole path with a test engine: the API (on its unix socket, through the client) mints
/// a link for a sandbox whose run directory holds a VNC socket; the link's page and
/// WebSocket reach that socket; without the socket there is no link.
#[tokio::test]
async fn api_link_reaches_the_sandbox_screen() {
    let tmp = tempfile::tempdir().unwrap();
    let (client, viewers, id, run) =
        api_daemon(tmp.path(), |engine| Arc::new(RunDirLocator { engine })).await;
    let req = kiln_api_types::DesktopViewRequest { control: false };
    let (status, code) = api_code(client.desktop_view(&id, &req).await.unwrap_err());
    assert_eq!((status, code.as_str()), (409, "not_a_desktop"));

    std::fs::create_dir_all(&run).unwrap();
    let mut server = fake_vnc(
        UnixListener::bind(run.join("vnc.sock")).unwrap(),
        Vec::new(),
    );
    let link = client.desktop_view(&id, &req).await.unwrap();
    assert!(!link.control);
    let (token, page) = split_url(&link.url);
    assert_eq!(http(&viewers, "GET", &page).await.0, 200);
    let mut ws = connect(&viewers, &token).await;
    assert_eq!(recv_bytes(&mut ws, 12).await, b"RFB 003.008\n");
    ws.send(WsMessage::Binary(
        b"RFB 003.008\n\x01\x00\x05\x00\x00\x01\x00\x02"
            .to_vec()
            .into(),
    ))
    .await
    .unwrap();
    ws.close(None).await.unwrap();
    let got = tokio::time::timeout(HANG, server.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, b"RFB 003.008\n\x01\x01", "view only, shared");
}
