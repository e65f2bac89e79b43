//! Desktop actions as QEMU input: the frames of events each action sends (pointer moves,
//! button presses, wheel clicks, key events), the words of its receipt, and where the
//! pointer is drawn before and after (the settle detector masks it). Pure: no I/O, no clock.

use kiln_api_types::{DesktopAction, Screen};
use serde_json::Value;

use super::frame::Rect;
use super::keys::{self, KeyEvent};
use crate::error::CoreError;

/// Steps of the pointer's path during a drag (applications see it move, not jump).
const DRAG_STEPS: u32 = 8;

/// Where the pointer ends up after `action`, if it moves it.
pub(super) fn pointer_after(action: &DesktopAction) -> Option<(u32, u32)> {
    match action {
        DesktopAction::MouseMove { x, y } => Some((*x, *y)),
        DesktopAction::MouseClick {
            x: Some(x),
            y: Some(y),
            ..
        }
        | DesktopAction::Scroll {
            x: Some(x),
            y: Some(y),
            ..
        } => Some((*x, *y)),
        DesktopAction::MouseDrag { to, .. } => Some((to.x, to.y)),
        _ => None,
    }
}

/// The box the pointer's picture may cover when its hot spot is at `p`: X cursors are at
/// most 32 × 32 with the hot spot inside, so 32 pixels each way, clipped to the screen.
pub(super) fn pointer_box(p: (u32, u32), screen: Screen) -> Rect {
    const REACH: u32 = 32;
    let x = p.0.saturating_sub(REACH);
    let y = p.1.saturating_sub(REACH);
    Rect {
        x,
        y,
        width: (p.0 + REACH + 1).min(screen.width) - x,
        height: (p.1 + REACH + 1).min(screen.height) - y,
    }
}

/// The input of one action: frames of events, each sent as one `input-send-event`, and the
/// words of its receipt.
pub(super) struct Plan {
    pub(super) frames: Vec<Vec<Value>>,
    /// Horizontal wheel steps the guest clicks (negative: left).
    pub(super) guest_hscroll: i32,
    pub(super) done: String,
}

fn bad(e: keys::KeyError) -> CoreError {
    CoreError::BadRequest(e.to_string())
}

fn move_to(x: u32, y: u32, screen: Screen) -> Result<Vec<Value>, CoreError> {
    Ok(keys::abs_move(x, y, screen.width, screen.height)
        .map_err(bad)?
        .to_vec())
}

fn press(button: &str, down: bool) -> Result<Vec<Value>, CoreError> {
    Ok(vec![keys::button(button, down).map_err(bad)?])
}

/// The input frames of `action` on `screen` (typing is planned apart: it may need the guest).
pub(super) fn plan(action: &DesktopAction, screen: Screen) -> Result<Plan, CoreError> {
    let mut frames = Vec::new();
    let mut guest_hscroll = 0;
    let done = match action {
        DesktopAction::MouseMove { x, y } => {
            frames.push(move_to(*x, *y, screen)?);
            format!("moved the pointer to ({x}, {y})")
        }
        DesktopAction::MouseClick {
            x,
            y,
            button,
            count,
        } => {
            let at = match (x, y) {
                (Some(x), Some(y)) => {
                    frames.push(move_to(*x, *y, screen)?);
                    format!(" at ({x}, {y})")
                }
                _ => " where the pointer was".to_owned(),
            };
            for _ in 0..*count {
                frames.push(press(button.as_str(), true)?);
                frames.push(press(button.as_str(), false)?);
            }
            let times = match count {
                1 => String::new(),
                2 => " twice".to_owned(),
                n => format!(" {n} times"),
            };
            format!("clicked {}{times}{at}", button.as_str())
        }
        DesktopAction::MouseDrag { from, to, button } => {
            frames.push(move_to(from.x, from.y, screen)?);
            frames.push(press(button.as_str(), true)?);
            for step in 1..=DRAG_STEPS {
                let lerp = |a: u32, b: u32| {
                    let (a, b) = (i64::from(a), i64::from(b));
                    let v = a + (b - a) * i64::from(step) / i64::from(DRAG_STEPS);
                    u32::try_from(v).unwrap_or(0)
                };
                frames.push(move_to(lerp(from.x, to.x), lerp(from.y, to.y), screen)?);
            }
            frames.push(press(button.as_str(), false)?);
            format!(
                "dragged {} from ({}, {}) to ({}, {})",
                button.as_str(),
                from.x,
                from.y,
                to.x,
                to.y
            )
        }
        DesktopAction::Scroll { x, y, dx, dy } => {
            if let (Some(x), Some(y)) = (x, y) {
                frames.push(move_to(*x, *y, screen)?);
            }
            let name = if *dy >= 0 { "wheel-down" } else { "wheel-up" };
            for _ in 0..dy.unsigned_abs() {
                frames.push(press(name, true)?);
                frames.push(press(name, false)?);
            }
            // QEMU 7.2's virtio tablet drops the horizontal wheel (it maps only up and down):
            // the guest clicks X's buttons 6 (left) and 7 (right) instead, where the pointer is.
            guest_hscroll = *dx;
            format!("scrolled {dy} down and {dx} right")
        }
        DesktopAction::KeyPress { keys: combo } => {
            let c = keys::parse_combo(combo).map_err(bad)?;
            frames.extend(key_frames(&c.events()));
            format!("pressed {combo}")
        }
        DesktopAction::TypeText { text, secret } => match (text, secret) {
            (_, Some(name)) => format!("typed the secret {name}"),
            (Some(t), None) => format!("typed {} characters", t.chars().count()),
            (None, None) => "typed nothing".to_owned(),
        },
        DesktopAction::Wait { ms } => format!("waited {ms} ms"),
    };
    Ok(Plan {
        frames,
        guest_hscroll,
        done,
    })
}

