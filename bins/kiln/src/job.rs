//! `kiln job run|status|ls|cancel|languages` and `kiln go`: programs in one of kiln's
//! languages, each run once in a fresh sandbox of its language's image by the daemon's job
//! queue.
//!
//! Owns: turning command-line options into a [`JobRequest`] (local files read and checked
//! here, before the daemon is asked for), and the commands' output. Following a submitted
//! job and what its end means for the exit code are `job_result.rs`'s.
//! Must not: know which languages exist or check a language name (the daemon does, and
//! answers 400 naming the language), nor run anything itself.
//!
//! Exit codes of `kiln job run` / `kiln go` (as `kiln run`'s where they overlap):
//! the program's exit code; 128+N if signal N killed it; 124 if it ran past `--timeout`;
//! 1 if it did not compile; 125 if the job ended `error`, `cancelled` or `interrupted` (kiln
//! could not give a result: 125 as docker and podman use it, since 1 is a program's own
//! failure); 130 on Ctrl-C (the job is cancelled). Errors before the job exists (bad
//! options, no daemon, 400 from the daemon) are kiln's usual `kiln: ...` and exit 1.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use kiln_api_types::jobs::validate_job_file;
use kiln_api_types::{
    JobCreated, JobId, JobInfo, JobList, JobRequest, JobStatus, JobSummary, LanguageEntry,
};
use kiln_client::{Client, ClientHome};

use crate::job_result::{Echo, exit_code, follow, notes, submit, wait_final};

/// Exit code on Ctrl-C (the job is cancelled).
const EXIT_INTERRUPTED: i32 = 130;

