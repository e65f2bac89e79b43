//! The live view of a real desktop sandbox (`kiln desktop view`), end to end: the link's JSON,
//! Debian's noVNC in headless Chromium showing exactly the pixels of `kiln desktop screenshot`,
//! more viewers at once, and input: a view-only link's pointer event never reaches the
//! desktop, the same event through a `--control` link moves the pointer.
//!
//! Chromium is driven over its DevTools protocol (a page's WebSocket, `Runtime.evaluate`
//! reading noVNC's canvas); the raw viewers speak RFB over the viewer relay's WebSocket. Both
//! read the same framebuffer as the screenshot, so the compared regions must be equal pixel
//! for pixel; they keep away from the pointer (it starts at the screen's centre, 640,400, and
//! is drawn into the framebuffer). Waits are bounded polls of a condition, never fixed sleeps.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kiln_e2e::{Kiln, assert_success, stdout, wait_until};
use serde_json::{Value, json};
use tungstenite::{Message, WebSocket};

/// The desktop image's default screen.
const SCREEN: (usize, usize) = (1280, 800);
/// The panel at the bottom with its launcher icons.
const PANEL: Region = Region {
    x: 0,
    y: 764,
    w: 1280,
    h: 36,
};
/// A band of background, above the pointer.
const BACKGROUND: Region = Region {
    x: 0,
    y: 0,
    w: 1280,
    h: 300,
};
/// Where the test's pointer events point (the regions are compared before any is sent).
const TARGET: (u16, u16) = (300, 200);
/// Longest a socket read or write may block.
const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// How long, at least, the desktop is watched for a view-only viewer's pointer event.
const QUIET_WINDOW: Duration = Duration::from_secs(2);

/// A rectangle of the screen.
#[derive(Debug, Clone, Copy)]
struct Region {
    x: usize,
    y: usize,
    w: usize,
    h: usize,
}

impl Region {
    /// The rectangle's pixels out of a full-screen RGB buffer `width` pixels wide.
    fn cut(self, width: usize, rgb: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.w * self.h * 3);
        for row in self.y..self.y + self.h {
            let start = (row * width + self.x) * 3;
            out.extend_from_slice(&rgb[start..start + self.w * 3]);
        }
        out
    }

    fn contains(self, x: usize, y: usize) -> bool {
        x >= self.x && x < self.x + self.w && y >= self.y && y < self.y + self.h
    }
}

/// How two RGB buffers of `r` differ: `None` when equal, else the count of differing pixels
/// and the first one.
fn difference(r: Region, a: &[u8], b: &[u8]) -> Option<String> {
    assert_eq!(a.len(), b.len(), "buffers of {r:?}");
    let mut count = 0;
    let mut first = None;
    for (i, (pa, pb)) in a.chunks_exact(3).zip(b.chunks_exact(3)).enumerate() {
        if pa != pb {
            count += 1;
            first.get_or_insert((r.x + i % r.w, r.y + i / r.w, pa.to_vec(), pb.to_vec()));
        }
    }
    first.map(|(x, y, pa, pb)| {
        format!("{count} pixels of {r:?} differ, the first at ({x},{y}): {pa:?} vs {pb:?}")
    })
}

/// Removes the sandbox when the test fails half-way.
struct Sandbox<'a> {
    k: &'a Kiln,
    id: String,
    removed: bool,
}

impl Drop for Sandbox<'_> {
    fn drop(&mut self) {
        if !self.removed {
            let _ = self.k.run(&["rm", &self.id]);
        }
    }
}

/// A viewer link as `kiln desktop view --json` printed it, taken apart.
struct Link {
    url: String,
    addr: SocketAddr,
    token: String,
}

impl Link {
    /// The relay's WebSocket of this link.
    fn websocket_url(&self) -> String {
        format!("ws://{}/view/{}/websockify", self.addr, self.token)
    }
}

fn now_ms() -> u64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970");
    u64::try_from(since.as_millis()).expect("ms fit u64")
}

