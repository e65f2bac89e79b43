//! Screen frames of a desktop sandbox: parsing QEMU's `screendump`, PNG encoding with an
//! optional area-averaging downscale, comparison, and the "settle" detector.
//!
//! Owns: the [`Frame`] type and everything computed from frames alone. It does no I/O and
//! knows no clock: [`Settle`] is a pure state machine fed with frames and timestamps, so the
//! caller (the QMP wiring) owns sampling and time.
//!
//! Invariants:
//! - a [`Frame`] always has `1..=MAX_DIMENSION` columns and rows and exactly
//!   `width * height * 3` bytes of packed RGB8, row-major (fields are private for that reason);
//! - parsing is strict and bounded: the guest chooses the screen size, so sizes are checked
//!   before anything is allocated, the header is at most [`MAX_HEADER_BYTES`] long, and the
//!   pixel data must be exactly as long as the header says;
//! - [`Settle`] never reports anything but `Waiting` before at least one frame was sampled
//!   after the action, and once it reports `Settled` or `TimedOut` it keeps reporting it.
//!
//! PPM (P6) as QEMU's `screendump` writes it (netpbm's syntax, comments allowed in the header):
//!
//! ```text
//!  "P6" ws+ <width> ws+ <height> ws+ <maxval=255> ONE-ws  width*height*3 bytes R,G,B ...
//!        (ws: space, \t, \r, \n, \v, \f; "#" starts a comment running to the end of the line)
//! ```

use sha2::{Digest as _, Sha256};

/// The largest width or height accepted, in pixels (a guest picks its screen size).
pub const MAX_DIMENSION: u32 = 8192;
/// The longest PPM header accepted, comments included, in bytes.
pub const MAX_HEADER_BYTES: usize = 4096;

/// Why a frame could not be parsed, scaled or encoded.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The data does not start with the P6 magic number.
    #[error("not a binary PPM (P6) image: it starts with {found:?}")]
    NotPpm { found: String },
    /// The header ends before one of its fields.
    #[error("PPM header ends before its {field}")]
    TruncatedHeader { field: &'static str },
    /// A header field is not a decimal number.
    #[error("PPM header's {field} is not a decimal number (found byte 0x{found:02x})")]
    BadNumber { field: &'static str, found: u8 },
    /// A header field has more digits than any valid value.
    #[error("PPM header's {field} has too many digits")]
    NumberTooLong { field: &'static str },
    /// The header (with its comments) is longer than [`MAX_HEADER_BYTES`].
    #[error("PPM header is longer than {MAX_HEADER_BYTES} bytes")]
    HeaderTooLong,
    /// A width or height is 0 or above [`MAX_DIMENSION`].
    #[error("frame {field} {value} is out of range 1..={MAX_DIMENSION}")]
    DimensionOutOfRange { field: &'static str, value: u64 },
    /// The maximum sample value is not 255 (only 8 bits per channel are supported).
    #[error("PPM maxval {0} is not supported (only 255: 8 bits per channel)")]
    UnsupportedMaxval(u64),
    /// The byte after maxval is not the single whitespace the format requires.
    #[error("PPM maxval is followed by byte 0x{0:02x} instead of one whitespace byte")]
    NoSeparator(u8),
    /// Fewer pixel bytes than the header announces.
    #[error("PPM pixel data is short: {width}x{height} needs {expected} bytes, found {found}")]
    ShortData {
        width: u32,
        height: u32,
        expected: usize,
        found: usize,
    },
    /// More bytes than the header announces.
    #[error("PPM has {extra} bytes after its {width}x{height} pixel data")]
    TrailingData {
        width: u32,
        height: u32,
        extra: usize,
    },
    /// [`Frame::new`] got a buffer of the wrong length.
    #[error("a {width}x{height} frame needs {expected} RGB bytes, got {found}")]
    LengthMismatch {
        width: u32,
        height: u32,
        expected: usize,
        found: usize,
    },
    /// A [`Scale`] outside what can be honoured.
    #[error("bad scale for a {width}x{height} frame: {reason}")]
    BadScale {
        width: u32,
        height: u32,
        reason: String,
    },
    /// The PNG encoder failed (writing to memory: not expected in practice).
    #[error("failed to encode PNG")]
    Png(#[source] png::EncodingError),
}

/// A downscale applied before encoding. Frames are never upscaled.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Scale {
    /// Target width in pixels, `1..=width`; the height keeps the aspect ratio (rounded, >= 1).
    Width(u32),
    /// Factor in `(0, 1]` applied to both sides (rounded, each side >= 1).
    Factor(f64),
}

/// One screen image: packed RGB8, row-major, no padding.
#[derive(Clone, PartialEq, Eq)]
pub struct Frame {
    width: u32,
    height: u32,
    rgb: Vec<u8>,
}

impl std::fmt::Debug for Frame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never dump megabytes of pixels into a log line.
        write!(f, "Frame({}x{})", self.width, self.height)
    }
}

/// A rectangle in pixels: `x..x+width`, `y..y+height`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rect {
    /// Left column.
    pub x: u32,
    /// Top row.
    pub y: u32,
    /// Columns covered (>= 1).
    pub width: u32,
    /// Rows covered (>= 1).
    pub height: u32,
}

