//! Desktop sandboxes against real VMs (issue 12), with the built-in `desktop` image: a
//! desktop restored from its warm snapshot shows a real desktop of the right size; a click
//! on the panel's terminal launcher opens a terminal; text typed through QEMU's keyboard
//! (and text only the guest can type) arrives exactly; key combinations work; the pointer and
//! keyboard still work in a clone of a user snapshot; ten concurrent actions leave a
//! gap-free, ordered timeline; the review bundle opens offline after `kiln rm`; malformed
//! actions get 4xx; `--screen` gives another screen size.
//!
//! The typed text is read back from files the terminal's shell writes (through the files
//! API): what QEMU typed, not what the guest reports about the screen. Waits are bounded
//! polls of a condition (a file's content, a window's existence), never fixed sleeps.
//!
//! One desktop sandbox serves the whole input walk (a restore costs seconds; a fresh one per
//! check would cost minutes under TCG).

use std::path::Path;

use kiln_e2e::{
    Kiln, api_request, assert_success, decode_png, desktop_exec, desktop_screenshot, stderr,
    stdout, wait_until,
};
use serde_json::{Value, json};

/// The terminal launcher: the first icon of the panel, at the screen's bottom-left corner.
const TERMINAL_LAUNCHER: (u32, u32) = (19, 781);

/// `kiln desktop screenshot ID` into `dir`, decoded.
fn screenshot(k: &Kiln, id: &str, dir: &Path, name: &str) -> (u32, u32, Vec<u8>) {
    desktop_screenshot(k, id, &dir.join(name))
}

/// Distinct colours among the pixels of rows `y0..y1`.
fn colours(width: u32, rgb: &[u8], y0: u32, y1: u32) -> usize {
    let row = width as usize * 3;
    let mut seen = std::collections::HashSet::new();
    for px in rgb[y0 as usize * row..y1 as usize * row].chunks_exact(3) {
        seen.insert([px[0], px[1], px[2]]);
    }
    seen.len()
}

/// A command run as the desktop's user with its display; its stdout.
fn as_user(k: &Kiln, id: &str, script: &str) -> String {
    let out = desktop_exec(k, id, &["sh", "-c", script]);
    assert_success(&out, script);
    stdout(&out)
}

/// The content of guest file `path`, if it exists.
fn guest_file(k: &Kiln, id: &str, path: &str) -> Option<String> {
    let out = k.run(&["exec", id, "--", "cat", path]);
    out.status.success().then(|| stdout(&out))
}

/// One action through the CLI's JSON form; the receipt.
fn act(k: &Kiln, id: &str, action: &Value) -> Value {
    let out = k.run(&["desktop", "act", id, &action.to_string(), "--json"]);
    assert_success(&out, &format!("kiln desktop act {action}"));
    serde_json::from_slice(&out.stdout).expect("receipt json")
}

/// Types `line` (with a newline) into the focused terminal and waits until the file it
/// writes has `want`.
fn type_line_and_wait(k: &Kiln, id: &str, line: &str, path: &str, want: &str) {
    let r = act(
        k,
        id,
        &json!({"kind": "type_text", "text": format!("{line}\n")}),
    );
    assert_eq!(r["kind"], "type_text", "{r:#}");
    wait_until(&format!("{path} holds {want:?}"), 60, || {
        guest_file(k, id, path).as_deref() == Some(want)
    });
}

/// Opens a terminal with the panel's launcher and waits until its window is mapped and has
/// the keyboard focus (xterm takes about a second under TCG).
fn open_terminal(k: &Kiln, id: &str, dir: &Path) {
    let (x, y) = TERMINAL_LAUNCHER;
    let out = k.run(&[
        "desktop",
        "click",
        id,
        &x.to_string(),
        &y.to_string(),
        "--screenshot",
        dir.join("after-click.png").to_str().expect("utf-8"),
        "--json",
    ]);
    assert_success(&out, "kiln desktop click");
    let receipt: Value = serde_json::from_slice(&out.stdout).expect("receipt");
    assert_eq!(receipt["kind"], "mouse_click");
    assert!(
        receipt["settle"]["frames"].as_u64().unwrap_or(0) >= 2,
        "{receipt:#}"
    );
    wait_until("an xterm window has the focus", 60, || {
        let out = desktop_exec(
            k,
            id,
            &[
                "sh",
                "-c",
                "xprop -id \"$(xdotool getwindowfocus)\" WM_CLASS",
            ],
        );
        out.status.success() && stdout(&out).contains("\"XTerm\"")
    });
}

