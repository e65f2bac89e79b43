//! The viewer side against a real VNC server and a real browser, `#[ignore]`d (CI runs them
//! with `--run-ignored`; they need Debian's `qemu-system-x86`, `novnc` and `chromium`, and
//! fail, not skip, without them).
//!
//! The VNC server is QEMU itself without any guest: `-nodefaults -machine q35 -accel tcg
//! -device VGA -display none -vnc unix:… -S`. Paused before its first instruction, its VGA
//! shows QEMU's own placeholder screen (640×480, a line of text), which does not change, so
//! what a viewer shows can be compared pixel for pixel with QMP `screendump` of the same
//! QEMU.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio_tungstenite::tungstenite::Message as WsMessage;

use super::tests::{HANG, serve, split_url};

/// A QEMU with a VNC server and QMP on unix sockets, killed when dropped.
struct Qemu {
    dir: tempfile::TempDir,
    _child: tokio::process::Child,
}

impl Qemu {
    async fn start() -> Qemu {
        let dir = tempfile::tempdir().unwrap();
        let vnc = dir.path().join("vnc.sock");
        let qmp = dir.path().join("qmp.sock");
        let child = tokio::process::Command::new("qemu-system-x86_64")
            .args([
                "-nodefaults",
                "-machine",
                "q35",
                "-accel",
                "tcg",
                "-device",
                "VGA",
                "-display",
                "none",
                "-S",
            ])
            .arg("-vnc")
            .arg(format!("unix:{}", vnc.display()))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("qemu-system-x86_64 (Debian's qemu-system-x86) must be installed");
        tokio::time::timeout(HANG, async {
            while !(vnc.exists() && qmp.exists()) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("QEMU made its sockets");
        Qemu { dir, _child: child }
    }

    fn vnc(&self) -> PathBuf {
        self.dir.path().join("vnc.sock")
    }

    /// QMP `screendump` as (width, height, RGB bytes).
    async fn screendump(&self) -> (usize, usize, Vec<u8>) {
        let s = tokio::net::UnixStream::connect(self.dir.path().join("qmp.sock"))
            .await
            .unwrap();
        let (r, mut w) = s.into_split();
        let mut lines = BufReader::new(r).lines();
        lines.next_line().await.unwrap().expect("QMP greeting");
        let file = self.dir.path().join("screen.ppm");
        for cmd in [
            json!({"execute": "qmp_capabilities"}),
            json!({"execute": "screendump", "arguments": {"filename": file}}),
        ] {
            w.write_all(format!("{cmd}\n").as_bytes()).await.unwrap();
            loop {
                let line = lines.next_line().await.unwrap().expect("QMP answer");
                let v: Value = serde_json::from_str(&line).unwrap();
                assert!(v.get("error").is_none(), "{line}");
                if v.get("return").is_some() {
                    break;
                }
            }
        }
        parse_ppm(&std::fs::read(&file).unwrap())
    }
}

/// A binary PPM (P6, maxval 255) as (width, height, RGB bytes).
fn parse_ppm(data: &[u8]) -> (usize, usize, Vec<u8>) {
    let mut fields = Vec::new();
    let mut at = 0;
    while fields.len() < 4 {
        while data[at].is_ascii_whitespace() {
            at += 1;
        }
        let start = at;
        while !data[at].is_ascii_whitespace() {
            at += 1;
        }
        fields.push(String::from_utf8_lossy(&data[start..at]).into_owned());
    }
    assert_eq!((fields[0].as_str(), fields[3].as_str()), ("P6", "255"));
    let (w, h) = (fields[1].parse().unwrap(), fields[2].parse().unwrap());
    let px = data[at + 1..].to_vec();
    assert_eq!(px.len(), w * h * 3);
    (w, h, px)
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A minimal RFB client over the viewer WebSocket.
struct RfbClient {
    ws: Ws,
    buf: Vec<u8>,
    width: usize,
    height: usize,
    /// bits per pixel, big endian, red/green/blue max and shift.
    format: [u8; 16],
}

impl RfbClient {
    async fn read(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            match tokio::time::timeout(HANG, self.ws.next()).await.unwrap() {
                Some(Ok(WsMessage::Binary(b))) => self.buf.extend_from_slice(&b),
                other => panic!("expected RFB bytes, got {other:?}"),
            }
        }
        self.buf.drain(..n).collect()
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.ws
            .send(WsMessage::Binary(bytes.to_vec().into()))
            .await
            .unwrap();
    }

    /// Connects and runs the handshake, asking for *exclusive* access (the relay must make
    /// it shared).
    async fn connect(addr: std::net::SocketAddr, token: &str) -> RfbClient {
        let url = format!("ws://{addr}/view/{token}/websockify");
        let ws = tokio_tungstenite::connect_async(url).await.unwrap().0;
        let mut c = RfbClient {
            ws,
            buf: Vec::new(),
            width: 0,
            height: 0,
            format: [0; 16],
        };
        assert_eq!(c.read(12).await, b"RFB 003.008\n");
        c.send(b"RFB 003.008\n").await;
        let n = c.read(1).await[0] as usize;
        let types = c.read(n).await;
        assert!(
            types.contains(&1),
            "QEMU offers no None security: {types:?}"
        );
        c.send(&[1]).await;
        assert_eq!(c.read(4).await, [0, 0, 0, 0], "security result");
        c.send(&[0]).await;
        let init = c.read(24).await;
        c.width = u16::from_be_bytes([init[0], init[1]]).into();
        c.height = u16::from_be_bytes([init[2], init[3]]).into();
        c.format.copy_from_slice(&init[4..20]);
        let name_len = u32::from_be_bytes([init[20], init[21], init[22], init[23]]) as usize;
        c.read(name_len).await;
        // Raw encoding only, so that pixels can be compared.
        c.send(&[2, 0, 0, 1, 0, 0, 0, 0]).await;
        c
    }

    /// Asks for the whole screen and assembles the answer as RGB bytes.
    async fn full_frame(&mut self) -> Vec<u8> {
        let (w, h) = (self.width as u16, self.height as u16);
        let mut req = vec![3, 0, 0, 0, 0, 0];
        req.extend_from_slice(&w.to_be_bytes());
        req.extend_from_slice(&h.to_be_bytes());
        self.send(&req).await;
        let bpp = usize::from(self.format[0] / 8);
        assert_eq!(bpp, 4, "QEMU's server pixel format is 32 bits");
        let mut rgb = vec![0u8; self.width * self.height * 3];
        let mut covered = 0;
        while covered < self.width * self.height {
            let head = self.read(4).await;
            assert_eq!(
                head[0], 0,
                "expected a FramebufferUpdate, got type {}",
                head[0]
            );
            let rects = u16::from_be_bytes([head[2], head[3]]);
            for _ in 0..rects {
                let r = self.read(12).await;
                let x = usize::from(u16::from_be_bytes([r[0], r[1]]));
                let y = usize::from(u16::from_be_bytes([r[2], r[3]]));
                let rw = usize::from(u16::from_be_bytes([r[4], r[5]]));
                let rh = usize::from(u16::from_be_bytes([r[6], r[7]]));
                let enc = i32::from_be_bytes([r[8], r[9], r[10], r[11]]);
                assert_eq!(enc, 0, "only raw rectangles were asked for");
                assert!(x + rw <= self.width && y + rh <= self.height);
                let data = self.read(rw * rh * bpp).await;
                for (i, px) in data.chunks(bpp).enumerate() {
                    let (px_x, px_y) = (x + i % rw, y + i / rw);
                    let v = if self.format[2] != 0 {
                        u32::from_be_bytes([px[0], px[1], px[2], px[3]])
                    } else {
                        u32::from_le_bytes([px[0], px[1], px[2], px[3]])
                    };
                    let chan = |max_at: usize, shift_at: usize| {
                        let max = u32::from(u16::from_be_bytes([
                            self.format[max_at],
                            self.format[max_at + 1],
                        ]));
                        let c = (v >> self.format[shift_at]) & max;
                        (c * 255 / max.max(1)) as u8
                    };
                    let o = (px_y * self.width + px_x) * 3;
                    rgb[o] = chan(4, 10);
                    rgb[o + 1] = chan(6, 11);
                    rgb[o + 2] = chan(8, 12);
                }
                covered += rw * rh;
            }
        }
        rgb
    }
}

fn lit(rgb: &[u8]) -> usize {
    rgb.chunks(3).filter(|p| p.iter().any(|&c| c > 0)).count()
}

#[tokio::test]
#[ignore = "needs qemu-system-x86_64 and noVNC (scripts/setup-host)"]
async fn real_qemu_two_viewers_get_the_screen_through_the_relay() {
    let qemu = Qemu::start().await;
    let v = serve(super::DEFAULT_NOVNC_DIR.into(), qemu.vnc(), HANG).await;
    let id: kiln_api_types::SandboxId = "sb-0123456789ab".parse().unwrap();
    let (view_token, _) = split_url(&v.mint(&id, false).unwrap().url);
    let (control_token, _) = split_url(&v.mint(&id, true).unwrap().url);
    let (w, h, dump) = qemu.screendump().await;
    assert!(lit(&dump) > 100, "the placeholder screen has text");

    let mut a = RfbClient::connect(v.0.config.addr, &view_token).await;
    assert_eq!((a.width, a.height), (w, h));
    let frame_a = a.full_frame().await;
    assert_eq!(
        frame_a, dump,
        "viewer A's screen differs from QMP screendump"
    );
    // A second viewer asking for exclusive access does not disconnect the first.
    let mut b = RfbClient::connect(v.0.config.addr, &control_token).await;
    assert_eq!((b.width, b.height), (w, h));
    assert_eq!(b.full_frame().await, dump);
    assert_eq!(a.full_frame().await, dump, "viewer A lost its screen");
    // A view-only viewer's input is dropped: a pointer event and a key event do not end or
    // disturb its session (QEMU sees none of it; the filter's tests pin what is dropped).
    a.send(&[5, 1, 0, 10, 0, 10]).await;
    a.send(&[4, 1, 0, 0, 0, 0, 0, 0x61]).await;
    assert_eq!(a.full_frame().await, dump);
}

/// Chromium's DevTools endpoint: the browser's process and the page's WebSocket.
struct Browser {
    _child: tokio::process::Child,
    _profile: tempfile::TempDir,
    page: Ws,
    next_id: u64,
}

impl Browser {
    /// Opens `url` in headless Chromium.
    async fn open(url: &str) -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let mut child = tokio::process::Command::new("chromium")
            .args([
                "--headless=new",
                "--disable-gpu",
                "--no-sandbox",
                "--no-first-run",
                "--remote-debugging-port=0",
                "--window-size=1024,768",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(url)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("chromium (Debian's chromium) must be installed");
        let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
        let port = tokio::time::timeout(HANG, async {
            loop {
                let line = stderr.next_line().await.unwrap().expect("chromium exited");
                if let Some(rest) = line.strip_prefix("DevTools listening on ws://127.0.0.1:") {
                    break rest.split('/').next().unwrap().parse::<u16>().unwrap();
                }
            }
        })
        .await
        .expect("chromium's DevTools endpoint");
        // Keep draining stderr so the browser never blocks on it.
        tokio::spawn(async move { while let Ok(Some(_)) = stderr.next_line().await {} });
        let list = http_get(port, "/json/list").await;
        let targets: Value = serde_json::from_str(&list).unwrap();
        let ws_url = targets
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["type"] == "page")
            .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            .unwrap_or_else(|| panic!("no page among {list}"))
            .to_owned();
        // The URL may name `localhost`, which can resolve to an address it does not serve.
        let path = &ws_url[ws_url.find("/devtools/").expect("a DevTools URL")..];
        let page = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}{path}"))
            .await
            .unwrap()
            .0;
        Browser {
            _child: child,
            _profile: profile,
            page,
            next_id: 1,
        }
    }

    /// `Runtime.evaluate` of `expression`; its value.
    async fn eval(&mut self, expression: &str) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let msg = json!({"id": id, "method": "Runtime.evaluate",
            "params": {"expression": expression, "returnByValue": true}});
        self.page
            .send(WsMessage::Text(msg.to_string().into()))
            .await
            .unwrap();
        loop {
            let msg = tokio::time::timeout(HANG, self.page.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            let WsMessage::Text(text) = msg else { continue };
            let v: Value = serde_json::from_str(&text).unwrap();
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{text}");
                return v["result"]["result"]["value"].clone();
            }
        }
    }
}