impl Rect {
    /// Whether pixel `(x, y)` is inside.
    pub fn contains(&self, x: u32, y: u32) -> bool {
        x >= self.x
            && y >= self.y
            && u64::from(x) < u64::from(self.x) + u64::from(self.width)
            && u64::from(y) < u64::from(self.y) + u64::from(self.height)
    }

    /// Pixels covered.
    pub fn area(&self) -> u64 {
        u64::from(self.width) * u64::from(self.height)
    }
}

/// How two frames differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Diff {
    /// Pixels whose RGB value differs.
    pub changed_px: u64,
    /// The smallest rectangle holding every changed pixel; `None` when the frames are equal.
    pub bbox: Option<Rect>,
}

impl Frame {
    /// A frame from packed RGB8 bytes; checks the dimensions and the buffer's length.
    pub fn new(width: u32, height: u32, rgb: Vec<u8>) -> Result<Frame, FrameError> {
        check_dimension("width", u64::from(width))?;
        check_dimension("height", u64::from(height))?;
        let expected = rgb_len(width, height);
        if rgb.len() != expected {
            return Err(FrameError::LengthMismatch {
                width,
                height,
                expected,
                found: rgb.len(),
            });
        }
        Ok(Frame { width, height, rgb })
    }

    /// Width in pixels.
    pub fn width(&self) -> u32 {
        self.width
    }

    /// Height in pixels.
    pub fn height(&self) -> u32 {
        self.height
    }

    /// The pixels: `width * height * 3` bytes, R, G, B, row-major.
    pub fn rgb(&self) -> &[u8] {
        &self.rgb
    }

    /// The pixels, taken.
    pub fn into_rgb(self) -> Vec<u8> {
        self.rgb
    }

    /// Parses a binary PPM (P6, maxval 255) as QEMU's `screendump` writes it. Strict: every
    /// deviation is an error naming what was wrong (see the module's format diagram).
    pub fn from_ppm(bytes: &[u8]) -> Result<Frame, FrameError> {
        // The magic must be followed by whitespace (or a comment), not run into the width.
        let magic_ok =
            bytes.starts_with(b"P6") && bytes.get(2).is_none_or(|&b| is_ws(b) || b == b'#');
        if !magic_ok {
            if bytes.len() < 2 {
                return Err(FrameError::TruncatedHeader {
                    field: "magic number",
                });
            }
            let head = &bytes[..bytes.len().min(8)];
            return Err(FrameError::NotPpm {
                found: String::from_utf8_lossy(head).into_owned(),
            });
        }
        let mut header = Header { bytes, pos: 2 };
        let width = header.number("width")?;
        check_dimension("width", width)?;
        let height = header.number("height")?;
        check_dimension("height", height)?;
        let maxval = header.number("maxval")?;
        if maxval != 255 {
            return Err(FrameError::UnsupportedMaxval(maxval));
        }
        match bytes.get(header.pos) {
            None => {
                return Err(FrameError::TruncatedHeader {
                    field: "whitespace after maxval",
                });
            }
            Some(&b) if !is_ws(b) => return Err(FrameError::NoSeparator(b)),
            Some(_) => header.pos += 1,
        }
        // Both were checked against MAX_DIMENSION: they fit in u32.
        let (width, height) = (width as u32, height as u32);
        let data = &bytes[header.pos..];
        let expected = rgb_len(width, height);
        if data.len() < expected {
            return Err(FrameError::ShortData {
                width,
                height,
                expected,
                found: data.len(),
            });
        }
        if data.len() > expected {
            return Err(FrameError::TrailingData {
                width,
                height,
                extra: data.len() - expected,
            });
        }
        Ok(Frame {
            width,
            height,
            rgb: data.to_vec(),
        })
    }