#[test]
#[ignore = "boots real VMs under QEMU"]
fn desktop_screen_input_review_and_clone() {
    let k = Kiln::shared();
    let tmp = tempfile::tempdir().expect("tempdir");
    let secret = "s3cr3t-Desk-value-42";
    let (id, source) = k.create_json(&[
        "--image",
        "desktop",
        "--secret",
        &format!("DESK_TOKEN={secret}"),
    ]);
    assert_ne!(source, "cold", "a desktop starts from its warm snapshot");

    // A restore, and a real desktop: 1280x800, the background and a panel with icons.
    let (w, h, rgb) = screenshot(&k, &id, tmp.path(), "first.png");
    assert_eq!((w, h), (1280, 800), "the default screen");
    assert!(
        colours(w, &rgb, 0, 700) >= 1 && colours(w, &rgb, 764, 800) > 20,
        "a background and a panel with launcher icons (source {source})"
    );

    // The terminal launcher opens a terminal.
    open_terminal(&k, &id, tmp.path());
    let (_, _, after) = screenshot(&k, &id, tmp.path(), "terminal.png");
    let changed = rgb
        .chunks_exact(3)
        .zip(after.chunks_exact(3))
        .filter(|(a, b)| a != b)
        .count();
    assert!(
        changed > 50_000,
        "a window appeared: {changed} pixels changed"
    );

    // Text through QEMU's keyboard, every printable ASCII character that the shell passes
    // through a single-quoted printf.
    let ascii = "Hello, kiln! ~`@#$%^&*()_+-=[]{}|;:\"<>?/.,\\ 42";
    type_line_and_wait(
        &k,
        &id,
        &format!("printf '%s\\n' '{ascii}' > /tmp/ascii.txt"),
        "/tmp/ascii.txt",
        &format!("{ascii}\n"),
    );
    // Text a US keyboard cannot type: the guest types it, whole and in order.
    let unicode = "héllo → 日本 ✓";
    type_line_and_wait(
        &k,
        &id,
        &format!("printf '%s\\n' '{unicode}' > /tmp/unicode.txt"),
        "/tmp/unicode.txt",
        &format!("{unicode}\n"),
    );
    // A key combination: ctrl+u erases the half-typed line, so only the echo runs.
    let r = act(
        &k,
        &id,
        &json!({"kind": "type_text", "text": "garbage-that-must-go"}),
    );
    assert_eq!(r["typed_in_guest"].as_u64().unwrap_or(0), 0, "{r:#}");
    act(&k, &id, &json!({"kind": "key_press", "keys": "ctrl+u"}));
    type_line_and_wait(
        &k,
        &id,
        "echo combo-ok > /tmp/combo.txt",
        "/tmp/combo.txt",
        "combo-ok\n",
    );
    let history = as_user(&k, &id, "cat /tmp/combo.txt /tmp/ascii.txt");
    assert!(!history.contains("garbage"), "{history}");
    // A secret typed by name: it arrives, and the review timeline never holds its value.
    act(
        &k,
        &id,
        &json!({"kind": "type_text", "text": "printf '%s\\n' '"}),
    );
    act(
        &k,
        &id,
        &json!({"kind": "type_text", "secret": "DESK_TOKEN"}),
    );
    type_line_and_wait(
        &k,
        &id,
        "' > /tmp/secret.txt",
        "/tmp/secret.txt",
        &format!("{secret}\n"),
    );

    // The wheel on both axes, seen by an X client (xev prints each button event).
    as_user(
        &k,
        &id,
        "setsid xev -geometry 240x180+1020+40 -event button >/tmp/xev.txt 2>&1 </dev/null &",
    );
    wait_until("xev's window is mapped", 60, || {
        let out = desktop_exec(
            &k,
            &id,
            &[
                "xdotool",
                "search",
                "--onlyvisible",
                "--name",
                "Event Tester",
            ],
        );
        out.status.success()
    });
    act(
        &k,
        &id,
        &json!({"kind": "scroll", "x": 1140, "y": 130, "dy": 2, "dx": -1}),
    );
    act(&k, &id, &json!({"kind": "scroll", "dx": 1}));
    let count = |button: u32| {
        guest_file(&k, &id, "/tmp/xev.txt")
            .unwrap_or_default()
            .matches(&format!("button {button},"))
            .count()
    };
    wait_until(
        "xev saw the wheel turn down twice, left once, right once",
        60,
        || count(5) == 4 && count(6) == 2 && count(7) == 2,
    );
    assert_eq!(count(4), 0, "never up");

    // A drag: xev's window moved by its title bar, as the window manager saw the pointer go.
    let position = || {
        let out = desktop_exec(
            &k,
            &id,
            &[
                "xdotool",
                "search",
                "--name",
                "Event Tester",
                "getwindowgeometry",
            ],
        );
        let text = stdout(&out);
        let pos = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("Position: "))
            .and_then(|p| p.split_whitespace().next())
            .and_then(|p| p.split_once(','))
            .and_then(|(x, y)| Some((x.parse::<i64>().ok()?, y.parse::<i64>().ok()?)));
        pos.unwrap_or_else(|| panic!("no position in {text:?}"))
    };
    let (x0, y0) = position();
    act(
        &k,
        &id,
        &json!({"kind": "mouse_drag", "from": {"x": 1100, "y": 49}, "to": {"x": 700, "y": 449}}),
    );
    wait_until("xev's window moved with the drag", 60, || {
        let (x, y) = position();
        (x - (x0 - 400)).abs() <= 8 && (y - (y0 + 400)).abs() <= 8
    });

    // Malformed actions: 4xx naming what was wrong, nothing done.
    let cases = [
        (
            json!({"kind": "mouse_click", "x": 1280, "y": 10}),
            400,
            "off the screen",
        ),
        (json!({"kind": "mouse_click", "x": 10}), 400, "both x and y"),
        (json!({"kind": "teleport"}), 400, "teleport"),
        (
            json!({"kind": "key_press", "keys": "ctrl+nosuchkey"}),
            400,
            "nosuchkey",
        ),
        (
            json!({"kind": "type_text", "text": "a\u{7}b"}),
            400,
            "U+0007",
        ),
        (json!({"kind": "wait", "ms": 600_000}), 400, "ms"),
    ];
    let path = format!("/v1/sandboxes/{id}/desktop/actions");
    for (body, status, needle) in cases {
        let (got, text) = api_request(k.home(), "POST", &path, body.to_string().as_bytes());
        assert_eq!(got, status, "{body}: {text}");
        assert!(text.contains(needle), "{body}: {text}");
    }
    let (got, text) = api_request(
        k.home(),
        "POST",
        &format!("{path}?width=0&screenshot=true"),
        br#"{"kind":"wait","ms":1}"#,
    );
    assert_eq!(got, 400, "{text}");

    // Ten concurrent actions: each gets its receipt, and the timeline is gap-free.
    std::thread::scope(|s| {
        for i in 0..10u32 {
            let (home, path) = (k.home(), path.clone());
            s.spawn(move || {
                let body = json!({"kind": "mouse_move", "x": 300 + i * 40, "y": 200});
                let (got, text) = api_request(home, "POST", &path, body.to_string().as_bytes());
                assert_eq!(got, 200, "{text}");
            });
        }
    });

    // The pointer and keyboard in a clone of a user snapshot (the terminal is open in it).
    let snap = format!("desk-{}", &id[3..9]);
    assert_success(&k.run(&["snapshot", &id, "--name", &snap]), "kiln snapshot");
    let out = k.run(&["clone", &snap]);
    assert_success(&out, "kiln clone");
    let clone = stdout(&out).trim().to_owned();
    let (cw, ch, _) = screenshot(&k, &clone, tmp.path(), "clone.png");
    assert_eq!((cw, ch), (1280, 800), "the clone keeps the screen");
    // The click gives the terminal the focus back (xev took it); waiting for the screen to
    // settle lets the window manager act on it before the keys arrive.
    let out = k.run(&[
        "desktop",
        "click",
        &clone,
        "640",
        "300",
        "--screenshot",
        tmp.path().join("clone-focus.png").to_str().expect("utf-8"),
    ]);
    assert_success(&out, "kiln desktop click in the clone");
    type_line_and_wait(
        &k,
        &clone,
        "echo in-the-clone > /tmp/clone.txt",
        "/tmp/clone.txt",
        "in-the-clone\n",
    );
    assert!(
        guest_file(&k, &id, "/tmp/clone.txt").is_none(),
        "typed into the clone only"
    );
    assert_success(&k.run(&["rm", &clone]), "kiln rm clone");
    assert_success(&k.run(&["snapshot", "rm", &snap]), "kiln snapshot rm");

    // The review bundle: written, then still there and complete after `kiln rm`.
    let bundle = tmp.path().join("bundle");
    let out = k.run(&[
        "review",
        "export",
        &id,
        "-o",
        bundle.to_str().expect("utf-8"),
        "--json",
    ]);
    assert_success(&out, "kiln review export");
    let export: Value = serde_json::from_slice(&out.stdout).expect("export json");
    assert!(
        export["screenshots"].as_u64().unwrap_or(0) >= 2,
        "{export:#}"
    );
    assert_success(&k.run(&["rm", &id]), "kiln rm");
    let timeline = std::fs::read_to_string(bundle.join("timeline.jsonl")).expect("timeline");
    let events: Vec<Value> = timeline
        .lines()
        .map(|l| serde_json::from_str(l).expect("timeline line"))
        .collect();
    for (i, e) in events.iter().enumerate() {
        assert_eq!(
            e["seq"].as_u64(),
            Some(i as u64 + 1),
            "gap-free and ordered: {e}"
        );
    }
    let moves = events
        .iter()
        .filter(|e| e["kind"] == "action_completed" && e["receipt"]["kind"] == "mouse_move")
        .count();
    assert_eq!(moves, 10, "every concurrent action recorded once");
    assert!(
        timeline.contains("DESK_TOKEN"),
        "the secret's name is recorded"
    );
    assert!(!timeline.contains(secret), "the secret's value is not");
    for e in &events {
        for key in ["screenshot_before", "screenshot_after", "screenshot"] {
            if let Some(hash) = e[key].as_str() {
                assert!(
                    bundle
                        .join("screenshots")
                        .join(format!("{hash}.png"))
                        .is_file(),
                    "{key} {hash} is in the bundle"
                );
            }
        }
    }
    let index = std::fs::read_to_string(bundle.join("index.html")).expect("index.html");
    assert!(
        index.contains("screenshots/"),
        "the page shows the screenshots"
    );
    assert!(
        !index.contains("http://") && !index.contains("https://"),
        "offline page"
    );
    // The page in a real browser, from file:// with the sandbox gone.
    let dom = std::process::Command::new("chromium")
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--dump-dom",
        ])
        .arg(format!("file://{}", bundle.join("index.html").display()))
        .output()
        .expect("run chromium");
    let dom = String::from_utf8_lossy(&dom.stdout);
    assert!(
        dom.contains("mouse_move") && dom.contains("<img"),
        "rendered timeline"
    );
}

