//! Keyboard and pointer input for QMP `input-send-event`: xdotool-style key combinations,
//! typing plans for text, and the JSON of key, button and absolute-move events.
//!
//! Owns: the translation from what an agent asks ("ctrl+shift+t", "Hello, wörld", a click
//! at (x, y)) to QEMU's input events. It sends nothing: the caller wraps the values in
//! `{"execute": "input-send-event", "arguments": {"events": [...]}}`.
//!
//! Invariants:
//! - every key name produced is one of QEMU's `QKeyCode` names ([`QKEYCODES`], from
//!   `qapi/ui.json`) and every button one of its `InputButton` names;
//! - typing assumes the guest's keyboard layout is US QWERTY; characters that layout cannot
//!   produce are returned as [`TypeChunk::Other`] for the caller to deliver another way;
//! - inputs are bounded: a combination has at most [`MAX_COMBO_PARTS`] keys and
//!   [`MAX_COMBO_BYTES`] bytes, a text at most [`MAX_TYPE_BYTES`] bytes;
//! - an absolute position maps pixel `x` of a screen `width` wide to the centre of that
//!   pixel in QEMU's axis range `0..=ABS_MAX`, so that the guest's scaling brings it back to
//!   `x` (see [`abs_axis_value`]).

use serde_json::{Value, json};

/// The most keys in one combination ("ctrl+alt+shift+t" is 4).
pub const MAX_COMBO_PARTS: usize = 8;
/// The longest combination string accepted, in bytes.
pub const MAX_COMBO_BYTES: usize = 256;
/// The longest text [`type_plan`] accepts, in bytes.
pub const MAX_TYPE_BYTES: usize = 64 * 1024;
/// The top of QEMU's absolute axis range (`INPUT_EVENT_ABS_MAX` in `include/ui/input.h`).
pub const ABS_MAX: u32 = 0x7fff;

/// Every `QKeyCode` of QEMU (`qapi/ui.json`, QEMU 8.0 and later), except `unmapped`.
#[rustfmt::skip]
pub const QKEYCODES: &[&str] = &[
    "shift", "shift_r", "alt", "alt_r", "ctrl", "ctrl_r", "menu", "esc", "1", "2", "3", "4", "5",
    "6", "7", "8", "9", "0", "minus", "equal", "backspace", "tab", "q", "w", "e", "r", "t", "y",
    "u", "i", "o", "p", "bracket_left", "bracket_right", "ret", "a", "s", "d", "f", "g", "h", "j",
    "k", "l", "semicolon", "apostrophe", "grave_accent", "backslash", "z", "x", "c", "v", "b", "n",
    "m", "comma", "dot", "slash", "asterisk", "spc", "caps_lock", "f1", "f2", "f3", "f4", "f5",
    "f6", "f7", "f8", "f9", "f10", "num_lock", "scroll_lock", "kp_divide", "kp_multiply",
    "kp_subtract", "kp_add", "kp_enter", "kp_decimal", "sysrq", "kp_0", "kp_1", "kp_2", "kp_3",
    "kp_4", "kp_5", "kp_6", "kp_7", "kp_8", "kp_9", "less", "f11", "f12", "print", "home", "pgup",
    "pgdn", "end", "left", "up", "down", "right", "insert", "delete", "stop", "again", "props",
    "undo", "front", "copy", "open", "paste", "find", "cut", "lf", "help", "meta_l", "meta_r",
    "compose", "pause", "ro", "hiragana", "henkan", "yen", "muhenkan", "katakanahiragana",
    "kp_comma", "kp_equals", "power", "sleep", "wake", "audionext", "audioprev", "audiostop",
    "audioplay", "audiomute", "volumeup", "volumedown", "mediaselect", "mail", "calculator",
    "computer", "ac_home", "ac_back", "ac_forward", "ac_refresh", "ac_bookmarks", "lang1", "lang2",
    "f13", "f14", "f15", "f16", "f17", "f18", "f19", "f20", "f21", "f22", "f23", "f24",
];

