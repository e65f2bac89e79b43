//! `kiln bench desktop`'s live view part: how many screen updates per second a browser
//! viewer gets while the screen keeps changing.
//!
//! [`live_view_fps`] mints a view-only link, opens a terminal on the desktop that prints
//! without pause, and watches the screen over the link's WebSocket (the viewer relay, as
//! noVNC would): the RFB handshake (shared), raw encoding only, then one incremental
//! FramebufferUpdateRequest at a time, a new one as soon as an update is complete (noVNC's
//! rhythm). Complete FramebufferUpdate messages are counted by [`UpdateParser`], a pure
//! parser of the server's stream that takes chunks split anywhere.
//!
//! Must not: send input (the link is view-only; the relay would drop it anyway).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use kiln_api_types::{DesktopViewRequest, ExecKillRequest, ExecRequest, ExecState, SandboxId};
use kiln_client::Client;
use serde::Serialize;
use tokio_tungstenite::tungstenite::Message;

/// Longest wait for one step of the setup (the terminal's window, a handshake message, the
/// first full frame).
const SETUP_TIMEOUT: Duration = Duration::from_secs(60);
/// RFB encoding: raw pixels.
const ENCODING_RAW: i32 = 0;
/// RFB pseudo-encoding: the screen changed size (no pixel data).
const ENCODING_DESKTOP_SIZE: i32 = -223;
/// Largest server cut text skipped (QEMU sends none unasked; a bigger one is not RFB).
const MAX_CUT_TEXT: u64 = 16 << 20;

/// What [`live_view_fps`] measured.
#[derive(Debug, Clone, Serialize)]
pub struct LiveViewFps {
    /// Complete framebuffer updates per second.
    pub fps: f64,
    /// Complete framebuffer updates in the measurement.
    pub updates: u64,
    /// Bytes received from the relay in the measurement.
    pub bytes: u64,
    /// Length of the measurement (seconds).
    pub secs: f64,
}

/// Why the server's stream could not be followed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RfbStreamError {
    /// A server message type other than update, colour map, bell and cut text.
    UnknownMessage(u8),
    /// A rectangle encoding that was not asked for.
    UnexpectedEncoding(i32),
    /// A cut text longer than [`MAX_CUT_TEXT`].
    CutTextTooLong(u64),
}

impl std::fmt::Display for RfbStreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RfbStreamError::UnknownMessage(t) => write!(f, "unknown RFB server message type {t}"),
            RfbStreamError::UnexpectedEncoding(e) => write!(
                f,
                "unexpected RFB rectangle encoding {e} (only raw was asked for)"
            ),
            RfbStreamError::CutTextTooLong(n) => write!(f, "RFB server cut text of {n} bytes"),
        }
    }
}

impl std::error::Error for RfbStreamError {}

/// Where the parser is in the server's stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before a message's type byte.
    Type,
    /// FramebufferUpdate: padding and the rectangle count (3 bytes).
    UpdateHead,
    /// A rectangle's header (12 bytes); `left` rectangles remain, this one included.
    RectHead { left: u16 },
    /// A raw rectangle's pixels; `left` rectangles remain after this one.
    RectData { remaining: u64, left: u16 },
    /// SetColourMapEntries: padding, first colour, count (5 bytes).
    ColourMapHead,
    /// ServerCutText: padding and length (7 bytes).
    CutHead,
    /// A body skipped whole (colours, cut text).
    Skip { remaining: u64 },
}

/// Counts complete FramebufferUpdate messages in the server → client RFB stream after
/// ServerInit, for a client that asked for raw encoding only. Holds at most one header
/// (12 bytes) between chunks; pixel data is skipped, never buffered.
#[derive(Debug)]
pub struct UpdateParser {
    bytes_per_pixel: u64,
    state: State,
    head: Vec<u8>,
    updates: u64,
}

