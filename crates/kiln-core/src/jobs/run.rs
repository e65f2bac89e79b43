//! One job in its sandbox: take a sandbox of the language's image, write the program and its
//! files, compile (compiled languages), run with the job's stdin, arguments and environment,
//! record the end, remove the sandbox.
//!
//! ```text
//!  acquire      sandbox_create(image, labels kiln.job=<id>)  pool → restore → cold boot;
//!               over capacity: wait for a sandbox to go, try again
//!  setup        one tar archive unpacked into /root/job:  <source file>, <files…>
//!  compile      cd /root/job && <compile argv>   output → `compile`; ≠ 0 → failed, no run
//!  run          cd /root/job && <run argv> <args>   stdout, stderr; stdin written, closed
//!  end          record stored and published; sandbox removed (slot freed after that)
//! ```
//!
//! Limits: compile and run share the job's `timeout`, kept by the host's clock (the program's
//! process group is SIGKILLed when it passes; a guest's clock may run at any rate); a stream past `max_output` gets the program killed
//! (SIGKILL to its process group) and the job ends `failed` saying which stream. A cancel or a
//! daemon stop ends the job at whatever step it is.
//!
//! Must not: keep anything of a job outside its `Live` record, or reuse a sandbox.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_api_types::{
    EventKind, ExecRequest, JobStatus, JobStream, Label, Labels, Lifetime, SandboxId, SandboxInfo,
    SandboxSource, SandboxSpec, StartSource,
};
use tokio::io::AsyncWriteExt;
use tracing::warn;

use super::{Live, Stop, compile_record, image_of};
use crate::error::CoreError;
use crate::languages::Language;
use crate::{Engine, ExecOutput};

/// The job's directory in the guest.
const WORKDIR: &str = "/root/job";
/// Beyond its timeout, how long a job's guest may take before the job is given up as broken.
const GRACE: Duration = Duration::from_secs(30);
/// A job's sandbox lives at most this long beyond the job's timeout (in case its daemon dies
/// and the next one does not find the job).
const SANDBOX_TTL_MARGIN_SECS: u64 = 600;
/// How long a start refused for lack of room waits before trying again when no sandbox goes.
const CAPACITY_RETRY: Duration = Duration::from_secs(1);

/// How a step ended when it did not run to its end.
enum Halt {
    /// Cancelled or interrupted.
    Stopped(Stop),
    /// kiln failed (no sandbox, a broken guest).
    Failed(CoreError),
}

impl From<CoreError> for Halt {
    fn from(e: CoreError) -> Halt {
        Halt::Failed(e)
    }
}

/// Runs `live` to its end and removes its sandbox.
pub(super) async fn run(engine: &Arc<Engine>, live: &Arc<Live>) {
    let mut sandbox = None;
    let halt = steps(engine, live, &mut sandbox).await;
    if let Err(halt) = halt {
        live.finish(engine, |j| match halt {
            Halt::Stopped(Stop::Cancelled) => {
                j.status = JobStatus::Cancelled;
                j.error = Some("cancelled while it ran".into());
            }
            Halt::Stopped(Stop::Interrupted) => {
                j.status = JobStatus::Interrupted;
                j.error = Some("the daemon stopped while the job ran".into());
            }
            Halt::Failed(e) => {
                j.status = JobStatus::Error;
                j.error = Some(e.chain());
            }
        });
    }
    if let Some(id) = sandbox
        && let Err(e) = engine.sandbox_delete(&id).await
        && !matches!(e, CoreError::SandboxNotFound(_))
    {
        warn!(job_id = %live.id, sandbox_id = %id, error = %crate::error::error_chain(&e), "could not remove a job's sandbox");
    }
    live.released.send_replace(true);
}

/// Waits for `fut`, unless the job is told to stop first.
async fn unless_stopped<T>(
    live: &Live,
    fut: impl std::future::Future<Output = Result<T, CoreError>>,
) -> Result<T, Halt> {
    let mut stop = live.stop.subscribe();
    tokio::select! {
        r = fut => r.map_err(Halt::Failed),
        s = stop.wait_for(|s| s.is_some()) => {
            let why = s.ok().and_then(|s| *s).unwrap_or(Stop::Interrupted);
            Err(Halt::Stopped(why))
        }
    }
}