    /// Writes the frame as a binary PPM (P6, maxval 255), the format [`Frame::from_ppm`] reads.
    pub fn to_ppm(&self) -> Vec<u8> {
        let mut out = format!("P6\n{} {}\n255\n", self.width, self.height).into_bytes();
        out.extend_from_slice(&self.rgb);
        out
    }

    /// A smaller copy, each output pixel the area-weighted mean of the source pixels it
    /// covers (a box filter with fractional edges), so thin text strokes fade instead of
    /// vanishing. `Scale::Width(self.width())` or `Scale::Factor(1.0)` returns a copy.
    pub fn scaled(&self, scale: Scale) -> Result<Frame, FrameError> {
        let (dw, dh) = self.scaled_size(scale)?;
        if (dw, dh) == (self.width, self.height) {
            return Ok(self.clone());
        }
        let (sw, sh) = (self.width as usize, self.height as usize);
        let (dwu, dhu) = (dw as usize, dh as usize);
        let cols = box_weights(self.width, dw);
        let rows = box_weights(self.height, dh);
        // Horizontal pass: each row summed into dw columns, weights summing to sw per column.
        let mut horizontal = vec![0u32; sh * dwu * 3];
        for y in 0..sh {
            let src = &self.rgb[y * sw * 3..(y + 1) * sw * 3];
            let dst = &mut horizontal[y * dwu * 3..(y + 1) * dwu * 3];
            for &(s, d, w) in &cols {
                for c in 0..3 {
                    dst[d * 3 + c] += w * u32::from(src[s * 3 + c]);
                }
            }
        }
        // Vertical pass: weights summing to sh per row; the total weight is sw * sh.
        let mut vertical = vec![0u64; dhu * dwu * 3];
        for &(s, d, w) in &rows {
            let src = &horizontal[s * dwu * 3..(s + 1) * dwu * 3];
            let dst = &mut vertical[d * dwu * 3..(d + 1) * dwu * 3];
            for (acc, &v) in dst.iter_mut().zip(src) {
                *acc += u64::from(w) * u64::from(v);
            }
        }
        let total = (sw as u64) * (sh as u64);
        let rgb = vertical
            .iter()
            // Rounded mean of values <= 255: always fits in a byte.
            .map(|&acc| ((acc + total / 2) / total) as u8)
            .collect();
        Ok(Frame {
            width: dw,
            height: dh,
            rgb,
        })
    }

    /// The size [`Frame::scaled`] would produce, or why the scale is refused.
    pub fn scaled_size(&self, scale: Scale) -> Result<(u32, u32), FrameError> {
        let bad = |reason: String| FrameError::BadScale {
            width: self.width,
            height: self.height,
            reason,
        };
        let (w, h) = (f64::from(self.width), f64::from(self.height));
        match scale {
            Scale::Width(dw) => {
                if dw == 0 || dw > self.width {
                    return Err(bad(format!(
                        "target width {dw} is outside 1..={}",
                        self.width
                    )));
                }
                let dh = (h * f64::from(dw) / w).round().max(1.0);
                Ok((dw, dh as u32))
            }
            Scale::Factor(f) => {
                if !(f.is_finite() && f > 0.0 && f <= 1.0) {
                    return Err(bad(format!("factor {f} is outside (0, 1]")));
                }
                // Each side is in 1..=its original size: the casts cannot truncate.
                let dw = (w * f).round().clamp(1.0, w) as u32;
                let dh = (h * f).round().clamp(1.0, h) as u32;
                Ok((dw, dh))
            }
        }
    }

