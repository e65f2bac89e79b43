//! Text a US keyboard cannot type, typed by the guest: the session's user runs `xdotool type`
//! after the characters are bound to spare keycodes in one keymap change
//! ([`GUEST_TYPE_SCRIPT`]), in batches; and the guest's X clicks QEMU cannot send (the
//! horizontal wheel). Through an exec of the sandbox's agent, like any command.

use std::time::Duration;

use kiln_api_types::{ExecRequest, SandboxId};

use super::keys;
use super::ops::DesktopOf;
use crate::Engine;
use crate::error::CoreError;
use crate::sandbox::ExecOutput;

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

impl Engine {
    /// Types `text` in the guest as the session's user: for characters a US keyboard cannot
    /// produce, bound to spare keys first ([`GUEST_TYPE_SCRIPT`]), in batches of at most
    /// [`GUEST_KEYS_PER_BATCH`] such characters.
    pub(super) async fn type_in_guest(
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
    pub(super) async fn guest_x(
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
