//! Jobs as the API describes them: a program in one of kiln's languages, run once in a fresh
//! sandbox ([`JobRequest`]), what became of it ([`JobInfo`]), its live output
//! ([`JobEvent`]), the shapes of the code-execution service cloude's routes (`POST /run`,
//! `GET /status/{id}`), and the languages `kiln job languages` lists.
//!
//! Must not: know how a job runs (that is `kiln-core`'s `jobs` room) or which languages
//! exist (`kiln_core::languages`; a language arrives here as the name the client gave).
//! Invariants: a [`JobId`] is `job-` and 12 lowercase hex digits, checked on parse; every
//! limit of a request is checked by [`JobRequest::validate`], whose error names the field.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::names::InvalidInput;
use crate::{SandboxId, StartSource};

/// Default run time of a job, seconds (cloude's).
pub const DEFAULT_JOB_TIMEOUT_SECS: u64 = 30;
/// Longest run time a job may ask for, seconds.
pub const MAX_JOB_TIMEOUT_SECS: u64 = 3600;
/// Default output kept per stream, bytes (cloude's 1 MiB).
pub const DEFAULT_JOB_MAX_OUTPUT: u64 = 1 << 20;
/// Largest `max_output` a job may ask for, bytes per stream.
pub const MAX_JOB_MAX_OUTPUT: u64 = 16 << 20;
/// Largest program, bytes.
pub const MAX_JOB_CODE_BYTES: usize = 1 << 20;
/// Largest stdin, bytes.
pub const MAX_JOB_STDIN_BYTES: usize = 8 << 20;
/// Most extra files.
pub const MAX_JOB_FILES: usize = 64;
/// Largest total of the extra files, bytes.
pub const MAX_JOB_FILES_BYTES: usize = 8 << 20;
/// Most program arguments.
pub const MAX_JOB_ARGS: usize = 256;
/// Most environment variables.
pub const MAX_JOB_ENV: usize = 128;
/// Longest `?wait=` of `GET /v1/jobs/{id}`, seconds.
pub const MAX_JOB_WAIT_SECS: u64 = 300;

/// Identifier of a job: `job-` and 12 lowercase hex digits.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct JobId(String);

