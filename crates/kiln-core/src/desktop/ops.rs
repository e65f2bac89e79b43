//! The desktop operations of the engine: screenshots, actions with their receipts, and
//! where a desktop's VNC server listens. One code path serves the API and the CLI.
//!
//! ```text
//!   screenshot: owner ─Screen(Dump)─▶ QEMU writes PPM ─▶ Frame ─▶ PNG (scaled on request)
//!   action:     validate ─▶ input events ─owner Screen(Input)─▶ QEMU tablet/keyboard
//!                          └▶ text QEMU cannot type: `xdotool type` as the session's user
//!               ─▶ (screenshot asked) sample frames until the screen settles ─▶ receipt
//! ```
//!
//! Invariants: every QMP round trip goes through the sandbox's owner (one at a time per
//! sandbox, refused unless it runs); an input frame is one `input-send-event` followed by
//! QEMU's sync, and the frames of one action are sent in order, one at a time, so the
//! guest's virtio input queue never sees a burst it could drop; screenshot files are unique
//! per call and removed whatever happens.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kiln_api_types::{
    ActionQuery, ActionReceipt, DesktopAction, ExecRequest, ReceiptScreenshot, SandboxId, Screen,
    Settle,
};
use serde_json::Value;

use super::frame::{Frame, Rect, Scale, SettleConfig, SettleState};
use super::keys::{self, KeyEvent, TypeChunk};
use super::review::TimelineEvent;
use crate::error::CoreError;
use crate::owner::{Op, ScreenOp};
use crate::sandbox::ExecOutput;
use crate::{Engine, unix_now_ms};

/// Longest a settle wait runs when the request names none (ms).
pub const DEFAULT_SETTLE_MS: u64 = 3000;
/// Pause between the input frames of one action: room for the guest to take the events
/// out of its virtio queue (QEMU drops a whole frame when the queue has no free buffer).
const FRAME_GAP: Duration = Duration::from_millis(2);
/// Steps of the pointer's path during a drag (applications see it move, not jump).
const DRAG_STEPS: u32 = 8;
/// The guest's pace for text a US keyboard cannot type (ms per character, xdotool's delay).
const GUEST_TYPE_DELAY_MS: u64 = 12;
/// Most characters a US keyboard lacks that one guest run binds to spare keys: the desktop's
/// keymap has about 18 unbound keycodes. Text with more distinct ones is typed in batches.
const GUEST_KEYS_PER_BATCH: usize = 16;
/// Pause between two batches: the application must have read the last batch's keys before
/// their keycodes are bound to other characters.
const GUEST_BATCH_GAP: Duration = Duration::from_millis(500);
/// Types stdin with xdotool after binding each character named in the arguments (keysyms
/// `Uxxxx`) to a spare keycode, all in one keymap change before the first key. xdotool on its
/// own binds one character at a time to one scratch key and unbinds it right after; an
/// application that reads the keymap when it handles the key (after the next rebinding) then
/// sees another character or none: measured under TCG on "héllo → 日本 ✓", 12 ms between
/// characters lost three, 50 ms two, and 150 ms on a loaded host still lost three. With every
/// character bound beforehand and nothing rebound while typing, the keymap an application
/// reads is the right one whenever it reads it. The keycodes bound by the previous run
/// (listed in `/tmp/.kiln-typed-keys`) are reused.
const GUEST_TYPE_SCRIPT: &str = r#"set -eu
state=/tmp/.kiln-typed-keys
used=$(cat "$state" 2>/dev/null || true)
spare=$( { xmodmap -pke | awk '$1 == "keycode" && NF == 3 && $2 > 8 { print $2 }'; printf '%s\n' $used; } | sort -n -u)
exprs=$(mktemp)
trap 'rm -f "$exprs" "$state.new"' EXIT
: > "$state.new"
for code in $used; do printf 'keycode %s =\n' "$code" >> "$exprs"; done
i=0
for sym in "$@"; do
  i=$((i + 1))
  code=$(printf '%s\n' $spare | sed -n "${i}p")
  if [ -z "$code" ]; then echo "no spare keycode left for $sym ($i characters)" >&2; exit 3; fi
  printf 'keycode %s = %s %s\n' "$code" "$sym" "$sym" >> "$exprs"
  echo "$code" >> "$state.new"
