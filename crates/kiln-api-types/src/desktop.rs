//! Desktop sandboxes as the API describes them: the screen size chosen at create
//! ([`Screen`]), the actions an agent sends ([`DesktopAction`]), the receipt each one gets
//! ([`ActionReceipt`]), and the options of screenshots and actions.
//!
//! Coordinates are screen pixels, `(0, 0)` top left. [`DesktopAction::validate`] checks
//! everything that needs only the screen size (coordinates on the screen, counts, lengths);
//! key names are checked by the engine, which knows the keyboard. Must not: know how an
//! action reaches the guest (QMP input events, or the guest's own tools for text QEMU
//! cannot type).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::names::InvalidInput;

/// The screen of a desktop sandbox that asks for none (its image's recipe may name another).
pub const DEFAULT_SCREEN: Screen = Screen {
    width: 1280,
    height: 800,
};
/// Smallest screen, width × height.
pub const SCREEN_MIN: Screen = Screen {
    width: 640,
    height: 480,
};
/// Largest screen, width × height (the most video memory kiln gives the VGA).
pub const SCREEN_MAX: Screen = Screen {
    width: 2560,
    height: 1600,
};

/// Longest text one `type_text` action may type (bytes of UTF-8).
pub const MAX_TYPE_TEXT_BYTES: usize = 64 << 10;
/// Longest `key_press` combination (bytes).
pub const MAX_KEYS_BYTES: usize = 128;
/// Longest `wait` (ms).
pub const MAX_WAIT_MS: u64 = 60_000;
/// Most clicks of one `mouse_click` (a triple click selects a line).
pub const MAX_CLICKS: u32 = 3;
/// Most wheel steps of one `scroll`, per axis.
pub const MAX_SCROLL_STEPS: i32 = 100;
/// Longest time an action may wait for the screen to settle (ms).
pub const MAX_SETTLE_MS: u64 = 30_000;

/// A screen size, written `WIDTHxHEIGHT` (e.g. `1280x800`) on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Screen {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
}

impl fmt::Display for Screen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x{}", self.width, self.height)
    }
}

impl FromStr for Screen {
    type Err = InvalidInput;

    /// Parses `WIDTHxHEIGHT` within [`SCREEN_MIN`]..=[`SCREEN_MAX`], the width a multiple
    /// of 8 (the VGA's scanline granularity).
    fn from_str(s: &str) -> Result<Screen, InvalidInput> {
        let bad = || {
            InvalidInput::Rule(format!(
                "screen {s:?}: expected WIDTHxHEIGHT, e.g. {DEFAULT_SCREEN}"
            ))
        };
        let (w, h) = s.split_once(['x', 'X']).ok_or_else(bad)?;
        let width = w.parse::<u32>().map_err(|_| bad())?;
        let height = h.parse::<u32>().map_err(|_| bad())?;
        let screen = Screen { width, height };
        screen.validate()?;
        Ok(screen)
    }
}

impl Screen {
    /// Checks the bounds; the error names the allowed range.
    pub fn validate(&self) -> Result<(), InvalidInput> {
        if !(SCREEN_MIN.width..=SCREEN_MAX.width).contains(&self.width)
            || !(SCREEN_MIN.height..=SCREEN_MAX.height).contains(&self.height)
        {
            return Err(InvalidInput::Rule(format!(
                "screen {self}: a screen is {SCREEN_MIN} to {SCREEN_MAX} pixels"
            )));
        }
        if !self.width.is_multiple_of(8) {
            return Err(InvalidInput::Rule(format!(
                "screen {self}: the width must be a multiple of 8"
            )));
        }
        Ok(())
    }

    /// Whether `(x, y)` is on the screen.
    pub fn contains(&self, x: u32, y: u32) -> bool {
        x < self.width && y < self.height
    }
}

impl Serialize for Screen {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Screen {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Screen, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A mouse button.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum MouseButton {
    /// The primary button.
    #[default]
    Left,
    /// The wheel button.
    Middle,
    /// The secondary button (context menus).
    Right,
}

impl MouseButton {
    /// The name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            MouseButton::Left => "left",
            MouseButton::Middle => "middle",
            MouseButton::Right => "right",
        }
    }
}

