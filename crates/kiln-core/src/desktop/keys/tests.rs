//! Tests of `desktop::keys`.
use super::*;

// An independent US QWERTY table, key by key along the rows: the unshifted character,
// the shifted one and the qcode of the key.
const US_UNSHIFTED: &str = "`1234567890-=qwertyuiop[]\\asdfghjkl;'zxcvbnm,./";
const US_SHIFTED: &str = "~!@#$%^&*()_+QWERTYUIOP{}|ASDFGHJKL:\"ZXCVBNM<>?";
#[rustfmt::skip]
const US_KEYS: [&str; 47] = [
    "grave_accent", "1", "2", "3", "4", "5", "6", "7", "8", "9", "0", "minus", "equal",
    "q", "w", "e", "r", "t", "y", "u", "i", "o", "p", "bracket_left", "bracket_right",
    "backslash", "a", "s", "d", "f", "g", "h", "j", "k", "l", "semicolon", "apostrophe",
    "z", "x", "c", "v", "b", "n", "m", "comma", "dot", "slash",
];

fn press(qcode: &'static str, shift: bool) -> Vec<KeyEvent> {
    let ev = |qcode, down| KeyEvent { qcode, down };
    if shift {
        vec![
            ev("shift", true),
            ev(qcode, true),
            ev(qcode, false),
            ev("shift", false),
        ]
    } else {
        vec![ev(qcode, true), ev(qcode, false)]
    }
}

#[test]
fn type_plan_maps_every_printable_ascii_char_like_the_us_layout() {
    let mut expected = vec![(' ', "spc", false)];
    for ((plain, shifted), key) in US_UNSHIFTED.chars().zip(US_SHIFTED.chars()).zip(US_KEYS) {
        expected.push((plain, key, false));
        expected.push((shifted, key, true));
    }
    // The table covers all 95 printable ASCII characters, each once.
    let mut covered: Vec<char> = expected.iter().map(|&(c, ..)| c).collect();
    covered.sort_unstable();
    assert_eq!(covered, (' '..='~').collect::<Vec<char>>());
    for (c, key, shift) in expected {
        let plan = type_plan(&c.to_string()).expect("printable ASCII");
        assert_eq!(plan, vec![TypeChunk::Keys(press(key, shift))], "{c:?}");
        assert!(QKEYCODES.contains(&key), "{key}");
    }
}

#[test]
fn type_plan_merges_runs_and_sets_aside_what_keys_cannot_type() {
    let plan = type_plan("Hi\té→x 日本\n").expect("plan");
    let mut first = press("h", true);
    first.extend(press("i", false));
    first.extend(press("tab", false));
    let mut third = press("x", false);
    third.extend(press("spc", false));
    assert_eq!(
        plan,
        vec![
            TypeChunk::Keys(first),
            TypeChunk::Other("é→".into()),
            TypeChunk::Keys(third),
            TypeChunk::Other("日本".into()),
            TypeChunk::Keys(press("ret", false)),
        ]
    );
    assert_eq!(type_plan("").expect("empty text"), vec![]);
    let emoji = type_plan("👍🏽").expect("emoji");
    assert_eq!(emoji, vec![TypeChunk::Other("👍🏽".into())]);
}

#[test]
fn type_plan_refuses_control_chars_and_long_texts() {
    for (text, message) in [
        (
            "ab\rc",
            "control character U+000D at byte 2 cannot be typed",
        ),
        (
            "\u{1b}[A",
            "control character U+001B at byte 0 cannot be typed",
        ),
        (
            "é\u{7f}",
            "control character U+007F at byte 2 cannot be typed",
        ),
        (
            "x\u{85}",
            "control character U+0085 at byte 1 cannot be typed",
        ),
    ] {
        let err = type_plan(text).expect_err(message);
        assert_eq!(err.to_string(), message);
    }
    assert!(type_plan(&"a".repeat(MAX_TYPE_BYTES)).is_ok());
    let err = type_plan(&"a".repeat(MAX_TYPE_BYTES + 1)).expect_err("too long");
    assert_eq!(
        err,
        KeyError::TextTooLong {
            len: MAX_TYPE_BYTES + 1
        }
    );
}