done
xmodmap "$exprs"
mv "$state.new" "$state"
exec xdotool type --clearmodifiers --delay "$KILN_TYPE_DELAY_MS" --file -
"#;
/// Most characters one action may have the guest type.
pub const MAX_GUEST_TYPED_CHARS: usize = 20_000;

/// A screenshot: PNG bytes and the picture's size.
#[derive(Debug, Clone)]
pub struct Screenshot {
    /// The PNG.
    pub png: Vec<u8>,
    /// Width (pixels).
    pub width: u32,
    /// Height (pixels).
    pub height: u32,
}

/// Numbers the screendump files of this process.
static DUMPS: AtomicU64 = AtomicU64::new(0);

/// What the engine knows of a running desktop sandbox.
struct DesktopOf {
    screen: Screen,
    /// The session's user and X display (from the image's recipe).
    user: String,
    display: String,
}

impl Engine {
    /// The screen and session of `id`, or `not_a_desktop`.
    fn desktop_of(&self, id: &SandboxId) -> Result<DesktopOf, CoreError> {
        let sb = self.live_sandbox(id).ok_or_else(|| self.not_running(id))?;
        let Some(d) = sb.vm().config().display else {
            return Err(CoreError::NotADesktop(format!(
                "sandbox {id} has no screen: its image is not a desktop"
            )));
        };
        let row = self.sandbox_get(id)?;
        let recipe_desktop = kiln_image::get(self.home.root(), row.status.image.as_str())?
            .and_then(|m| m.recipe.desktop);
        let (user, display) = recipe_desktop
            .map(|d| (d.user, d.display))
            .unwrap_or_else(|| ("root".to_owned(), ":0".to_owned()));
        Ok(DesktopOf {
            screen: Screen {
                width: d.width,
                height: d.height,
            },
            user,
            display,
        })
    }

    /// Why `id` has no live owner: not found, or its state.
    fn not_running(&self, id: &SandboxId) -> CoreError {
        match self.store.sandbox_get(id) {
            Ok(Some(row)) => CoreError::WrongState {
                id: id.clone(),
                state: row.status.state,
                wanted: kiln_api_types::SandboxState::Running,
            },
            Ok(None) => CoreError::SandboxNotFound(id.to_string()),
            Err(e) => e.into(),
        }
    }

    /// The running sandbox `id` (its owner's table entry), if there is one.
    pub(crate) fn live_sandbox(&self, id: &SandboxId) -> Option<Arc<crate::sandbox::Sandbox>> {
        self.table().get(id).map(|(_, sb)| Arc::clone(sb))
    }

    /// Where kiln last put `id`'s pointer (none known before its first pointer action).
    fn pointer(&self, id: &SandboxId) -> Option<(u32, u32)> {
        self.live_sandbox(id)?.extras().pointer
    }

    fn set_pointer(&self, id: &SandboxId, p: Option<(u32, u32)>) {
        if let Some(sb) = self.live_sandbox(id) {
            sb.extras().pointer = p;
        }
    }

    /// Where the desktop `id`'s VNC server listens (a unix socket of its run directory).
    pub fn desktop_vnc_socket(&self, id: &SandboxId) -> Result<PathBuf, CoreError> {
        self.desktop_of(id)?;
        Ok(kiln_vmm::RunPaths::new(&self.home.sandbox_dir(id)).vnc_socket)
    }

    /// The screen of `id` as QEMU shows it now.
    pub(crate) async fn desktop_frame(&self, id: &SandboxId) -> Result<Frame, CoreError> {
        let n = DUMPS.fetch_add(1, Ordering::Relaxed);
        let path = self
            .home
            .sandbox_dir(id)
            .join(format!("screen-{}-{n}.ppm", std::process::id()));
        let _cleanup = RemoveOnDrop(path.clone());
        self.call(id, |r| Op::Screen(ScreenOp::Dump(path.clone()), r))
            .await?;
        let bytes = std::fs::read(&path).map_err(|source| CoreError::Io {
            what: "read",
            path: path.clone(),
            source,
        })?;
        Frame::from_ppm(&bytes).map_err(|e| {
            CoreError::HostSetup(format!(
                "QEMU's screendump of sandbox {id} is unusable: {e}"
            ))
        })
    }

    /// A PNG of `id`'s screen, scaled to `width` pixels wide if given.
    pub async fn desktop_screenshot(
        &self,
        id: &SandboxId,
        width: Option<u32>,
    ) -> Result<Screenshot, CoreError> {
        let desk = self.desktop_of(id)?;
        let scale = scale_of(width, desk.screen)?;
        let frame = self.desktop_frame(id).await?;
        encode(&frame, scale)
    }