/// A point on the screen (pixels).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Point {
    /// Column, from the left edge.
    pub x: u32,
    /// Row, from the top edge.
    pub y: u32,
}

fn one() -> u32 {
    1
}

/// One thing done to a desktop, as an agent asks for it. Input reaches the guest as the
/// hardware would deliver it (QEMU's tablet and keyboard); text QEMU cannot type on a US
/// keyboard is typed by the guest's X tools instead, as the session's user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum DesktopAction {
    /// Move the pointer to `(x, y)`.
    MouseMove {
        /// Column.
        x: u32,
        /// Row.
        y: u32,
    },
    /// Click `count` times (1 to 3) with `button`, at `(x, y)` if given (both or neither),
    /// else where the pointer is.
    MouseClick {
        /// Column (with `y`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        x: Option<u32>,
        /// Row (with `x`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        y: Option<u32>,
        /// The button (default `left`).
        #[serde(default)]
        button: MouseButton,
        /// How many clicks (default 1; 2 is a double click).
        #[serde(default = "one")]
        count: u32,
    },
    /// Press `button` at `from`, move to `to`, release.
    MouseDrag {
        /// Where the button goes down.
        from: Point,
        /// Where it comes up.
        to: Point,
        /// The button (default `left`).
        #[serde(default)]
        button: MouseButton,
    },
    /// Turn the wheel: `dy` steps down (negative: up) and `dx` steps right (negative:
    /// left), at `(x, y)` if given (both or neither).
    Scroll {
        /// Column (with `y`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        x: Option<u32>,
        /// Row (with `x`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        y: Option<u32>,
        /// Steps right (negative: left).
        #[serde(default)]
        dx: i32,
        /// Steps down (negative: up).
        #[serde(default)]
        dy: i32,
    },
    /// Press a key or a combination, xdotool-style: `Return`, `ctrl+l`, `ctrl+shift+t`,
    /// `alt+F4`.
    KeyPress {
        /// The keys, joined by `+`.
        keys: String,
    },
    /// Type text (any Unicode), or the value of one of the sandbox's secrets (`secret`,
    /// never written to the review timeline).
    TypeText {
        /// The text (with `secret` absent).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        text: Option<String>,
        /// The name of a secret whose value is typed (with `text` absent).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        secret: Option<String>,
    },
    /// Do nothing for `ms` milliseconds (then settle and screenshot as asked).
    Wait {
        /// How long (at most 60 000).
        ms: u64,
    },
}