/// One frame per key event: a press and its release never share a frame.
pub(super) fn key_frames(events: &[KeyEvent]) -> Vec<Vec<Value>> {
    events.iter().map(|e| vec![e.to_qmp()]).collect()
}

#[cfg(test)]
mod tests {
    use kiln_api_types::{DEFAULT_SCREEN, MouseButton, Point};

    use super::*;

    #[test]
    fn click_moves_then_presses_and_releases_in_separate_frames() {
        let p = plan(
            &DesktopAction::MouseClick {
                x: Some(10),
                y: Some(20),
                button: MouseButton::Right,
                count: 2,
            },
            DEFAULT_SCREEN,
        )
        .expect("plan");
        assert_eq!(p.frames.len(), 5, "move + 2 × (down, up)");
        assert_eq!(p.frames[0].len(), 2, "x and y of the move");
        assert_eq!(p.frames[1][0]["data"]["button"], "right");
        assert_eq!(p.frames[1][0]["data"]["down"], true);
        assert_eq!(p.frames[2][0]["data"]["down"], false);
        assert_eq!(p.done, "clicked right twice at (10, 20)");
    }

    #[test]
    fn drag_walks_the_pointer_to_its_end() {
        let p = plan(
            &DesktopAction::MouseDrag {
                from: Point { x: 0, y: 0 },
                to: Point { x: 800, y: 400 },
                button: MouseButton::Left,
            },
            DEFAULT_SCREEN,
        )
        .expect("plan");
        assert_eq!(p.frames.len(), 2 + DRAG_STEPS as usize + 1);
        let last_move = &p.frames[p.frames.len() - 2];
        let (x, _) = (
            last_move[0]["data"]["value"].as_u64().expect("x"),
            last_move[1]["data"]["value"].as_u64().expect("y"),
        );
        assert_eq!(
            x,
            u64::from(keys::abs_axis_value(800, DEFAULT_SCREEN.width))
        );
    }

    #[test]
    fn scroll_and_keys_plan_one_event_per_frame() {
        let p = plan(
            &DesktopAction::Scroll {
                x: None,
                y: None,
                dx: -1,
                dy: 2,
            },
            DEFAULT_SCREEN,
        )
        .expect("plan");
        let names: Vec<&str> = p
            .frames
            .iter()
            .map(|f| f[0]["data"]["button"].as_str().expect("button"))
            .collect();
        assert_eq!(
            names, ["wheel-down"; 4],
            "dy: QEMU's wheel, press and release"
        );
        assert_eq!(p.guest_hscroll, -1, "dx: the guest's buttons 6 and 7");
        let k = plan(
            &DesktopAction::KeyPress {
                keys: "ctrl+shift+t".into(),
            },
            DEFAULT_SCREEN,
        )
        .expect("plan");
        assert_eq!(k.frames.len(), 6, "3 down, 3 up");
        assert!(k.frames.iter().all(|f| f.len() == 1));
        let err = plan(
            &DesktopAction::KeyPress {
                keys: "ctrl+nope".into(),
            },
            DEFAULT_SCREEN,
        )
        .err()
        .expect("unknown key");
        assert!(err.to_string().contains("nope"), "{err}");
    }
}
