//! Unit tests of the recorder, redaction, pinning and reclaiming (temporary directories only).

use std::fs::OpenOptions;
use std::sync::Arc;
use std::time::Duration;

use kiln_api_types::SandboxId;
use serde_json::json;

use super::super::redact::Redactor;
use super::*;

pub(crate) fn sb() -> SandboxId {
    "sb-0123456789ab".parse().unwrap()
}

/// A tiny "PNG": the signature and `tag` (put_screenshot checks only the signature).
pub(crate) fn png(tag: &str) -> Vec<u8> {
    let mut b = PNG_MAGIC.to_vec();
    b.extend_from_slice(tag.as_bytes());
    b
}

pub(crate) fn lines(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join(TIMELINE_FILE))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect()
}

fn note(text: &str) -> TimelineEvent {
    TimelineEvent::Note { text: text.into() }
}

fn recorder(dir: &Path) -> Recorder {
    Recorder::open(dir, &sb(), Redactor::none()).unwrap()
}

#[test]
fn record_concurrent_callers_get_gap_free_seqs_in_file_order() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("rec");
    let rec = Arc::new(recorder(&dir));
    let threads: Vec<_> = (0..16)
        .map(|t| {
            let rec = Arc::clone(&rec);
            std::thread::spawn(move || {
                (0..50)
                    .map(|i| rec.record(note(&format!("t{t} e{i}"))).unwrap())
                    .collect::<Vec<u64>>()
            })
        })
        .collect();
    let mut returned: Vec<u64> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    returned.sort();
    assert_eq!(returned, (1..=800).collect::<Vec<u64>>());
    let all = lines(&dir);
    assert_eq!(all.len(), 800);
    let mut last_at = String::new();
    for (i, line) in all.iter().enumerate() {
        assert_eq!(line["seq"], json!(i as u64 + 1), "line {i}");
        let at = line["at"].as_str().unwrap().to_owned();
        assert!(at >= last_at, "time goes back at seq {}", i + 1);
        last_at = at;
    }
    // Each thread's own events are in its order.
    let mine: Vec<&str> = all
        .iter()
        .map(|l| l["text"].as_str().unwrap())
        .filter(|t| t.starts_with("t3 "))
        .collect();
    let expected: Vec<String> = (0..50).map(|i| format!("t3 e{i}")).collect();
    assert_eq!(mine, expected);
    assert_eq!(rec.events(), 800);
}

#[test]
fn record_line_shape_is_seq_at_kind_then_fields() {
    let tmp = tempfile::tempdir().unwrap();
    let rec = recorder(tmp.path());
    let h = rec.put_screenshot(&png("a")).unwrap();
    rec.record(TimelineEvent::ActionRequested {
        action_id: "a-1".into(),
        action: json!({"kind": "click", "x": 10, "y": 20}),
    })
    .unwrap();
    rec.record(TimelineEvent::ActionCompleted {
        action_id: "a-1".into(),
        receipt: json!({"ok": true}),
        screenshot_before: Some(h.clone()),
        screenshot_after: None,
    })
    .unwrap();
    let text = std::fs::read_to_string(tmp.path().join(TIMELINE_FILE)).unwrap();
    let first = text.lines().next().unwrap();
    assert!(first.starts_with("{\"seq\":1,\"at\":\""), "{first}");
    assert!(first.contains(",\"kind\":\"action_requested\","), "{first}");
    let all = lines(tmp.path());
    assert_eq!(all[1]["kind"], "action_completed");
    assert_eq!(all[1]["screenshot_before"], json!(h.as_str()));
    assert_eq!(all[1]["screenshot_after"], Value::Null);
    let at = all[0]["at"].as_str().unwrap();
    assert!(parse_rfc3339_ms(at).is_some(), "{at}");
    // Lines read back as events.
    let back: TimelineEvent = serde_json::from_value(all[1].clone()).unwrap();
    assert_eq!(back.screenshots(), vec![&h]);
}