async fn http_get(port: u16, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    // Read the head, then exactly the body (DevTools may keep the connection open).
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(HANG, async {
        loop {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "DevTools closed: {}", String::from_utf8_lossy(&out));
            out.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&out).into_owned();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let len = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse::<usize>().ok())?
                    })
                    .expect("a content-length");
                if body.len() >= len {
                    return body[..len].to_owned();
                }
            }
        }
    })
    .await
    .expect("DevTools answered")
}

/// The page's state and, once noVNC is connected, its canvas as RGB hex.
const PROBE: &str = r#"(() => {
  const c = document.querySelector('#noVNC_container canvas');
  const connected = document.documentElement.classList.contains('noVNC_connected');
  const status = (document.getElementById('noVNC_status') || {}).textContent || '';
  if (!c || !connected || c.width < 2) return {connected, status};
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  const hex = new Array(c.width * c.height);
  for (let i = 0, p = 0; i < d.length; i += 4, p++) {
    hex[p] = ((1 << 24) | (d[i] << 16) | (d[i + 1] << 8) | d[i + 2]).toString(16).slice(1);
  }
  return {connected, status, width: c.width, height: c.height,
          viewOnly: document.getElementById('noVNC_setting_view_only').checked,
          rgb: hex.join('')};
})()"#;

