//! `kiln job run` against a fake daemon: the real `kiln` binary, with `$KILN_HOME/kilnd.sock`
//! served by a small HTTP/1.1 server in this test that answers the job routes from a script
//! (chosen by the job's `language`) and records every request. No daemon, no VM.
//!
//! What is checked is the CLI's own decisions: a full queue (429 `queue_full`) is waited out
//! with one line on stderr; output is streamed from the events and, when the event stream
//! ends without `end` (here after an `event: lagged` entry, which is said on stderr), caught
//! up from `GET /v1/jobs/{id}?wait=` without printing anything twice; the exit code follows
//! the job's end (its own code, 124 timed out, 125 error); `--detach` and `--json`. And
//! `kiln bench jobs` against a daemon whose pools are ready at once: only built languages
//! are measured, the pools it set are put back as they were (size and warm-up), also when a
//! job's wrong output fails the bench naming the job.

mod common;

use std::path::Path;
use std::process::Output;
use std::sync::{Arc, Mutex};

use kiln_api_types::{
    API_VERSION, ApiError, Health, JanitorReport, JobCreated, JobEvent, JobId, JobInfo, JobRequest,
    JobStatus, JobStream,
};
use tokio::net::UnixListener;

/// Requests the fake daemon got: method and path (with query).
type Seen = Arc<Mutex<Vec<(String, String)>>>;

fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("serializable")
}

/// The scripts, by the job's language: the id they get.
fn id_of(language: &str) -> JobId {
    let n = match language {
        "lagged" => 1,
        "timeout" => 2,
        "error" => 3,
        _ => 9,
    };
    format!("job-{n:012x}").parse().expect("job id")
}

fn job(id: &JobId, status: JobStatus) -> JobInfo {
    JobInfo {
        status,
        finished_unix_ms: Some(2),
        warm: true,
        ..JobInfo::queued(id.clone(), "c", 1, 7, 1 << 20)
    }
}

/// The final record of each script.
fn final_job(id: &JobId) -> JobInfo {
    match id.as_str() {
        "job-000000000001" => {
            let mut j = job(id, JobStatus::Failed);
            j.exit_code = Some(3);
            j.compile = Some(kiln_api_types::JobCompile {
                exit_code: Some(0),
                output: "warning: unused\n".into(),
                output_truncated: false,
            });
            j.stdout = "hello\nworld\n".into();
            j.stderr = "oops\n".into();
            j
        }
        "job-000000000002" => {
            let mut j = job(id, JobStatus::TimedOut);
            j.stdout = "tick\n".into();
            j.error = Some("ran past its timeout of 7 s and was stopped".into());
            j
        }
        _ => {
            let mut j = job(id, JobStatus::Error);
            j.error = Some("image c is not built".into());
            j
        }
    }
}

fn sse(ev: &JobEvent) -> String {
    format!("data: {}\n\n", json(ev))
}

/// The event stream of each script.
fn events(id: &JobId) -> String {
    let out = |stream, data: &str| {
        sse(&JobEvent::Output {
            stream,
            data: data.into(),
        })
    };
    let running = sse(&JobEvent::Status {
        status: JobStatus::Running,
    });
    match id.as_str() {
        // Ends without `end` after part of stdout and a lagged entry.
        "job-000000000001" => format!(
            "{running}{}{}event: lagged\ndata: {{\"missed\":3}}\n\n",
            out(JobStream::Compile, "warning: unused\n"),
            out(JobStream::Stdout, "hello\n")
        ),
        "job-000000000002" => format!(
            "{running}{}{}",
            out(JobStream::Stdout, "tick\n"),
            sse(&JobEvent::End {
                job: Box::new(final_job(id))
            })
        ),
        _ => sse(&JobEvent::End {
            job: Box::new(final_job(id)),
        }),
    }
}