#[test]
fn open_again_continues_after_the_last_seq() {
    let tmp = tempfile::tempdir().unwrap();
    let rec = recorder(tmp.path());
    for i in 0..3 {
        rec.record(note(&i.to_string())).unwrap();
    }
    rec.close().unwrap();
    let rec = recorder(tmp.path());
    assert_eq!(rec.recovery(), None);
    assert_eq!(rec.record(note("after restart")).unwrap(), 4);
    let seqs: Vec<u64> = lines(tmp.path())
        .iter()
        .map(|l| l["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, vec![1, 2, 3, 4]);
}

#[test]
fn open_cuts_a_torn_last_line_and_reports_it() {
    let tmp = tempfile::tempdir().unwrap();
    let rec = recorder(tmp.path());
    rec.record(note("one")).unwrap();
    rec.record(note("two")).unwrap();
    drop(rec);
    let path = tmp.path().join(TIMELINE_FILE);
    let whole = std::fs::read(&path).unwrap();
    let torn = b"{\"seq\":3,\"at\":\"2026-11-30T1";
    let mut f = OpenOptions::new().append(true).open(&path).unwrap();
    f.write_all(torn).unwrap();
    drop(f);

    let rec = recorder(tmp.path());
    assert_eq!(
        rec.recovery(),
        Some(&Recovery {
            torn_bytes: torn.len() as u64,
            last_seq: 2
        })
    );
    assert_eq!(std::fs::read(&path).unwrap(), whole, "cut back exactly");
    assert_eq!(rec.record(note("three")).unwrap(), 3);
    let all = lines(tmp.path());
    assert_eq!(all.len(), 3);
    assert_eq!(all[2]["text"], "three");
}

#[test]
fn open_cuts_complete_garbage_lines_at_the_end() {
    let tmp = tempfile::tempdir().unwrap();
    let rec = recorder(tmp.path());
    rec.record(note("one")).unwrap();
    drop(rec);
    // A power failure can leave zeros where the page cache had not written back.
    let path = tmp.path().join(TIMELINE_FILE);
    let mut f = OpenOptions::new().append(true).open(&path).unwrap();
    f.write_all(b"\0\0\0\0\n\0\0").unwrap();
    drop(f);
    let rec = recorder(tmp.path());
    assert_eq!(rec.recovery().map(|r| r.torn_bytes), Some(7));
    assert_eq!(rec.record(note("two")).unwrap(), 2);
    assert_eq!(lines(tmp.path()).len(), 2);
}

#[test]
fn open_refuses_a_recording_of_another_sandbox() {
    let tmp = tempfile::tempdir().unwrap();
    recorder(tmp.path()).close().unwrap();
    let other: SandboxId = "sb-ffffffffffff".parse().unwrap();
    let err = Recorder::open(tmp.path(), &other, Redactor::none()).unwrap_err();
    assert!(matches!(err, ReviewError::Corrupt { .. }), "{err}");
}

#[test]
fn record_cuts_long_strings_to_the_line_limit_with_a_marker() {
    let tmp = tempfile::tempdir().unwrap();
    let rec = recorder(tmp.path());
    let long = "é".repeat(100_000); // 200 KB, two bytes a character
    rec.record(TimelineEvent::ActionRequested {
        action_id: "a-1".into(),
        action: json!({"kind": "type_text", "text": long}),
    })
    .unwrap();
    let text = std::fs::read_to_string(tmp.path().join(TIMELINE_FILE)).unwrap();
    let line = text.lines().next().unwrap();
    assert!(
        line.len() <= Limits::default().max_line_bytes,
        "{}",
        line.len()
    );
    let v: Value = serde_json::from_str(line).unwrap();
    let cut = v["action"]["text"].as_str().unwrap();
    assert!(cut.contains("…[truncated "), "marker missing");
    assert!(cut.starts_with("éé"));
    assert_eq!(v["action_id"], "a-1");
}

#[test]
fn record_replaces_a_field_of_many_small_values_by_a_marker() {
    let tmp = tempfile::tempdir().unwrap();
    let rec = recorder(tmp.path());
    let many: Vec<u64> = (0..100_000).collect();
    rec.record(TimelineEvent::ActionCompleted {
        action_id: "a-1".into(),
        receipt: json!({ "points": many }),
        screenshot_before: None,
        screenshot_after: None,
    })
    .unwrap();
    let v = &lines(tmp.path())[0];
    let receipt = v["receipt"].as_str().unwrap();
    assert!(receipt.starts_with("[truncated: "), "{receipt}");
    assert_eq!(v["kind"], "action_completed");
}

#[test]
fn record_past_the_event_limit_writes_one_truncated_event_and_counts_drops() {
    let tmp = tempfile::tempdir().unwrap();
    let limits = Limits {
        max_events: 5,
        ..Limits::default()
    };
    let rec = Recorder::open_with(tmp.path(), &sb(), Redactor::none(), limits).unwrap();
    let results: Vec<Result<u64, ReviewError>> =
        (0..10).map(|i| rec.record(note(&i.to_string()))).collect();
    for (i, r) in results.iter().enumerate().take(4) {
        assert_eq!(*r.as_ref().unwrap(), i as u64 + 1);
    }
    for r in &results[4..] {
        assert!(matches!(r, Err(ReviewError::TimelineFull { .. })), "{r:?}");
    }
    let all = lines(tmp.path());
    assert_eq!(all.len(), 5);
    assert_eq!(all[4]["kind"], "truncated");
    assert_eq!(all[4]["seq"], 5);
    rec.close().unwrap();
    assert_eq!(read_meta(tmp.path()).unwrap().dropped_events, 6);

    // Still full after a restart: nothing more is written.
    let rec = Recorder::open_with(tmp.path(), &sb(), Redactor::none(), limits).unwrap();
    assert!(rec.record(note("late")).is_err());
    assert_eq!(lines(tmp.path()).len(), 5);
    drop(rec);
    assert_eq!(read_meta(tmp.path()).unwrap().dropped_events, 7);
}

#[test]
fn record_past_the_byte_limit_stops_below_it() {
    let tmp = tempfile::tempdir().unwrap();
    let limits = Limits {
        max_timeline_bytes: 4096,
        ..Limits::default()
    };
    let rec = Recorder::open_with(tmp.path(), &sb(), Redactor::none(), limits).unwrap();
    let mut ok = 0;
    for _ in 0..100 {
        if rec.record(note(&"x".repeat(100))).is_ok() {
            ok += 1;
        }
    }
    let len = std::fs::metadata(tmp.path().join(TIMELINE_FILE))
        .unwrap()
        .len();
    assert!(len <= 4096, "{len}");
    assert!(ok > 10 && ok < 100, "{ok}");
    let all = lines(tmp.path());
    assert_eq!(all.last().unwrap()["kind"], "truncated");
    assert_eq!(all.len(), ok + 1);
}

#[test]
fn put_screenshot_same_bytes_are_stored_once() {
    let tmp = tempfile::tempdir().unwrap();
    let rec = recorder(tmp.path());
    let a = rec.put_screenshot(&png("a")).unwrap();
    let path = tmp.path().join(SCREENSHOTS_DIR).join(a.file_name());
    let ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&path).unwrap());
    let again = rec.put_screenshot(&png("a")).unwrap();
    assert_eq!(a, again);
    let ino2 = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&path).unwrap());
    assert_eq!(ino, ino2, "rewritten");
    let b = rec.put_screenshot(&png("b")).unwrap();
    assert_ne!(a, b);
    assert_eq!(std::fs::read(&path).unwrap(), png("a"));
    let files = std::fs::read_dir(tmp.path().join(SCREENSHOTS_DIR))
        .unwrap()
        .count();
    assert_eq!(files, 2, "no temporary files left");
    assert_eq!(a.as_str(), hex(&Sha256::digest(png("a"))));

    // Known after a restart too: nothing written again.
    drop(rec);
    let rec = recorder(tmp.path());
    std::fs::remove_file(&path).unwrap();
    rec.put_screenshot(&png("a")).unwrap();
    assert!(!path.exists(), "a known hash is not written again");
}