fn hex_rgb(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

/// The region of `rgb` (width `w`) at `x, y` of `rw × rh` pixels.
fn region(rgb: &[u8], w: usize, (x, y, rw, rh): (usize, usize, usize, usize)) -> Vec<u8> {
    let mut out = Vec::with_capacity(rw * rh * 3);
    for row in y..y + rh {
        out.extend_from_slice(&rgb[(row * w + x) * 3..(row * w + x + rw) * 3]);
    }
    out
}

#[tokio::test]
#[ignore = "needs qemu-system-x86_64, noVNC and chromium (scripts/setup-host)"]
async fn chromium_viewer_page_shows_the_same_pixels_as_screendump() {
    assert!(
        Path::new(super::DEFAULT_NOVNC_DIR)
            .join("vnc.html")
            .is_file(),
        "noVNC (Debian's novnc) must be installed"
    );
    let qemu = Qemu::start().await;
    let v = serve(super::DEFAULT_NOVNC_DIR.into(), qemu.vnc(), HANG).await;
    let id: kiln_api_types::SandboxId = "sb-0123456789ab".parse().unwrap();
    let link = v.mint(&id, false).unwrap();
    let (w, h, dump) = qemu.screendump().await;
    assert!(lit(&dump) > 100, "the placeholder screen has text");
    let mut browser = Browser::open(&link.url).await;
    let deadline = tokio::time::Instant::now() + HANG;
    let page = loop {
        let state = browser.eval(PROBE).await;
        if let Some(hex) = state["rgb"].as_str() {
            let rgb = hex_rgb(hex);
            // The first frame may still be arriving: wait until the text is there.
            if lit(&rgb) >= lit(&dump) {
                break state;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "noVNC did not show the screen: {}",
            state
                .as_object()
                .map(|o| o
                    .iter()
                    .filter(|(k, _)| *k != "rgb")
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(" "))
                .unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(page["viewOnly"], true, "the link is view-only");
    assert_eq!(
        (page["width"].as_u64(), page["height"].as_u64()),
        (Some(w as u64), Some(h as u64))
    );
    let shown = hex_rgb(page["rgb"].as_str().unwrap());
    // The region holding QEMU's text, then the whole screen.
    let lit_rows: Vec<usize> = (0..h)
        .filter(|&y| lit(&region(&dump, w, (0, y, w, 1))) > 0)
        .collect();
    let (top, bottom) = (lit_rows[0], lit_rows[lit_rows.len() - 1]);
    let text = (0, top, w, bottom - top + 1);
    assert_eq!(
        region(&shown, w, text),
        region(&dump, w, text),
        "the text region differs"
    );
    assert_eq!(shown, dump, "the canvas differs from QMP screendump");
}