impl UpdateParser {
    /// A parser for a pixel format of `bits_per_pixel` (ServerInit's, or the client's
    /// SetPixelFormat).
    pub fn new(bits_per_pixel: u8) -> UpdateParser {
        UpdateParser {
            bytes_per_pixel: u64::from(bits_per_pixel).div_ceil(8),
            state: State::Type,
            head: Vec::with_capacity(12),
            updates: 0,
        }
    }

    /// Complete updates so far.
    pub fn updates(&self) -> u64 {
        self.updates
    }

    /// Consumes the next chunk of the stream; the number of updates it completed.
    pub fn feed(&mut self, mut data: &[u8]) -> Result<u64, RfbStreamError> {
        let before = self.updates;
        while !data.is_empty() {
            match self.state {
                State::Type => {
                    let kind = data[0];
                    data = &data[1..];
                    self.state = match kind {
                        0 => State::UpdateHead,
                        1 => State::ColourMapHead,
                        // Bell: the type byte is the whole message.
                        2 => State::Type,
                        3 => State::CutHead,
                        other => return Err(RfbStreamError::UnknownMessage(other)),
                    };
                }
                State::RectData { remaining, left } => {
                    let n = skip(&mut data, remaining);
                    self.state = if n == remaining {
                        self.rect_done(left)
                    } else {
                        State::RectData {
                            remaining: remaining - n,
                            left,
                        }
                    };
                }
                State::Skip { remaining } => {
                    let n = skip(&mut data, remaining);
                    self.state = if n == remaining {
                        State::Type
                    } else {
                        State::Skip {
                            remaining: remaining - n,
                        }
                    };
                }
                State::UpdateHead
                | State::RectHead { .. }
                | State::ColourMapHead
                | State::CutHead => {
                    let need = match self.state {
                        State::UpdateHead => 3,
                        State::RectHead { .. } => 12,
                        State::ColourMapHead => 5,
                        _ => 7,
                    };
                    let take = (need - self.head.len()).min(data.len());
                    self.head.extend_from_slice(&data[..take]);
                    data = &data[take..];
                    if self.head.len() == need {
                        self.state = self.header_done()?;
                        self.head.clear();
                    }
                }
            }
        }
        Ok(self.updates - before)
    }

    /// The state after a complete header in `self.head`. A body of no bytes is not waited
    /// for: its message is over at once.
    fn header_done(&mut self) -> Result<State, RfbStreamError> {
        let mut h = [0u8; 12];
        h[..self.head.len()].copy_from_slice(&self.head);
        let u16_at = |i: usize| u16::from_be_bytes([h[i], h[i + 1]]);
        let skip = |remaining: u64| {
            if remaining == 0 {
                State::Type
            } else {
                State::Skip { remaining }
            }
        };
        Ok(match self.state {
            State::UpdateHead => match u16_at(1) {
                0 => self.rect_done(0),
                rects => State::RectHead { left: rects },
            },
            State::RectHead { left } => {
                let (w, hh) = (u64::from(u16_at(4)), u64::from(u16_at(6)));
                let size = match i32::from_be_bytes([h[8], h[9], h[10], h[11]]) {
                    ENCODING_RAW => w * hh * self.bytes_per_pixel,
                    ENCODING_DESKTOP_SIZE => 0,
                    other => return Err(RfbStreamError::UnexpectedEncoding(other)),
                };
                if size == 0 {
                    self.rect_done(left - 1)
                } else {
                    State::RectData {
                        remaining: size,
                        left: left - 1,
                    }
                }
            }
            State::ColourMapHead => skip(u64::from(u16_at(3)) * 6),
            State::CutHead => {
                // A negative length is the extended clipboard's: its absolute value follows.
                let len = i32::from_be_bytes([h[3], h[4], h[5], h[6]]).unsigned_abs();
                let len = u64::from(len);
                if len > MAX_CUT_TEXT {
                    return Err(RfbStreamError::CutTextTooLong(len));
                }
                skip(len)
            }
            other => other,
        })
    }