    /// Encodes the frame (downscaled first when `scale` is given) as an 8-bit RGB PNG.
    ///
    /// Speed over size: `png::Compression::Fast` (fdeflate's fast deflate with the adaptive
    /// row filter). Measured (release, best of 15, one core of this 2-core dev machine) on
    /// synthetic 1280x800 desktops: 1.9 ms / 420 KB for panels, a window of text and a
    /// gradient wallpaper; 3.0 ms / 1.1 MB with a noisy photo added. `Fastest` (filter `Up`)
    /// is as fast but ~35% bigger on text; `Balanced` (zlib level 6) is 5x smaller but takes
    /// 28-60 ms. Downscaled to 640x400 first, the whole call takes 3.5-3.8 ms for 210-330 KB.
    pub fn to_png(&self, scale: Option<Scale>) -> Result<Vec<u8>, FrameError> {
        let scaled;
        let frame = match scale {
            Some(scale) => {
                scaled = self.scaled(scale)?;
                &scaled
            }
            None => self,
        };
        let mut out = Vec::with_capacity(frame.rgb.len() / 4);
        let mut encoder = png::Encoder::new(&mut out, frame.width, frame.height);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        encoder.set_compression(png::Compression::Fast);
        let mut writer = encoder.write_header().map_err(FrameError::Png)?;
        writer
            .write_image_data(&frame.rgb)
            .map_err(FrameError::Png)?;
        writer.finish().map_err(FrameError::Png)?;
        Ok(out)
    }

    /// SHA-256 of the width and height (little-endian u32 each) followed by the pixels: equal
    /// digests mean equal frames, sizes included.
    pub fn digest(&self) -> [u8; 32] {
        let mut hasher = Sha256::new();
        hasher.update(self.width.to_le_bytes());
        hasher.update(self.height.to_le_bytes());
        hasher.update(&self.rgb);
        hasher.finalize().into()
    }

    /// How `other` (the newer frame) differs from `self`. Frames of different sizes differ
    /// everywhere: every pixel of `other` counts as changed and the box is all of `other`.
    pub fn diff(&self, other: &Frame) -> Diff {
        self.diff_outside(other, &[])
    }

    /// [`Frame::diff`] with the pixels inside `masks` left out (e.g. where the pointer is
    /// drawn: kiln moved it, so its picture changing says nothing about the application).
    pub fn diff_outside(&self, other: &Frame, masks: &[Rect]) -> Diff {
        if (self.width, self.height) != (other.width, other.height) {
            return Diff {
                changed_px: u64::from(other.width) * u64::from(other.height),
                bbox: Some(Rect {
                    x: 0,
                    y: 0,
                    width: other.width,
                    height: other.height,
                }),
            };
        }
        let row_len = self.width as usize * 3;
        let mut changed_px = 0u64;
        // (min x, min y, max x, max y), inclusive.
        let mut bounds: Option<(u32, u32, u32, u32)> = None;
        let rows = self
            .rgb
            .chunks_exact(row_len)
            .zip(other.rgb.chunks_exact(row_len));
        for (y, (a, b)) in (0u32..).zip(rows) {
            if a == b {
                continue; // memcmp first: most rows of a settling screen are equal
            }
            let pixels = a.chunks_exact(3).zip(b.chunks_exact(3));
            for (x, (pa, pb)) in (0u32..).zip(pixels) {
                if pa != pb && !masks.iter().any(|m| m.contains(x, y)) {
                    changed_px += 1;
                    bounds = Some(match bounds {
                        None => (x, y, x, y),
                        Some((x0, y0, x1, y1)) => (x0.min(x), y0.min(y), x1.max(x), y1.max(y)),
                    });
                }
            }
        }
        Diff {
            changed_px,
            bbox: bounds.map(|(x0, y0, x1, y1)| Rect {
                x: x0,
                y: y0,
                width: x1 - x0 + 1,
                height: y1 - y0 + 1,
            }),
        }
    }
}

fn rgb_len(width: u32, height: u32) -> usize {
    width as usize * height as usize * 3
}

fn check_dimension(field: &'static str, value: u64) -> Result<(), FrameError> {
    if value == 0 || value > u64::from(MAX_DIMENSION) {
        return Err(FrameError::DimensionOutOfRange { field, value });
    }
    Ok(())
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

/// A cursor over a PPM header.
struct Header<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Header<'_> {
    /// Skips whitespace and comments, then reads one decimal number.
    fn number(&mut self, field: &'static str) -> Result<u64, FrameError> {
        loop {
            if self.pos > MAX_HEADER_BYTES {
                return Err(FrameError::HeaderTooLong);
            }
            match self.bytes.get(self.pos) {
                Some(&b) if is_ws(b) => self.pos += 1,
                Some(b'#') => {
                    while let Some(&b) = self.bytes.get(self.pos) {
                        self.pos += 1;
                        if b == b'\n' || b == b'\r' || self.pos > MAX_HEADER_BYTES {
                            break;
                        }
                    }
                }
                _ => break,
            }
        }
        let start = self.pos;
        let mut value = 0u64;
        while let Some(&b) = self.bytes.get(self.pos) {
            if !b.is_ascii_digit() {
                break;
            }
            // 10 digits hold any u32; a longer number is refused before it could overflow.
            if self.pos - start == 10 {
                return Err(FrameError::NumberTooLong { field });
            }
            value = value * 10 + u64::from(b - b'0');
            self.pos += 1;
        }
        if self.pos == start {
            return match self.bytes.get(self.pos) {
                None => Err(FrameError::TruncatedHeader { field }),
                Some(&found) => Err(FrameError::BadNumber { field, found }),
            };
        }
        Ok(value)
    }
}

