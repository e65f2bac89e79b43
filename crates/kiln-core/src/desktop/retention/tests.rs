//! Unit tests of removal, reclaiming and the pin setting (temporary directories only).

use super::*;
use crate::desktop::redact::Redactor;
use crate::desktop::review::tests::sb;
use crate::desktop::review::{Recorder, TIMELINE_FILE};
use crate::desktop::timestamp::{parse_rfc3339_ms, rfc3339_ms};

fn recorder(dir: &Path) -> Recorder {
    Recorder::open(dir, &sb(), Redactor::none()).unwrap()
}

#[test]
fn remove_or_keep_removes_unpinned_and_keeps_pinned_until_expiry() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("sb-0123456789ab");
    let now = SystemTime::now();
    assert_eq!(remove_or_keep(&dir, now).unwrap(), Kept::Absent);

    recorder(&dir).close().unwrap();
    assert_eq!(remove_or_keep(&dir, now).unwrap(), Kept::Removed);
    assert!(!dir.exists());
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        0,
        "leftovers"
    );

    let rec = recorder(&dir);
    let until = now + Duration::from_secs(60);
    rec.pin_until(until).unwrap();
    rec.close().unwrap();
    let until = parse_rfc3339_ms(&rfc3339_ms(until)).unwrap(); // ms precision
    assert_eq!(remove_or_keep(&dir, now).unwrap(), Kept::Pinned { until });
    assert!(dir.join(TIMELINE_FILE).exists());
    assert_eq!(
        remove_or_keep(&dir, now + Duration::from_secs(61)).unwrap(),
        Kept::Removed
    );
    assert!(!dir.exists());
}

#[test]
fn reclaim_removes_gone_unpinned_recordings_only() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let now = SystemTime::now();
    let open = |id: &str| {
        let id: SandboxId = id.parse().unwrap();
        Recorder::open(&root.join(id.as_str()), &id, Redactor::none()).unwrap()
    };
    open("sb-00000000000a").close().unwrap(); // live
    open("sb-00000000000b").close().unwrap(); // gone
    let pinned = open("sb-00000000000c"); // gone, pinned
    pinned.pin_for(Duration::from_secs(600)).unwrap();
    pinned.close().unwrap();
    let expired = open("sb-00000000000d"); // gone, pin expired
    expired.pin_until(now - Duration::from_secs(1)).unwrap();
    expired.close().unwrap();
    std::fs::create_dir(root.join("not-a-recording")).unwrap();
    std::fs::create_dir(root.join(".tmp-rm-sb-00000000000e-4000000000")).unwrap();

    let live: HashSet<String> = ["sb-00000000000a".to_owned()].into();
    let report = reclaim(root, &live, now).unwrap();
    assert_eq!(
        report.removed,
        vec![
            ".tmp-rm-sb-00000000000e-4000000000".to_owned(),
            "sb-00000000000b".into(),
            "sb-00000000000d".into()
        ]
    );
    assert_eq!(report.pinned.len(), 1);
    assert_eq!(report.pinned[0].0, "sb-00000000000c");
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    for kept in ["sb-00000000000a", "sb-00000000000c", "not-a-recording"] {
        assert!(root.join(kept).exists(), "{kept} removed");
    }
    for gone in ["sb-00000000000b", "sb-00000000000d"] {
        assert!(!root.join(gone).exists(), "{gone} kept");
    }
    // A missing root is an empty report.
    assert_eq!(
        reclaim(&root.join("none"), &live, now).unwrap(),
        ReclaimReport::default()
    );
}

#[test]
fn parse_pin_secs_defaults_accepts_zero_and_names_the_variable() {
    assert_eq!(parse_pin_secs(None).unwrap(), DEFAULT_PIN);
    assert_eq!(parse_pin_secs(Some(" ")).unwrap(), DEFAULT_PIN);
    assert_eq!(parse_pin_secs(Some("0")).unwrap(), Duration::ZERO);
    assert_eq!(parse_pin_secs(Some("90")).unwrap(), Duration::from_secs(90));
    let err = parse_pin_secs(Some("1h")).unwrap_err();
    assert!(err.contains(PIN_SECS_ENV), "{err}");
}