/// The qcodes that may precede the last key of a combination.
pub const MODIFIERS: &[&str] = &[
    "ctrl", "ctrl_r", "alt", "alt_r", "shift", "shift_r", "meta_l", "meta_r",
];

/// QEMU's `InputButton` names accepted by [`button`] (`touch` is left out: multi-touch only).
pub const BUTTONS: &[&str] = &[
    "left",
    "middle",
    "right",
    "wheel-up",
    "wheel-down",
    "wheel-left",
    "wheel-right",
    "side",
    "extra",
];

/// Key names (xdotool's keysym names and common aliases) that differ from their qcode,
/// lowercase (looked up case-insensitively), with the qcode and whether the US layout needs
/// shift. A qcode's own name (`f5`, `home`, `kp_add`, `shift_r`) is accepted as well.
#[rustfmt::skip]
const NAMED_KEYS: &[(&str, &str, bool)] = &[
    // Modifiers.
    ("control", "ctrl", false), ("control_l", "ctrl", false), ("ctrl_l", "ctrl", false),
    ("control_r", "ctrl_r", false), ("alt_l", "alt", false), ("altgr", "alt_r", false),
    ("iso_level3_shift", "alt_r", false), ("shift_l", "shift", false), ("super", "meta_l", false),
    ("super_l", "meta_l", false), ("meta", "meta_l", false), ("win", "meta_l", false),
    ("super_r", "meta_r", false),
    // Editing and navigation.
    ("return", "ret", false), ("enter", "ret", false), ("escape", "esc", false),
    ("space", "spc", false), ("del", "delete", false), ("page_up", "pgup", false),
    ("prior", "pgup", false), ("pageup", "pgup", false), ("page_down", "pgdn", false),
    ("next", "pgdn", false), ("pagedown", "pgdn", false), ("sys_req", "sysrq", false),
    ("break", "pause", false),
    // Keypad.
    ("kp_equal", "kp_equals", false),
    // Punctuation by X keysym name (US layout).
    ("underscore", "minus", true), ("plus", "equal", true), ("bracketleft", "bracket_left", false),
    ("braceleft", "bracket_left", true), ("bracketright", "bracket_right", false),
    ("braceright", "bracket_right", true), ("colon", "semicolon", true),
    ("quoteright", "apostrophe", false), ("quotedbl", "apostrophe", true),
    ("grave", "grave_accent", false), ("quoteleft", "grave_accent", false),
    ("asciitilde", "grave_accent", true), ("bar", "backslash", true), ("less", "comma", true),
    ("period", "dot", false), ("greater", "dot", true), ("question", "slash", true),
    ("exclam", "1", true), ("at", "2", true), ("numbersign", "3", true), ("dollar", "4", true),
    ("percent", "5", true), ("asciicircum", "6", true), ("ampersand", "7", true),
    ("asterisk", "8", true), ("parenleft", "9", true), ("parenright", "0", true),
];

const LETTERS: &str = "abcdefghijklmnopqrstuvwxyz";
const DIGITS: &str = "0123456789";

/// Why a combination, a text or a pointer event was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Nothing to press.
    #[error("empty key combination")]
    EmptyCombo,
    /// A combination longer than [`MAX_COMBO_BYTES`].
    #[error("key combination is {len} bytes long: at most {MAX_COMBO_BYTES}")]
    ComboTooLong { len: usize },
    /// An empty name between `+` signs (`ctrl+`, `ctrl++t`).
    #[error("empty key name in {combo:?}")]
    EmptyPart { combo: String },
    /// More than [`MAX_COMBO_PARTS`] keys.
    #[error("{count} keys in {combo:?}: at most {MAX_COMBO_PARTS}")]
    TooManyParts { combo: String, count: usize },
    /// A name that is neither a known key name nor a typeable character.
    #[error("unknown key {part:?} in {combo:?}")]
    UnknownKey { part: String, combo: String },
    /// The same key twice (`ctrl+control+t`).
    #[error("duplicate key {part:?} in {combo:?}")]
    DuplicateKey { part: String, combo: String },
    /// A key other than a modifier before the last position (`a+b`).
    #[error("{part:?} in {combo:?} is not a modifier: only the last key may be another key")]
    NotAModifier { part: String, combo: String },
    /// A control character other than `\n` and `\t` in a text to type.
    #[error("control character U+{code:04X} at byte {offset} cannot be typed")]
    ControlChar { code: u32, offset: usize },
    /// A text longer than [`MAX_TYPE_BYTES`].
    #[error("text is {len} bytes long: at most {MAX_TYPE_BYTES} can be typed at once")]
    TextTooLong { len: usize },
    /// A pointer position outside the screen.
    #[error("pointer position ({x}, {y}) is outside the {width}x{height} screen")]
    OutsideScreen {
        x: u32,
        y: u32,
        width: u32,
        height: u32,
    },
    /// A button name QEMU does not have.
    #[error("unknown pointer button {0:?} (expected one of {BUTTONS:?})")]
    UnknownButton(String),
}