impl JobId {
    /// A new random id.
    pub fn random() -> JobId {
        let n: u64 = rand::random::<u64>() & 0xffff_ffff_ffff;
        JobId(format!("job-{n:012x}"))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for JobId {
    type Err = InvalidInput;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ok = s.strip_prefix("job-").is_some_and(|hex| {
            hex.len() == 12
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        });
        if ok {
            Ok(JobId(s.to_owned()))
        } else {
            Err(InvalidInput::Name {
                kind: "job id",
                value: s.to_owned(),
                rule: "expected `job-` and 12 lowercase hex digits",
            })
        }
    }
}

impl TryFrom<String> for JobId {
    type Error = InvalidInput;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<JobId> for String {
    fn from(id: JobId) -> String {
        id.0
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `POST /v1/jobs` (and cloude's `POST /run`): a program to run once in a fresh sandbox of
/// its language's image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JobRequest {
    /// The language: `python`, `node`, `ruby`, `go`, `rust`, `c`, `cpp`, `bash`, or an alias
    /// (`py`, `js`, `javascript`, `rs`, `golang`, `c++`, ...; `GET /v1/languages`).
    pub language: String,
    /// The program's source (at most 1 MiB), written to the language's source file.
    pub code: String,
    /// What the program reads on stdin (at most 8 MiB; default: nothing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
    /// Extra files beside the program: relative path → content (at most 64 files, 8 MiB).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub files: BTreeMap<String, String>,
    /// Arguments passed to the program.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Extra environment variables of the compile and run steps.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Longest the job may run, seconds, compile and run together (default 30, at most 3600).
    /// A job that passes it is stopped and ends `timed_out`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u64>,
    /// Output kept per stream, bytes (default 1 MiB, at most 16 MiB). A program that writes
    /// more is stopped, ends `failed`, and its stream says `…_truncated`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_output: Option<u64>,
}

impl JobRequest {
    /// A request for `code` in `language`, everything else default.
    pub fn new(language: impl Into<String>, code: impl Into<String>) -> JobRequest {
        JobRequest {
            language: language.into(),
            code: code.into(),
            stdin: None,
            files: BTreeMap::new(),
            args: Vec::new(),
            env: BTreeMap::new(),
            timeout: None,
            max_output: None,
        }
    }

    /// The run time limit in effect, seconds.
    pub fn timeout_secs(&self) -> u64 {
        self.timeout.unwrap_or(DEFAULT_JOB_TIMEOUT_SECS)
    }

    /// The output limit in effect, bytes per stream.
    pub fn max_output_bytes(&self) -> u64 {
        self.max_output.unwrap_or(DEFAULT_JOB_MAX_OUTPUT)
    }

    /// Checks every limit and the form of file names, arguments and variables (not the
    /// language, which the engine knows); the error names the field.
    pub fn validate(&self) -> Result<(), InvalidInput> {
        if self.code.len() > MAX_JOB_CODE_BYTES {
            return Err(too_big("code", self.code.len(), MAX_JOB_CODE_BYTES));
        }
        if let Some(s) = &self.stdin
            && s.len() > MAX_JOB_STDIN_BYTES
        {
            return Err(too_big("stdin", s.len(), MAX_JOB_STDIN_BYTES));
        }
        if self.files.len() > MAX_JOB_FILES {
            return Err(InvalidInput::TooMany {
                what: "files",
                got: self.files.len(),
                max: MAX_JOB_FILES,
            });
        }
        let total: usize = self.files.values().map(String::len).sum();
        if total > MAX_JOB_FILES_BYTES {
            return Err(too_big("files (together)", total, MAX_JOB_FILES_BYTES));
        }
        for path in self.files.keys() {
            validate_job_file(path)?;
        }
        if self.args.len() > MAX_JOB_ARGS {
            return Err(InvalidInput::TooMany {
                what: "args",
                got: self.args.len(),
                max: MAX_JOB_ARGS,
            });
        }
        if self.args.iter().any(|a| a.contains('\0')) {
            return Err(InvalidInput::Rule("args must not contain NUL bytes".into()));
        }
        if self.env.len() > MAX_JOB_ENV {
            return Err(InvalidInput::TooMany {
                what: "env variables",
                got: self.env.len(),
                max: MAX_JOB_ENV,
            });
        }
        for (k, v) in &self.env {
            let name_ok = !k.is_empty()
                && k.len() <= 256
                && !k.starts_with(|c: char| c.is_ascii_digit())
                && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !name_ok {
                return Err(InvalidInput::Rule(format!(
                    "env: invalid variable name {k:?} (letters, digits and `_`, not starting with a digit)"
                )));
            }
            if v.contains('\0') {
                return Err(InvalidInput::Rule(format!(
                    "env: the value of {k} contains a NUL byte"
                )));
            }
        }
        if let Some(t) = self.timeout
            && !(1..=MAX_JOB_TIMEOUT_SECS).contains(&t)
        {
            return Err(InvalidInput::Range {
                field: "timeout",
                min: 1,
                max: MAX_JOB_TIMEOUT_SECS,
                got: t,
            });
        }
        if let Some(m) = self.max_output
            && !(1..=MAX_JOB_MAX_OUTPUT).contains(&m)
        {
            return Err(InvalidInput::Range {
                field: "max_output",
                min: 1,
                max: MAX_JOB_MAX_OUTPUT,
                got: m,
            });
        }
        Ok(())
    }
}

fn too_big(field: &str, got: usize, max: usize) -> InvalidInput {
    InvalidInput::Rule(format!(
        "{field} is {got} bytes, more than the {max} bytes a job may have"
    ))
}

/// Checks the name of an extra file: a relative path of plain components (no `.`, `..` or
/// empty ones), at most 255 bytes, no NUL or backslash.
pub fn validate_job_file(path: &str) -> Result<(), InvalidInput> {
    let bad = |why: &str| {
        Err(InvalidInput::Rule(format!(
            "files: invalid path {path:?}: {why}"
        )))
    };
    if path.is_empty() || path.len() > 255 {
        return bad("it must be 1 to 255 bytes long");
    }
    if path.starts_with('/') {
        return bad("it must be relative to the job's directory");
    }
    if path.contains('\0') || path.contains('\\') {
        return bad("it contains a NUL byte or a backslash");
    }
    if path
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return bad("every component must be a plain name (no `.`, `..` or `//`)");
    }
    Ok(())
}

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    /// Waiting for room (`queue_position` says where).
    Queued,
    /// Its sandbox is being taken, or its program compiles or runs.
    Running,
    /// It compiled (if compiled) and exited 0.
    Succeeded,
    /// It did not compile, exited non-zero, was killed by a signal, or wrote more than
    /// `max_output` (`error` says which).
    Failed,
    /// It ran past its `timeout` and was stopped.
    TimedOut,
    /// `DELETE /v1/jobs/{id}` cancelled it.
    Cancelled,
    /// It was running when the daemon stopped.
    Interrupted,
    /// kiln could not run it (no image, no sandbox, a broken guest); `error` says why.
    Error,
}

impl JobStatus {
    /// Whether the job has ended (nothing about it changes any more).
    pub fn is_final(self) -> bool {
        !matches!(self, JobStatus::Queued | JobStatus::Running)
    }