/// The fake daemon's answer: status, content type, body. The first create is refused as
/// `queue_full`.
fn answer(
    method: &str,
    path: &str,
    body: &[u8],
    creates: &Mutex<u32>,
) -> (u16, &'static str, String) {
    const JSON: &str = "application/json";
    let (route, _query) = path.split_once('?').unwrap_or((path, ""));
    let job_path = route
        .strip_prefix("/v1/jobs/")
        .map(|p| p.split('/').collect::<Vec<_>>());
    match (method, route, job_path.as_deref()) {
        ("GET", "/v1/health", _) => (
            200,
            JSON,
            json(&Health {
                api_version: API_VERSION,
                version: "fake".into(),
                pid: 1,
                janitor: JanitorReport::default(),
            }),
        ),
        ("POST", "/v1/jobs", _) => {
            let first = {
                let mut c = creates.lock().expect("lock");
                *c += 1;
                *c == 1
            };
            if first {
                return (
                    429,
                    JSON,
                    json(&ApiError {
                        code: "queue_full".into(),
                        message: "fake daemon: the job queue is full".into(),
                    }),
                );
            }
            let req: JobRequest = serde_json::from_slice(body).expect("a job request");
            (
                202,
                JSON,
                json(&JobCreated {
                    id: id_of(&req.language),
                }),
            )
        }
        ("GET", _, Some([id, "events"])) => {
            (200, "text/event-stream", events(&id.parse().expect("id")))
        }
        ("GET", _, Some([id])) => (200, JSON, json(&final_job(&id.parse().expect("id")))),
        _ => (
            404,
            JSON,
            json(&ApiError {
                code: "not_found".into(),
                message: format!("fake daemon: no route {method} {path}"),
            }),
        ),
    }
}

/// The job scripts' daemon: [`answer`], the first create refused as `queue_full`.
fn fake_daemon(socket: &Path) -> Seen {
    let creates = Mutex::new(0u32);
    serve(
        socket,
        Arc::new(move |method, path, body| answer(method, path, body, &creates)),
    )
}

/// A fake daemon's answer to one request (method, path with query, body): status, content
/// type, body.
type Handler = Arc<dyn Fn(&str, &str, &[u8]) -> (u16, &'static str, String) + Send + Sync>;

/// Serves HTTP/1.1 on `socket` with `handler` until the test ends.
fn serve(socket: &Path, handler: Handler) -> Seen {
    let listener = UnixListener::bind(socket).expect("bind the fake daemon's socket");
    let seen: Seen = Arc::default();
    let seen2 = Arc::clone(&seen);
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            let (seen, handler) = (Arc::clone(&seen2), Arc::clone(&handler));
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while let Some((method, path, body)) =
                    common::read_request(&mut conn, &mut buf).await
                {
                    let (status, ctype, answer) = handler(&method, &path, &body);
                    seen.lock().expect("lock").push((method, path));
                    if !common::write_answer(&mut conn, status, ctype, &answer).await {
                        return;
                    }
                }
            });
        }
    });
    seen
}