/// `kiln desktop view ID --json [--control]`, checked and taken apart.
fn view_link(k: &Kiln, id: &str, control: bool) -> Link {
    let mut args = vec!["desktop", "view", id, "--json"];
    if control {
        args.push("--control");
    }
    let out = k.run(&args);
    assert_success(&out, "kiln desktop view");
    let v: Value = serde_json::from_slice(&out.stdout).expect("view json");
    let mut keys: Vec<&String> = v.as_object().expect("a JSON object").keys().collect();
    keys.sort();
    assert_eq!(keys, ["control", "expires_at_unix_ms", "url"], "{v:#}");
    assert_eq!(v["control"], control, "{v:#}");
    let expires = v["expires_at_unix_ms"].as_u64().expect("expiry in ms");
    assert!(expires > now_ms() + 60_000, "the link expires later: {v:#}");
    let url = v["url"].as_str().expect("url").to_owned();
    let rest = url.strip_prefix("http://").expect("an http:// link");
    let (addr, path) = rest.split_once('/').expect("a path");
    let addr: SocketAddr = addr.parse().expect("an ip:port address");
    assert!(
        addr.ip().is_loopback(),
        "the viewer listener is local: {url}"
    );
    let (token, page) = path
        .strip_prefix("view/")
        .and_then(|p| p.split_once('/'))
        .expect("/view/<token>/<page>");
    assert!(
        token.len() == 64 && token.bytes().all(|b| b.is_ascii_hexdigit()),
        "a 32-byte token: {token}"
    );
    let (file, query) = page.split_once('?').expect("a query");
    assert_eq!(file, "vnc.html", "{url}");
    let params: Vec<&str> = query.split('&').collect();
    let view_only = format!("view_only={}", u8::from(!control));
    let ws_path = format!("path=view/{token}/websockify");
    for want in ["autoconnect=1", "shared=1", &view_only, &ws_path] {
        assert!(params.contains(&want), "{want} in {url}");
    }
    Link {
        addr,
        token: token.to_owned(),
        url,
    }
}

/// `kiln desktop screenshot ID` as (width, height, RGB bytes).
fn screenshot(k: &Kiln, id: &str, dir: &std::path::Path) -> (usize, usize, Vec<u8>) {
    let (w, h, rgb) = kiln_e2e::desktop_screenshot(k, id, &dir.join("screen.png"));
    (w as usize, h as usize, rgb)
}

/// The desktop's pointer per `xdotool getmouselocation` (`x:640 y:400 screen:0 window:…`).
fn pointer(k: &Kiln, id: &str) -> (i64, i64) {
    let out = kiln_e2e::desktop_exec(k, id, &["xdotool", "getmouselocation"]);
    assert_success(&out, "xdotool getmouselocation");
    let text = stdout(&out);
    let field = |name: &str| {
        text.split_whitespace()
            .find_map(|f| f.strip_prefix(name))
            .and_then(|v| v.parse::<i64>().ok())
            .unwrap_or_else(|| panic!("no {name} in {text:?}"))
    };
    (field("x:"), field("y:"))
}

/// Whether the pointer is at `to` (the tablet's absolute scaling may round by a pixel).
fn near(at: (i64, i64), to: (u16, u16)) -> bool {
    (at.0 - i64::from(to.0)).abs() <= 1 && (at.1 - i64::from(to.1)).abs() <= 1
}