/// Contributions `(source index, destination index, weight)` of a box filter from `src`
/// samples to `dst <= src` samples. Coordinates are scaled so source sample `i` spans
/// `[i*dst, (i+1)*dst)` and destination sample `o` spans `[o*src, (o+1)*src)`; the weight is
/// the overlap, so each destination's weights sum to `src`. A source sample is at most
/// `src` wide in those units and so touches at most two destination samples.
fn box_weights(src: u32, dst: u32) -> Vec<(usize, usize, u32)> {
    let (src, dst) = (u64::from(src), u64::from(dst));
    let mut out = Vec::with_capacity(2 * src as usize);
    for i in 0..src {
        let (lo, hi) = (i * dst, (i + 1) * dst);
        let mut o = lo / src;
        while o < dst && o * src < hi {
            let overlap = hi.min((o + 1) * src) - lo.max(o * src);
            if overlap > 0 {
                // Indices are below MAX_DIMENSION and an overlap is at most `dst` units (one
                // source sample's width): all fit in usize and u32.
                out.push((i as usize, o as usize, overlap as u32));
            }
            o += 1;
        }
    }
    out
}

/// Settings of the [`Settle`] detector.
///
/// Defaults: a sample every 50 ms, settled after 3 quiet samples (150 ms of stillness: long
/// enough to outlast one frame of a toolkit's redraw or a 100 ms animation step, short enough
/// to keep an agent's act → screenshot loop snappy), give up after 3 s, and ignore changes
/// within a box of 400 pixels or less (a text cursor: a 2x20 I-beam is 40 px, a 10x20 block
/// 200 px) so that a blinking cursor does not keep the screen "busy" forever.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SettleConfig {
    /// How often the caller samples a frame, in ms (only [`Settle::next_sample_ms`] uses it).
    pub interval_ms: u64,
    /// Consecutive still samples that make the screen settled (0 counts as 1).
    pub quiet_frames: u32,
    /// Give up this long after the action, in ms.
    pub timeout_ms: u64,
    /// A change whose bounding box covers this many pixels or fewer counts as still.
    pub ignore_small_changes_px: u64,
    /// How long to wait for the screen to answer the action at all: before this, a screen
    /// that has not yet differed from the frame before the action (see
    /// [`Settle::with_baseline`]) is not settled, however still. Applications under TCG take
    /// up to a second to draw a reaction (xterm's window: 0.7–1 s after the click); without it a click would "settle" on the
    /// unchanged screen before the application even noticed it.
    pub respond_ms: u64,
}

impl Default for SettleConfig {
    fn default() -> Self {
        SettleConfig {
            interval_ms: 50,
            quiet_frames: 3,
            timeout_ms: 3000,
            ignore_small_changes_px: 400,
            respond_ms: 1000,
        }
    }
}

/// What [`Settle::observe`] concluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SettleState {
    /// Not yet settled: sample again at [`Settle::next_sample_ms`].
    Waiting,
    /// The screen stopped changing `after_ms` after the action (the time of the first frame
    /// of the final quiet run).
    Settled {
        /// ms from the action to the moment the screen stopped changing.
        after_ms: u64,
    },
    /// Still changing when the timeout passed; `after_ms` is when that was noticed.
    TimedOut {
        /// ms from the action to the sample that passed the timeout.
        after_ms: u64,
    },
}