    /// The status as in the API (`timed_out`).
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::TimedOut => "timed_out",
            JobStatus::Cancelled => "cancelled",
            JobStatus::Interrupted => "interrupted",
            JobStatus::Error => "error",
        }
    }

    /// Every status.
    pub const ALL: [JobStatus; 8] = [
        JobStatus::Queued,
        JobStatus::Running,
        JobStatus::Succeeded,
        JobStatus::Failed,
        JobStatus::TimedOut,
        JobStatus::Cancelled,
        JobStatus::Interrupted,
        JobStatus::Error,
    ];
}

impl FromStr for JobStatus {
    type Err = InvalidInput;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobStatus::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| {
                InvalidInput::Rule(format!(
                    "unknown job status {s:?} (one of queued, running, succeeded, failed, \
                     timed_out, cancelled, interrupted, error)"
                ))
            })
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The compile step of a compiled language.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct JobCompile {
    /// The compiler's exit code (`None` when killed by a signal or stopped).
    pub exit_code: Option<i32>,
    /// The compiler's stdout and stderr, interleaved as they came.
    pub output: String,
    /// Whether `output` was cut at `max_output`.
    pub output_truncated: bool,
}

/// How long each step of a job took, milliseconds (`None`: not reached).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct JobTiming {
    /// From submission until a sandbox was being taken for it.
    pub queued_ms: Option<u64>,
    /// Taking the sandbox: from the pool, or restored, or booted.
    pub acquire_ms: Option<u64>,
    /// Writing the program and its files into the sandbox.
    pub setup_ms: Option<u64>,
    /// The compile step (compiled languages).
    pub compile_ms: Option<u64>,
    /// The program's run.
    pub run_ms: Option<u64>,
    /// From submission to the result.
    pub total_ms: Option<u64>,
}

/// `GET /v1/jobs/{id}`: one job and its result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct JobInfo {
    /// Its id.
    #[schema(value_type = String, pattern = "^job-[0-9a-f]{12}$")]
    pub id: JobId,
    /// The language's id (aliases resolved).
    pub language: String,
    /// Where it is.
    pub status: JobStatus,
    /// Place in the queue, 0 first (while `queued`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_position: Option<u32>,
    /// When it was submitted, milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// When it ended, milliseconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_unix_ms: Option<u64>,
    /// The program's exit code (`None` when it did not exit by itself).
    pub exit_code: Option<i32>,
    /// The signal that killed the program, if one did.
    pub signal: Option<i32>,
    /// What the program wrote to stdout (invalid UTF-8 replaced), at most `max_output` bytes.
    pub stdout: String,
    /// What the program wrote to stderr, likewise.
    pub stderr: String,
    /// Whether stdout was cut at `max_output` (the program was stopped).
    pub stdout_truncated: bool,
    /// Whether stderr was cut at `max_output` (the program was stopped).
    pub stderr_truncated: bool,
    /// The compile step (compiled languages, once it ran).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compile: Option<JobCompile>,
    /// Why it failed, timed out, was cancelled or interrupted, or could not run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// How long each step took.
    pub timing: JobTiming,
    /// Whether its sandbox came from the warm pool.
    pub warm: bool,
    /// How its sandbox started (`pool`, `snapshot`, `cold`), once it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<StartSource>,
    /// Its sandbox, while running (removed when the job ends).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<SandboxId>,
    /// The run time limit in effect, seconds.
    pub timeout_secs: u64,
    /// The output limit in effect, bytes per stream.
    pub max_output: u64,
}

impl JobInfo {
    /// A job just submitted: `queued`, nothing of it run yet.
    pub fn queued(
        id: JobId,
        language: impl Into<String>,
        created_unix_ms: u64,
        timeout_secs: u64,
        max_output: u64,
    ) -> JobInfo {
        JobInfo {
            id,
            language: language.into(),
            status: JobStatus::Queued,
            queue_position: None,
            created_unix_ms,
            finished_unix_ms: None,
            exit_code: None,
            signal: None,
            stdout: String::new(),
            stderr: String::new(),
            stdout_truncated: false,
            stderr_truncated: false,
            compile: None,
            error: None,
            timing: JobTiming::default(),
            warm: false,
            source: None,
            sandbox: None,
            timeout_secs,
            max_output,
        }
    }
}