/// The steps, each unless the job is told to stop; `sandbox` is set once there is one.
async fn steps(
    engine: &Arc<Engine>,
    live: &Live,
    sandbox: &mut Option<SandboxId>,
) -> Result<(), Halt> {
    let t = Instant::now();
    let info = unless_stopped(live, acquire(engine, live.language, Some(live))).await?;
    *sandbox = Some(info.id.clone());
    live.update(|j| {
        j.timing.acquire_ms = Some(ms(t));
        j.warm = info.status.source == StartSource::Pool;
        j.source = Some(info.status.source);
        j.sandbox = Some(info.id.clone());
    });
    // Stored with its sandbox: a daemon that dies now leaves a record the next one reads.
    live.persist(engine);
    let id = info.id;
    let t = Instant::now();
    unless_stopped(live, setup(engine, live, &id)).await?;
    live.update(|j| j.timing.setup_ms = Some(ms(t)));
    // Compile and run share the timeout; the grace bounds a guest that never answers.
    let deadline = Instant::now() + Duration::from_secs(live.req.timeout_secs());
    let timeout_secs = live.req.timeout_secs();
    if let Some(compile) = live.language.compile() {
        let t = Instant::now();
        let step = unless_stopped(
            live,
            exec_step(engine, live, &id, compile, None, deadline, Step::Compile),
        )
        .await?;
        live.update(|j| {
            j.timing.compile_ms = Some(ms(t));
            j.compile = Some(compile_record(step.status.code));
        });
        if step.status.code != Some(0) {
            live.finish(engine, |j| {
                if step.status.timed_out {
                    j.status = JobStatus::TimedOut;
                    j.error = Some(format!(
                        "the compile step ran past the job's timeout of {timeout_secs} s and was stopped"
                    ));
                } else {
                    j.status = JobStatus::Failed;
                    j.error = Some(match (step.over, step.status.code, step.status.signal) {
                        (true, _, _) => format!(
                            "the compiler's output passed max_output ({} bytes) and it was stopped",
                            live.req.max_output_bytes()
                        ),
                        (_, Some(c), _) => format!("compile error (the compiler exited {c})"),
                        (_, None, Some(s)) => format!("the compiler was killed by signal {s}"),
                        _ => "the compiler ended without an exit status".into(),
                    });
                }
            });
            return Ok(());
        }
    }
    let mut argv: Vec<String> = live
        .language
        .run()
        .iter()
        .map(|a| (*a).to_owned())
        .collect();
    argv.extend(live.req.args.iter().cloned());
    let t = Instant::now();
    let step = unless_stopped(
        live,
        exec_step(
            engine,
            live,
            &id,
            &argv,
            live.req.stdin.as_deref().map(str::as_bytes),
            deadline,
            Step::Run,
        ),
    )
    .await?;
    let max = live.req.max_output_bytes();
    live.finish(engine, |j| {
        j.timing.run_ms = Some(ms(t));
        j.exit_code = step.status.code;
        j.signal = step.status.signal;
        let (status, error) = if step.status.timed_out {
            (
                JobStatus::TimedOut,
                Some(format!(
                    "ran past its timeout of {timeout_secs} s and was stopped"
                )),
            )
        } else if let Some(stream) = step.over_stream {
            (
                JobStatus::Failed,
                Some(format!(
                    "{stream} passed max_output ({max} bytes) and the program was stopped"
                )),
            )
        } else if let Some(s) = step.status.signal {
            (
                JobStatus::Failed,
                Some(format!("the program was killed by signal {s}")),
            )
        } else if step.status.code == Some(0) {
            (JobStatus::Succeeded, None)
        } else {
            (JobStatus::Failed, None)
        };
        j.status = status;
        j.error = error;
    });
    Ok(())
}

