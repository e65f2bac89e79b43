//! Unit tests of export bundles (temporary directories only).

use super::*;
use crate::desktop::redact::Redactor;
use crate::desktop::retention::{Kept, remove_or_keep};
use crate::desktop::review::{
    ActionError, TimelineEvent,
    tests::{png, sb},
};
use std::time::{Duration, UNIX_EPOCH};

/// A recording with two referenced screenshots and one stored but unreferenced.
fn recording(dir: &Path, action_text: &str) -> (Recorder, ScreenshotHash, ScreenshotHash) {
    let rec = Recorder::open(dir, &sb(), Redactor::none()).unwrap();
    rec.set_machine(
        "desktop",
        ScreenSize {
            width: 1280,
            height: 800,
        },
    )
    .unwrap();
    let before = rec.put_screenshot(&png("before")).unwrap();
    let after = rec.put_screenshot(&png("after")).unwrap();
    rec.put_screenshot(&png("unreferenced")).unwrap();
    rec.record(TimelineEvent::Readiness {
        state: "ready".into(),
    })
    .unwrap();
    rec.record(TimelineEvent::ActionRequested {
        action_id: "a-1".into(),
        action: json!({"kind": "type_text", "text": action_text}),
    })
    .unwrap();
    rec.record(TimelineEvent::ActionCompleted {
        action_id: "a-1".into(),
        receipt: json!({"ok": true}),
        screenshot_before: Some(before.clone()),
        screenshot_after: Some(after.clone()),
    })
    .unwrap();
    rec.record(TimelineEvent::ActionFailed {
        action_id: "a-2".into(),
        error: ActionError {
            code: "timeout".into(),
            message: "no change".into(),
        },
        screenshot: Some(after.clone()),
    })
    .unwrap();
    (rec, before, after)
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

#[test]
fn export_writes_a_complete_bundle_with_only_referenced_screenshots() {
    let tmp = tempfile::tempdir().unwrap();
    let (rec, before, after) = recording(&tmp.path().join("rec"), "hello");
    let exports = tmp.path().join("exports");
    let info = rec.export(&exports, None).unwrap();

    assert_eq!(info.path.parent().unwrap(), exports);
    let name = info
        .path
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert!(name.starts_with("sb-0123456789ab-20"), "{name}");
    assert!(name.ends_with('Z'), "{name}");
    assert_eq!(names(&exports), vec![name], "temporary directory left");
    assert_eq!(
        names(&info.path),
        vec![INDEX_FILE, MANIFEST_FILE, SCREENSHOTS_DIR, TIMELINE_FILE]
    );
    let mut shots = vec![before.file_name(), after.file_name()];
    shots.sort();
    assert_eq!(names(&info.path.join(SCREENSHOTS_DIR)), shots);
    assert_eq!((info.events, info.screenshots), (4, 2));
    assert!(info.missing_screenshots.is_empty());

    let manifest: BundleManifest =
        serde_json::from_slice(&std::fs::read(info.path.join(MANIFEST_FILE)).unwrap()).unwrap();
    assert_eq!(manifest.format, BUNDLE_FORMAT);
    assert_eq!(manifest.version, BUNDLE_VERSION);
    assert_eq!(manifest.sandbox_id, "sb-0123456789ab");
    assert_eq!(manifest.image.as_deref(), Some("desktop"));
    assert_eq!(manifest.screen.map(|s| s.width), Some(1280));
    assert_eq!((manifest.events, manifest.screenshots), (4, 2));
    assert_eq!(manifest.files.len(), 4, "{:?}", manifest.files);
    let mut total = std::fs::metadata(info.path.join(MANIFEST_FILE))
        .unwrap()
        .len();
    for f in &manifest.files {
        let body = std::fs::read(info.path.join(&f.path)).unwrap();
        assert_eq!(f.sha256, hex(&Sha256::digest(&body)), "{}", f.path);
        assert_eq!(f.bytes, body.len() as u64);
        total += f.bytes;
    }
    assert_eq!(info.bytes, total);
    assert_eq!(
        std::fs::read(info.path.join(TIMELINE_FILE)).unwrap(),
        std::fs::read(rec.dir().join(TIMELINE_FILE)).unwrap()
    );
    let html = std::fs::read_to_string(info.path.join(INDEX_FILE)).unwrap();
    assert!(html.contains(after.as_str()));
    assert!(!html.contains(DATA_PLACEHOLDER));
}

#[test]
fn export_page_escapes_event_text_that_looks_like_markup() {
    let tmp = tempfile::tempdir().unwrap();
    let evil = "</script><img src=x onerror=alert(1)><!-- & \u{2028}";
    let (rec, _, _) = recording(&tmp.path().join("rec"), evil);
    let info = rec.export(&tmp.path().join("exports"), None).unwrap();
    let html = std::fs::read_to_string(info.path.join(INDEX_FILE)).unwrap();

    let template_closes = TEMPLATE.matches("</script>").count();
    assert_eq!(
        html.to_lowercase().matches("</script").count(),
        template_closes
    );
    assert!(!html.contains("<img src=x"), "markup got through");
    assert!(!html.contains("<!--"));
    assert!(html.contains("\\u003c/script\\u003e\\u003cimg src=x onerror=alert(1)\\u003e"));
    // The embedded data reads back to the same text.
    let start = html.find("id=\"kiln-review-data\">").unwrap() + "id=\"kiln-review-data\">".len();
    let len = html[start..].find("</script>").unwrap();
    let data: Value = serde_json::from_str(&html[start..start + len]).unwrap();
    assert_eq!(data["events"][1]["action"]["text"], evil);
    assert_eq!(data["bundle"]["sandbox_id"], "sb-0123456789ab");
}

#[test]
fn template_holds_the_data_placeholder_once_and_loads_nothing_external() {
    assert_eq!(TEMPLATE.matches(DATA_PLACEHOLDER).count(), 1);
    for external in [
        "http://",
        "https://",
        "src=\"",
        "fetch(",
        "XMLHttpRequest",
        "@import",
    ] {
        assert!(!TEMPLATE.contains(external), "{external}");
    }
    assert!(TEMPLATE.contains("default-src 'none'"));
}

#[test]
fn script_json_reads_back_to_the_same_value() {
    let v = json!({"t": "a<b>c&d\u{2028}e\u{2029}</script><!--", "n": [1, 2]});
    let s = script_json(&v);
    assert!(!s.contains('<') && !s.contains('>') && !s.contains('&'));
    assert!(!s.contains('\u{2028}') && !s.contains('\u{2029}'));
    assert_eq!(serde_json::from_str::<Value>(&s).unwrap(), v);
}

#[test]
fn export_into_a_destination_accepts_new_or_empty_and_refuses_the_rest() {
    let tmp = tempfile::tempdir().unwrap();
    let (rec, _, _) = recording(&tmp.path().join("rec"), "x");
    let exports = tmp.path().join("exports");

    let fresh = tmp.path().join("out/new");
    let info = rec.export(&exports, Some(&fresh)).unwrap();
    assert_eq!(info.path, fresh);
    assert!(fresh.join(INDEX_FILE).exists());

    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    rec.export(&exports, Some(&empty)).unwrap();
    assert!(empty.join(MANIFEST_FILE).exists());

    let full = tmp.path().join("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::write(full.join("mine.txt"), b"keep").unwrap();
    let err = rec.export(&exports, Some(&full)).unwrap_err();
    assert!(
        matches!(err, ReviewError::DestinationNotEmpty { .. }),
        "{err}"
    );
    assert_eq!(names(&full), vec!["mine.txt"]);

    let file = tmp.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    assert!(matches!(
        rec.export(&exports, Some(&file)),
        Err(ReviewError::DestinationNotEmpty { .. })
    ));
    assert_eq!(std::fs::read(&file).unwrap(), b"x");
    // Nothing half-built is left beside the destinations.
    assert!(!names(tmp.path()).iter().any(|n| n.starts_with(".tmp-")));
    assert!(!exports.exists(), "a destination export touched exports/");
}

#[test]
fn export_in_the_same_millisecond_gets_a_new_name() {
    let tmp = tempfile::tempdir().unwrap();
    let (rec, _, _) = recording(&tmp.path().join("rec"), "x");
    let exports = tmp.path().join("exports");
    let now = UNIX_EPOCH + Duration::from_millis(1_796_051_391_123);
    let a = export_at(rec.dir(), &exports, None, now).unwrap();
    let b = export_at(rec.dir(), &exports, None, now).unwrap();
    assert_eq!(
        a.path.file_name().unwrap(),
        "sb-0123456789ab-20261130T150951123Z"
    );
    assert_eq!(
        b.path.file_name().unwrap(),
        "sb-0123456789ab-20261130T150951123Z-2"
    );
    assert!(a.path.join(MANIFEST_FILE).exists() && b.path.join(MANIFEST_FILE).exists());
}

#[test]
fn export_outlives_the_recording_and_works_after_the_recorder_closed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("rec");
    let (rec, _, after) = recording(&dir, "x");
    rec.close().unwrap();
    // The sandbox is gone, its recording pinned: export from the directory alone.
    let exports = tmp.path().join("exports");
    let info = export_dir(&dir, &exports, None).unwrap();
    assert_eq!(info.events, 4);
    assert_eq!(
        remove_or_keep(&dir, SystemTime::now()).unwrap(),
        Kept::Removed
    );
    assert!(!dir.exists());
    let shot = info.path.join(SCREENSHOTS_DIR).join(after.file_name());
    assert_eq!(std::fs::read(shot).unwrap(), png("after"));
}

#[test]
fn export_lists_missing_and_damaged_screenshots_and_still_completes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("rec");
    let (rec, before, after) = recording(&dir, "x");
    std::fs::remove_file(dir.join(SCREENSHOTS_DIR).join(before.file_name())).unwrap();
    std::fs::write(
        dir.join(SCREENSHOTS_DIR).join(after.file_name()),
        b"damaged",
    )
    .unwrap();
    let info = rec.export(&tmp.path().join("exports"), None).unwrap();
    assert_eq!(info.screenshots, 0);
    assert_eq!(info.missing_screenshots, vec![before, after]);
    assert!(names(&info.path.join(SCREENSHOTS_DIR)).is_empty());
    let manifest: BundleManifest =
        serde_json::from_slice(&std::fs::read(info.path.join(MANIFEST_FILE)).unwrap()).unwrap();
    assert_eq!(manifest.missing_screenshots.len(), 2);
}

#[test]
fn export_leaves_out_a_line_being_written() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("rec");
    let (rec, _, _) = recording(&dir, "x");
    drop(rec);
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(dir.join(TIMELINE_FILE))
        .unwrap();
    f.write_all(b"{\"seq\":5,\"at\"").unwrap();
    let info = export_dir(&dir, &tmp.path().join("exports"), None).unwrap();
    assert_eq!(info.events, 4);
    let copied = std::fs::read(info.path.join(TIMELINE_FILE)).unwrap();
    assert!(copied.ends_with(b"}\n"));
}