/// Polls `probe` every 200 ms until it gives a value; panics with `what` and the probe's
/// last complaint after `secs` seconds.
fn poll<T>(what: &str, secs: u64, mut probe: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        match probe() {
            Ok(v) => return v,
            Err(last) => assert!(
                Instant::now() < deadline,
                "{what}: not within {secs} s; last: {last}"
            ),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A TCP connection with bounded reads and writes.
fn tcp(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    s.set_read_timeout(Some(IO_TIMEOUT)).expect("read timeout");
    s.set_write_timeout(Some(IO_TIMEOUT))
        .expect("write timeout");
    s
}

/// A plain WebSocket client over a bounded TCP connection.
fn websocket(addr: SocketAddr, url: &str) -> WebSocket<TcpStream> {
    match tungstenite::client(url, tcp(addr)) {
        Ok((ws, _)) => ws,
        Err(e) => panic!("WebSocket handshake with {url}: {e}"),
    }
}

/// A raw RFB viewer over the relay's WebSocket, keeping the framebuffer it was sent.
struct Rfb {
    ws: WebSocket<TcpStream>,
    buf: Vec<u8>,
    width: usize,
    height: usize,
    /// RGB of the whole screen, as far as updates have painted it.
    fb: Vec<u8>,
}

impl Rfb {
    /// Connects and runs the handshake asking for *exclusive* access (the relay makes every
    /// viewer shared, so nobody else is disconnected), then sets a known pixel format
    /// (32 bits, little endian, red at bit 16) and raw encoding only.
    fn connect(link: &Link) -> Rfb {
        let ws = websocket(link.addr, &link.websocket_url());
        let mut c = Rfb {
            ws,
            buf: Vec::new(),
            width: 0,
            height: 0,
            fb: Vec::new(),
        };
        let version = c.take(12);
        assert!(version.starts_with(b"RFB 003."), "{version:?}");
        c.send(b"RFB 003.008\n");
        let n = usize::from(c.take(1)[0]);
        assert!(n > 0, "the server refused the connection");
        let types = c.take(n);
        assert!(types.contains(&1), "security None offered: {types:?}");
        c.send(&[1]);
        assert_eq!(c.take(4), [0, 0, 0, 0], "security result OK");
        c.send(&[0]);
        let init = c.take(24);
        c.width = usize::from(u16::from_be_bytes([init[0], init[1]]));
        c.height = usize::from(u16::from_be_bytes([init[2], init[3]]));
        let name_len = u32::from_be_bytes([init[20], init[21], init[22], init[23]]);
        c.take(usize::try_from(name_len).expect("name length"));
        c.fb = vec![0; c.width * c.height * 3];
        let mut format = vec![0u8, 0, 0, 0];
        format.extend_from_slice(&[32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0]);
        c.send(&format);
        c.send(&[2, 0, 0, 1, 0, 0, 0, 0]);
        c
    }

    fn send(&mut self, bytes: &[u8]) {
        self.ws
            .send(Message::binary(bytes.to_vec()))
            .expect("send to the relay");
    }

    /// The next `n` bytes of the server's stream.
    fn take(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            match self.ws.read() {
                Ok(Message::Binary(b)) => self.buf.extend_from_slice(&b),
                Ok(Message::Ping(_) | Message::Pong(_)) => {}
                other => panic!("expected RFB bytes from the relay, got {other:?}"),
            }
        }
        self.buf.drain(..n).collect()
    }

    /// A pointer event (no button) at `(x, y)`.
    fn point(&mut self, (x, y): (u16, u16)) {
        let mut msg = vec![5, 0];
        msg.extend_from_slice(&x.to_be_bytes());
        msg.extend_from_slice(&y.to_be_bytes());
        self.send(&msg);
    }

    /// Asks for `r` in full and reads updates until every pixel of it has come; its RGB.
    /// The server handles a connection's messages in order, so the answer also means that
    /// everything sent before was handled (or dropped by the relay).
    fn region(&mut self, r: Region) -> Vec<u8> {
        let mut req = vec![3, 0];
        for v in [r.x, r.y, r.w, r.h] {
            req.extend_from_slice(&u16::try_from(v).expect("a u16").to_be_bytes());
        }
        self.send(&req);
        let mut covered = vec![false; r.w * r.h];
        let mut missing = r.w * r.h;
        while missing > 0 {
            match self.take(1)[0] {
                0 => {
                    let head = self.take(3);
                    for _ in 0..u16::from_be_bytes([head[1], head[2]]) {
                        let h = self.take(12);
                        let field = |i: usize| usize::from(u16::from_be_bytes([h[i], h[i + 1]]));
                        let (x, y, w, hh) = (field(0), field(2), field(4), field(6));
                        let enc = i32::from_be_bytes([h[8], h[9], h[10], h[11]]);
                        assert_eq!(enc, 0, "only raw rectangles were asked for");
                        assert!(
                            x + w <= self.width && y + hh <= self.height,
                            "{x},{y} {w}x{hh}"
                        );
                        let data = self.take(w * hh * 4);
                        for (i, px) in data.chunks_exact(4).enumerate() {
                            let (px_x, px_y) = (x + i % w, y + i / w);
                            let o = (px_y * self.width + px_x) * 3;
                            // Little endian 0x00RRGGBB: blue, green, red, padding.
                            self.fb[o..o + 3].copy_from_slice(&[px[2], px[1], px[0]]);
                            if r.contains(px_x, px_y) {
                                let c = &mut covered[(px_y - r.y) * r.w + (px_x - r.x)];
                                if !*c {
                                    *c = true;
                                    missing -= 1;
                                }
                            }
                        }
                    }
                }
                // Bell.
                2 => {}
                // Server cut text: 3 bytes of padding, a length, the text.
                3 => {
                    let head = self.take(7);
                    let len = u32::from_be_bytes([head[3], head[4], head[5], head[6]]);
                    self.take(usize::try_from(len).expect("a length"));
                }
                other => panic!("unexpected RFB server message type {other}"),
            }
        }
        r.cut(self.width, &self.fb)
    }

    fn close(mut self) {
        let _ = self.ws.close(None);
        let _ = self.ws.flush();
    }
}

/// The browser's process, killed when dropped (its helpers end with it).
struct Chromium(Child);

impl Drop for Chromium {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Headless Chromium with one page, driven over the DevTools protocol; killed when dropped.
struct Browser {
    _chromium: Chromium,
    page: WebSocket<TcpStream>,
    next_id: u64,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts Chromium on `url`.
    fn open(url: &str) -> Browser {
        let profile = tempfile::tempdir().expect("profile dir");
        let mut chromium = Chromium(
            Command::new("chromium")
                .args([
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--no-first-run",
                    "--disable-dev-shm-usage",
                    "--disable-breakpad",
                    "--remote-debugging-port=0",
                    "--window-size=1400,1000",
                ])
                .arg(format!("--user-data-dir={}", profile.path().display()))
                .arg(url)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("chromium (Debian's chromium) must be installed"),
        );
        // The DevTools port is announced on stderr; the thread then drains it to the end.
        let stderr = chromium.0.stderr.take().expect("piped stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.strip_prefix("DevTools listening on ws://") {
                    let port = rest
                        .split_once('/')
                        .and_then(|(host, _)| host.rsplit_once(':'))
                        .and_then(|(_, p)| p.parse::<u16>().ok());
                    let _ = tx.send(port);
                }
            }
        });
        let port = match rx.recv_timeout(IO_TIMEOUT) {
            Ok(Some(port)) => port,
            other => panic!("chromium announced no DevTools port: {other:?}"),
        };
        let devtools: SocketAddr = ([127, 0, 0, 1], port).into();
        let path = poll("Chromium lists its page", 60, || {
            let list: Value = serde_json::from_str(&http_get(devtools, "/json/list"))
                .map_err(|e| e.to_string())?;
            list.as_array()
                .into_iter()
                .flatten()
                .find(|t| t["type"] == "page")
                .and_then(|t| t["webSocketDebuggerUrl"].as_str())
                .and_then(|u| u.find("/devtools/").map(|at| u[at..].to_owned()))
                .ok_or_else(|| list.to_string())
        });
        let page = websocket(devtools, &format!("ws://{devtools}{path}"));
        Browser {
            _chromium: chromium,
            page,
            next_id: 1,
            _profile: profile,
        }
    }

    /// `Runtime.evaluate(expression)`'s value.
    fn eval(&mut self, expression: &str) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let call = json!({
            "id": id,
            "method": "Runtime.evaluate",
            "params": {"expression": expression, "returnByValue": true},
        });
        self.page
            .send(Message::text(call.to_string()))
            .expect("send to DevTools");
        loop {
            let msg = self.page.read().expect("a DevTools message");
            let Message::Text(text) = msg else { continue };
            let v: Value = serde_json::from_str(&text).expect("DevTools JSON");
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{text}");
                let result = &v["result"];
                assert!(result.get("exceptionDetails").is_none(), "{text}");
                return result["result"]["value"].clone();
            }
        }
    }

    /// noVNC's state and, once connected, the RGB of `r` on its canvas.
    fn canvas(&mut self, r: Region) -> (Value, Option<Vec<u8>>) {
        let mut state = self.eval(&format!(
            "({CANVAS_PROBE})({}, {}, {}, {})",
            r.x, r.y, r.w, r.h
        ));
        let rgb = state
            .as_object_mut()
            .and_then(|o| o.remove("rgb"))
            .and_then(|v| v.as_str().map(hex_bytes));
        (state, rgb)
    }
}