    /// The state after a rectangle whose update has `left` more; counts a complete update.
    fn rect_done(&mut self, left: u16) -> State {
        if left == 0 {
            self.updates += 1;
            State::Type
        } else {
            State::RectHead { left }
        }
    }
}

/// Drops up to `remaining` bytes from the front of `data`; how many it dropped.
fn skip(data: &mut &[u8], remaining: u64) -> u64 {
    let n = usize::try_from(remaining).map_or(data.len(), |r| r.min(data.len()));
    *data = &data[n..];
    n as u64
}

/// The relay's WebSocket for a viewer page's URL (`http://ADDR/view/<token>/vnc.html?…` →
/// `ws://ADDR/view/<token>/websockify`).
fn websocket_url(page: &str) -> anyhow::Result<String> {
    let rest = page
        .strip_prefix("http://")
        .with_context(|| format!("not an http:// viewer link: {page}"))?;
    let (addr, path) = rest
        .split_once('/')
        .with_context(|| format!("no path in {page}"))?;
    let token = path
        .strip_prefix("view/")
        .and_then(|p| p.split_once('/'))
        .map(|(token, _)| token)
        .filter(|t| !t.is_empty())
        .with_context(|| format!("no /view/<token>/ in {page}"))?;
    Ok(format!("ws://{addr}/view/{token}/websockify"))
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The viewer WebSocket during the handshake: exact reads over its binary messages.
struct Handshake {
    ws: Ws,
    buf: Vec<u8>,
}

impl Handshake {
    /// The next binary message's bytes.
    async fn chunk(&mut self) -> anyhow::Result<bytes::Bytes> {
        loop {
            let msg = tokio::time::timeout(SETUP_TIMEOUT, self.ws.next())
                .await
                .context("the viewer relay sent nothing")?;
            match msg {
                Some(Ok(Message::Binary(b))) => return Ok(b),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(Message::Close(frame))) => bail!("the viewer relay closed: {frame:?}"),
                Some(Ok(other)) => bail!("unexpected viewer relay message {other:?}"),
                Some(Err(e)) => return Err(e).context("viewer WebSocket"),
                None => bail!("the viewer relay closed"),
            }
        }
    }

    /// The next `n` bytes of the server's stream.
    async fn take(&mut self, n: usize) -> anyhow::Result<Vec<u8>> {
        while self.buf.len() < n {
            let chunk = self.chunk().await?;
            self.buf.extend_from_slice(&chunk);
        }
        Ok(self.buf.drain(..n).collect())
    }

    async fn send(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        self.ws
            .send(Message::Binary(bytes.to_vec().into()))
            .await
            .context("send to the viewer relay")
    }
}

/// A FramebufferUpdateRequest of the whole `width`×`height` screen.
fn update_request(incremental: bool, width: u16, height: u16) -> [u8; 10] {
    let [w0, w1] = width.to_be_bytes();
    let [h0, h1] = height.to_be_bytes();
    [3, u8::from(incremental), 0, 0, 0, 0, w0, w1, h0, h1]
}

