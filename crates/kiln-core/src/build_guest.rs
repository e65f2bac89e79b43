//! The guest side of image builds ([`kiln_image::BuildGuest`]): a build guest that copies a
//! recipe's files and runs its `run` steps on the new root file system, and the self-test
//! guest that boots the finished files before they are published.
//!
//! ```text
//!   apply:     steps.qcow2 over rootfs.ext4 ─▶ boot ─▶ files (mkdir -p, write, chown)
//!              ─▶ run steps (output streamed, first failure stops) ─▶ agent shutdown (sync)
//!              ─▶ qemu-img commit (the changes land in rootfs.ext4)
//!   self_test: test.qcow2 over rootfs.ext4 ─▶ boot ─▶ on_boot ─▶ readiness ─▶ `test`
//!              ─▶ QEMU stopped, layer removed (rootfs.ext4 unchanged)
//! ```
//!
//! Build guests are sandboxes in all but name: same kernel command line, same devices, no
//! network, their run directory under `run/` (so a daemon that dies mid-build leaves a QEMU
//! the startup janitor finds and kills). Recipe steps run in the guest, never on the host.
//! The image builder calls in on a blocking thread; each call drives its async work with the
//! daemon's runtime handle. Must not: touch published images or the store.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_agent_host::{AgentClient, ExecEvent, ExecRequest, FileWriteRequest};
use kiln_image::{BootFiles, BuildEvent, FileSource, GuestCommand, ImageError, Recipe};
use kiln_vmm::{Vm, VmConfig};
use tokio::io::AsyncWriteExt;

use crate::Engine;
use crate::error::CoreError;

/// Memory of a build guest when the recipe names none: package scripts and compilers need
/// more than a sandbox's default.
const BUILD_MEMORY_MIB: u32 = 1024;
/// How much of a failed step's output its error quotes.
const OUTPUT_TAIL_BYTES: usize = 4096;
/// How long a powered-off build guest may take to exit after the agent synced.
const POWER_OFF_WAIT: Duration = Duration::from_secs(30);

/// Boots build and self-test guests for the image builder.
pub struct EngineBuildGuest {
    /// The daemon's runtime (the builder runs on a blocking thread).
    pub rt: tokio::runtime::Handle,
    /// The engine: QEMU and the accelerator verdict.
    pub engine: Arc<Engine>,
    /// `$KILN_HOME/run`: build guests' run directories go below it.
    pub run_dir: PathBuf,
}

impl kiln_image::BuildGuest for EngineBuildGuest {
    fn apply(
        &mut self,
        boot: &BootFiles<'_>,
        recipe: &Recipe,
        on_event: &mut dyn FnMut(BuildEvent),
    ) -> Result<(), ImageError> {
        let rt = self.rt.clone();
        rt.block_on(self.apply_async(boot, recipe, on_event))
    }

    fn self_test(
        &mut self,
        boot: &BootFiles<'_>,
        recipe: &Recipe,
        on_event: &mut dyn FnMut(BuildEvent),
    ) -> Result<(), ImageError> {
        let rt = self.rt.clone();
        rt.block_on(self.self_test_async(boot, recipe, on_event))
    }
}

/// A running build guest: its VM and agent, and its run directory (removed on drop of the
/// guard by [`BuildVm::stop`]).
struct BuildVm {
    vm: Vm,
    agent: AgentClient,
    run_dir: PathBuf,
}

impl BuildVm {
    async fn stop(self) {
        self.vm.kill().await;
        let _ = std::fs::remove_dir_all(&self.run_dir);
    }
}

fn step_error(step: &str, detail: impl Into<String>) -> ImageError {
    ImageError::GuestStep {
        step: step.to_owned(),
        detail: detail.into(),
    }
}

fn core_error(step: &str, e: CoreError) -> ImageError {
    step_error(step, e.chain())
}

