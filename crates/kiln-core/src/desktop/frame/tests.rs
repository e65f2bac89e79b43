//! Tests of `desktop::frame`.
use super::*;

/// A frame whose every pixel is distinct enough to catch transposed rows or channels.
fn pattern(width: u32, height: u32) -> Frame {
    let mut rgb = Vec::new();
    for y in 0..height {
        for x in 0..width {
            rgb.extend_from_slice(&[(x * 7 + y) as u8, (y * 13) as u8, (x ^ y) as u8]);
        }
    }
    Frame::new(width, height, rgb).expect("pattern has the right length")
}

fn rect(x: u32, y: u32, width: u32, height: u32) -> Rect {
    Rect {
        x,
        y,
        width,
        height,
    }
}

fn solid(width: u32, height: u32, px: [u8; 3]) -> Frame {
    Frame::new(width, height, px.repeat((width * height) as usize)).expect("solid frame")
}

fn paint(frame: &mut Frame, rect: Rect, px: [u8; 3]) {
    for y in rect.y..rect.y + rect.height {
        for x in rect.x..rect.x + rect.width {
            let i = ((y * frame.width + x) * 3) as usize;
            frame.rgb[i..i + 3].copy_from_slice(&px);
        }
    }
}

#[test]
fn from_ppm_round_trips_synthetic_frames() {
    for (w, h) in [(1, 1), (3, 2), (17, 5), (64, 48)] {
        let frame = pattern(w, h);
        let parsed = Frame::from_ppm(&frame.to_ppm()).expect("own PPM parses");
        assert_eq!(parsed, frame, "{w}x{h}");
    }
}

#[test]
fn from_ppm_accepts_comments_and_any_whitespace_in_the_header() {
    let frame = pattern(2, 2);
    let mut ppm = b"P6 # made by QEMU\n#another\n2\t 2\r\n# maxval next\n255\n".to_vec();
    ppm.extend_from_slice(frame.rgb());
    assert_eq!(Frame::from_ppm(&ppm).expect("comments are allowed"), frame);
}

#[test]
fn from_ppm_rejects_malformed_input_naming_the_problem() {
    let px = |n: usize| vec![7u8; n];
    let with = |header: &str, data: Vec<u8>| [header.as_bytes().to_vec(), data].concat();
    let long_comment = format!("P6\n#{}\n1 1\n255\n", "x".repeat(MAX_HEADER_BYTES));
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"".to_vec(), "PPM header ends before its magic number"),
        (b"P3\n1 1\n255\n".to_vec(), "not a binary PPM (P6) image"),
        (with("P61 1\n255\n", px(3)), "not a binary PPM (P6) image"),
        (b"P6\n".to_vec(), "PPM header ends before its width"),
        (b"P6\n4 ".to_vec(), "PPM header ends before its height"),
        (
            b"P6\n4 x\n".to_vec(),
            "height is not a decimal number (found byte 0x78)",
        ),
        (b"P6\n-4 4\n255\n".to_vec(), "width is not a decimal number"),
        (
            b"P6\n0 4\n255\n".to_vec(),
            "frame width 0 is out of range 1..=8192",
        ),
        (
            b"P6\n4 8193\n255\n".to_vec(),
            "frame height 8193 is out of range",
        ),
        (
            b"P6\n12345678901 1\n255\n".to_vec(),
            "width has too many digits",
        ),
        (
            b"P6\n1 1\n65535\n".to_vec(),
            "PPM maxval 65535 is not supported",
        ),
        (
            b"P6\n1 1\n255".to_vec(),
            "ends before its whitespace after maxval",
        ),
        (
            with("P6\n1 1\n255", px(3)),
            "followed by byte 0x07 instead of one whitespace",
        ),
        (
            with("P6\n2 2\n255\n", px(11)),
            "short: 2x2 needs 12 bytes, found 11",
        ),
        (
            with("P6\n2 2\n255\n", px(13)),
            "has 1 bytes after its 2x2 pixel data",
        ),
        (
            long_comment.into_bytes(),
            "PPM header is longer than 4096 bytes",
        ),
    ];
    for (ppm, expected) in cases {
        let err = Frame::from_ppm(&ppm).expect_err(expected).to_string();
        assert!(
            err.contains(expected),
            "{err:?} should contain {expected:?}"
        );
    }
}

#[test]
fn new_rejects_a_buffer_of_the_wrong_length() {
    let err = Frame::new(2, 2, vec![0; 11]).expect_err("short buffer");
    assert_eq!(err.to_string(), "a 2x2 frame needs 12 RGB bytes, got 11");
    assert!(Frame::new(0, 2, vec![]).is_err());
}