/// A sandbox of `language`'s image for a job (labelled with its id when `live` is given):
/// from the pool, restored or booted; while the host's budget has no room, waits for a
/// sandbox to go and tries again.
pub(super) async fn acquire(
    engine: &Arc<Engine>,
    language: Language,
    live: Option<&Live>,
) -> Result<SandboxInfo, CoreError> {
    let image = image_of(language)?;
    let machine = engine.pool_machine(&image, None, None)?;
    let timeout = live.map_or(60, |l| l.req.timeout_secs());
    let labels = match live {
        Some(l) => Labels::from_labels([format!("kiln.job={}", l.id).parse::<Label>()?])?,
        None => Labels::default(),
    };
    let spec = SandboxSpec {
        source: SandboxSource::Image {
            image,
            machine,
            cold: false,
        },
        labels,
        lifetime: Lifetime {
            ttl_secs: Some(timeout + SANDBOX_TTL_MARGIN_SECS),
            idle_timeout_secs: None,
        },
        ..SandboxSpec::default()
    };
    loop {
        // Subscribed before the attempt: a sandbox that goes meanwhile is seen.
        let mut events = engine.events();
        match engine.sandbox_create(&spec).await {
            Err(CoreError::OverCapacity { .. }) => {
                let gone = async {
                    loop {
                        match events.recv().await {
                            Ok(ev) if matches!(ev.kind, EventKind::Removed { .. }) => return,
                            Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                                std::future::pending::<()>().await
                            }
                            _ => {}
                        }
                    }
                };
                let _ = tokio::time::timeout(CAPACITY_RETRY, gone).await;
            }
            other => return other,
        }
    }
}

/// Writes the program and its files into `WORKDIR`, as one tar archive the guest unpacks
/// into that new directory (it makes the directories).
async fn setup(engine: &Engine, live: &Live, id: &SandboxId) -> Result<(), CoreError> {
    let archive = archive(live.language, &live.req).map_err(|e| CoreError::Io {
        what: "pack the job's files for",
        path: WORKDIR.into(),
        source: e,
    })?;
    let mut up = engine.file_upload(id, WORKDIR, None, true).await?;
    up.write_all(&archive)
        .await
        .map_err(|e| crate::files::transfer_error(WORKDIR, e))?;
    up.finish().await.map(drop)
}

/// The tar archive of a job: its program and its files, with their directories.
fn archive(language: Language, req: &kiln_api_types::JobRequest) -> std::io::Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    let mut dirs = std::collections::BTreeSet::new();
    for path in req.files.keys() {
        let parts: Vec<&str> = path.split('/').collect();
        for n in 1..parts.len() {
            dirs.insert(parts[..n].join("/"));
        }
    }
    for dir in &dirs {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        b.append_data(&mut h, format!("{dir}/"), std::io::empty())?;
    }
    let files = std::iter::once((language.source_file(), req.code.as_str()))
        .chain(req.files.iter().map(|(p, c)| (p.as_str(), c.as_str())));
    for (path, content) in files {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(content.len() as u64);
        b.append_data(&mut h, path, content.as_bytes())?;
    }
    b.into_inner()
}

/// Which step a command is.
#[derive(Clone, Copy)]
enum Step {
    Compile,
    Run,
}

/// How a command ended.
struct Ended {
    status: kiln_api_types::ExitStatus,
    /// A stream passed `max_output` (the command was killed).
    over: bool,
    /// Which one (the run step's `stdout` or `stderr`).
    over_stream: Option<&'static str>,
}