/// One key going down or up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyEvent {
    /// QEMU's name of the key (a [`QKEYCODES`] entry).
    pub qcode: &'static str,
    /// `true` for a press, `false` for a release.
    pub down: bool,
}

impl KeyEvent {
    /// The event as one element of `input-send-event`'s `events`:
    /// `{"type":"key","data":{"down":true,"key":{"type":"qcode","data":"a"}}}`.
    pub fn to_qmp(&self) -> Value {
        json!({
            "type": "key",
            "data": {"down": self.down, "key": {"type": "qcode", "data": self.qcode}},
        })
    }
}

/// A key combination: modifiers held (in order) around one final key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Combo {
    modifiers: Vec<&'static str>,
    key: &'static str,
}

impl Combo {
    /// The modifiers' qcodes in press order, including a shift the final key implies
    /// (`A`, `plus`), which comes last.
    pub fn modifiers(&self) -> &[&'static str] {
        &self.modifiers
    }

    /// The final key's qcode.
    pub fn key(&self) -> &'static str {
        self.key
    }

    /// The events that perform the combination: modifiers down in order, the key down and
    /// up, modifiers up in reverse order.
    pub fn events(&self) -> Vec<KeyEvent> {
        let down = |qcode| KeyEvent { qcode, down: true };
        let up = |qcode| KeyEvent { qcode, down: false };
        let mut events: Vec<KeyEvent> = self.modifiers.iter().copied().map(down).collect();
        events.extend([down(self.key), up(self.key)]);
        events.extend(self.modifiers.iter().rev().copied().map(up));
        events
    }
}