fn decode_png(png: &[u8]) -> (u32, u32, Vec<u8>) {
    let decoder = png::Decoder::new(std::io::Cursor::new(png));
    let mut reader = decoder.read_info().expect("PNG header");
    let mut buf = vec![0; reader.output_buffer_size().expect("size fits")];
    let info = reader.next_frame(&mut buf).expect("PNG data");
    assert_eq!(info.color_type, png::ColorType::Rgb);
    assert_eq!(info.bit_depth, png::BitDepth::Eight);
    buf.truncate(info.buffer_size());
    (info.width, info.height, buf)
}

#[test]
fn to_png_decodes_back_to_the_same_pixels() {
    let frame = pattern(37, 23);
    let (w, h, rgb) = decode_png(&frame.to_png(None).expect("encodes"));
    assert_eq!((w, h), (37, 23));
    assert_eq!(rgb, frame.rgb());
}

#[test]
fn to_png_with_scale_encodes_the_scaled_frame() {
    let frame = pattern(40, 30);
    let png = frame.to_png(Some(Scale::Width(20))).expect("encodes");
    let (w, h, rgb) = decode_png(&png);
    assert_eq!((w, h), (20, 15));
    let scaled = frame.scaled(Scale::Width(20)).expect("scales");
    assert_eq!(rgb, scaled.rgb());
}

#[test]
fn scaled_size_keeps_the_aspect_and_refuses_out_of_range_scales() {
    let frame = solid(1280, 800, [0; 3]);
    let size = |s| frame.scaled_size(s).expect("valid scale");
    assert_eq!(size(Scale::Width(640)), (640, 400));
    assert_eq!(size(Scale::Width(1000)), (1000, 625));
    assert_eq!(size(Scale::Width(1)), (1, 1));
    assert_eq!(size(Scale::Factor(0.5)), (640, 400));
    assert_eq!(size(Scale::Factor(1.0)), (1280, 800));
    assert_eq!(size(Scale::Factor(1e-9)), (1, 1));
    for bad in [
        Scale::Width(0),
        Scale::Width(1281),
        Scale::Factor(0.0),
        Scale::Factor(1.5),
        Scale::Factor(f64::NAN),
    ] {
        let err = frame.scaled_size(bad).expect_err("refused").to_string();
        assert!(err.starts_with("bad scale for a 1280x800 frame"), "{err}");
    }
}

#[test]
fn scaled_averages_whole_blocks_at_integer_ratios() {
    // 4x2 → 2x1: each output pixel is the mean of a 2x2 block.
    let rgb = [
        [0, 0, 0],
        [100, 10, 255],
        [10, 20, 30],
        [10, 20, 30],
        [0, 0, 0],
        [100, 10, 255],
        [50, 60, 70],
        [50, 60, 70],
    ]
    .concat();
    let frame = Frame::new(4, 2, rgb).expect("frame");
    let half = frame.scaled(Scale::Factor(0.5)).expect("scales");
    assert_eq!((half.width(), half.height()), (2, 1));
    assert_eq!(half.rgb(), &[50, 5, 128, 30, 40, 50]);
}

#[test]
fn scaled_weights_partial_pixels_at_fractional_ratios() {
    // 3 → 2 columns: output 0 covers source 0 fully and half of source 1.
    let frame =
        Frame::new(3, 1, [[0, 0, 0], [90, 90, 90], [180, 180, 180]].concat()).expect("frame");
    let out = frame.scaled(Scale::Width(2)).expect("scales");
    // (0*2 + 90*1) / 3 = 30, (90*1 + 180*2) / 3 = 150.
    assert_eq!(out.rgb(), &[30, 30, 30, 150, 150, 150]);
}

#[test]
fn scaled_keeps_a_one_pixel_stroke_visible() {
    // A vertical 1-px black line on white, halved: it becomes a grey column, not nothing.
    let mut frame = solid(8, 4, [255; 3]);
    paint(&mut frame, rect(3, 0, 1, 4), [0; 3]);
    let half = frame.scaled(Scale::Factor(0.5)).expect("scales");
    let column1 = &half.rgb()[3..6];
    assert_eq!(column1, &[128, 128, 128]);
    assert_eq!(&half.rgb()[0..3], &[255, 255, 255]);
}

#[test]
fn digest_differs_on_pixels_and_on_shape() {
    let a = pattern(4, 6);
    let mut b = a.clone();
    assert_eq!(a.digest(), b.digest());
    b.rgb[5] ^= 1;
    assert_ne!(a.digest(), b.digest());
    // Same bytes, transposed shape: still different.
    let c = Frame::new(6, 4, a.rgb().to_vec()).expect("same length");
    assert_ne!(a.digest(), c.digest());
}