/// One job in `GET /v1/jobs` (no output; `GET /v1/jobs/{id}` has it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct JobSummary {
    /// Its id.
    #[schema(value_type = String, pattern = "^job-[0-9a-f]{12}$")]
    pub id: JobId,
    /// The language's id.
    pub language: String,
    /// Where it is.
    pub status: JobStatus,
    /// When it was submitted, milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// The program's exit code, once it exited.
    pub exit_code: Option<i32>,
    /// From submission to the result, once it ended.
    pub total_ms: Option<u64>,
    /// Whether its sandbox came from the warm pool.
    pub warm: bool,
}

impl From<&JobInfo> for JobSummary {
    fn from(j: &JobInfo) -> JobSummary {
        JobSummary {
            id: j.id.clone(),
            language: j.language.clone(),
            status: j.status,
            created_unix_ms: j.created_unix_ms,
            exit_code: j.exit_code,
            total_ms: j.timing.total_ms,
            warm: j.warm,
        }
    }
}

/// `GET /v1/jobs`: jobs, newest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct JobList {
    /// The jobs that match the filters, newest first.
    pub jobs: Vec<JobSummary>,
}

/// `POST /v1/jobs` and `POST /run`: the job's id (202 Accepted).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct JobCreated {
    /// The job's id.
    #[schema(value_type = String, pattern = "^job-[0-9a-f]{12}$")]
    pub id: JobId,
}

/// An output stream of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobStream {
    /// The compiler's output (stdout and stderr together).
    Compile,
    /// The program's stdout.
    Stdout,
    /// The program's stderr.
    Stderr,
}

/// One entry of `GET /v1/jobs/{id}/events` (a `data:` line of server-sent events): what
/// happened so far is replayed first, then entries follow as they happen; `end` is last.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum JobEvent {
    /// The job changed status (`running` once it has a sandbox).
    Status {
        /// The new status.
        status: JobStatus,
    },
    /// Output, in order per stream (invalid UTF-8 replaced; a character split between
    /// reads is kept whole).
    Output {
        /// Which stream.
        stream: JobStream,
        /// The text.
        data: String,
    },
    /// The job ended: its final record (the same as `GET /v1/jobs/{id}`).
    End {
        /// The job.
        job: Box<JobInfo>,
    },
}

/// cloude's job status, as `GET /status/{id}` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CloudeStatus {
    /// Queued.
    Pending,
    /// Running.
    Running,
    /// The program ran (whatever its exit code; a compile error is a run whose stderr is
    /// the compiler's).
    Done,
    /// It could not run, ran out of time, or was cancelled or interrupted.
    Error,
}

/// `GET /status/{id}`: a job in cloude's shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CloudeJob {
    /// The job's id.
    #[schema(value_type = String, pattern = "^job-[0-9a-f]{12}$")]
    pub id: JobId,
    /// Where it is.
    pub status: CloudeStatus,
    /// The exit code (the compiler's, for a compile error).
    pub exit_code: Option<i32>,
    /// The program's stdout.
    pub stdout: String,
    /// The program's stderr (the compiler's output for a compile error; kiln's reason for an
    /// error).
    pub stderr: String,
}

impl From<&JobInfo> for CloudeJob {
    fn from(j: &JobInfo) -> CloudeJob {
        let status = match j.status {
            JobStatus::Queued => CloudeStatus::Pending,
            JobStatus::Running => CloudeStatus::Running,
            JobStatus::Succeeded | JobStatus::Failed => CloudeStatus::Done,
            JobStatus::TimedOut
            | JobStatus::Cancelled
            | JobStatus::Interrupted
            | JobStatus::Error => CloudeStatus::Error,
        };
        let compile_failed = j
            .compile
            .as_ref()
            .filter(|c| c.exit_code != Some(0) && j.exit_code.is_none() && j.stdout.is_empty());
        let (exit_code, stderr) = match (compile_failed, status) {
            (Some(c), _) => (c.exit_code, c.output.clone()),
            (None, CloudeStatus::Error) => {
                let mut s = j.stderr.clone();
                if let Some(e) = &j.error {
                    if !s.is_empty() && !s.ends_with('\n') {
                        s.push('\n');
                    }
                    s.push_str(e);
                }
                (j.exit_code, s)
            }
            (None, _) => (j.exit_code, j.stderr.clone()),
        };
        CloudeJob {
            id: j.id.clone(),
            status,
            exit_code,
            stdout: j.stdout.clone(),
            stderr,
        }
    }
}