/// The one-byte name at `i` of an ASCII table (the letters' and digits' qcodes are the
/// characters themselves).
fn nth(table: &'static str, i: usize) -> &'static str {
    &table[i..i + 1]
}

/// The qcode of a character on a US QWERTY keyboard and whether it needs shift; `None` for
/// anything but printable ASCII, `\n` and `\t`.
fn char_key(c: char) -> Option<(&'static str, bool)> {
    let key = match c {
        'a'..='z' => (nth(LETTERS, c as usize - 'a' as usize), false),
        'A'..='Z' => (nth(LETTERS, c as usize - 'A' as usize), true),
        '0'..='9' => (nth(DIGITS, c as usize - '0' as usize), false),
        ' ' => ("spc", false),
        '\n' => ("ret", false),
        '\t' => ("tab", false),
        '-' => ("minus", false),
        '_' => ("minus", true),
        '=' => ("equal", false),
        '+' => ("equal", true),
        '[' => ("bracket_left", false),
        '{' => ("bracket_left", true),
        ']' => ("bracket_right", false),
        '}' => ("bracket_right", true),
        '\\' => ("backslash", false),
        '|' => ("backslash", true),
        ';' => ("semicolon", false),
        ':' => ("semicolon", true),
        '\'' => ("apostrophe", false),
        '"' => ("apostrophe", true),
        '`' => ("grave_accent", false),
        '~' => ("grave_accent", true),
        ',' => ("comma", false),
        '<' => ("comma", true),
        '.' => ("dot", false),
        '>' => ("dot", true),
        '/' => ("slash", false),
        '?' => ("slash", true),
        '!' => ("1", true),
        '@' => ("2", true),
        '#' => ("3", true),
        '$' => ("4", true),
        '%' => ("5", true),
        '^' => ("6", true),
        '&' => ("7", true),
        '*' => ("8", true),
        '(' => ("9", true),
        ')' => ("0", true),
        _ => return None,
    };
    Some(key)
}

/// One key name of a combination: a printable ASCII character (case-sensitive: `A` is
/// shift+a), else a key name or a raw qcode (case-insensitive).
fn lookup(part: &str) -> Option<(&'static str, bool)> {
    let mut chars = part.chars();
    if let (Some(c), None) = (chars.next(), chars.next()) {
        return c.is_ascii_graphic().then(|| char_key(c)).flatten();
    }
    let lower = part.to_ascii_lowercase();
    if let Some(&(_, qcode, shift)) = NAMED_KEYS.iter().find(|(name, ..)| *name == lower) {
        return Some((qcode, shift));
    }
    QKEYCODES
        .iter()
        .find(|&&qcode| qcode == lower)
        .map(|&qcode| (qcode, false))
}

/// Parses an xdotool-style combination such as `ctrl+shift+t`, `alt+F4`, `Return`, `A`
/// (= shift+a) or `plus` (= shift+equal). Names are separated by `+` (spaces around them are
/// ignored); every name but the last must be a modifier.
pub fn parse_combo(s: &str) -> Result<Combo, KeyError> {
    if s.len() > MAX_COMBO_BYTES {
        return Err(KeyError::ComboTooLong { len: s.len() });
    }
    if s.trim().is_empty() {
        return Err(KeyError::EmptyCombo);
    }
    let combo = || s.to_owned();
    let parts: Vec<&str> = s.split('+').map(str::trim).collect();
    if parts.len() > MAX_COMBO_PARTS {
        return Err(KeyError::TooManyParts {
            combo: combo(),
            count: parts.len(),
        });
    }
    let mut modifiers = Vec::new();
    let mut seen = Vec::new();
    let mut last = None;
    for (i, &part) in parts.iter().enumerate() {
        if part.is_empty() {
            return Err(KeyError::EmptyPart { combo: combo() });
        }
        let (qcode, shift) = lookup(part).ok_or_else(|| KeyError::UnknownKey {
            part: part.to_owned(),
            combo: combo(),
        })?;
        if seen.contains(&qcode) {
            return Err(KeyError::DuplicateKey {
                part: part.to_owned(),
                combo: combo(),
            });
        }
        seen.push(qcode);
        if i + 1 < parts.len() {
            if shift || !MODIFIERS.contains(&qcode) {
                return Err(KeyError::NotAModifier {
                    part: part.to_owned(),
                    combo: combo(),
                });
            }
            modifiers.push(qcode);
        } else {
            last = Some((qcode, shift));
        }
    }
    // `parts` is never empty (split yields at least one piece) and the loop returns early
    // or records the last piece.
    let (key, shift) = last.ok_or(KeyError::EmptyCombo)?;
    let shifted = modifiers.iter().any(|&m| m == "shift" || m == "shift_r");
    if shift && !shifted && key != "shift" && key != "shift_r" {
        modifiers.push("shift");
    }
    Ok(Combo { modifiers, key })
}

/// A piece of a text to type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TypeChunk {
    /// Characters typed by these key events (US QWERTY layout).
    Keys(Vec<KeyEvent>),
    /// Characters no key of the US layout produces (`é`, `→`, emoji, CJK): the caller
    /// delivers them another way, e.g. `xdotool type` in the guest.
    Other(String),
}

/// Whether a key of the US layout (with shift if need be) types `c`; `\n` and `\t` count.
pub fn us_typeable(c: char) -> bool {
    char_key(c).is_some()
}