/// `kiln job ...`.
#[derive(Debug, Subcommand)]
pub enum JobCmd {
    /// Run a program once in a fresh sandbox of its language's image; by default wait for
    /// it, streaming its output, and exit with its exit code.
    Run(JobRunArgs),
    /// Show a job: status, exit code, timings, output.
    Status {
        /// The job's id (`job-` and 12 hex digits).
        id: JobId,
        /// Wait up to this many seconds for the job to end first (at most 300).
        #[arg(long, value_name = "SECS")]
        wait: Option<u64>,
        /// Print the job as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List jobs, newest first.
    Ls {
        /// Only jobs with this status (queued, running, succeeded, failed, timed_out,
        /// cancelled, interrupted, error).
        #[arg(long)]
        status: Option<JobStatus>,
        /// Only jobs of this language.
        #[arg(long)]
        language: Option<String>,
        /// At most this many jobs.
        #[arg(long)]
        limit: Option<u32>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Cancel a queued or running job (its sandbox is removed).
    Cancel {
        /// The job's id.
        id: JobId,
        /// Print the job as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The languages jobs can use: aliases, whether they compile, their image and version.
    Languages {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Options of `kiln job run` and `kiln go`.
#[derive(Debug, Args)]
pub struct JobRunArgs {
    /// The language: python, node, ruby, go, rust, c, cpp, bash, or an alias (`kiln job
    /// languages`).
    #[arg(long)]
    pub language: String,
    /// Read the program from this file (`-`: kiln's stdin).
    #[arg(long, value_name = "FILE", required_unless_present = "code")]
    pub file: Option<String>,
    /// The program's source, given inline.
    #[arg(long, value_name = "CODE", conflicts_with = "file")]
    pub code: Option<String>,
    /// Give the program this file as its stdin (`-`: kiln's own stdin); default: nothing.
    #[arg(long, value_name = "FILE")]
    pub stdin: Option<String>,
    /// An argument for the program (repeatable, in order).
    #[arg(long = "arg", value_name = "ARG", allow_hyphen_values = true)]
    pub args: Vec<String>,
    /// An environment variable of the compile and run steps (repeatable).
    #[arg(long = "env", value_name = "K=V")]
    pub env: Vec<String>,
    /// Stop the job after this many seconds, compile and run together (default 30, at most
    /// 3600; exit code 124).
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u64>,
    /// Output kept per stream, bytes (default 1 MiB, at most 16 MiB); a program that writes
    /// more is stopped.
    #[arg(long, value_name = "BYTES")]
    pub max_output: Option<u64>,
    /// Put the local file LOCALFILE beside the program as PATH (relative; repeatable).
    #[arg(long = "file-add", value_name = "PATH=LOCALFILE")]
    pub file_add: Vec<String>,
    /// Wait for the job and stream its output (the default).
    #[arg(long, conflicts_with = "detach")]
    pub wait: bool,
    /// Print the job's id and exit at once (`kiln job status ID` shows it later).
    #[arg(long)]
    pub detach: bool,
    /// Print the finished job as JSON instead of its output (with --detach: the id).
    #[arg(long)]
    pub json: bool,
}

impl JobRunArgs {
    /// The request these options describe, reading the local files they name through
    /// `stdin` for `-`; errors name the option.
    fn request(&self, stdin: &mut dyn Read) -> anyhow::Result<JobRequest> {
        if self.file.as_deref() == Some("-") && self.stdin.as_deref() == Some("-") {
            bail!("--file - and --stdin - both want kiln's stdin; give one of them a file");
        }
        let env = parse_env(&self.env)?;
        let adds = parse_file_adds(&self.file_add)?;
        let code = match (&self.file, &self.code) {
            (Some(path), _) => read_text("--file", path, stdin)?,
            (None, Some(code)) => code.clone(),
            (None, None) => bail!("no program given: use --file FILE or --code CODE"),
        };
        let mut req = JobRequest::new(self.language.clone(), code);
        if let Some(path) = &self.stdin {
            req.stdin = Some(read_text("--stdin", path, stdin)?);
        }
        for (path, local) in adds {
            let what = format!("--file-add {path}");
            let bytes = std::fs::read(&local)
                .with_context(|| format!("{what}: cannot read {}", local.display()))?;
            let text = String::from_utf8(bytes).map_err(|_| {
                anyhow::anyhow!(
                    "{what}: {} is not UTF-8 text (a job's files are text)",
                    local.display()
                )
            })?;
            req.files.insert(path, text);
        }
        req.args = self.args.clone();
        req.env = env;
        req.timeout = self.timeout;
        req.max_output = self.max_output;
        req.validate()
            .map_err(|e| anyhow::anyhow!("invalid job: {e}"))?;
        Ok(req)
    }
}

/// `--env K=V`... as a map; a missing `=`, an empty name or a name given twice is an error
/// naming the option.
pub fn parse_env(items: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    let mut env = BTreeMap::new();
    for kv in items {
        let Some((k, v)) = kv.split_once('=') else {
            bail!("--env {kv:?}: expected NAME=VALUE");
        };
        if k.is_empty() {
            bail!("--env {kv:?}: the variable name is empty");
        }
        if env.insert(k.to_owned(), v.to_owned()).is_some() {
            bail!("--env {k}: given twice");
        }
    }
    Ok(env)
}

/// `--file-add PATH=LOCALFILE`... as (path in the job, local file); PATH is checked as the
/// daemon will (relative, plain components), and may not be given twice.
pub fn parse_file_adds(items: &[String]) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let mut out: Vec<(String, PathBuf)> = Vec::new();
    for item in items {
        let Some((path, local)) = item.split_once('=') else {
            bail!("--file-add {item:?}: expected PATH=LOCALFILE");
        };
        if local.is_empty() {
            bail!("--file-add {item:?}: the local file is empty");
        }
        validate_job_file(path).map_err(|e| anyhow::anyhow!("--file-add {item:?}: {e}"))?;
        if out.iter().any(|(p, _)| p == path) {
            bail!("--file-add {path}: given twice");
        }
        out.push((path.to_owned(), PathBuf::from(local)));
    }
    Ok(out)
}

/// A local file (or `stdin` for `-`) as text; errors name the option and the file.
fn read_text(option: &str, path: &str, stdin: &mut dyn Read) -> anyhow::Result<String> {
    let mut bytes = Vec::new();
    if path == "-" {
        stdin
            .read_to_end(&mut bytes)
            .with_context(|| format!("{option} -: cannot read kiln's stdin"))?;
    } else {
        bytes = std::fs::read(path).with_context(|| format!("{option}: cannot read {path}"))?;
    }
    String::from_utf8(bytes)
        .map_err(|_| anyhow::anyhow!("{option} {path}: not UTF-8 text (jobs take text)"))
}

/// Runs `kiln job run` / `kiln go`; returns the exit code. The request (and the local
/// files it reads) is checked before the daemon is asked for, or started.
pub async fn run(home: &ClientHome, a: &JobRunArgs) -> anyhow::Result<i32> {
    let req = a.request(&mut std::io::stdin().lock())?;
    kiln_client::config::Config::load(&home.config())?;
    let client = &Client::connect(home).await?;
    let id = submit(client, &req, &Cell::new(false)).await?;
    if a.detach {
        if a.json {
            println!(
                "{}",
                serde_json::to_string_pretty(&JobCreated { id: id.clone() })?
            );
        } else {
            println!("{id}");
        }
        return Ok(0);
    }
    let waited = async {
        if a.json {
            wait_final(client, &id).await
        } else {
            follow(
                client,
                &id,
                &mut Echo::new(std::io::stdout(), std::io::stderr()),
            )
            .await
        }
    };
    let job = tokio::select! {
        job = waited => job?,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("kiln: interrupted; cancelling job {id}");
            client.job_cancel(&id).await.with_context(|| format!("cancelling job {id} failed"))?;
            return Ok(EXIT_INTERRUPTED);
        }
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&job)?);
    } else {
        for line in notes(&job) {
            eprintln!("{line}");
        }
    }
    Ok(exit_code(&job))
}

/// Runs a `kiln job` subcommand.
/// (`run` is [`run`], dispatched before the daemon is connected to.)
pub async fn cmd(client: &Client, cmd: &JobCmd) -> anyhow::Result<i32> {
    match cmd {
        JobCmd::Run(_) => unreachable!("kiln job run is dispatched to job::run"),
        JobCmd::Status { id, wait, json } => {
            let job = client.job_get(id, *wait).await?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&job)?);
            } else {
                print!("{}", describe(&job));
            }
            Ok(0)
        }
        JobCmd::Ls {
            status,
            language,
            limit,
            json,
        } => {
            let limit = limit.map(|n| n.to_string());
            let mut filters: Vec<(&str, &str)> = Vec::new();
            if let Some(s) = status {
                filters.push(("status", s.as_str()));
            }
            if let Some(l) = language {
                filters.push(("language", l));
            }
            if let Some(n) = &limit {
                filters.push(("limit", n));
            }
            let list: JobList = client.job_list(&filters).await?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                print!("{}", jobs_table(&list.jobs));
            }
            Ok(0)
        }
        JobCmd::Cancel { id, json } => {
            let job = client.job_cancel(id).await?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&job)?);
            } else if job.status == JobStatus::Cancelled {
                println!("job {}: cancelled", job.id);
            } else {
                println!("job {} had already ended: {}", job.id, job.status);
            }
            Ok(0)
        }
        JobCmd::Languages { json } => {
            let list = client.language_list().await?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                print!("{}", languages_table(&list.languages));
            }
            Ok(0)
        }
    }
}