impl DesktopAction {
    /// The action's kind as on the wire (`mouse_click`, ...).
    pub fn kind(&self) -> &'static str {
        match self {
            DesktopAction::MouseMove { .. } => "mouse_move",
            DesktopAction::MouseClick { .. } => "mouse_click",
            DesktopAction::MouseDrag { .. } => "mouse_drag",
            DesktopAction::Scroll { .. } => "scroll",
            DesktopAction::KeyPress { .. } => "key_press",
            DesktopAction::TypeText { .. } => "type_text",
            DesktopAction::Wait { .. } => "wait",
        }
    }

    /// Checks what needs only the screen: coordinates on it, `x`/`y` given together,
    /// counts and lengths in range, exactly one of `text` and `secret`.
    pub fn validate(&self, screen: Screen) -> Result<(), InvalidInput> {
        let on_screen = |x: u32, y: u32| {
            if screen.contains(x, y) {
                Ok(())
            } else {
                Err(InvalidInput::Rule(format!(
                    "({x}, {y}) is off the screen: it is {screen}, so x must be below {} and y \
                     below {}",
                    screen.width, screen.height
                )))
            }
        };
        let maybe = |x: Option<u32>, y: Option<u32>| match (x, y) {
            (Some(x), Some(y)) => on_screen(x, y),
            (None, None) => Ok(()),
            _ => Err(InvalidInput::Rule(
                "give both x and y, or neither (the pointer stays where it is)".to_owned(),
            )),
        };
        match self {
            DesktopAction::MouseMove { x, y } => on_screen(*x, *y),
            DesktopAction::MouseClick { x, y, count, .. } => {
                maybe(*x, *y)?;
                if !(1..=MAX_CLICKS).contains(count) {
                    return Err(InvalidInput::Range {
                        field: "count",
                        min: 1,
                        max: MAX_CLICKS.into(),
                        got: (*count).into(),
                    });
                }
                Ok(())
            }
            DesktopAction::MouseDrag { from, to, .. } => {
                on_screen(from.x, from.y)?;
                on_screen(to.x, to.y)
            }
            DesktopAction::Scroll { x, y, dx, dy } => {
                maybe(*x, *y)?;
                for (field, v) in [("dx", dx), ("dy", dy)] {
                    if v.unsigned_abs() > MAX_SCROLL_STEPS.unsigned_abs() {
                        return Err(InvalidInput::Rule(format!(
                            "{field} must be between -{MAX_SCROLL_STEPS} and {MAX_SCROLL_STEPS}, \
                             got {v}"
                        )));
                    }
                }
                if *dx == 0 && *dy == 0 {
                    return Err(InvalidInput::Rule(
                        "scroll needs dx or dy (wheel steps), not both 0".to_owned(),
                    ));
                }
                Ok(())
            }
            DesktopAction::KeyPress { keys } => {
                if keys.trim().is_empty() || keys.len() > MAX_KEYS_BYTES {
                    return Err(InvalidInput::Rule(format!(
                        "keys must be 1 to {MAX_KEYS_BYTES} bytes, e.g. \"ctrl+l\" or \"Return\""
                    )));
                }
                Ok(())
            }
            DesktopAction::TypeText { text, secret } => match (text, secret) {
                (Some(t), None) if t.len() > MAX_TYPE_TEXT_BYTES => {
                    Err(InvalidInput::Rule(format!(
                        "text is {} bytes; type_text takes at most {MAX_TYPE_TEXT_BYTES}",
                        t.len()
                    )))
                }
                (Some(t), None) if t.is_empty() => {
                    Err(InvalidInput::Rule("text must not be empty".to_owned()))
                }
                (Some(_), None) | (None, Some(_)) => Ok(()),
                _ => Err(InvalidInput::Rule(
                    "type_text takes exactly one of text and secret".to_owned(),
                )),
            },
            DesktopAction::Wait { ms } => {
                if *ms > MAX_WAIT_MS {
                    return Err(InvalidInput::Range {
                        field: "ms",
                        min: 0,
                        max: MAX_WAIT_MS,
                        got: *ms,
                    });
                }
                Ok(())
            }
        }
    }
}

/// Query of `GET /v1/sandboxes/{id}/desktop/screenshot`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ScreenshotQuery {
    /// Scale the picture to this width (pixels, keeping the aspect; at most the screen's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<u32>,
}

/// Query of `POST /v1/sandboxes/{id}/desktop/actions`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ActionQuery {
    /// Wait for the screen to settle after the action and put a screenshot in the receipt.
    #[serde(default)]
    pub screenshot: bool,
    /// Width of that screenshot (pixels, keeping the aspect).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<u32>,
    /// Longest wait for the screen to settle (ms; default 3000, at most 30 000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settle_ms: Option<u64>,
}

/// How the screen settled after an action.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Settle {
    /// The screen stopped changing (false: it still changed when the wait ran out).
    pub settled: bool,
    /// The screen changed after the action (pointer aside) within the response window
    /// (1 s) or later; false: it still looked as before (the application may answer later
    /// still: a `wait` action and another screenshot tell).
    pub changed: bool,
    /// When it stopped changing (or the wait ran out), ms after the input was sent.
    pub after_ms: u64,
    /// Frames compared.
    pub frames: u32,
}

/// A screenshot inside a receipt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ReceiptScreenshot {
    /// PNG, base64 (standard alphabet, padded).
    pub png_base64: String,
    /// Picture width (pixels).
    pub width: u32,
    /// Picture height (pixels).
    pub height: u32,
    /// sha256 of the PNG (hex): its name in the review recording.
    pub sha256: String,
}