#[test]
fn diff_reports_count_and_bounding_box() {
    let a = solid(20, 10, [1, 2, 3]);
    assert_eq!(
        a.diff(&a.clone()),
        Diff {
            changed_px: 0,
            bbox: None
        }
    );
    let mut b = a.clone();
    paint(&mut b, rect(2, 3, 1, 1), [9; 3]);
    paint(&mut b, rect(15, 7, 2, 2), [9; 3]);
    let diff = a.diff(&b);
    assert_eq!(diff.changed_px, 5);
    let bbox = rect(2, 3, 15, 6);
    assert_eq!(diff.bbox, Some(bbox));
    // A change in one channel only still counts.
    let mut c = a.clone();
    c.rgb[(9 * 20 + 19) * 3 + 2] = 4;
    let last = rect(19, 9, 1, 1);
    assert_eq!(
        a.diff(&c),
        Diff {
            changed_px: 1,
            bbox: Some(last)
        }
    );
}

#[test]
fn diff_of_different_sizes_is_a_full_change_of_the_new_frame() {
    let diff = solid(4, 4, [0; 3]).diff(&solid(3, 2, [0; 3]));
    let all = rect(0, 0, 3, 2);
    assert_eq!(
        diff,
        Diff {
            changed_px: 6,
            bbox: Some(all)
        }
    );
}

/// Runs a detector over frames sampled every 50 ms from t=1000+50 (action at t=1000).
fn run(config: SettleConfig, frames: &[Frame]) -> Vec<SettleState> {
    let mut settle = Settle::new(config, 1000);
    let mut states = Vec::new();
    for frame in frames {
        let now = settle.next_sample_ms();
        states.push(settle.observe(frame.clone(), now));
    }
    states
}

fn numbered(n: u8) -> Frame {
    solid(32, 32, [n, 0, 0])
}

#[test]
fn settle_with_a_baseline_waits_for_the_screen_to_answer() {
    // A click whose window appears 400 ms later: the unchanged screen before it is not
    // "settled", the window drawn and still is.
    let before = numbered(1);
    let mut frames: Vec<Frame> = vec![numbered(1); 8]; // 50..400 ms: nothing yet
    frames.extend(vec![numbered(7); 4]); // 450..600: the window, still
    let mut settle = Settle::new(SettleConfig::default(), 1000).with_baseline(before.clone());
    let mut last = SettleState::Waiting;
    for (i, f) in frames.iter().enumerate() {
        let now = settle.next_sample_ms();
        last = settle.observe(f.clone(), now);
        if i < 11 {
            assert_eq!(last, SettleState::Waiting, "sample {i}");
        }
    }
    assert_eq!(last, SettleState::Settled { after_ms: 450 });

    // Nothing ever answers: settled once the response window has passed.
    let mut quiet = Settle::new(SettleConfig::default(), 1000).with_baseline(before);
    let mut t = 0;
    let state = loop {
        let now = quiet.next_sample_ms();
        match quiet.observe(numbered(1), now) {
            SettleState::Waiting => t = now - 1000,
            other => break other,
        }
    };
    assert_eq!(state, SettleState::Settled { after_ms: 50 });
    assert_eq!(
        t + 50,
        SettleConfig::default().respond_ms,
        "not before the window"
    );
}

#[test]
fn settle_leaves_the_masked_pointer_out() {
    // The pointer's picture moves every sample inside the mask: still. Without the mask
    // the same frames never settle (each move is a 100-pixel box change, above 400 px
    // only together, so use a small threshold to make the point).
    let config = SettleConfig {
        ignore_small_changes_px: 0,
        ..SettleConfig::default()
    };
    let frames: Vec<Frame> = (0..6u32)
        .map(|i| {
            let mut f = solid(32, 32, [9, 9, 9]);
            let mut rgb = f.rgb().to_vec();
            let at = ((i % 4) as usize * 32 + 2) * 3;
            rgb[at] = 200;
            f = Frame::new(32, 32, rgb).expect("same size");
            f
        })
        .collect();
    let mut masked = Settle::new(config, 1000).with_masks(vec![rect(0, 0, 8, 8)]);
    let mut plain = Settle::new(config, 1000);
    let (mut a, mut b) = (SettleState::Waiting, SettleState::Waiting);
    for f in &frames {
        let now = masked.next_sample_ms();
        a = masked.observe(f.clone(), now);
        b = plain.observe(f.clone(), now);
    }
    assert_eq!(a, SettleState::Settled { after_ms: 50 });
    assert_eq!(b, SettleState::Waiting);
    assert!(rect(0, 0, 8, 8).contains(7, 7) && !rect(0, 0, 8, 8).contains(8, 0));
}