fn ms(v: Option<u64>) -> String {
    v.map_or("-".to_owned(), |m| format!("{m} ms"))
}

/// `kiln job status`'s text: the record, then the output blocks that are not empty.
fn describe(job: &JobInfo) -> String {
    let mut s = String::new();
    let mut line = |k: &str, v: String| s.push_str(&format!("{k:<10} {v}\n"));
    line("id:", job.id.to_string());
    line("language:", job.language.clone());
    let mut status = job.status.to_string();
    if let Some(p) = job.queue_position {
        status.push_str(&format!(" (position {p} in the queue)"));
    }
    line("status:", status);
    line(
        "exit:",
        match (job.exit_code, job.signal) {
            (_, Some(sig)) => format!("killed by signal {sig}"),
            (Some(c), None) => c.to_string(),
            (None, None) => "-".to_owned(),
        },
    );
    let t = &job.timing;
    line(
        "timing:",
        format!(
            "queued {}, acquire {}, setup {}, compile {}, run {}, total {}",
            ms(t.queued_ms),
            ms(t.acquire_ms),
            ms(t.setup_ms),
            ms(t.compile_ms),
            ms(t.run_ms),
            ms(t.total_ms)
        ),
    );
    line(
        "warm:",
        match (job.warm, job.source) {
            (true, _) => "yes (from the pool)".to_owned(),
            (false, Some(src)) => format!("no ({})", src.as_str()),
            (false, None) => "no".to_owned(),
        },
    );
    line(
        "limits:",
        format!(
            "timeout {} s, output {} bytes per stream",
            job.timeout_secs, job.max_output
        ),
    );
    line("created:", crate::ps::ago(job.created_unix_ms / 1000));
    if let Some(e) = &job.error {
        line("error:", e.clone());
    }
    let mut block = |name: String, text: &str, cut: bool| {
        if text.is_empty() {
            return;
        }
        s.push_str(&format!(
            "--- {name}{} ---\n{text}",
            if cut { " (cut at the limit)" } else { "" }
        ));
        if !text.ends_with('\n') {
            s.push('\n');
        }
    };
    if let Some(c) = &job.compile {
        let code = c
            .exit_code
            .map_or("killed".to_owned(), |c| format!("exit {c}"));
        block(format!("compile ({code})"), &c.output, c.output_truncated);
    }
    block("stdout".into(), &job.stdout, job.stdout_truncated);
    block("stderr".into(), &job.stderr, job.stderr_truncated);
    s
}