    /// Sends one input frame (events, then QEMU's sync) to `id`.
    async fn send_input(&self, id: &SandboxId, events: Vec<Value>) -> Result<(), CoreError> {
        self.call(id, |r| Op::Screen(ScreenOp::Input(events), r))
            .await
    }

    /// Does `action` on desktop `id` and answers its receipt; with `q.screenshot`, waits for
    /// the screen to settle and puts a screenshot in it.
    pub async fn desktop_act(
        self: &Arc<Self>,
        id: &SandboxId,
        action: &DesktopAction,
        q: &ActionQuery,
    ) -> Result<ActionReceipt, CoreError> {
        let desk = self.desktop_of(id)?;
        action.validate(desk.screen)?;
        let settle_ms = q.settle_ms.unwrap_or(DEFAULT_SETTLE_MS);
        if settle_ms > kiln_api_types::desktop::MAX_SETTLE_MS {
            return Err(CoreError::BadRequest(format!(
                "settle_ms must be at most {}, got {settle_ms}",
                kiln_api_types::desktop::MAX_SETTLE_MS
            )));
        }
        let scale = scale_of(q.width, desk.screen)?;
        let plan = plan(action, desk.screen)?;
        let text = match action {
            DesktopAction::TypeText {
                secret: Some(name), ..
            } => Some(self.secret_value(id, name)?),
            DesktopAction::TypeText { text: Some(t), .. } => Some(t.clone()),
            _ => None,
        };
        let chunks = match &text {
            Some(t) => {
                let chunks =
                    keys::type_plan(t).map_err(|e| CoreError::BadRequest(e.to_string()))?;
                // Text with characters a US keyboard cannot type goes to the guest whole: a
                // key event of QEMU's keyboard arriving between the guest's keymap change and
                // its keys makes the X server switch to that keyboard's map and loses the
                // character (measured: "héllo → 日本" typed in pieces came out "héllo  日").
                if chunks.iter().any(|c| matches!(c, TypeChunk::Other(_))) {
                    let n = t.chars().count();
                    if n > MAX_GUEST_TYPED_CHARS {
                        return Err(CoreError::BadRequest(format!(
                            "text with characters a US keyboard lacks is typed by the guest, at \
                             most {MAX_GUEST_TYPED_CHARS} characters in one action; this one has \
                             {n}: split it"
                        )));
                    }
                    vec![TypeChunk::Other(t.clone())]
                } else {
                    chunks
                }
            }
            None => Vec::new(),
        };

        let rec = self.recording(id);
        let _busy = rec.as_ref().map(|r| r.busy());
        let action_id = rec.as_ref().map_or_else(String::new, |r| r.action_id());
        if let Some(r) = &rec {
            r.record(TimelineEvent::ActionRequested {
                action_id: action_id.clone(),
                action: serde_json::to_value(action).unwrap_or(Value::Null),
            });
        }
        // The screen before: for the recording, and as the settle detector's baseline.
        let before = if rec.is_some() || q.screenshot {
            self.desktop_frame(id).await.ok()
        } else {
            None
        };
        // Where the pointer is drawn before and after: left out of the settle comparison.
        let masks = {
            // Unknown before the first pointer action: the X server puts it in the middle
            // of the screen when it starts, and the warm snapshot was taken with it there.
            let mut pointer = self
                .pointer(id)
                .or(Some((desk.screen.width / 2, desk.screen.height / 2)));
            let mut masks: Vec<Rect> = pointer
                .iter()
                .map(|&p| pointer_box(p, desk.screen))
                .collect();
            if let Some(p) = pointer_after(action) {
                masks.push(pointer_box(p, desk.screen));
                pointer = Some(p);
            }
            self.set_pointer(id, pointer);
            masks
        };
        let settle_with = q.screenshot.then(|| SettleWith {
            timeout_ms: settle_ms,
            before: before.clone(),
            masks,
        });
        let done = self
            .perform(id, &desk, action, plan, chunks, settle_with)
            .await;
        let (mut receipt, after) = match done {
            Ok(r) => r,
            Err(e) => {
                if let Some(r) = &rec {
                    let now = self.desktop_frame(id).await.ok();
                    r.failed(action_id, &e, now.as_ref().or(before.as_ref()));
                }
                return Err(e);
            }
        };
        receipt.action_id = action_id.clone();
        if let Some(frame) = &after {
            receipt.screenshot = Some(receipt_shot(&encode(frame, scale)?));
        }
        if let Some(r) = &rec {
            let after = match after {
                Some(f) => Some(f),
                None => self.desktop_frame(id).await.ok(),
            };
            let mut logged = serde_json::to_value(&receipt).unwrap_or(Value::Null);
            if let Some(shot) = logged.get_mut("screenshot").and_then(Value::as_object_mut) {
                // The picture is in the recording's screenshots; the line keeps its name.
                shot.remove("png_base64");
            }
            r.record(TimelineEvent::ActionCompleted {
                action_id,
                receipt: logged,
                screenshot_before: before.as_ref().and_then(|f| r.screenshot(f)),
                screenshot_after: after.as_ref().and_then(|f| r.screenshot(f)),
            });
        }
        Ok(receipt)
    }