impl EngineBuildGuest {
    /// Boots a guest of `boot`'s kernel and initramfs over `layer` (a qcow2 over the root
    /// file system), with `recipe`'s machine size.
    async fn boot(
        &self,
        boot: &BootFiles<'_>,
        layer: &Path,
        recipe: &Recipe,
        what: &str,
    ) -> Result<BuildVm, ImageError> {
        let qemu = self
            .engine
            .qemu()
            .await
            .map_err(|e| core_error(what, e))?
            .path
            .clone();
        let accel = self
            .engine
            .accel(boot.kernel, boot.initramfs)
            .await
            .map_err(|e| core_error(what, e))?
            .accel;
        kiln_vmm::create_overlay(boot.rootfs, layer)
            .await
            .map_err(|e| step_error(what, crate::error::error_chain(&e)))?;
        let run_dir = self.run_dir.join(format!(
            "build-{}",
            kiln_api_types::SandboxId::random().as_str()
        ));
        std::fs::create_dir_all(&run_dir).map_err(|source| ImageError::Io {
            action: "create directory",
            path: run_dir.clone(),
            source,
        })?;
        let config = VmConfig {
            qemu,
            accel,
            cpus: recipe.cpus.unwrap_or(kiln_api_types::DEFAULT_CPUS),
            memory_mib: recipe.memory_mib.unwrap_or(BUILD_MEMORY_MIB),
            kernel: boot.kernel.to_owned(),
            initramfs: boot.initramfs.to_owned(),
            extra_cmdline: String::new(),
            disk: Some(layer.to_owned()),
            memory_file: run_dir.join("mem"),
            memory_shared: false,
            run_dir: run_dir.clone(),
            incoming: None,
            nic: None,
            display: None,
        };
        let vm = match Vm::spawn(&config).await {
            Ok(vm) => vm,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&run_dir);
                return Err(step_error(what, crate::error::error_chain(&e)));
            }
        };
        let deadline = crate::sandbox::boot_deadline(accel);
        let connected = tokio::select! {
            r = crate::sandbox::connect_agent(&vm, deadline) => r.map(|(a, _)| a),
            status = vm.wait_exit() => Err(CoreError::HostSetup(format!(
                "QEMU exited during boot ({status}); console: {}",
                kiln_vmm::console::log_tail(&run_dir.join("console.log"), 2048)
            ))),
        };
        match connected {
            Ok(agent) => Ok(BuildVm { vm, agent, run_dir }),
            Err(e) => {
                vm.kill().await;
                let _ = std::fs::remove_dir_all(&run_dir);
                Err(core_error(what, e))
            }
        }
    }

    async fn apply_async(
        &self,
        boot: &BootFiles<'_>,
        recipe: &Recipe,
        on_event: &mut dyn FnMut(BuildEvent),
    ) -> Result<(), ImageError> {
        let layer = boot.scratch.join("steps.qcow2");
        let started = Instant::now();
        let guest = self.boot(boot, &layer, recipe, "the build guest").await?;
        on_event(BuildEvent::Log(format!(
            "build guest up in {} ms",
            started.elapsed().as_millis()
        )));
        let result = run_steps(&guest.agent, recipe, on_event).await;
        if result.is_ok() {
            // The agent syncs the file systems and powers off: everything written is in
            // the layer before QEMU exits.
            let _ = guest.agent.shutdown().await;
            let exited = tokio::time::timeout(POWER_OFF_WAIT, guest.vm.wait_exit()).await;
            if exited.is_err() {
                guest.stop().await;
                return Err(step_error(
                    "the build guest",
                    format!(
                        "did not power off within {} s after syncing",
                        POWER_OFF_WAIT.as_secs()
                    ),
                ));
            }
        }
        guest.stop().await;
        result?;
        commit(&layer).await?;
        let _ = std::fs::remove_file(&layer);
        Ok(())
    }

    async fn self_test_async(
        &self,
        boot: &BootFiles<'_>,
        recipe: &Recipe,
        on_event: &mut dyn FnMut(BuildEvent),
    ) -> Result<(), ImageError> {
        let layer = boot.scratch.join("test.qcow2");
        let started = Instant::now();
        let guest = self
            .boot(boot, &layer, recipe, "the self-test guest")
            .await?;
        let result = async {
            on_event(BuildEvent::Log(format!(
                "self-test: agent answered {} ms after QEMU started",
                started.elapsed().as_millis()
            )));
            crate::guest::prepare(&guest.agent, recipe)
                .await
                .map_err(|e| core_error("the self-test (on_boot, readiness)", e))?;
            if !recipe.on_boot.is_empty() || recipe.readiness_probe.is_some() {
                on_event(BuildEvent::Log(format!(
                    "self-test: ready {} ms after QEMU started",
                    started.elapsed().as_millis()
                )));
            }
            if let Some(test) = &recipe.test {
                let what = format!("the self-test `{}`", describe(test));
                let (code, tail) = stream(&guest.agent, test, recipe, on_event)
                    .await
                    .map_err(|e| core_error(&what, e))?;
                if code != 0 {
                    return Err(step_error(
                        &what,
                        format!("exit code {code}; last output:\n{tail}"),
                    ));
                }
                on_event(BuildEvent::Log(format!(
                    "self-test passed in {} ms",
                    started.elapsed().as_millis()
                )));
            }
            Ok(())
        }
        .await;
        guest.stop().await;
        let _ = std::fs::remove_file(&layer);
        result
    }
}