/// Decides when the screen has settled after an action, from frames sampled by the caller.
///
/// ```text
///   new(start) ──observe──▶ Waiting ──(quiet_frames still samples in a row)──▶ Settled
///                            │  ▲  └──(now - start >= timeout_ms)────────────▶ TimedOut
///                            └──┘ a change starts a new run at this sample
/// ```
///
/// A run starts at a reference frame; each later sample is still when it differs from that
/// reference by nothing, or only within a box of at most `ignore_small_changes_px` pixels.
/// Comparing with the run's reference (not just the previous sample) means slow progressive
/// changes, like text appearing a character at a time, add up and break the run, while a
/// cursor blinking in place never does. With `ignore_small_changes_px = 0` this is exactly
/// "identical to the previous sample".
#[derive(Debug)]
pub struct Settle {
    config: SettleConfig,
    start_ms: u64,
    /// The first frame of the current run and when it was sampled.
    reference: Option<(Frame, u64)>,
    /// Still samples since the reference.
    quiet: u32,
    last_sample_ms: Option<u64>,
    last_frame: Option<Frame>,
    done: Option<SettleState>,
    /// The screen before the action, and whether a sample has differed from it yet.
    baseline: Option<Frame>,
    answered: bool,
    /// Left out of every comparison (where the pointer is drawn).
    masks: Vec<Rect>,
}

impl Settle {
    /// A detector for an action sent at `start_ms` (any monotonic clock, in ms).
    pub fn new(config: SettleConfig, start_ms: u64) -> Settle {
        Settle {
            config,
            start_ms,
            reference: None,
            quiet: 0,
            last_sample_ms: None,
            last_frame: None,
            done: None,
            baseline: None,
            answered: true,
            masks: Vec::new(),
        }
    }

    /// The same detector, told the screen before the action: until a sample differs from
    /// it (outside the masks, beyond the small-change threshold) or `respond_ms` pass, the
    /// screen is not settled.
    pub fn with_baseline(mut self, before: Frame) -> Settle {
        self.baseline = Some(before);
        self.answered = false;
        self
    }

    /// The same detector, leaving `masks` out of every comparison.
    pub fn with_masks(mut self, masks: Vec<Rect>) -> Settle {
        self.masks = masks;
        self
    }

    /// Whether `b` differs from `a` beyond the masks and the small-change threshold.
    fn differs(&self, a: &Frame, b: &Frame) -> bool {
        match a.diff_outside(b, &self.masks).bbox {
            None => false,
            Some(bbox) => bbox.area() > self.config.ignore_small_changes_px,
        }
    }

    /// When the next frame should be sampled: `interval_ms` after the last one (or after the
    /// action, before the first).
    pub fn next_sample_ms(&self) -> u64 {
        self.last_sample_ms
            .unwrap_or(self.start_ms)
            .saturating_add(self.config.interval_ms.max(1))
    }

    /// Whether a sample differed from the baseline (always true without one).
    pub fn answered(&self) -> bool {
        self.answered
    }

    /// The last frame observed: after `Settled`, the settled screen, ready to encode.
    pub fn last_frame(&self) -> Option<&Frame> {
        self.last_frame.as_ref()
    }

    /// Feeds one frame sampled at `now_ms` (after the action). Once `Settled` or `TimedOut`
    /// is returned, later calls return the same answer and ignore their frame.
    pub fn observe(&mut self, frame: Frame, now_ms: u64) -> SettleState {
        if let Some(done) = self.done {
            return done;
        }
        self.last_sample_ms = Some(now_ms);
        if !self.answered
            && let Some(before) = &self.baseline
            && self.differs(before, &frame)
        {
            self.answered = true;
        }
        let still = match &self.reference {
            None => false,
            Some((reference, _)) => !self.differs(reference, &frame),
        };
        if still {
            self.quiet += 1;
        } else {
            self.reference = Some((frame.clone(), now_ms));
            self.quiet = 0;
        }
        self.last_frame = Some(frame);
        let elapsed = now_ms.saturating_sub(self.start_ms);
        let answered = self.answered || elapsed >= self.config.respond_ms;
        let state = match &self.reference {
            Some((_, since)) if answered && self.quiet >= self.config.quiet_frames.max(1) => {
                SettleState::Settled {
                    after_ms: since.saturating_sub(self.start_ms),
                }
            }
            _ if now_ms.saturating_sub(self.start_ms) >= self.config.timeout_ms => {
                SettleState::TimedOut {
                    after_ms: now_ms.saturating_sub(self.start_ms),
                }
            }
            _ => SettleState::Waiting,
        };
        if state != SettleState::Waiting {
            self.done = Some(state);
        }
        state
    }
}

#[cfg(test)]
mod tests;