    /// Sends an action's input (and types its text); with `settle_ms`, waits for the screen
    /// to settle and answers the frame it settled on.
    async fn perform(
        &self,
        id: &SandboxId,
        desk: &DesktopOf,
        action: &DesktopAction,
        plan: Plan,
        chunks: Vec<TypeChunk>,
        settle_with: Option<SettleWith>,
    ) -> Result<(ActionReceipt, Option<Frame>), CoreError> {
        let started_unix_ms = unix_now_ms();
        let t0 = Instant::now();
        let mut events = 0u32;
        let mut typed_in_guest = 0u32;
        for frame in plan.frames {
            events += u32::try_from(frame.len()).unwrap_or(u32::MAX);
            self.send_input(id, frame).await?;
            tokio::time::sleep(FRAME_GAP).await;
        }
        if plan.guest_hscroll != 0 {
            let steps = plan.guest_hscroll.unsigned_abs().to_string();
            let button = if plan.guest_hscroll > 0 { "7" } else { "6" };
            let args = ["click", "--repeat", &steps, "--delay", "20", button];
            self.guest_x(id, desk, "xdotool", &args, None, 30_000)
                .await?;
        }
        for chunk in chunks {
            match chunk {
                TypeChunk::Keys(keys) => {
                    for frame in key_frames(&keys) {
                        events += u32::try_from(frame.len()).unwrap_or(u32::MAX);
                        self.send_input(id, frame).await?;
                        tokio::time::sleep(FRAME_GAP).await;
                    }
                }
                TypeChunk::Other(s) => {
                    typed_in_guest += u32::try_from(s.chars().count()).unwrap_or(u32::MAX);
                    self.type_in_guest(id, desk, &s).await?;
                }
            }
        }
        if let DesktopAction::Wait { ms } = action {
            tokio::time::sleep(Duration::from_millis(*ms)).await;
        }
        let input_ms = t0.elapsed().as_secs_f64() * 1000.0;
        let (settle, frame) = match settle_with {
            Some(w) => {
                let (settle, frame) = self.settle(id, w).await?;
                (Some(settle), Some(frame))
            }
            None => (None, None),
        };
        let receipt = ActionReceipt {
            action_id: String::new(),
            kind: action.kind().to_owned(),
            done: plan.done,
            started_unix_ms,
            input_ms,
            events,
            typed_in_guest,
            settle,
            screenshot: None,
        };
        Ok((receipt, frame))
    }

