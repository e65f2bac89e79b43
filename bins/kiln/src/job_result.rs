//! Following a submitted job to its end, for `kiln job run`, `kiln go` and `kiln bench
//! jobs`: the submit that waits out a full queue (429 `queue_full`, at most
//! [`QUEUE_FULL_PATIENCE`]), long polls until the job is final, printing its streams as they
//! come ([`Echo`], [`follow`]), and what a finished job means for kiln's exit code
//! ([`exit_code`]) and stderr ([`notes`]).
//!
//! Must not: build requests or read local files (`job.rs` does), or print anything but the
//! job's own streams and the one-line notes.
//!
//! Invariant of [`Echo`]: every byte of a stream is printed once, in order, whether it
//! arrived as an event or was caught up from `GET /v1/jobs/{id}` after the event stream
//! broke off.

use std::cell::Cell;
use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::Context;
use kiln_api_types::{
    ErrorCode, JobCreated, JobEvent, JobId, JobInfo, JobRequest, JobStatus, JobStream,
};
use kiln_client::{Client, ClientError};

/// How long a submit waits out a full job queue before giving up.
pub const QUEUE_FULL_PATIENCE: Duration = Duration::from_secs(600);
/// Pause between submits while the queue is full (the client does not expose the answer's
/// `Retry-After`).
const QUEUE_FULL_RETRY: Duration = Duration::from_secs(1);
/// `?wait=` of each long poll while waiting for a job's end (the daemon's limit is 300).
const POLL_WAIT_SECS: u64 = 60;

/// Exit code when the job ran past its timeout (as `kiln run --timeout`, and `timeout(1)`).
pub const EXIT_TIMED_OUT: i32 = 124;
/// Exit code when kiln could not give the job's result (`error`, `cancelled`,
/// `interrupted`).
pub const EXIT_NO_RESULT: i32 = 125;

/// Whether the daemon refused a submit because its job queue is full.
pub fn is_queue_full(e: &ClientError) -> bool {
    e.api()
        .is_some_and(|b| b.code == ErrorCode::QueueFull.as_str())
}

/// Submits `req`, waiting out a full queue (one line on stderr the first time, shared
/// through `told` by concurrent submits), for at most [`QUEUE_FULL_PATIENCE`].
pub async fn submit(client: &Client, req: &JobRequest, told: &Cell<bool>) -> anyhow::Result<JobId> {
    let started = Instant::now();
    loop {
        match client.job_create(req).await {
            Ok(JobCreated { id }) => return Ok(id),
            Err(e) if is_queue_full(&e) => {
                if started.elapsed() >= QUEUE_FULL_PATIENCE {
                    return Err(e).context(format!(
                        "the job queue stayed full for {} s; giving up",
                        QUEUE_FULL_PATIENCE.as_secs()
                    ));
                }
                if !told.replace(true) {
                    eprintln!("kiln: the job queue is full; waiting…");
                }
                tokio::time::sleep(QUEUE_FULL_RETRY).await;
            }
            Err(e) => return Err(e).context("submitting the job failed"),
        }
    }
}