/// What an action did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ActionReceipt {
    /// The action's id in the sandbox's review timeline (`a-N`; empty when the sandbox
    /// records none).
    pub action_id: String,
    /// The action's kind.
    pub kind: String,
    /// What was done, in words (`clicked left at (100, 200)`); typed text is not repeated.
    pub done: String,
    /// When the input started (unix ms).
    pub started_unix_ms: u64,
    /// How long sending the input took (ms).
    pub input_ms: f64,
    /// Input events sent through QEMU.
    pub events: u32,
    /// Characters typed by the guest's X tools (text QEMU cannot type), if any.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub typed_in_guest: u32,
    /// How the screen settled (with `?screenshot=true`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settle: Option<Settle>,
    /// The screen after it settled (with `?screenshot=true`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub screenshot: Option<ReceiptScreenshot>,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

/// Body of `POST /v1/sandboxes/{id}/review/export`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReviewExportRequest {
    /// A directory on the daemon's host to write the bundle into (must not exist, or be
    /// empty); default: a new directory in kiln's exports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dest: Option<String>,
}

/// Answer of `POST /v1/sandboxes/{id}/review/export`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ReviewExport {
    /// The bundle's directory (open its `index.html`).
    pub path: String,
    /// Timeline events in it.
    pub events: u64,
    /// Screenshots in it.
    pub screenshots: u64,
    /// Its size on disk (bytes).
    pub bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn screen_parses_and_prints_and_checks_bounds() {
        let s: Screen = "1280x800".parse().expect("valid");
        assert_eq!((s.width, s.height), (1280, 800));
        assert_eq!(s.to_string(), "1280x800");
        assert_eq!(serde_json::to_string(&s).expect("json"), "\"1280x800\"");
        for bad in [
            "1280", "x800", "1280x", "100x100", "4000x800", "1283x800", "ax b",
        ] {
            assert!(bad.parse::<Screen>().is_err(), "{bad} accepted");
        }
        let e = serde_json::from_str::<Screen>("\"10x10\"").expect_err("too small");
        assert!(e.to_string().contains("640x480 to 2560x1600"), "{e}");
    }

    #[test]
    fn actions_decode_tagged_with_defaults_and_reject_unknown_fields() {
        let a: DesktopAction =
            serde_json::from_str(r#"{"kind":"mouse_click","x":100,"y":200}"#).expect("click");
        assert_eq!(
            a,
            DesktopAction::MouseClick {
                x: Some(100),
                y: Some(200),
                button: MouseButton::Left,
                count: 1
            }
        );
        assert!(serde_json::from_str::<DesktopAction>(r#"{"kind":"mouse_click","z":1}"#).is_err());
        assert!(serde_json::from_str::<DesktopAction>(r#"{"kind":"teleport"}"#).is_err());
        let t: DesktopAction =
            serde_json::from_str(r#"{"kind":"type_text","text":"héllo →"}"#).expect("text");
        assert_eq!(t.kind(), "type_text");
    }

    #[test]
    fn validate_names_what_is_wrong() {
        let screen = DEFAULT_SCREEN;
        let err = |a: DesktopAction| a.validate(screen).expect_err("invalid").to_string();
        assert!(err(DesktopAction::MouseMove { x: 1280, y: 0 }).contains("off the screen"));
        assert!(
            err(DesktopAction::MouseClick {
                x: Some(1),
                y: None,
                button: MouseButton::Left,
                count: 1
            })
            .contains("both x and y")
        );
        assert!(
            err(DesktopAction::MouseClick {
                x: None,
                y: None,
                button: MouseButton::Left,
                count: 4
            })
            .contains("count")
        );
        assert!(
            err(DesktopAction::Scroll {
                x: None,
                y: None,
                dx: 0,
                dy: 0
            })
            .contains("dx or dy")
        );
        assert!(
            err(DesktopAction::TypeText {
                text: Some("a".into()),
                secret: Some("S".into())
            })
            .contains("exactly one")
        );
        assert!(err(DesktopAction::KeyPress { keys: " ".into() }).contains("keys"));
        assert!(err(DesktopAction::Wait { ms: 60_001 }).contains("ms"));
        DesktopAction::MouseMove { x: 1279, y: 799 }
            .validate(screen)
            .expect("bottom-right pixel is on the screen");
        DesktopAction::MouseDrag {
            from: Point { x: 0, y: 0 },
            to: Point { x: 10, y: 10 },
            button: MouseButton::Left,
        }
        .validate(screen)
        .expect("drag");
    }
}