/// noVNC's page: connected or not, view-only or not, the canvas size and, once connected and
/// big enough, the pixels of one rectangle as hex RGB.
const CANVAS_PROBE: &str = r#"(x, y, w, h) => {
  const canvas = document.querySelector('#noVNC_container canvas');
  const state = {
    connected: document.documentElement.classList.contains('noVNC_connected'),
    status: (document.getElementById('noVNC_status') || {}).textContent || '',
    viewOnly: !!(document.getElementById('noVNC_setting_view_only') || {}).checked,
    width: canvas ? canvas.width : 0,
    height: canvas ? canvas.height : 0,
  };
  if (!state.connected || state.width < x + w || state.height < y + h) return state;
  const px = canvas.getContext('2d').getImageData(x, y, w, h).data;
  const parts = [];
  for (let i = 0; i < px.length; i += 4) {
    for (let c = 0; c < 3; c++) parts.push(px[i + c].toString(16).padStart(2, '0'));
  }
  state.rgb = parts.join('');
  return state;
}"#;

fn hex_bytes(hex: &str) -> Vec<u8> {
    hex.as_bytes()
        .chunks(2)
        .map(|pair| {
            let s = std::str::from_utf8(pair).expect("ascii hex");
            u8::from_str_radix(s, 16).expect("hex digits")
        })
        .collect()
}