    /// Samples `id`'s screen until it settles or `timeout_ms` pass; answers how, and the
    /// last frame.
    async fn settle(&self, id: &SandboxId, w: SettleWith) -> Result<(Settle, Frame), CoreError> {
        let config = SettleConfig {
            timeout_ms: w.timeout_ms,
            respond_ms: SettleConfig::default().respond_ms.min(w.timeout_ms),
            ..SettleConfig::default()
        };
        let t0 = Instant::now();
        let now_ms = || u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX);
        let mut settle = super::frame::Settle::new(config, 0).with_masks(w.masks);
        if let Some(before) = w.before {
            settle = settle.with_baseline(before);
        }
        let mut frames = 0u32;
        loop {
            let wait = settle.next_sample_ms().saturating_sub(now_ms());
            if wait > 0 {
                tokio::time::sleep(Duration::from_millis(wait)).await;
            }
            let frame = self.desktop_frame(id).await?;
            frames += 1;
            let state = settle.observe(frame, now_ms());
            let (settled, after_ms) = match state {
                SettleState::Waiting => continue,
                SettleState::Settled { after_ms } => (true, after_ms),
                SettleState::TimedOut { after_ms } => (false, after_ms),
            };
            let frame = settle
                .last_frame()
                .cloned()
                .ok_or_else(|| CoreError::HostSetup("settle ended without a frame".into()))?;
            return Ok((
                Settle {
                    settled,
                    changed: settle.answered(),
                    after_ms,
                    frames,
                },
                frame,
            ));
        }
    }

    /// The value of secret `name` of sandbox `id` (for `type_text` with `secret`), from the
    /// daemon's memory.
    pub(crate) fn secret_value(&self, id: &SandboxId, name: &str) -> Result<String, CoreError> {
        let sb = self.live_sandbox(id).ok_or_else(|| self.not_running(id))?;
        let value = sb.extras().secrets.0.get(name).cloned();
        value.ok_or_else(|| {
            CoreError::BadRequest(format!("sandbox {id} has no secret named {name:?}"))
        })
    }

    /// Types `text` in the guest as the session's user: for characters a US keyboard cannot
    /// produce, bound to spare keys first ([`GUEST_TYPE_SCRIPT`]), in batches of at most
    /// [`GUEST_KEYS_PER_BATCH`] such characters.
    async fn type_in_guest(
        &self,
        id: &SandboxId,
        desk: &DesktopOf,
        text: &str,
    ) -> Result<(), CoreError> {
        for (i, (batch, syms)) in guest_batches(text).into_iter().enumerate() {
            if i > 0 {
                tokio::time::sleep(GUEST_BATCH_GAP).await;
            }
            let mut args = vec!["-c", GUEST_TYPE_SCRIPT, "kiln-type"];
            args.extend(syms.iter().map(String::as_str));
            // Its pace, plus room for the command to start on a busy guest.
            let timeout_ms = GUEST_TYPE_DELAY_MS * (batch.chars().count() as u64 + 1) + 30_000;
            self.guest_x(id, desk, "sh", &args, Some(&batch), timeout_ms)
                .await?;
        }
        Ok(())
    }

    /// Runs `program ARGS` in the guest as the session's user on its display, feeding
    /// `stdin`; fails with its output unless it exits 0.
    async fn guest_x(
        &self,
        id: &SandboxId,
        desk: &DesktopOf,
        program: &str,
        args: &[&str],
        stdin: Option<&str>,
        timeout_ms: u64,
    ) -> Result<(), CoreError> {
        let req = ExecRequest {
            argv: std::iter::once(program)
                .chain(args.iter().copied())
                .map(str::to_owned)
                .collect(),
            env: [
                ("DISPLAY".to_owned(), desk.display.clone()),
                (
                    "KILN_TYPE_DELAY_MS".to_owned(),
                    GUEST_TYPE_DELAY_MS.to_string(),
                ),
            ]
            .into(),
            cwd: Some("/".into()),
            stdin: stdin.is_some(),
            timeout_ms: Some(timeout_ms),
            max_output_bytes: None,
            tty: None,
            user: Some(desk.user.clone()),
        };
        let mut exec = self.sandbox_exec(id, &req).await?;
        if let Some(text) = stdin {
            let tx = exec.stdin();
            tx.write(bytes::Bytes::copy_from_slice(text.as_bytes()))
                .await
                .map_err(CoreError::Agent)?;
            tx.close().await.map_err(CoreError::Agent)?;
        }
        let mut output = Vec::new();
        loop {
            match exec.next().await? {
                ExecOutput::Stdout(b) | ExecOutput::Stderr(b) => {
                    output.extend_from_slice(&b[..b.len().min(4096 - output.len().min(4096))]);
                }
                ExecOutput::Exit(status) => {
                    let code = status.shell_code();
                    if code == 0 {
                        return Ok(());
                    }
                    return Err(CoreError::GuestCommand(format!(
                        "`{program}` in the guest (for input QEMU cannot send) exited with \
                         {code}: {}",
                        String::from_utf8_lossy(&output).trim()
                    )));
                }
            }
        }
    }
}