#[test]
fn parse_combo_accepts_xdotool_names() {
    let cases: &[(&str, &[&str], &str)] = &[
        ("ctrl+shift+t", &["ctrl", "shift"], "t"),
        ("ctrl+l", &["ctrl"], "l"),
        ("Return", &[], "ret"),
        ("Escape", &[], "esc"),
        ("alt+F4", &["alt"], "f4"),
        ("super", &[], "meta_l"),
        ("Super_L+e", &["meta_l"], "e"),
        ("meta+d", &["meta_l"], "d"),
        ("win", &[], "meta_l"),
        ("BackSpace", &[], "backspace"),
        ("Tab", &[], "tab"),
        ("Page_Up", &[], "pgup"),
        ("Page_Down", &[], "pgdn"),
        ("KP_Enter", &[], "kp_enter"),
        ("space", &[], "spc"),
        ("a", &[], "a"),
        ("A", &["shift"], "a"),
        ("ctrl+A", &["ctrl", "shift"], "a"),
        ("shift+A", &["shift"], "a"),
        ("Shift_R+a", &["shift_r"], "a"),
        ("Up", &[], "up"),
        ("Delete", &[], "delete"),
        ("Home", &[], "home"),
        ("F5", &[], "f5"),
        ("minus", &[], "minus"),
        ("plus", &["shift"], "equal"),
        ("ctrl+plus", &["ctrl", "shift"], "equal"),
        ("ctrl+minus", &["ctrl"], "minus"),
        ("period", &[], "dot"),
        ("comma", &[], "comma"),
        ("slash", &[], "slash"),
        ("less", &["shift"], "comma"),
        ("ctrl+/", &["ctrl"], "slash"),
        ("CONTROL_L+alt_l+Delete", &["ctrl", "alt"], "delete"),
        ("Control_R+c", &["ctrl_r"], "c"),
        ("ctrl + alt + t", &["ctrl", "alt"], "t"),
        ("ctrl+shift", &["ctrl"], "shift"),
        ("kp_add", &[], "kp_add"),
        ("Print", &[], "print"),
        ("1", &[], "1"),
        ("!", &["shift"], "1"),
    ];
    for &(input, modifiers, key) in cases {
        let combo = parse_combo(input).unwrap_or_else(|e| panic!("{input}: {e}"));
        assert_eq!(
            (combo.modifiers(), combo.key()),
            (modifiers, key),
            "{input}"
        );
    }
}

#[test]
fn every_named_key_maps_to_a_real_qcode_and_is_reachable() {
    for &(name, qcode, _) in NAMED_KEYS {
        assert!(QKEYCODES.contains(&qcode), "{name} → {qcode}");
        assert_eq!(name, name.to_ascii_lowercase(), "table names are lowercase");
        assert!(parse_combo(name).is_ok(), "{name}");
    }
    for qcode in MODIFIERS {
        assert!(QKEYCODES.contains(qcode), "{qcode}");
    }
}