/// Splits `text` into runs typeable with key presses and runs that are not. Each typeable
/// character becomes press/release events, wrapped in shift press/release when the US layout
/// needs it; `\n` is Return and `\t` is Tab. Consecutive characters of one class share a
/// chunk. Other control characters are refused, as is a text over [`MAX_TYPE_BYTES`].
pub fn type_plan(text: &str) -> Result<Vec<TypeChunk>, KeyError> {
    if text.len() > MAX_TYPE_BYTES {
        return Err(KeyError::TextTooLong { len: text.len() });
    }
    let mut chunks: Vec<TypeChunk> = Vec::new();
    for (offset, c) in text.char_indices() {
        if let Some((qcode, shift)) = char_key(c) {
            if !matches!(chunks.last(), Some(TypeChunk::Keys(_))) {
                chunks.push(TypeChunk::Keys(Vec::new()));
            }
            if let Some(TypeChunk::Keys(events)) = chunks.last_mut() {
                if shift {
                    events.push(KeyEvent {
                        qcode: "shift",
                        down: true,
                    });
                }
                events.push(KeyEvent { qcode, down: true });
                events.push(KeyEvent { qcode, down: false });
                if shift {
                    events.push(KeyEvent {
                        qcode: "shift",
                        down: false,
                    });
                }
            }
        } else if c.is_control() {
            return Err(KeyError::ControlChar {
                code: u32::from(c),
                offset,
            });
        } else if let Some(TypeChunk::Other(run)) = chunks.last_mut() {
            run.push(c);
        } else {
            chunks.push(TypeChunk::Other(c.to_string()));
        }
    }
    Ok(chunks)
}

/// The absolute axis value that puts the pointer on the centre of pixel `pixel` of an axis
/// `size` pixels long: `floor((pixel + 1/2) * (ABS_MAX + 1) / size)`.
///
/// QEMU passes `input-send-event`'s value unchanged to the tablet (usb-tablet, virtio
/// tablet), whose axis spans `0..=ABS_MAX`; the guest scales it to the screen. libinput
/// computes `value * size / (ABS_MAX + 1)` (its range is `max - min + 1`), the older
/// `value * size / ABS_MAX` (QEMU's own `qemu_input_scale_axis` shape) is also in use; the
/// pixel's centre lands back on `pixel` under both for any `size <= 8192`. Callers check
/// `pixel < size` and `size >= 1` ([`abs_move`] does).
pub fn abs_axis_value(pixel: u32, size: u32) -> u32 {
    // A size of 0 is a caller's mistake; treat it as 1 rather than divide by zero.
    let size = u64::from(size.max(1));
    let scaled = (2 * u64::from(pixel) + 1) * (u64::from(ABS_MAX) + 1) / (2 * size);
    // pixel < size makes this < ABS_MAX + 1; the min keeps a caller's mistake in range.
    scaled.min(u64::from(ABS_MAX)) as u32
}

/// The two `abs` events (x then y) that move an absolute pointer to pixel `(x, y)` of a
/// `width` x `height` screen. The VM needs an absolute pointing device (usb-tablet or
/// virtio-tablet) for QEMU to accept them.
pub fn abs_move(x: u32, y: u32, width: u32, height: u32) -> Result<[Value; 2], KeyError> {
    if x >= width || y >= height {
        return Err(KeyError::OutsideScreen {
            x,
            y,
            width,
            height,
        });
    }
    let axis =
        |axis: &str, value: u32| json!({"type": "abs", "data": {"axis": axis, "value": value}});
    Ok([
        axis("x", abs_axis_value(x, width)),
        axis("y", abs_axis_value(y, height)),
    ])
}

/// A pointer button event: `{"type":"btn","data":{"down":true,"button":"left"}}`. A wheel
/// notch is `wheel-up` (or `-down`, `-left`, `-right`) pressed then released.
pub fn button(name: &str, down: bool) -> Result<Value, KeyError> {
    let name = BUTTONS
        .iter()
        .find(|&&b| b == name)
        .ok_or_else(|| KeyError::UnknownButton(name.to_owned()))?;
    Ok(json!({"type": "btn", "data": {"down": down, "button": name}}))
}

#[cfg(test)]
mod tests;