/// `text` cut into the guest's batches: each with the keysyms (`Uxxxx`) of its characters a US
/// keyboard lacks, at most [`GUEST_KEYS_PER_BATCH`] distinct ones.
fn guest_batches(text: &str) -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    let mut batch = String::new();
    let mut syms: Vec<String> = Vec::new();
    for c in text.chars() {
        if !keys::us_typeable(c) {
            let sym = format!("U{:04X}", u32::from(c));
            if !syms.contains(&sym) {
                if syms.len() == GUEST_KEYS_PER_BATCH {
                    out.push((std::mem::take(&mut batch), std::mem::take(&mut syms)));
                }
                syms.push(sym);
            }
        }
        batch.push(c);
    }
    if !batch.is_empty() {
        out.push((batch, syms));
    }
    out
}

/// How an action waits for the screen to settle.
struct SettleWith {
    /// Longest wait (ms).
    timeout_ms: u64,
    /// The screen before the action.
    before: Option<Frame>,
    /// Where the pointer is drawn, before and after.
    masks: Vec<Rect>,
}

/// Where the pointer ends up after `action`, if it moves it.
fn pointer_after(action: &DesktopAction) -> Option<(u32, u32)> {
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
fn pointer_box(p: (u32, u32), screen: Screen) -> Rect {
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
struct Plan {
    frames: Vec<Vec<Value>>,
    /// Horizontal wheel steps the guest clicks (negative: left).
    guest_hscroll: i32,
    done: String,
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
fn plan(action: &DesktopAction, screen: Screen) -> Result<Plan, CoreError> {
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
fn key_frames(events: &[KeyEvent]) -> Vec<Vec<Value>> {
    events.iter().map(|e| vec![e.to_qmp()]).collect()
}

/// The scale of a requested picture width (`None`: full size).
fn scale_of(width: Option<u32>, screen: Screen) -> Result<Option<Scale>, CoreError> {
    match width {
        None => Ok(None),
        Some(w) if (1..=screen.width).contains(&w) => Ok(Some(Scale::Width(w))),
        Some(w) => Err(CoreError::BadRequest(format!(
            "width {w}: a screenshot of this {screen} screen can be 1 to {} pixels wide",
            screen.width
        ))),
    }
}

fn encode(frame: &Frame, scale: Option<Scale>) -> Result<Screenshot, CoreError> {
    let (width, height) = match scale {
        Some(s) => frame
            .scaled_size(s)
            .map_err(|e| CoreError::BadRequest(e.to_string()))?,
        None => (frame.width(), frame.height()),
    };
    let png = frame
        .to_png(scale)
        .map_err(|e| CoreError::BadRequest(e.to_string()))?;
    Ok(Screenshot { png, width, height })
}

fn receipt_shot(shot: &Screenshot) -> ReceiptScreenshot {
    use base64::Engine as _;
    use sha2::Digest as _;
    ReceiptScreenshot {
        png_base64: base64::engine::general_purpose::STANDARD.encode(&shot.png),
        width: shot.width,
        height: shot.height,
        sha256: hex::encode(sha2::Sha256::digest(&shot.png)),
    }
}

/// Removes a file when dropped (a screendump, read or not).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_api_types::{DEFAULT_SCREEN, MouseButton, Point};

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

    #[test]
    fn guest_batches_bind_each_character_once_and_split_past_the_spare_keys() {
        let b = guest_batches("héllo → 日本 ✓ é");
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].0, "héllo → 日本 ✓ é", "the text whole, ASCII included");
        assert_eq!(b[0].1, ["U00E9", "U2192", "U65E5", "U672C", "U2713"]);
        // 20 distinct CJK characters: two batches, the text cut where the 17th begins.
        let text: String = (0..20u32)
            .map(|i| char::from_u32(0x4E00 + i).expect("cjk"))
            .collect();
        let b = guest_batches(&text);
        assert_eq!(b.len(), 2);
        assert_eq!(b[0].1.len(), GUEST_KEYS_PER_BATCH);
        assert_eq!(b[1].1.len(), 4);
        assert_eq!(
            format!("{}{}", b[0].0, b[1].0),
            text,
            "nothing lost or repeated"
        );
        assert!(guest_batches("").is_empty());
    }

    #[test]
    fn screenshot_width_is_bounded_by_the_screen() {
        assert!(scale_of(Some(640), DEFAULT_SCREEN).expect("ok").is_some());
        assert!(scale_of(None, DEFAULT_SCREEN).expect("ok").is_none());
        let e = scale_of(Some(1281), DEFAULT_SCREEN).expect_err("too wide");
        assert!(e.to_string().contains("1 to 1280"), "{e}");
    }
}