/// Runs the real `kiln` with `KILN_HOME=home`, off the async runtime's threads.
async fn kiln(home: &Path, args: &[&str]) -> Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.args(args)
        .env("KILN_HOME", home)
        .stdin(std::process::Stdio::null());
    tokio::task::spawn_blocking(move || cmd.output().expect("run kiln"))
        .await
        .expect("kiln ran")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_run_waits_out_a_full_queue_and_catches_up_once_after_the_stream_breaks() {
    let home = tempfile::tempdir().expect("home");
    let seen = fake_daemon(&home.path().join("kilnd.sock"));
    let out = kiln(
        home.path(),
        &["job", "run", "--language", "lagged", "--code", "x"],
    )
    .await;
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    // "hello\n" came as an event, "world\n" only from the record: each printed once.
    assert_eq!(stdout, "hello\nworld\n");
    assert_eq!(
        stderr
            .matches("kiln: the job queue is full; waiting…")
            .count(),
        1,
        "{stderr}"
    );
    assert_eq!(stderr.matches("warning: unused\n").count(), 1, "{stderr}");
    assert!(stderr.contains("missed 3 pieces of it"), "{stderr}");
    assert!(stderr.ends_with("oops\n"), "{stderr}");
    let seen = seen.lock().expect("lock");
    let creates = seen.iter().filter(|(m, _)| m == "POST").count();
    assert_eq!(creates, 2, "{seen:?}");
    assert!(
        seen.iter()
            .any(|(m, p)| m == "GET" && p == "/v1/jobs/job-000000000001?wait=60"),
        "{seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_run_exit_codes_say_timed_out_and_no_result() {
    let home = tempfile::tempdir().expect("home");
    let _seen = fake_daemon(&home.path().join("kilnd.sock"));
    let out = kiln(home.path(), &["go", "--language", "timeout", "--code", "x"]).await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(124), "{stderr}");
    assert_eq!(text(&out.stdout), "tick\n");
    assert!(
        stderr.contains("kiln: job job-000000000002 timed out: it ran longer than its 7 s"),
        "{stderr}"
    );

    let out = kiln(
        home.path(),
        &["job", "run", "--language", "error", "--code", "x"],
    )
    .await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{stderr}");
    assert!(
        stderr.contains("kiln: job job-000000000003 error: image c is not built"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_run_detach_prints_the_id_and_json_prints_the_record() {
    let home = tempfile::tempdir().expect("home");
    let seen = fake_daemon(&home.path().join("kilnd.sock"));
    let out = kiln(
        home.path(),
        &[
            "job",
            "run",
            "--language",
            "timeout",
            "--code",
            "x",
            "--detach",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "job-000000000002\n");
    assert!(
        !seen
            .lock()
            .expect("lock")
            .iter()
            .any(|(_, p)| p.contains("events")),
        "a detached run does not follow the job"
    );

    let out = kiln(
        home.path(),
        &[
            "job",
            "run",
            "--language",
            "timeout",
            "--code",
            "x",
            "--json",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(124), "{}", text(&out.stderr));
    let job: JobInfo = serde_json::from_slice(&out.stdout).expect("stdout is a JobInfo");
    assert_eq!(
        (job.status, job.stdout.as_str()),
        (JobStatus::TimedOut, "tick\n")
    );
}

/// The pools of the bench's fake daemon: image → (size, warm-up), and every `PUT` in order.
#[derive(Default)]
struct FakePools {
    now: std::collections::BTreeMap<String, (u32, Option<Vec<String>>)>,
    puts: Vec<(String, u32, Option<Vec<String>>)>,
}

/// A daemon for `kiln bench jobs`: python and bash built (rust not), a python pool of 3
/// with a warm-up before the bench, pools ready at once, every job a warm hello world —
/// except the `bad_job`-th, which prints `hell`.
fn bench_daemon(socket: &Path, bad_job: u32) -> (Seen, Arc<Mutex<FakePools>>) {
    use kiln_api_types::{
        LanguageEntry, LanguageList, MachineSpec, PoolInfo, PoolList, PoolOrigin, PoolSetRequest,
    };
    const JSON: &str = "application/json";
    let pools = Arc::new(Mutex::new(FakePools::default()));
    pools.lock().expect("lock").now.insert(
        "python".into(),
        (3, Some(vec!["python3".into(), "-c".into(), "pass".into()])),
    );
    let jobs = Mutex::new(Vec::<String>::new());
    let state = Arc::clone(&pools);
    let lang = |id: &str, built: bool| LanguageEntry {
        id: id.into(),
        name: id.into(),
        aliases: Vec::new(),
        image: id.into(),
        compiled: false,
        source_file: "main".into(),
        warmup: vec!["toolchain".into()],
        image_built: built,
        version: None,
    };
    let languages = LanguageList {
        languages: vec![
            lang("python", true),
            lang("rust", false),
            lang("bash", true),
        ],
    };
    let seen = serve(
        socket,
        Arc::new(move |method, path, body| {
            let (route, _) = path.split_once('?').unwrap_or((path, ""));
            match (method, route) {
                ("GET", "/v1/health") => (
                    200,
                    JSON,
                    json(&Health {
                        api_version: API_VERSION,
                        version: "fake".into(),
                        pid: 1,
                        janitor: JanitorReport::default(),
                    }),
                ),
                ("GET", "/v1/languages") => (200, JSON, json(&languages)),
                ("GET", "/v1/pools") => {
                    let pools = state.lock().expect("lock");
                    let list = pools
                        .now
                        .iter()
                        .filter(|(_, (size, _))| *size > 0)
                        .map(|(image, (size, warmup))| PoolInfo {
                            image: image.parse().expect("image"),
                            machine: MachineSpec::default(),
                            size: *size,
                            ready: *size,
                            filling: 0,
                            handed_out: 0,
                            misses: 0,
                            warmup: warmup.clone(),
                            origin: PoolOrigin::Api,
                            last_error: None,
                        })
                        .collect();
                    (200, JSON, json(&PoolList { pools: list }))
                }
                ("PUT", p) if p.starts_with("/v1/pools/") => {
                    let image = p.trim_start_matches("/v1/pools/").to_owned();
                    let req: PoolSetRequest = serde_json::from_slice(body).expect("pool set");
                    let mut pools = state.lock().expect("lock");
                    pools
                        .puts
                        .push((image.clone(), req.size, req.warmup.clone()));
                    pools
                        .now
                        .insert(image.clone(), (req.size, req.warmup.clone()));
                    let info = PoolInfo {
                        image: image.parse().expect("image"),
                        machine: MachineSpec::default(),
                        size: req.size,
                        ready: req.size,
                        filling: 0,
                        handed_out: 0,
                        misses: 0,
                        warmup: req.warmup,
                        origin: PoolOrigin::Api,
                        last_error: None,
                    };
                    (200, JSON, json(&info))
                }
                ("POST", "/v1/jobs") => {
                    let req: JobRequest = serde_json::from_slice(body).expect("a job request");
                    let mut jobs = jobs.lock().expect("lock");
                    jobs.push(req.language);
                    let id: JobId = format!("job-{:012x}", jobs.len()).parse().expect("id");
                    (202, JSON, json(&JobCreated { id }))
                }
                ("GET", p) if p.starts_with("/v1/jobs/") => {
                    let id: JobId = p.trim_start_matches("/v1/jobs/").parse().expect("id");
                    let n = u32::from_str_radix(&id.as_str()[4..], 16).expect("hex");
                    let language = jobs.lock().expect("lock")[n as usize - 1].clone();
                    let mut j = job(&id, JobStatus::Succeeded);
                    j.language = language;
                    j.exit_code = Some(0);
                    j.stdout = if n == bad_job { "hell\n" } else { "hello\n" }.into();
                    j.timing.total_ms = Some(10);
                    j.timing.acquire_ms = Some(2);
                    j.timing.run_ms = Some(5);
                    (200, JSON, json(&j))
                }
                _ => (
                    404,
                    JSON,
                    json(&ApiError {
                        code: "not_found".into(),
                        message: format!("fake daemon: no route {method} {path}"),
                    }),
                ),
            }
        }),
    );
    (seen, pools)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_jobs_measures_built_languages_and_puts_the_pools_back() {
    let home = tempfile::tempdir().expect("home");
    let (_seen, pools) = bench_daemon(&home.path().join("kilnd.sock"), 0);
    let out = kiln(
        home.path(),
        &[
            "bench",
            "jobs",
            "--runs",
            "2",
            "--throughput-jobs",
            "3",
            "--json",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(v["languages"], serde_json::json!(["python", "bash"]), "{v}");
    assert_eq!(v["submit_to_result_ms"]["python"]["n"], 2, "{v}");
    assert_eq!(v["warm_runs"]["bash"], 2, "{v}");
    assert_eq!(v["job_total_ms_p50"]["python"], 10.0, "{v}");
    assert!(v["job_compile_ms_p50"]["python"].is_null(), "{v}");
    assert!(
        v["jobs_per_min_pool"].as_f64().is_some_and(|r| r > 0.0),
        "{v}"
    );
    assert!(v["throughput_pool_vs_no_pool"].as_f64().is_some(), "{v}");
    let pools = pools.lock().expect("lock");
    // Python: emptied and set to 1 before each of its runs, the warm-up alternating between
    // `true` and the language's own; 0 after them; 2 and 0 for the throughput halves;
    // then as it was.
    let python: Vec<(u32, Option<Vec<String>>)> = pools
        .puts
        .iter()
        .filter(|(i, ..)| i == "python")
        .map(|(_, s, w)| (*s, w.clone()))
        .collect();
    let own = Some(vec!["toolchain".to_owned()]);
    let sizes: Vec<u32> = python.iter().map(|(s, _)| *s).collect();
    assert_eq!(
        sizes,
        [0, 1, 0, 1, 0, 1, 0, 1, 0, 2, 0, 3],
        "{:?}",
        pools.puts
    );
    let warmups: Vec<&Option<Vec<String>>> = python
        .iter()
        .filter(|(s, _)| *s == 1)
        .map(|(_, w)| w)
        .collect();
    let plain = Some(vec!["true".to_owned()]);
    assert_eq!(warmups, [&plain, &own, &plain, &own], "{:?}", pools.puts);
    assert_eq!(v["submit_to_result_ms_warmup"]["python"]["n"], 2, "{v}");
    assert_eq!(
        pools.now.get("python"),
        Some(&(3, Some(vec!["python3".into(), "-c".into(), "pass".into()])))
    );
    assert_eq!(pools.now.get("bash"), Some(&(0, None)));
    assert!(
        !pools.now.contains_key("rust"),
        "an unbuilt language is left out"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_jobs_a_wrong_result_fails_naming_the_job_and_still_restores_pools() {
    let home = tempfile::tempdir().expect("home");
    // The 6th job: bash's second (python's four come first: two runs of each warm-up).
    let (_seen, pools) = bench_daemon(&home.path().join("kilnd.sock"), 6);
    let out = kiln(
        home.path(),
        &["bench", "jobs", "--runs", "2", "--throughput-jobs", "3"],
    )
    .await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("job job-000000000006 (bash) printed \"hell\\n\" instead of \"hello\\n\""),
        "{stderr}"
    );
    assert!(
        text(&out.stdout).is_empty(),
        "no numbers from a failed bench"
    );
    let pools = pools.lock().expect("lock");
    assert_eq!(
        pools.now.get("python").map(|p| p.0),
        Some(3),
        "{:?}",
        pools.puts
    );
    assert_eq!(
        pools.now.get("bash").map(|p| p.0),
        Some(0),
        "{:?}",
        pools.puts
    );
}