/// Runs the RFB handshake (shared, security None, raw encoding only); the connection, the
/// screen's size and a parser positioned after ServerInit (fed what already arrived).
async fn rfb_connect(url: &str) -> anyhow::Result<(Handshake, u16, u16, UpdateParser)> {
    let (ws, _) = tokio::time::timeout(SETUP_TIMEOUT, tokio_tungstenite::connect_async(url))
        .await
        .context("the viewer relay did not answer")?
        .with_context(|| format!("connect to {url}"))?;
    let mut c = Handshake {
        ws,
        buf: Vec::new(),
    };
    let version = c.take(12).await?;
    if !version.starts_with(b"RFB 003.") {
        bail!("not an RFB server: {version:?}");
    }
    c.send(b"RFB 003.008\n").await?;
    let n = usize::from(c.take(1).await?[0]);
    if n == 0 {
        bail!("the VNC server refused the connection");
    }
    if !c.take(n).await?.contains(&1) {
        bail!("the VNC server offers no security type None");
    }
    c.send(&[1]).await?;
    if c.take(4).await? != [0, 0, 0, 0] {
        bail!("the VNC server refused security type None");
    }
    // Shared: other viewers stay connected.
    c.send(&[1]).await?;
    let init = c.take(24).await?;
    let (width, height) = (
        u16::from_be_bytes([init[0], init[1]]),
        u16::from_be_bytes([init[2], init[3]]),
    );
    let name_len = u32::from_be_bytes([init[20], init[21], init[22], init[23]]);
    c.take(usize::try_from(name_len)?).await?;
    // SetEncodings: raw only.
    c.send(&[2, 0, 0, 1, 0, 0, 0, 0]).await?;
    let parser = UpdateParser::new(init[4]);
    Ok((c, width, height, parser))
}

/// Starts a terminal printing without pause on the desktop (as its user `kiln`), waits
/// until its window is visible; the detached exec to kill afterwards.
async fn start_busy_terminal(
    client: &Client,
    id: &SandboxId,
    secs: f64,
) -> anyhow::Result<kiln_api_types::ExecId> {
    let exec = |argv: &[&str], timeout_ms: u64| ExecRequest {
        argv: argv.iter().map(|a| (*a).to_owned()).collect(),
        env: BTreeMap::from([("DISPLAY".to_owned(), ":0".to_owned())]),
        cwd: None,
        stdin: false,
        timeout_ms: Some(timeout_ms),
        max_output_bytes: None,
        tty: None,
        user: Some("kiln".to_owned()),
    };
    // Killed at the end; the timeout only bounds a bench that died half-way.
    let life_ms = ((secs + 300.0) * 1000.0) as u64;
    let term = client
        .exec_detach(
            id,
            &exec(
                &["xterm", "-e", "sh", "-c", "while :; do date +%N; done"],
                life_ms,
            ),
        )
        .await
        .context("start a terminal on the desktop")?;
    let wait = SETUP_TIMEOUT.as_millis() as u64;
    let search = client
        .exec_detach(
            id,
            &exec(
                &[
                    "xdotool",
                    "search",
                    "--sync",
                    "--onlyvisible",
                    "--class",
                    "XTerm",
                ],
                wait,
            ),
        )
        .await?;
    let deadline = Instant::now() + SETUP_TIMEOUT + Duration::from_secs(5);
    loop {
        let info = client.exec_get(&search.id).await?;
        match info.state {
            ExecState::Exited if info.exit.as_ref().and_then(|e| e.code) == Some(0) => {
                return Ok(term.id);
            }
            ExecState::Running if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            _ => {
                let _ = client
                    .exec_kill(&term.id, &ExecKillRequest::default())
                    .await;
                bail!("the terminal's window did not appear: {info:?}");
            }
        }
    }
}

/// Watches the desktop `id` over a view-only live view link for `secs` seconds while a
/// terminal keeps printing; complete screen updates per second.
pub async fn live_view_fps(
    client: &Client,
    id: &SandboxId,
    secs: f64,
) -> anyhow::Result<LiveViewFps> {
    if !(secs > 0.0 && secs.is_finite()) {
        bail!("the live view measurement needs a positive duration, not {secs}");
    }
    let link = client
        .desktop_view(id, &DesktopViewRequest { control: false })
        .await
        .context("mint a viewer link")?;
    let url = websocket_url(&link.url)?;
    let term = start_busy_terminal(client, id, secs).await?;
    let measured = measure(&url, secs).await;
    let killed = client.exec_kill(&term, &ExecKillRequest::default()).await;
    let result = measured?;
    killed.context("stop the terminal")?;
    Ok(result)
}