#[test]
fn parse_combo_errors_name_the_bad_part() {
    let long = "a".repeat(MAX_COMBO_BYTES + 1);
    let cases = [
        ("ctrl+foo", r#"unknown key "foo" in "ctrl+foo""#),
        ("ctrl+", r#"empty key name in "ctrl+""#),
        ("ctrl++t", r#"empty key name in "ctrl++t""#),
        ("+", r#"empty key name in "+""#),
        ("", "empty key combination"),
        ("   ", "empty key combination"),
        (
            "ctrl+control+t",
            r#"duplicate key "control" in "ctrl+control+t""#,
        ),
        ("super+Win+e", r#"duplicate key "Win" in "super+Win+e""#),
        (
            "t+t",
            r#""t" in "t+t" is not a modifier: only the last key may be another key"#,
        ),
        (
            "a+b",
            r#""a" in "a+b" is not a modifier: only the last key may be another key"#,
        ),
        (
            "A+b",
            r#""A" in "A+b" is not a modifier: only the last key may be another key"#,
        ),
        ("ctrl+é", r#"unknown key "é" in "ctrl+é""#),
        ("unmapped", r#"unknown key "unmapped" in "unmapped""#),
        (
            "ctrl+alt+shift+super+ctrl_r+alt_r+shift_r+meta_r+t",
            r#"9 keys in "ctrl+alt+shift+super+ctrl_r+alt_r+shift_r+meta_r+t": at most 8"#,
        ),
        (&long, "key combination is 257 bytes long: at most 256"),
    ];
    for (input, message) in cases {
        let err = parse_combo(input).expect_err(message);
        assert_eq!(err.to_string(), message, "{input:?}");
    }
}

#[test]
fn combo_events_press_modifiers_in_order_and_release_in_reverse() {
    let ev = |qcode, down| KeyEvent { qcode, down };
    let events = parse_combo("ctrl+alt+T").expect("combo").events();
    assert_eq!(
        events,
        vec![
            ev("ctrl", true),
            ev("alt", true),
            ev("shift", true),
            ev("t", true),
            ev("t", false),
            ev("shift", false),
            ev("alt", false),
            ev("ctrl", false),
        ]
    );
    let single = parse_combo("Return").expect("combo").events();
    assert_eq!(single, vec![ev("ret", true), ev("ret", false)]);
}

#[test]
fn key_event_to_qmp_is_the_input_send_event_shape() {
    let value = KeyEvent {
        qcode: "ctrl",
        down: true,
    }
    .to_qmp();
    let expected = r#"{"data":{"down":true,"key":{"data":"ctrl","type":"qcode"}},"type":"key"}"#;
    assert_eq!(value.to_string(), expected);
    let up = KeyEvent {
        qcode: "a",
        down: false,
    }
    .to_qmp();
    assert_eq!(up["data"]["down"], Value::Bool(false));
    assert_eq!(up["data"]["key"]["data"], "a");
}

#[test]
fn abs_axis_value_round_trips_every_pixel_through_guest_scaling() {
    let abs_range = u64::from(ABS_MAX) + 1;
    for size in [
        1u32, 2, 3, 7, 640, 768, 800, 1024, 1080, 1280, 1366, 1920, 2560, 8192,
    ] {
        for pixel in 0..size {
            let value = u64::from(abs_axis_value(pixel, size));
            assert!(value <= u64::from(ABS_MAX), "{pixel}/{size} → {value}");
            // libinput: value * size / (max - min + 1).
            assert_eq!(
                value * u64::from(size) / abs_range,
                u64::from(pixel),
                "{size}"
            );
            // QEMU's qemu_input_scale_axis(value, 0, ABS_MAX, 0, size).
            let qemu = value * u64::from(size) / u64::from(ABS_MAX);
            assert_eq!(qemu, u64::from(pixel), "{pixel}/{size}");
        }
    }
    // The centre: the middle pixel of an even axis lands just past half the range.
    assert_eq!(abs_axis_value(640, 1280), 0x4000 + 12);
    assert_eq!(abs_axis_value(0, 1), 0x4000);
    // Misuse stays in range instead of panicking.
    assert_eq!(abs_axis_value(0, 0), 0x4000);
    assert_eq!(abs_axis_value(5000, 10), ABS_MAX);
}

#[test]
fn abs_move_emits_x_then_y_and_refuses_points_off_screen() {
    let [x, y] = abs_move(0, 799, 1280, 800).expect("on screen");
    let expected_x = r#"{"data":{"axis":"x","value":12},"type":"abs"}"#;
    assert_eq!(x.to_string(), expected_x);
    assert_eq!(y["data"]["axis"], "y");
    assert_eq!(y["data"]["value"], abs_axis_value(799, 800));
    for (px, py) in [(1280, 0), (0, 800)] {
        let err = abs_move(px, py, 1280, 800).expect_err("off screen");
        let message = format!("pointer position ({px}, {py}) is outside the 1280x800 screen");
        assert_eq!(err.to_string(), message);
    }
    assert!(abs_move(0, 0, 0, 0).is_err());
}

#[test]
fn button_uses_qemu_names_and_refuses_others() {
    let value = button("left", true).expect("left");
    let expected = r#"{"data":{"button":"left","down":true},"type":"btn"}"#;
    assert_eq!(value.to_string(), expected);
    for name in BUTTONS {
        let value = button(name, false).expect(name);
        assert_eq!(value["data"]["button"], *name);
        assert_eq!(value["data"]["down"], false);
    }
    for bad in ["Left", "wheel_up", "touch", ""] {
        let err = button(bad, true).expect_err(bad);
        assert!(
            err.to_string()
                .starts_with(&format!("unknown pointer button {bad:?}"))
        );
    }
}