#[test]
fn settle_after_changes_then_quiet_reports_when_it_stopped() {
    // Samples at 50, 100, 150 (changing), then 200, 250, 300 equal to the one at 150.
    let frames: Vec<Frame> = [1, 2, 3, 3, 3, 3].into_iter().map(numbered).collect();
    let states = run(SettleConfig::default(), &frames);
    assert_eq!(states[..5], [SettleState::Waiting; 5]);
    assert_eq!(states[5], SettleState::Settled { after_ms: 150 });
}

#[test]
fn settle_needs_samples_after_the_first_one() {
    // An unchanging screen: the first sample is only the reference.
    let frames = vec![numbered(1); 4];
    let states = run(SettleConfig::default(), &frames);
    assert_eq!(states[2], SettleState::Waiting);
    assert_eq!(states[3], SettleState::Settled { after_ms: 50 });
}

#[test]
fn settle_a_quiet_run_broken_by_a_change_starts_over() {
    let frames: Vec<Frame> = [1, 1, 1, 2, 2, 2, 2].into_iter().map(numbered).collect();
    let states = run(SettleConfig::default(), &frames);
    assert_eq!(states[5], SettleState::Waiting);
    assert_eq!(states[6], SettleState::Settled { after_ms: 200 });
}

#[test]
fn settle_always_changing_times_out_and_stays_timed_out() {
    let config = SettleConfig {
        timeout_ms: 500,
        ..SettleConfig::default()
    };
    let frames: Vec<Frame> = (0..12).map(numbered).collect();
    let states = run(config, &frames);
    assert_eq!(states[8], SettleState::Waiting); // t = 450
    assert_eq!(states[9], SettleState::TimedOut { after_ms: 500 });
    assert_eq!(states[11], SettleState::TimedOut { after_ms: 500 });
}

fn cursor(on: bool) -> Frame {
    let mut frame = solid(200, 100, [255; 3]);
    if on {
        // A 10x20 block cursor: 200 px.
        paint(&mut frame, rect(40, 30, 10, 20), [0; 3]);
    }
    frame
}

#[test]
fn settle_ignores_a_cursor_blinking_inside_the_quiet_run() {
    // Two real changes, then the cursor screen with one blink while the run is counted.
    let frames = [
        solid(200, 100, [0, 0, 255]),
        solid(200, 100, [0, 255, 0]),
        cursor(true),
        cursor(true),
        cursor(false),
        cursor(true),
    ];
    let states = run(SettleConfig::default(), &frames);
    assert_eq!(states[4], SettleState::Waiting);
    assert_eq!(states[5], SettleState::Settled { after_ms: 150 });
    // The naive detector (filter off) restarts its run at every blink.
    let naive = SettleConfig {
        ignore_small_changes_px: 0,
        ..SettleConfig::default()
    };
    assert_eq!(run(naive, &frames)[5], SettleState::Waiting);
}

#[test]
fn settle_a_cursor_blinking_every_sample_defeats_only_the_naive_detector() {
    let blinking: Vec<Frame> = (0..80).map(|i| cursor(i % 2 == 0)).collect();
    let naive = SettleConfig {
        ignore_small_changes_px: 0,
        ..SettleConfig::default()
    };
    let states = run(naive, &blinking);
    assert_eq!(states[58], SettleState::Waiting);
    assert_eq!(states[59], SettleState::TimedOut { after_ms: 3000 });
    let states = run(SettleConfig::default(), &blinking);
    assert_eq!(states[3], SettleState::Settled { after_ms: 50 });
}

#[test]
fn settle_small_changes_add_up_against_the_runs_first_frame() {
    // Text typed one 10x20 glyph per sample: each step alone is under the 400 px filter,
    // but two steps together are not, so no run of 3 quiet samples forms while typing.
    let mut frames = Vec::new();
    let mut frame = solid(400, 50, [255; 3]);
    for i in 0..20 {
        paint(
            &mut frame,
            Rect {
                x: 12 * i,
                y: 10,
                width: 10,
                height: 20,
            },
            [0; 3],
        );
        frames.push(frame.clone());
    }
    frames.extend(std::iter::repeat_n(frame.clone(), 2));
    let states = run(SettleConfig::default(), &frames);
    assert!(
        states[..21].iter().all(|s| *s == SettleState::Waiting),
        "{states:?}"
    );
    // The last run starts at the 19th sample (t = 950); the 20th is one glyph more.
    assert_eq!(states[21], SettleState::Settled { after_ms: 950 });
}

#[test]
fn settle_keeps_the_last_frame_for_the_caller() {
    let mut settle = Settle::new(SettleConfig::default(), 0);
    assert_eq!(settle.last_frame(), None);
    assert_eq!(settle.next_sample_ms(), 50);
    settle.observe(numbered(1), 50);
    settle.observe(numbered(2), 100);
    assert_eq!(settle.last_frame(), Some(&numbered(2)));
    assert_eq!(settle.next_sample_ms(), 150);
}