/// Runs `argv` in `WORKDIR` with the job's environment, `stdin` written and closed, what is
/// left of the timeout, and its output kept as `step`'s.
async fn exec_step<S: AsRef<str>>(
    engine: &Engine,
    live: &Live,
    id: &SandboxId,
    argv: &[S],
    stdin: Option<&[u8]>,
    deadline: Instant,
    step: Step,
) -> Result<Ended, CoreError> {
    let left = deadline.saturating_duration_since(Instant::now());
    let req = ExecRequest {
        argv: argv.iter().map(|a| a.as_ref().to_owned()).collect(),
        env: live.req.env.clone(),
        cwd: Some(WORKDIR.into()),
        stdin: stdin.is_some(),
        // The host's clock decides: a guest's clock is the guest's to get wrong.
        timeout_ms: None,
        max_output_bytes: None,
        tty: None,
        user: None,
    };
    let run = async {
        let mut exec = engine.sandbox_exec(id, &req).await?;
        let writer = stdin.map(|data| {
            let handle = exec.stdin();
            let data = bytes::Bytes::copy_from_slice(data);
            tokio::spawn(async move {
                // The program may exit without reading it all: that is its business.
                if handle.write(data).await.is_ok() {
                    let _ = handle.close().await;
                }
            })
        });
        let mut over: Option<&'static str> = None;
        let mut timed_out = false;
        let overdue = tokio::time::sleep_until(tokio::time::Instant::from_std(deadline));
        tokio::pin!(overdue);
        let mut status = loop {
            let next = tokio::select! {
                next = exec.next() => next?,
                () = &mut overdue, if !timed_out => {
                    timed_out = true;
                    exec.signal(libc::SIGKILL).await?;
                    continue;
                }
            };
            let (stream, data) = match next {
                ExecOutput::Exit(status) => break status,
                ExecOutput::Stdout(b) => (
                    match step {
                        Step::Compile => JobStream::Compile,
                        Step::Run => JobStream::Stdout,
                    },
                    b,
                ),
                ExecOutput::Stderr(b) => (
                    match step {
                        Step::Compile => JobStream::Compile,
                        Step::Run => JobStream::Stderr,
                    },
                    b,
                ),
            };
            if live.output(stream, &data) && over.is_none() {
                over = Some(match stream {
                    JobStream::Stderr => "stderr",
                    JobStream::Stdout => "stdout",
                    JobStream::Compile => "the compiler's output",
                });
                exec.signal(libc::SIGKILL).await?;
            }
        };
        if let Some(w) = writer {
            w.abort();
        }
        status.timed_out |= timed_out;
        Ok(Ended {
            status,
            over: over.is_some(),
            over_stream: over.filter(|_| matches!(step, Step::Run)),
        })
    };
    tokio::time::timeout(left + GRACE, run)
        .await
        .map_err(|_| CoreError::Unresponsive {
            id: id.clone(),
            reason: format!(
                "the job's command did not end within its timeout and {} s more",
                GRACE.as_secs()
            ),
        })?
}

/// The first line `language`'s version command prints, asked of a fresh sandbox.
pub(super) async fn version(engine: &Arc<Engine>, language: Language) -> Result<String, CoreError> {
    let info = acquire(engine, language, None).await?;
    let asked = async {
        let req = ExecRequest {
            timeout_ms: Some(30_000),
            max_output_bytes: Some(64 << 10),
            ..ExecRequest::new(language.version().iter().map(|a| (*a).to_owned()).collect())
        };
        let mut exec = engine.sandbox_exec(&info.id, &req).await?;
        let mut out = Vec::new();
        let mut err = Vec::new();
        loop {
            match exec.next().await? {
                ExecOutput::Stdout(b) => out.extend_from_slice(&b),
                ExecOutput::Stderr(b) => err.extend_from_slice(&b),
                ExecOutput::Exit(_) => break,
            }
        }
        let first = |b: &[u8]| {
            String::from_utf8_lossy(b)
                .lines()
                .map(str::trim)
                .find(|l| !l.is_empty())
                .map(|l| l.chars().take(200).collect::<String>())
        };
        first(&out).or_else(|| first(&err)).ok_or_else(|| {
            CoreError::ExecRejected(format!(
                "`{}` printed nothing",
                language.version().join(" ")
            ))
        })
    }
    .await;
    if let Err(e) = engine.sandbox_delete(&info.id).await {
        warn!(sandbox_id = %info.id, error = %crate::error::error_chain(&e), "could not remove a version probe's sandbox");
    }
    asked
}

fn ms(since: Instant) -> u64 {
    since.elapsed().as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_holds_the_program_its_files_and_their_directories() {
        let mut req = kiln_api_types::JobRequest::new("python", "print(1)\n");
        req.files.insert("data/in.txt".into(), "42\n".into());
        req.files.insert("lib/a/b.py".into(), "X = 1\n".into());
        let bytes = archive(Language::Python, &req).unwrap();
        let mut a = tar::Archive::new(&bytes[..]);
        let mut seen = Vec::new();
        for e in a.entries().unwrap() {
            let mut e = e.unwrap();
            let path = e.path().unwrap().to_string_lossy().into_owned();
            let mut body = String::new();
            std::io::Read::read_to_string(&mut e, &mut body).unwrap();
            seen.push((path, body));
        }
        let names: Vec<&str> = seen.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            names,
            [
                "data/",
                "lib/",
                "lib/a/",
                "main.py",
                "data/in.txt",
                "lib/a/b.py"
            ]
        );
        assert_eq!(seen[3].1, "print(1)\n");
        assert_eq!(seen[5].1, "X = 1\n");
    }
}