/// Copies the recipe's files, then runs its steps; the first failure ends it.
async fn run_steps(
    agent: &AgentClient,
    recipe: &Recipe,
    on_event: &mut dyn FnMut(BuildEvent),
) -> Result<(), ImageError> {
    let total = (recipe.files.len() + recipe.run.len()) as u32;
    let mut index = 0u32;
    if let Some(dir) = &recipe.workdir {
        // Like Docker's WORKDIR: the steps run there, so it exists from the start.
        let path = crate::files::guest_path(dir).map_err(|e| core_error("workdir", e))?;
        agent
            .file_mkdir(&path, true, Some(0o755))
            .await
            .map_err(|e| core_error("workdir", crate::files::file_error(dir, e)))?;
    }
    for file in &recipe.files {
        index += 1;
        let what = format!("copy {}", file.dst);
        on_event(BuildEvent::Step {
            index,
            total,
            what: what.clone(),
        });
        let started = Instant::now();
        copy_file(agent, file)
            .await
            .map_err(|e| core_error(&format!("step {index}/{total} ({what})"), e))?;
        on_event(BuildEvent::StepDone {
            index,
            exit_code: 0,
            elapsed_ms: started.elapsed().as_millis() as u64,
        });
    }
    for step in &recipe.run {
        index += 1;
        let what = format!("run `{}`", describe(step));
        on_event(BuildEvent::Step {
            index,
            total,
            what: what.clone(),
        });
        let started = Instant::now();
        let label = format!("step {index}/{total} ({what})");
        let (code, tail) = stream(agent, step, recipe, on_event)
            .await
            .map_err(|e| core_error(&label, e))?;
        on_event(BuildEvent::StepDone {
            index,
            exit_code: code,
            elapsed_ms: started.elapsed().as_millis() as u64,
        });
        if code != 0 {
            return Err(step_error(
                &label,
                format!("exit code {code}; last output:\n{tail}"),
            ));
        }
    }
    Ok(())
}

/// A command as the user wrote it (the script of `sh -c`, else the argv), on one line.
fn describe(c: &GuestCommand) -> String {
    let text = match c.argv.as_slice() {
        [sh, flag, script] if sh.ends_with("sh") && flag == "-c" => script.trim().to_owned(),
        argv => argv.join(" "),
    };
    let line = text.lines().next().unwrap_or("").to_owned();
    let mut short: String = line.chars().take(60).collect();
    if short.len() < text.len() {
        short.push('…');
    }
    short
}

/// Runs `cmd` with the recipe's environment, working directory and user, passing its output
/// on as lines; returns its shell-style exit code and the end of its output.
async fn stream(
    agent: &AgentClient,
    cmd: &GuestCommand,
    recipe: &Recipe,
    on_event: &mut dyn FnMut(BuildEvent),
) -> Result<(i32, String), CoreError> {
    let mut req = ExecRequest::new(cmd.argv.iter().cloned());
    req.timeout_ms = Some(cmd.timeout_ms.max(1));
    // Build steps and the self-test run as the image's commands will: its environment,
    // working directory and user.
    crate::sandbox::ExecDefaults::of(recipe).apply(&mut req)?;
    let mut session = agent.exec(req).await.map_err(CoreError::Agent)?;
    let mut tail: Vec<u8> = Vec::new();
    let mut pending: Vec<u8> = Vec::new();
    let emit = |pending: &mut Vec<u8>, all: bool, on_event: &mut dyn FnMut(BuildEvent)| {
        while let Some(pos) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=pos).collect();
            on_event(BuildEvent::Log(
                String::from_utf8_lossy(&line[..line.len() - 1]).into_owned(),
            ));
        }
        // Bounded: a guest that never prints a newline still gets its output shown.
        if (all && !pending.is_empty()) || pending.len() > 4096 {
            on_event(BuildEvent::Log(
                String::from_utf8_lossy(pending).into_owned(),
            ));
            pending.clear();
        }
    };
    loop {
        match session.next_event().await {
            Some(ExecEvent::Stdout(b)) | Some(ExecEvent::Stderr(b)) => {
                tail.extend_from_slice(&b);
                if tail.len() > OUTPUT_TAIL_BYTES {
                    tail.drain(..tail.len() - OUTPUT_TAIL_BYTES);
                }
                pending.extend_from_slice(&b);
                emit(&mut pending, false, on_event);
            }
            Some(ExecEvent::Exit(s)) => {
                emit(&mut pending, true, on_event);
                let status = crate::sandbox::api_status(&s);
                let code = if s.timed_out {
                    on_event(BuildEvent::Log(format!(
                        "timed out after {} s",
                        cmd.timeout_ms / 1000
                    )));
                    124
                } else {
                    status.shell_code()
                };
                return Ok((code, String::from_utf8_lossy(&tail).into_owned()));
            }
            None => {
                return Err(match session.close_reason() {
                    Some(e) => CoreError::Agent(e),
                    None => CoreError::GuestCommand(
                        "the guest agent ended a command without an exit status".to_owned(),
                    ),
                });
            }
        }
    }
}