#[test]
fn put_screenshot_refuses_non_png_oversized_and_over_budget() {
    let tmp = tempfile::tempdir().unwrap();
    let limits = Limits {
        max_screenshot_bytes: 100,
        max_screenshots_total_bytes: 150,
        ..Limits::default()
    };
    let rec = Recorder::open_with(tmp.path(), &sb(), Redactor::none(), limits).unwrap();
    assert!(matches!(
        rec.put_screenshot(b"GIF89a......"),
        Err(ReviewError::NotPng)
    ));
    assert!(matches!(
        rec.put_screenshot(&png(&"x".repeat(200))),
        Err(ReviewError::ScreenshotTooLarge { .. })
    ));
    rec.put_screenshot(&png(&"a".repeat(80))).unwrap();
    assert!(matches!(
        rec.put_screenshot(&png(&"b".repeat(80))),
        Err(ReviewError::ScreenshotBudget { max: 150 })
    ));
    // The same bytes again cost nothing.
    rec.put_screenshot(&png(&"a".repeat(80))).unwrap();
}

#[test]
fn screenshot_hash_accepts_only_64_lowercase_hex_digits() {
    assert_eq!(
        ScreenshotHash::of(b"abc").as_str(),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    for bad in ["../../etc/passwd", "", &"A".repeat(64), &"a".repeat(63)] {
        assert!(bad.parse::<ScreenshotHash>().is_err(), "{bad:?}");
    }
    let bad_event = json!({"kind": "checkpoint", "screenshot": "../x"});
    assert!(serde_json::from_value::<TimelineEvent>(bad_event).is_err());
}

pub(crate) fn secrets() -> Redactor {
    Redactor::new(vec![
        ("DB_PASSWORD".into(), b"hunter22".to_vec()),
        // Its value is part of API_TOKEN's.
        ("SHORTER".into(), b"tok-1234".to_vec()),
        ("API_TOKEN".into(), b"xx-tok-1234-yy".to_vec()),
        // Starts with DB_PASSWORD's value.
        ("LONG_PW".into(), b"hunter22-and-more".to_vec()),
        ("PIN".into(), b"123".to_vec()), // too short: ignored
    ])
}

#[test]
fn record_writes_no_secret_to_the_timeline() {
    let tmp = tempfile::tempdir().unwrap();
    let rec = Recorder::open(tmp.path(), &sb(), secrets()).unwrap();
    rec.record(TimelineEvent::ActionRequested {
        action_id: "a-1".into(),
        action: json!({"kind": "type_text", "text": "hunter22"}),
    })
    .unwrap();
    rec.record(TimelineEvent::ActionCompleted {
        action_id: "a-1".into(),
        receipt: json!({"typed": {"chars": "xx-tok-1234-yy", "n": 14}}),
        screenshot_before: None,
        screenshot_after: None,
    })
    .unwrap();
    rec.record(TimelineEvent::ActionFailed {
        action_id: "a-2".into(),
        error: ActionError {
            code: "agent_error".into(),
            message: "login with tok-1234 refused".into(),
        },
        screenshot: None,
    })
    .unwrap();
    let text = std::fs::read_to_string(tmp.path().join(TIMELINE_FILE)).unwrap();
    for value in ["hunter22", "tok-1234", "xx-tok"] {
        assert!(!text.contains(value), "{value} in {text}");
    }
    assert!(text.contains("[secret:DB_PASSWORD]"));
    assert!(text.contains("[secret:API_TOKEN]"));
    assert!(text.contains("login with [secret:SHORTER] refused"));
}

#[test]
fn pin_for_sets_pinned_until_and_never_shortens_it() {
    let tmp = tempfile::tempdir().unwrap();
    let rec = recorder(tmp.path());
    assert_eq!(read_meta(tmp.path()).unwrap().pinned_until, None);
    let before = SystemTime::now();
    rec.pin_for(Duration::from_secs(3600)).unwrap();
    let until = read_meta(tmp.path()).unwrap().pinned_until().unwrap();
    let delta = until.duration_since(before).unwrap();
    assert!(
        delta >= Duration::from_secs(3599) && delta <= Duration::from_secs(3700),
        "{delta:?}"
    );
    rec.pin_for(Duration::from_secs(10)).unwrap();
    assert_eq!(
        read_meta(tmp.path()).unwrap().pinned_until().unwrap(),
        until,
        "a shorter pin shortened it"
    );
}