/// The measurement proper, over the viewer WebSocket at `url`.
async fn measure(url: &str, secs: f64) -> anyhow::Result<LiveViewFps> {
    let (mut c, width, height, mut parser) = rfb_connect(url).await?;
    // The first, full frame is not counted.
    c.send(&update_request(false, width, height)).await?;
    let leftover = std::mem::take(&mut c.buf);
    parser.feed(&leftover)?;
    while parser.updates() == 0 {
        let chunk = c.chunk().await.context("the first full frame")?;
        parser.feed(&chunk)?;
    }
    let Handshake { mut ws, .. } = c;

    let counted_from = parser.updates();
    let mut bytes = 0u64;
    let start = Instant::now();
    let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(secs);
    ws.send(Message::Binary(
        update_request(true, width, height).to_vec().into(),
    ))
    .await?;
    loop {
        let msg = match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => break,
            Ok(Some(msg)) => msg.context("viewer WebSocket")?,
            Ok(None) => bail!("the viewer relay closed during the measurement"),
        };
        let data = match msg {
            Message::Binary(b) => b,
            Message::Close(frame) => bail!("the viewer relay closed: {frame:?}"),
            _ => continue,
        };
        bytes += data.len() as u64;
        // One new request per complete update, as noVNC does.
        for _ in 0..parser.feed(&data)? {
            ws.send(Message::Binary(
                update_request(true, width, height).to_vec().into(),
            ))
            .await?;
        }
    }
    let took = start.elapsed().as_secs_f64();
    let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
    let updates = parser.updates() - counted_from;
    Ok(LiveViewFps {
        fps: updates as f64 / took,
        updates,
        bytes,
        secs: took,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A raw rectangle header.
    fn rect(x: u16, y: u16, w: u16, h: u16, encoding: i32) -> Vec<u8> {
        let mut out = Vec::new();
        for v in [x, y, w, h] {
            out.extend_from_slice(&v.to_be_bytes());
        }
        out.extend_from_slice(&encoding.to_be_bytes());
        out
    }

    /// A server stream after ServerInit (32 bits per pixel): 4 complete updates among other
    /// messages, and the start of a fifth.
    fn stream() -> Vec<u8> {
        let mut s = Vec::new();
        // Update 1: two raw rectangles.
        s.extend_from_slice(&[0, 0, 0, 2]);
        s.extend(rect(0, 0, 3, 2, 0));
        s.extend(std::iter::repeat_n(0xab, 3 * 2 * 4));
        s.extend(rect(10, 10, 1, 1, 0));
        s.extend_from_slice(&[0, 0, 0, 0]);
        // Bell.
        s.push(2);
        // Server cut text "hi", then an extended one of 3 bytes (negative length).
        s.extend_from_slice(&[3, 0, 0, 0, 0, 0, 0, 2, b'h', b'i']);
        s.extend_from_slice(&[3, 0, 0, 0]);
        s.extend_from_slice(&(-3i32).to_be_bytes());
        s.extend_from_slice(&[1, 2, 3]);
        // Update 2: no rectangle.
        s.extend_from_slice(&[0, 0, 0, 0]);
        // Colour map entries: 2 colours of 6 bytes.
        s.extend_from_slice(&[1, 0, 0, 0, 0, 2]);
        s.extend_from_slice(&[0; 12]);
        // Update 3: an empty raw rectangle and a screen size change.
        s.extend_from_slice(&[0, 0, 0, 2]);
        s.extend(rect(5, 5, 0, 7, 0));
        s.extend(rect(0, 0, 1024, 768, ENCODING_DESKTOP_SIZE));
        // Update 4: a rectangle whose pixels hold bytes that look like message types.
        s.extend_from_slice(&[0, 0, 0, 1]);
        s.extend(rect(0, 0, 2, 1, 0));
        s.extend_from_slice(&[0, 0, 0, 1, 3, 2, 1, 0]);
        // The start of update 5.
        s.extend_from_slice(&[0, 0, 0, 1]);
        s.extend(rect(0, 0, 1, 1, 0));
        s.extend_from_slice(&[9, 9]);
        s
    }

    #[test]
    fn updates_are_counted_whatever_the_chunks() {
        let s = stream();
        let whole = {
            let mut p = UpdateParser::new(32);
            assert_eq!(p.feed(&s), Ok(4));
            p
        };
        assert_eq!(whole.updates(), 4);
        assert!(
            matches!(
                whole.state,
                State::RectData {
                    remaining: 2,
                    left: 0
                }
            ),
            "inside update 5: {:?}",
            whole.state
        );
        // Every split into two chunks, and every chunk size from 1 byte up.
        for at in 0..=s.len() {
            let mut p = UpdateParser::new(32);
            let n = p.feed(&s[..at]).unwrap() + p.feed(&s[at..]).unwrap();
            assert_eq!((n, p.updates()), (4, 4), "split at {at}");
            assert_eq!(p.state, whole.state, "split at {at}");
        }
        for size in 1..=s.len() {
            let mut p = UpdateParser::new(32);
            let n: u64 = s.chunks(size).map(|c| p.feed(c).unwrap()).sum();
            assert_eq!(n, 4, "chunks of {size}");
            assert!(p.head.len() <= 12);
        }
        // The rest of update 5 completes it.
        let mut p = UpdateParser::new(32);
        p.feed(&s).unwrap();
        assert_eq!(p.feed(&[9, 9]), Ok(1));
        assert_eq!(p.state, State::Type);
    }

    #[test]
    fn pixel_size_follows_the_format() {
        // 16 bits per pixel: a 2×2 raw rectangle is 8 bytes.
        let mut s = vec![0, 0, 0, 1];
        s.extend(rect(0, 0, 2, 2, 0));
        s.extend_from_slice(&[0; 8]);
        let mut p = UpdateParser::new(16);
        assert_eq!(p.feed(&s[..s.len() - 1]), Ok(0));
        assert_eq!(p.feed(&s[s.len() - 1..]), Ok(1));
        let mut p = UpdateParser::new(32);
        assert_eq!(p.feed(&s), Ok(0), "half of a 32-bit rectangle");
    }

    #[test]
    fn what_was_not_asked_for_is_an_error() {
        let mut p = UpdateParser::new(32);
        assert_eq!(p.feed(&[7]), Err(RfbStreamError::UnknownMessage(7)));
        let mut s = vec![0, 0, 0, 1];
        s.extend(rect(0, 0, 4, 4, 16));
        let mut p = UpdateParser::new(32);
        assert_eq!(p.feed(&s), Err(RfbStreamError::UnexpectedEncoding(16)));
        let mut p = UpdateParser::new(32);
        assert_eq!(
            p.feed(&[3, 0, 0, 0, 0x7f, 0, 0, 0]),
            Err(RfbStreamError::CutTextTooLong(0x7f00_0000))
        );
    }

    #[test]
    fn websocket_url_of_a_viewer_link() {
        let page =
            "http://127.0.0.1:4321/view/abc123/vnc.html?autoconnect=1&path=view/abc123/websockify";
        assert_eq!(
            websocket_url(page).unwrap(),
            "ws://127.0.0.1:4321/view/abc123/websockify"
        );
        assert!(websocket_url("https://h/view/t/vnc.html").is_err());
        assert!(websocket_url("http://h/other/t/vnc.html").is_err());
        assert!(websocket_url("http://h/view//vnc.html").is_err());
    }

    #[test]
    fn update_requests_name_the_whole_screen() {
        assert_eq!(
            update_request(true, 1280, 800),
            [3, 1, 0, 0, 0, 0, 5, 0, 3, 32]
        );
        assert_eq!(update_request(false, 2, 1), [3, 0, 0, 0, 0, 0, 0, 2, 0, 1]);
    }
}