/// `GET path` from `addr`; the body ("" when nothing answers).
fn http_get(addr: SocketAddr, path: &str) -> String {
    http(addr, path).map(|(_, body)| body).unwrap_or_default()
}

/// `GET path` from `addr` (HTTP/1.1: Chromium's DevTools ignores 1.0): (status, body),
/// read up to its `Content-Length`.
fn http(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(IO_TIMEOUT)).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut data = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let n = s.read(&mut chunk).ok()?;
        data.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&data);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let status = head.split_whitespace().nth(1)?.parse().ok()?;
            let length = head.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse::<usize>().ok())?
            });
            if n == 0 || length.is_some_and(|len| body.len() >= len) {
                return Some((status, body.to_owned()));
            }
        } else if n == 0 {
            return None;
        }
    }
}

#[test]
#[ignore = "boots real VMs under QEMU"]
fn desktop_live_view_in_a_browser_and_view_only_input() {
    let k = Kiln::shared();
    let tmp = tempfile::tempdir().expect("tempdir");
    let (id, _) = k.create_json(&["--image", "desktop"]);
    let mut sandbox = Sandbox {
        k: &k,
        id: id.clone(),
        removed: false,
    };

    // The links: view-only by default, control on request; distinct capabilities.
    let view = view_link(&k, &id, false);
    let control = view_link(&k, &id, true);
    assert_ne!(view.token, control.token, "every link has its own token");
    let start = pointer(&k, &id);
    assert!(
        !near(start, TARGET),
        "the pointer starts elsewhere: {start:?}"
    );

    let (w, h, shot) = screenshot(&k, &id, tmp.path());
    assert_eq!((w, h), SCREEN, "the desktop's screen");
    let (shot_panel, shot_background) = (PANEL.cut(w, &shot), BACKGROUND.cut(w, &shot));
    let panel_colours: std::collections::HashSet<&[u8]> = shot_panel.chunks_exact(3).collect();
    assert!(panel_colours.len() > 20, "the panel has launcher icons");

    // noVNC in Chromium: connected, view-only, the screen's size, the same pixels.
    let mut browser = Browser::open(&view.url);
    let state = poll("noVNC shows the panel and the background", 90, || {
        let (state, panel) = browser.canvas(PANEL);
        let Some(panel) = panel else {
            return Err(format!("not connected yet: {state}"));
        };
        if let Some(diff) = difference(PANEL, &panel, &shot_panel) {
            return Err(format!("{state}: {diff}"));
        }
        let (_, background) = browser.canvas(BACKGROUND);
        let background = background.ok_or_else(|| format!("disconnected: {state}"))?;
        match difference(BACKGROUND, &background, &shot_background) {
            Some(diff) => Err(format!("{state}: {diff}")),
            None => Ok(state),
        }
    });
    assert_eq!(state["viewOnly"], true, "{state}");
    assert_eq!(
        (state["width"].as_u64(), state["height"].as_u64()),
        (Some(w as u64), Some(h as u64)),
        "the canvas is the screen, unscaled: {state}"
    );

    // A second viewer at once, on the same view-only link: the same pixels, and the page
    // stays connected (the relay makes the exclusive request shared).
    let mut raw = Rfb::connect(&view);
    assert_eq!((raw.width, raw.height), SCREEN);
    let raw_panel = raw.region(PANEL);
    assert_eq!(difference(PANEL, &raw_panel, &shot_panel), None);
    let raw_background = raw.region(BACKGROUND);
    assert_eq!(
        difference(BACKGROUND, &raw_background, &shot_background),
        None
    );
    let (state, panel) = browser.canvas(PANEL);
    assert_eq!(
        state["connected"], true,
        "the page kept its viewer: {state}"
    );
    assert_eq!(
        difference(PANEL, &panel.expect("canvas pixels"), &shot_panel),
        None
    );

    // A view-only viewer's pointer event: the relay drops it. The region's answer comes after
    // QEMU handled everything sent before it; the desktop is then watched for a while.
    raw.point(TARGET);
    raw.region(Region {
        x: 0,
        y: 0,
        w: 1,
        h: 1,
    });
    let dropped_at = Instant::now();
    let mut samples = 0;
    while samples < 3 || dropped_at.elapsed() < QUIET_WINDOW {
        let at = pointer(&k, &id);
        assert_eq!(at, start, "a view-only viewer moved the pointer");
        samples += 1;
    }
    let watched = dropped_at.elapsed();

    // The same event through a control link (a third viewer at once) moves the pointer.
    let mut ctl = Rfb::connect(&control);
    assert_eq!((ctl.width, ctl.height), SCREEN);
    ctl.point(TARGET);
    let sent_at = Instant::now();
    wait_until("the control viewer's pointer event arrives", 60, || {
        near(pointer(&k, &id), TARGET)
    });
    let arrived = sent_at.elapsed();
    assert!(
        arrived < watched,
        "the view-only check watched {watched:?}, less than a control event takes ({arrived:?})"
    );
    let (state, _) = browser.canvas(PANEL);
    assert_eq!(state["connected"], true, "three viewers at once: {state}");
    eprintln!(
        "pointer {start:?} unchanged for {watched:?} ({samples} samples) after a view-only \
         event; a control event moved it in {arrived:?}"
    );
    raw.close();
    ctl.close();
    drop(browser);

    // Removing the sandbox ends its links.
    assert_success(&k.run(&["rm", &id]), "kiln rm");
    sandbox.removed = true;
    let page_path = &view.url[view.url.find("/view/").expect("a view path")..];
    wait_until("the link is revoked with its sandbox", 30, || {
        http(view.addr, page_path).is_some_and(|(status, _)| status == 404)
    });
}