/// One language in `GET /v1/languages`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LanguageEntry {
    /// Its id (what a job's `language` resolves to).
    pub id: String,
    /// Its name for people (`C++`).
    pub name: String,
    /// Other names a job may give.
    pub aliases: Vec<String>,
    /// The image its jobs run in.
    pub image: String,
    /// Whether a job compiles before it runs.
    pub compiled: bool,
    /// The source file a program is written to.
    pub source_file: String,
    /// A command that runs the toolchain once on nothing: a good `warmup` for a pool of the
    /// language's image (`PUT /v1/pools/{image}`).
    pub warmup: Vec<String>,
    /// Whether its image is built (a job of an unbuilt image ends `error`).
    pub image_built: bool,
    /// The toolchain's version (the first line its version command prints), once known:
    /// asked of a sandbox of the image the first time, then kept per image build.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

/// `GET /v1/languages`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LanguageList {
    /// Every language, in kiln's order.
    pub languages: Vec<LanguageEntry>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_id_round_trips_and_rejects_tricks() {
        let id = JobId::random();
        assert_eq!(id.as_str().parse::<JobId>().unwrap(), id);
        for bad in [
            "",
            "job-",
            "ex-0123456789ab",
            "job-0123456789AB",
            "job-../../x",
        ] {
            assert!(bad.parse::<JobId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn validate_names_the_field_over_its_limit() {
        let ok = JobRequest::new("python", "print(1)");
        ok.validate().unwrap();
        let mut r = ok.clone();
        r.code = "x".repeat(MAX_JOB_CODE_BYTES + 1);
        assert!(r.validate().unwrap_err().to_string().starts_with("code is"));
        let mut r = ok.clone();
        r.timeout = Some(0);
        assert!(r.validate().unwrap_err().to_string().contains("timeout"));
        let mut r = ok.clone();
        r.max_output = Some(MAX_JOB_MAX_OUTPUT + 1);
        assert!(r.validate().unwrap_err().to_string().contains("max_output"));
        let mut r = ok.clone();
        r.env.insert("1BAD".into(), "v".into());
        assert!(r.validate().unwrap_err().to_string().contains("1BAD"));
        let mut r = ok.clone();
        r.args.push("a\0b".into());
        assert!(r.validate().unwrap_err().to_string().contains("args"));
        let mut r = ok;
        r.stdin = Some("x".repeat(MAX_JOB_STDIN_BYTES + 1));
        assert!(r.validate().unwrap_err().to_string().starts_with("stdin"));
    }

    #[test]
    fn job_files_must_stay_in_the_job_directory() {
        for good in ["data.txt", "lib/util.py", "a.b/c-d_e"] {
            validate_job_file(good).unwrap();
        }
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../b",
            "a//b",
            "./a",
            "a/",
            "a\\b",
        ] {
            assert!(validate_job_file(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err = serde_json::from_str::<JobRequest>(
            r#"{"language":"python","code":"print(1)","timeout_ms":5}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("timeout_ms"), "{err}");
    }

    fn job(status: JobStatus) -> JobInfo {
        JobInfo {
            status,
            ..JobInfo::queued(JobId::random(), "c", 1, 30, 1 << 20)
        }
    }

    #[test]
    fn cloude_shape_maps_statuses_and_compile_errors() {
        assert_eq!(
            CloudeJob::from(&job(JobStatus::Queued)).status,
            CloudeStatus::Pending
        );
        let mut failed = job(JobStatus::Failed);
        failed.exit_code = Some(3);
        failed.stderr = "bye\n".into();
        let c = CloudeJob::from(&failed);
        assert_eq!(
            (c.status, c.exit_code, c.stderr.as_str()),
            (CloudeStatus::Done, Some(3), "bye\n")
        );
        let mut broken = job(JobStatus::Failed);
        broken.compile = Some(JobCompile {
            exit_code: Some(1),
            output: "main.c:1: error".into(),
            output_truncated: false,
        });
        let c = CloudeJob::from(&broken);
        assert_eq!(
            (c.status, c.exit_code, c.stderr.as_str()),
            (CloudeStatus::Done, Some(1), "main.c:1: error")
        );
        let mut timed = job(JobStatus::TimedOut);
        timed.error = Some("ran past its timeout of 2 s".into());
        let c = CloudeJob::from(&timed);
        assert_eq!(c.status, CloudeStatus::Error);
        assert!(c.stderr.contains("timeout"), "{}", c.stderr);
    }

    #[test]
    fn statuses_parse_back() {
        for s in JobStatus::ALL {
            assert_eq!(s.as_str().parse::<JobStatus>().unwrap(), s);
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        assert!("done".parse::<JobStatus>().is_err());
    }
}