#[test]
#[ignore = "boots real VMs under QEMU"]
fn desktop_screen_size_and_bad_requests() {
    let k = Kiln::shared();
    let tmp = tempfile::tempdir().expect("tempdir");

    // Another screen: its own warm snapshot (captured on first use), X at that size.
    let (id, _) = k.create_json(&["--image", "desktop", "--screen", "1024x768"]);
    let (w, h, _) = screenshot(&k, &id, tmp.path(), "small.png");
    assert_eq!((w, h), (1024, 768));
    assert_eq!(
        as_user(&k, &id, "xdotool getdisplaygeometry").trim(),
        "1024 768"
    );
    let out = k.run(&[
        "desktop",
        "screenshot",
        &id,
        "--width",
        "512",
        "-o",
        tmp.path().join("half.png").to_str().expect("utf-8"),
    ]);
    assert_success(&out, "scaled screenshot");
    let (sw, sh, _) = decode_png(&std::fs::read(tmp.path().join("half.png")).expect("png"));
    assert_eq!((sw, sh), (512, 384), "scaled, aspect kept");

    // A failed action (the sandbox is paused: QEMU takes no input) pins the recording, which
    // then outlives `kiln rm` and still exports.
    assert_success(&k.run(&["pause", &id]), "kiln pause");
    let out = k.run(&["desktop", "click", &id, "10", "10"]);
    assert!(!out.status.success(), "a paused desktop takes no input");
    assert!(stderr(&out).contains("paused"), "{}", stderr(&out));
    assert_success(&k.run(&["resume", &id]), "kiln resume");
    assert_success(&k.run(&["rm", &id]), "kiln rm");
    let recording = k.home().join("recordings").join(&id);
    assert!(recording.join("timeline.jsonl").is_file(), "kept: pinned");
    let meta: Value =
        serde_json::from_slice(&std::fs::read(recording.join("meta.json")).expect("meta.json"))
            .expect("meta json");
    assert!(meta["pinned_until"].is_string(), "pinned: {meta}");
    let bundle = tmp.path().join("after-rm");
    let out = k.run(&[
        "review",
        "export",
        &id,
        "-o",
        bundle.to_str().expect("utf-8"),
    ]);
    assert_success(&out, "kiln review export after rm");
    let timeline = std::fs::read_to_string(bundle.join("timeline.jsonl")).expect("timeline");
    assert!(timeline.contains("\"action_failed\""), "{timeline}");
    assert!(
        timeline.contains("removed"),
        "the removal is in the timeline: {timeline}"
    );

    // A screen for an image that is not a desktop, and a bad size: refused before a start.
    let out = k.run(&["create", "--image", "python", "--screen", "1024x768"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not a desktop"), "{}", stderr(&out));
    let out = k.run(&["create", "--image", "desktop", "--screen", "100x100"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("640x480"), "{}", stderr(&out));

    // Desktop routes on a sandbox without a screen: 409 not_a_desktop.
    let py = k.create("python");
    let (got, text) = api_request(
        k.home(),
        "GET",
        &format!("/v1/sandboxes/{py}/desktop/screenshot"),
        b"",
    );
    assert_eq!(got, 409, "{text}");
    assert!(text.contains("not_a_desktop"), "{text}");
    let (got, text) = api_request(
        k.home(),
        "POST",
        &format!("/v1/sandboxes/{py}/desktop/actions"),
        br#"{"kind":"wait","ms":1}"#,
    );
    assert_eq!(got, 409, "{text}");
    assert_success(&k.run(&["rm", &py]), "kiln rm");
}