/// Waits until job `id` has ended (long polls); returns its final record.
pub async fn wait_final(client: &Client, id: &JobId) -> anyhow::Result<JobInfo> {
    loop {
        let t = Instant::now();
        let job = client.job_get(id, Some(POLL_WAIT_SECS)).await?;
        if job.status.is_final() {
            return Ok(job);
        }
        // A daemon that answers at once (before the wait) must not make this spin.
        if t.elapsed() < Duration::from_millis(200) {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// The exit code `kiln job run` gives for a finished job (the list is in `job.rs`'s header).
pub fn exit_code(job: &JobInfo) -> i32 {
    match job.status {
        JobStatus::Succeeded => job.exit_code.unwrap_or(0),
        JobStatus::Failed => {
            if compile_failed(job) {
                1
            } else if let Some(sig) = job.signal {
                128 + sig
            } else {
                match job.exit_code {
                    Some(c) if c != 0 => c,
                    _ => 1,
                }
            }
        }
        JobStatus::TimedOut => EXIT_TIMED_OUT,
        JobStatus::Cancelled
        | JobStatus::Interrupted
        | JobStatus::Error
        | JobStatus::Queued
        | JobStatus::Running => EXIT_NO_RESULT,
    }
}

/// Whether the job ended because its program did not compile.
fn compile_failed(job: &JobInfo) -> bool {
    job.status == JobStatus::Failed && job.compile.as_ref().is_some_and(|c| c.exit_code != Some(0))
}

/// The lines `kiln job run` prints on stderr after a job's output: why it did not give a
/// result, and which streams were cut.
pub fn notes(job: &JobInfo) -> Vec<String> {
    let id = &job.id;
    let mut out = Vec::new();
    let cut = |what: &str| {
        format!(
            "kiln: job {id}: {what} was cut at {} bytes (--max-output)",
            job.max_output
        )
    };
    if job.compile.as_ref().is_some_and(|c| c.output_truncated) {
        out.push(cut("the compiler's output"));
    }
    if job.stdout_truncated {
        out.push(cut("stdout"));
    }
    if job.stderr_truncated {
        out.push(cut("stderr"));
    }
    match job.status {
        JobStatus::Failed if compile_failed(job) => {
            let code = job
                .compile
                .as_ref()
                .and_then(|c| c.exit_code)
                .map_or("killed".to_owned(), |c| format!("exit {c}"));
            out.push(format!(
                "kiln: job {id}: the program did not compile ({code})"
            ));
        }
        JobStatus::TimedOut => out.push(format!(
            "kiln: job {id} timed out: it ran longer than its {} s (--timeout)",
            job.timeout_secs
        )),
        JobStatus::Cancelled | JobStatus::Interrupted | JobStatus::Error => out.push(format!(
            "kiln: job {id} {}: {}",
            job.status,
            job.error.as_deref().unwrap_or("no reason given")
        )),
        _ => {}
    }
    out
}

/// Prints a job's streams as they come, each byte once: compile output and stderr to
/// `err`, stdout to `out`.
pub struct Echo<O: Write, E: Write> {
    out: O,
    err: E,
    /// Bytes printed so far of compile, stdout, stderr.
    printed: [usize; 3],
}

impl<O: Write, E: Write> Echo<O, E> {
    /// An echo that has printed nothing yet.
    pub fn new(out: O, err: E) -> Self {
        Echo {
            out,
            err,
            printed: [0; 3],
        }
    }

    fn slot(stream: JobStream) -> usize {
        match stream {
            JobStream::Compile => 0,
            JobStream::Stdout => 1,
            JobStream::Stderr => 2,
        }
    }

    /// Prints `data`, the next piece of `stream`.
    pub fn event(&mut self, stream: JobStream, data: &str) -> std::io::Result<()> {
        self.printed[Self::slot(stream)] += data.len();
        let w: &mut dyn Write = match stream {
            JobStream::Stdout => &mut self.out,
            JobStream::Compile | JobStream::Stderr => &mut self.err,
        };
        w.write_all(data.as_bytes())?;
        w.flush()
    }

    /// Prints what `job` holds of each stream beyond what was printed (the text is the
    /// daemon's: the bytes kept, invalid UTF-8 replaced, as its events carry it).
    pub fn catch_up(&mut self, job: &JobInfo) -> std::io::Result<()> {
        let streams = [
            (JobStream::Compile, job.compile.as_ref().map(|c| &c.output)),
            (JobStream::Stdout, Some(&job.stdout)),
            (JobStream::Stderr, Some(&job.stderr)),
        ];
        for (stream, full) in streams {
            let Some(full) = full else { continue };
            let done = self.printed[Self::slot(stream)];
            let Some(rest) = full.as_bytes().get(done..) else {
                continue;
            };
            // A boundary inside a character cannot come from whole events; lossy keeps the
            // rest printable anyway.
            let mut rest = String::from_utf8_lossy(rest).into_owned();
            // A running job's record ends in U+FFFD while the rest of a character is still
            // on its way: leave it for the next look, which has the whole character.
            if !job.status.is_final() && rest.ends_with(char::REPLACEMENT_CHARACTER) {
                rest.pop();
            }
            if !rest.is_empty() {
                self.event(stream, &rest)?;
            }
        }
        Ok(())
    }

    /// The writers back (for tests).
    #[cfg(test)]
    fn into_parts(self) -> (O, E) {
        (self.out, self.err)
    }
}

/// Follows job `id`'s output until it ends: the event stream, then, if that broke off, long
/// polls of the job. Returns the final record.
pub async fn follow<O: Write, E: Write>(
    client: &Client,
    id: &JobId,
    echo: &mut Echo<O, E>,
) -> anyhow::Result<JobInfo> {
    let mut end = None;
    let mut write_err = None;
    let mut missed = 0u64;
    let streamed = client
        .job_events(
            id,
            |ev| -> Result<bool, std::io::Error> {
                let written = match ev {
                    JobEvent::Status {
                        status: JobStatus::Queued,
                    } => {
                        // Said to a person only: a script reads the program's stderr.
                        if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
                            eprintln!("kiln: job {id} is queued; waiting for a free slot…");
                        }
                        Ok(())
                    }
                    JobEvent::Status { .. } => Ok(()),
                    JobEvent::Output { stream, data } => echo.event(stream, &data),
                    JobEvent::End { job } => {
                        end = Some(*job);
                        return Ok(false);
                    }
                };
                match written {
                    Ok(()) => Ok(true),
                    Err(e) => {
                        write_err = Some(e);
                        Ok(false)
                    }
                }
            },
            |n| missed += n,
        )
        .await;
    if missed > 0 {
        eprintln!(
            "kiln: this terminal fell behind the job's output and missed {missed} pieces of it; `kiln job status {id}` has all of it"
        );
    }
    if let Some(e) = write_err {
        return Err(e).context("writing the job's output failed");
    }
    if let Some(job) = end {
        // Output the stream may have skipped (a slow reader) is in the record.
        echo.catch_up(&job)
            .context("writing the job's output failed")?;
        return Ok(job);
    }
    // The stream broke off (or ended without `end`): poll the record, printing only what is
    // new. An error of the stream (404 and the like) comes back from the poll too.
    drop(streamed);
    loop {
        let t = Instant::now();
        let job = client.job_get(id, Some(POLL_WAIT_SECS)).await?;
        echo.catch_up(&job)
            .context("writing the job's output failed")?;
        if job.status.is_final() {
            return Ok(job);
        }
        if t.elapsed() < Duration::from_millis(200) {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use kiln_api_types::{ApiError, JobCompile};

    /// A job of language `c` in `status`, nothing else set.
    pub(crate) fn job(status: JobStatus) -> JobInfo {
        JobInfo {
            status,
            ..JobInfo::queued("job-0123456789ab".parse().unwrap(), "c", 1, 30, 1 << 20)
        }
    }

    fn compile(exit_code: Option<i32>) -> Option<JobCompile> {
        Some(JobCompile {
            exit_code,
            output: "main.c:1: error: expected ';'\n".into(),
            output_truncated: false,
        })
    }
    #[test]
    fn exit_code_maps_every_ending() {
        let mut ok = job(JobStatus::Succeeded);
        ok.exit_code = Some(0);
        assert_eq!(exit_code(&ok), 0);

        let mut failed = job(JobStatus::Failed);
        failed.exit_code = Some(3);
        assert_eq!(exit_code(&failed), 3);

        let mut killed = job(JobStatus::Failed);
        killed.signal = Some(9);
        assert_eq!(exit_code(&killed), 137);

        let mut no_compile = job(JobStatus::Failed);
        no_compile.compile = compile(Some(2));
        assert_eq!(exit_code(&no_compile), 1);

        // Compiled fine, then the program failed: its own code counts.
        let mut ran = job(JobStatus::Failed);
        ran.compile = compile(Some(0));
        ran.exit_code = Some(42);
        assert_eq!(exit_code(&ran), 42);

        // Failed with no code of its own (e.g. stopped for its output): still a failure.
        assert_eq!(exit_code(&job(JobStatus::Failed)), 1);

        assert_eq!(exit_code(&job(JobStatus::TimedOut)), 124);
        for s in [
            JobStatus::Error,
            JobStatus::Cancelled,
            JobStatus::Interrupted,
        ] {
            assert_eq!(exit_code(&job(s)), 125, "{s}");
        }
    }

    #[test]
    fn notes_say_why_there_is_no_result_and_what_was_cut() {
        assert!(notes(&job(JobStatus::Succeeded)).is_empty());

        let mut err = job(JobStatus::Error);
        err.error = Some("image rust is not built".into());
        assert_eq!(
            notes(&err),
            ["kiln: job job-0123456789ab error: image rust is not built"]
        );

        let timed = notes(&job(JobStatus::TimedOut));
        assert_eq!(timed.len(), 1);
        assert!(timed[0].contains("30 s"), "{timed:?}");

        let mut cut = job(JobStatus::Failed);
        cut.stdout_truncated = true;
        cut.signal = Some(9);
        let n = notes(&cut);
        assert_eq!(n.len(), 1, "{n:?}");
        assert!(n[0].contains("stdout was cut at 1048576 bytes"), "{n:?}");

        let mut bad = job(JobStatus::Failed);
        bad.compile = compile(Some(1));
        assert!(notes(&bad)[0].contains("did not compile (exit 1)"));
    }

    #[test]
    fn echo_prints_each_byte_once_across_a_fallback() {
        let mut echo = Echo::new(Vec::new(), Vec::new());
        echo.event(JobStream::Compile, "warning: x\n").unwrap();
        echo.event(JobStream::Stdout, "hel").unwrap();
        echo.event(JobStream::Stderr, "e1\n").unwrap();
        // The stream broke off; the record has more of stdout and stderr.
        let mut j = job(JobStatus::Running);
        j.compile = Some(JobCompile {
            exit_code: Some(0),
            output: "warning: x\n".into(),
            output_truncated: false,
        });
        j.stdout = "hello\nwor".into();
        j.stderr = "e1\n".into();
        echo.catch_up(&j).unwrap();
        j.stdout = "hello\nworld\n".into();
        j.stderr = "e1\ne2\n".into();
        echo.catch_up(&j).unwrap();
        echo.catch_up(&j).unwrap();
        // A character cut in the running record is printed whole once it is complete.
        j.stdout = "hello\nworld\n\u{fffd}".into();
        echo.catch_up(&j).unwrap();
        j.stdout = "hello\nworld\n☃".into();
        j.status = JobStatus::Succeeded;
        echo.catch_up(&j).unwrap();
        let (out, err) = echo.into_parts();
        assert_eq!(String::from_utf8(out).unwrap(), "hello\nworld\n☃");
        assert_eq!(String::from_utf8(err).unwrap(), "warning: x\ne1\ne2\n");
    }

    #[test]
    fn queue_full_is_recognised_by_its_code_only() {
        let api = |status, code: &str| ClientError::Api {
            status,
            body: ApiError {
                code: code.into(),
                message: "m".into(),
            },
        };
        assert!(is_queue_full(&api(429, "queue_full")));
        assert!(!is_queue_full(&api(400, "bad_request")));
        assert!(!is_queue_full(&api(429, "http")));
    }
}