/// Writes one recipe file into the guest: parent directories, content with its mode, then
/// its owner.
async fn copy_file(agent: &AgentClient, file: &kiln_image::RecipeFile) -> Result<(), CoreError> {
    let path = crate::files::guest_path(&file.dst)?;
    if let Some(parent) = Path::new(&file.dst).parent()
        && parent != Path::new("/")
    {
        let dir = crate::files::guest_path(&parent.to_string_lossy())?;
        agent
            .file_mkdir(&dir, true, Some(0o755))
            .await
            .map_err(|e| crate::files::file_error(&parent.to_string_lossy(), e))?;
    }
    let mut req = FileWriteRequest::new(path);
    req.mode = Some(file.mode);
    let mut writer = agent
        .file_write(req)
        .await
        .map_err(|e| crate::files::file_error(&file.dst, e))?;
    let io = |e: std::io::Error| crate::files::transfer_error(&file.dst, e);
    match &file.source {
        Some(FileSource::Inline(bytes)) => writer.write_all(bytes).await.map_err(io)?,
        Some(FileSource::Path(p)) => {
            let mut f = tokio::fs::File::open(p)
                .await
                .map_err(|source| CoreError::Io {
                    what: "open",
                    path: p.clone(),
                    source,
                })?;
            tokio::io::copy(&mut f, &mut writer).await.map_err(io)?;
        }
        None => {
            return Err(CoreError::BadRequest(format!(
                "recipe file {} has no content to copy",
                file.dst
            )));
        }
    }
    writer.flush().await.map_err(io)?;
    writer
        .finish()
        .await
        .map_err(|e| crate::files::file_error(&file.dst, e))?;
    if let Some(owner) = &file.owner {
        let argv = ["chown", owner.as_str(), file.dst.as_str()].map(str::to_owned);
        let r = crate::guest::run(agent, &argv, None, Duration::from_secs(60)).await?;
        if r.code != 0 {
            return Err(CoreError::GuestCommand(format!(
                "`chown {owner} {}` exited with {}: {}",
                file.dst,
                r.code,
                r.output.trim()
            )));
        }
    }
    Ok(())
}

/// Writes the layer's changes into its raw backing file (the new root file system).
async fn commit(layer: &Path) -> Result<(), ImageError> {
    let out = tokio::process::Command::new("qemu-img")
        .arg("commit")
        .arg("-q")
        .arg(layer)
        .output()
        .await
        .map_err(|source| ImageError::Spawn {
            command: format!("qemu-img commit {}", layer.display()),
            source,
        })?;
    if !out.status.success() {
        return Err(ImageError::CommandFailed {
            command: format!("qemu-img commit {}", layer.display()),
            status: out.status.to_string(),
            output_tail: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_shows_the_script_or_argv_on_one_short_line() {
        let sh = GuestCommand {
            argv: vec!["/bin/sh".into(), "-c".into(), "\nset -e\nmake".into()],
            timeout_ms: 1,
        };
        assert_eq!(describe(&sh), "set -e…");
        let argv = GuestCommand {
            argv: vec!["/bin/true".into(), "x".into()],
            timeout_ms: 1,
        };
        assert_eq!(describe(&argv), "/bin/true x");
        let long = GuestCommand {
            argv: vec!["echo".into(), "a".repeat(100)],
            timeout_ms: 1,
        };
        assert_eq!(describe(&long).chars().count(), 61);
    }
}