/// `kiln job ls`'s table.
fn jobs_table(jobs: &[JobSummary]) -> String {
    let mut out = format!(
        "{:<16} {:<9} {:<11} {:>5} {:>9} {:<4}  CREATED\n",
        "ID", "LANGUAGE", "STATUS", "EXIT", "TOTAL", "WARM"
    );
    for j in jobs {
        out.push_str(&format!(
            "{:<16} {:<9} {:<11} {:>5} {:>9} {:<4}  {}\n",
            j.id.as_str(),
            j.language,
            j.status.as_str(),
            j.exit_code.map_or("-".to_owned(), |c| c.to_string()),
            j.total_ms.map_or("-".to_owned(), |m| format!("{m}ms")),
            if j.warm { "yes" } else { "no" },
            crate::ps::ago(j.created_unix_ms / 1000)
        ));
    }
    out
}

/// `kiln job languages`' table; columns as wide as their longest cell (aliases grow).
fn languages_table(langs: &[LanguageEntry]) -> String {
    let rows: Vec<[String; 6]> = langs
        .iter()
        .map(|l| {
            [
                l.id.clone(),
                l.name.clone(),
                if l.aliases.is_empty() {
                    "-".to_owned()
                } else {
                    l.aliases.join(",")
                },
                if l.compiled { "yes" } else { "no" }.to_owned(),
                format!(
                    "{} ({})",
                    l.image,
                    if l.image_built { "built" } else { "not built" }
                ),
                l.version.clone().unwrap_or_else(|| "-".to_owned()),
            ]
        })
        .collect();
    let head = ["ID", "NAME", "ALIASES", "COMPILED", "IMAGE", "VERSION"].map(str::to_owned);
    let mut width = [0usize; 6];
    for row in std::iter::once(&head).chain(&rows) {
        for (w, cell) in width.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(&head).chain(&rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  ", w = width[i]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job_result::tests::job;
    use clap::Parser;

    #[test]
    fn env_parse_splits_at_the_first_equals_and_names_bad_items() {
        let env = parse_env(&["A=1".into(), "B=x=y".into(), "C=".into()]).unwrap();
        assert_eq!(env.get("B").map(String::as_str), Some("x=y"));
        assert_eq!(env.get("C").map(String::as_str), Some(""));
        let e = parse_env(&["NOEQUALS".into()]).unwrap_err().to_string();
        assert!(
            e.contains("--env \"NOEQUALS\"") && e.contains("NAME=VALUE"),
            "{e}"
        );
        let e = parse_env(&["=v".into()]).unwrap_err().to_string();
        assert!(e.contains("name is empty"), "{e}");
        let e = parse_env(&["A=1".into(), "A=2".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--env A: given twice"), "{e}");
    }

    #[test]
    fn file_add_parse_checks_the_job_path() {
        let adds = parse_file_adds(&["lib/util.py=./util.py".into()]).unwrap();
        assert_eq!(adds, [("lib/util.py".into(), PathBuf::from("./util.py"))]);
        for (bad, says) in [
            ("util.py", "PATH=LOCALFILE"),
            ("util.py=", "local file is empty"),
            ("../x=y", "plain name"),
            ("/etc/passwd=y", "relative"),
        ] {
            let e = parse_file_adds(&[bad.into()]).unwrap_err().to_string();
            assert!(e.contains("--file-add") && e.contains(says), "{bad}: {e}");
        }
        let e = parse_file_adds(&["a=x".into(), "a=y".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("given twice"), "{e}");
    }

    fn run_args(argv: &[&str]) -> JobRunArgs {
        let mut full = vec!["kiln", "job", "run"];
        full.extend_from_slice(argv);
        match crate::Cli::try_parse_from(full).unwrap().cmd {
            crate::Cmd::Job(JobCmd::Run(a)) => a,
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn request_reads_program_and_stdin_from_files_and_kilns_stdin() {
        let dir = tempfile::tempdir().unwrap();
        let prog = dir.path().join("main.py");
        std::fs::write(&prog, "print(input())\n").unwrap();
        let data = dir.path().join("data.txt");
        std::fs::write(&data, "payload").unwrap();
        let a = run_args(&[
            "--language",
            "py",
            "--file",
            prog.to_str().unwrap(),
            "--stdin",
            "-",
            "--arg",
            "-v",
            "--arg",
            "x",
            "--env",
            "K=V",
            "--timeout",
            "5",
            "--max-output",
            "100",
            "--file-add",
            &format!("data.txt={}", data.display()),
        ]);
        let req = a.request(&mut &b"from stdin"[..]).unwrap();
        assert_eq!(req.language, "py");
        assert_eq!(req.code, "print(input())\n");
        assert_eq!(req.stdin.as_deref(), Some("from stdin"));
        assert_eq!(req.args, ["-v", "x"]);
        assert_eq!(req.env.get("K").map(String::as_str), Some("V"));
        assert_eq!((req.timeout, req.max_output), (Some(5), Some(100)));
        assert_eq!(
            req.files.get("data.txt").map(String::as_str),
            Some("payload")
        );

        let a = run_args(&["--language", "c", "--code", "int main(){}", "--stdin", "-"]);
        assert_eq!(
            a.request(&mut &b"in"[..]).unwrap().stdin.as_deref(),
            Some("in")
        );

        let a = run_args(&["--language", "c", "--file", "-", "--stdin", "-"]);
        let e = a.request(&mut &b""[..]).unwrap_err().to_string();
        assert!(e.contains("both want kiln's stdin"), "{e}");

        let missing = dir.path().join("nope.py");
        let a = run_args(&["--language", "c", "--file", missing.to_str().unwrap()]);
        let e = format!("{:#}", a.request(&mut &b""[..]).unwrap_err());
        assert!(
            e.contains("--file: cannot read") && e.contains("nope.py"),
            "{e}"
        );

        let a = run_args(&["--language", "c", "--code", "x", "--timeout", "0"]);
        let e = a.request(&mut &b""[..]).unwrap_err().to_string();
        assert!(e.contains("invalid job") && e.contains("timeout"), "{e}");

        let a = run_args(&["--language", "c", "--file", "-"]);
        let e = a.request(&mut &[0xffu8, 0xfe][..]).unwrap_err().to_string();
        assert!(e.contains("not UTF-8"), "{e}");
    }

    #[test]
    fn cli_parses_the_job_commands_and_refuses_bad_ones() {
        use crate::Cli;
        let ok = |argv: &[&str]| {
            Cli::try_parse_from(argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
        };
        let bad = |argv: &[&str]| {
            assert!(Cli::try_parse_from(argv).is_err(), "{argv:?} parsed");
        };
        ok(&[
            "kiln",
            "job",
            "run",
            "--language",
            "python",
            "--code",
            "print(1)",
        ]);
        ok(&[
            "kiln",
            "job",
            "run",
            "--language",
            "c",
            "--file",
            "m.c",
            "--wait",
            "--json",
        ]);
        ok(&[
            "kiln",
            "job",
            "run",
            "--language",
            "c",
            "--file",
            "-",
            "--detach",
        ]);
        ok(&["kiln", "go", "--language", "go", "--file", "main.go"]);
        ok(&[
            "kiln",
            "go",
            "--language",
            "go",
            "--file",
            "main.go",
            "--arg",
            "1",
            "--timeout",
            "9",
        ]);
        ok(&[
            "kiln",
            "job",
            "status",
            "job-0123456789ab",
            "--wait",
            "10",
            "--json",
        ]);
        ok(&[
            "kiln",
            "job",
            "ls",
            "--status",
            "timed_out",
            "--language",
            "rust",
            "--limit",
            "5",
        ]);
        ok(&["kiln", "job", "cancel", "job-0123456789ab", "--json"]);
        ok(&["kiln", "job", "languages", "--json"]);

        // No program, both programs, both modes.
        bad(&["kiln", "job", "run", "--language", "python"]);
        bad(&[
            "kiln",
            "job",
            "run",
            "--language",
            "c",
            "--file",
            "a",
            "--code",
            "b",
        ]);
        bad(&[
            "kiln",
            "job",
            "run",
            "--language",
            "c",
            "--code",
            "b",
            "--wait",
            "--detach",
        ]);
        // No language.
        bad(&["kiln", "go", "--file", "main.go"]);
        bad(&[
            "kiln",
            "job",
            "run",
            "--language",
            "c",
            "--code",
            "x",
            "--timeout",
            "soon",
        ]);
        bad(&["kiln", "job", "status", "sb-0123456789ab"]);
        bad(&["kiln", "job", "ls", "--status", "done"]);
        bad(&["kiln", "job", "cancel"]);
    }

    #[test]
    fn describe_and_tables_show_the_fields() {
        let mut j = job(JobStatus::Failed);
        j.exit_code = Some(3);
        j.stdout = "out".into();
        j.stderr_truncated = true;
        j.stderr = "err\n".into();
        j.timing.total_ms = Some(120);
        j.warm = true;
        let d = describe(&j);
        assert!(d.contains("status:    failed\n"), "{d}");
        assert!(d.contains("exit:      3\n"), "{d}");
        assert!(d.contains("total 120 ms"), "{d}");
        assert!(d.contains("yes (from the pool)"), "{d}");
        assert!(d.contains("--- stdout ---\nout\n"), "{d}");
        assert!(
            d.contains("--- stderr (cut at the limit) ---\nerr\n"),
            "{d}"
        );
        assert!(!d.contains("--- compile"), "{d}");

        let t = jobs_table(&[JobSummary::from(&j)]);
        let cols: Vec<&str> = t.lines().nth(1).unwrap().split_whitespace().collect();
        assert_eq!(
            cols[..6],
            ["job-0123456789ab", "c", "failed", "3", "120ms", "yes"],
            "{t}"
        );

        let lang = |id: &str, aliases: &[&str], built| LanguageEntry {
            id: id.into(),
            name: id.to_uppercase(),
            aliases: aliases.iter().map(|a| (*a).to_owned()).collect(),
            image: id.into(),
            compiled: id == "cpp",
            source_file: "main".into(),
            warmup: vec!["true".into()],
            image_built: built,
            version: None,
        };
        let t = languages_table(&[
            lang("cpp", &["c++", "cxx"], false),
            lang("node", &["js", "javascript", "nodejs", "node.js"], true),
        ]);
        let cols: Vec<&str> = t.lines().nth(1).unwrap().split_whitespace().collect();
        assert_eq!(
            cols,
            ["cpp", "CPP", "c++,cxx", "yes", "cpp", "(not", "built)", "-"],
            "{t}"
        );
        // A long alias list widens its column: the columns after it stay aligned.
        let lines: Vec<&str> = t.lines().collect();
        let image_at = lines[0].find("IMAGE").unwrap();
        assert_eq!(lines[1].find("cpp (not built)"), Some(image_at), "{t}");
        assert_eq!(lines[2].find("node (built)"), Some(image_at), "{t}");
    }
}
