//! `kiln clone` against a fake daemon: the real `kiln` binary, with `$KILN_HOME/kilnd.sock`
//! served by a small HTTP/1.1 server in this test that answers from a script and records
//! every request. No daemon, no VM.
//!
//! What is checked is the CLI's own decisions: `--publish` with `--count` above 1 is refused
//! before anything starts, and a clone of N where one start fails removes the ones that did
//! start (all or nothing) and fails naming the error.

mod common;

use std::path::Path;
use std::process::Output;
use std::sync::{Arc, Mutex};

use kiln_api_types::{
    API_VERSION, ApiError, Health, JanitorReport, SandboxId, SandboxInfo, SandboxSpec,
    SandboxState, SandboxStatus, StartSource,
};
use tokio::net::UnixListener;

/// One request the fake daemon got: method and path.
type Seen = Arc<Mutex<Vec<(String, String)>>>;

fn info(id: &SandboxId) -> SandboxInfo {
    SandboxInfo {
        id: id.clone(),
        spec: SandboxSpec::default(),
        status: SandboxStatus {
            network: None,
            state: SandboxState::Running,
            image: "base".parse().expect("image name"),
            image_id: "0123456789ab".into(),
            cpus: 1,
            memory_mib: 256,
            accel: "tcg".into(),
            created_unix: 1,
            boot_ms: Some(1),
            error: None,
            warnings: Vec::new(),
            source: StartSource::Snapshot,
            snapshot: Some("snap".into()),
            expires_unix: None,
        },
    }
}

/// The fake daemon's answer to one request: status and JSON body.
fn answer(method: &str, path: &str, creates: &Mutex<u32>, fail_create: u32) -> (u16, String) {
    match (method, path) {
        ("GET", "/v1/health") => (
            200,
            json(&Health {
                api_version: API_VERSION,
                version: "fake".into(),
                pid: 1,
                janitor: JanitorReport::default(),
            }),
        ),
        ("POST", "/v1/sandboxes") => {
            let n = {
                let mut c = creates.lock().expect("lock");
                *c += 1;
                *c
            };
            if n == fail_create {
                (
                    500,
                    json(&ApiError {
                        code: "sandbox_failed".into(),
                        message: "fake daemon: this start fails".into(),
                    }),
                )
            } else {
                (201, json(&info(&SandboxId::random())))
            }
        }
        ("DELETE", p) if p.starts_with("/v1/sandboxes/") => (204, String::new()),
        _ => (
            404,
            json(&ApiError {
                code: "not_found".into(),
                message: format!("fake daemon: no route {method} {path}"),
            }),
        ),
    }
}

fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("serializable")
}

/// Serves HTTP/1.1 on `socket` until the test ends; the `fail_create`-th create fails.
fn fake_daemon(socket: &Path, fail_create: u32) -> (Seen, Arc<Mutex<Vec<String>>>) {
    let listener = UnixListener::bind(socket).expect("bind the fake daemon's socket");
    let seen: Seen = Arc::default();
    let created: Arc<Mutex<Vec<String>>> = Arc::default();
    let creates = Arc::new(Mutex::new(0u32));
    let (seen2, created2) = (Arc::clone(&seen), Arc::clone(&created));
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            let (seen, created, creates) = (
                Arc::clone(&seen2),
                Arc::clone(&created2),
                Arc::clone(&creates),
            );
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while let Some((method, path, _body)) =
                    common::read_request(&mut conn, &mut buf).await
                {
                    let (status, body) = answer(&method, &path, &creates, fail_create);
                    if status == 201
                        && let Ok(v) = serde_json::from_str::<serde_json::Value>(&body)
                    {
                        created
                            .lock()
                            .expect("lock")
                            .push(v["id"].as_str().unwrap_or_default().to_owned());
                    }
                    seen.lock().expect("lock").push((method, path));
                    if !common::write_answer(&mut conn, status, "application/json", &body).await {
                        return;
                    }
                }
            });
        }
    });
    (seen, created)
}

/// Runs the real `kiln` with `KILN_HOME=home`, off the async runtime's threads.
async fn kiln(home: &Path, args: &[&str]) -> Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.args(args).env("KILN_HOME", home);
    tokio::task::spawn_blocking(move || cmd.output().expect("run kiln"))
        .await
        .expect("kiln ran")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn creates_and_deletes(seen: &Seen) -> (usize, Vec<String>) {
    let seen = seen.lock().expect("lock");
    let creates = seen
        .iter()
        .filter(|(m, p)| m == "POST" && p == "/v1/sandboxes")
        .count();
    let deletes = seen
        .iter()
        .filter(|(m, _)| m == "DELETE")
        .map(|(_, p)| p.trim_start_matches("/v1/sandboxes/").to_owned())
        .collect();
    (creates, deletes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clone_publish_with_count_above_one_is_refused_before_any_start() {
    let home = tempfile::tempdir().expect("home");
    let (seen, _) = fake_daemon(&home.path().join("kilnd.sock"), 0);
    let out = kiln(
        home.path(),
        &["clone", "snap", "--count", "2", "--publish", "18080:80"],
    )
    .await;
    assert!(!out.status.success(), "{out:?}");
    assert!(
        stderr(&out).contains("--publish cannot be used with --count above 1"),
        "{}",
        stderr(&out)
    );
    let (creates, deletes) = creates_and_deletes(&seen);
    assert_eq!((creates, deletes.len()), (0, 0), "{:?}", seen.lock());
    // With one clone the same flags are fine: it is the count that is refused.
    let out = kiln(
        home.path(),
        &["clone", "snap", "--count", "1", "--publish", "18080:80"],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(creates_and_deletes(&seen).0, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clone_one_failed_start_removes_the_started_ones_and_fails() {
    let home = tempfile::tempdir().expect("home");
    let (seen, created) = fake_daemon(&home.path().join("kilnd.sock"), 2);
    let out = kiln(home.path(), &["clone", "snap", "--count", "3"]).await;
    assert!(!out.status.success(), "{out:?}");
    let err = stderr(&out);
    assert!(err.contains("starting 3 clones"), "{err}");
    assert!(err.contains("fake daemon: this start fails"), "{err}");
    let (creates, mut deletes) = creates_and_deletes(&seen);
    assert_eq!(creates, 3, "{:?}", seen.lock());
    let mut started = created.lock().expect("lock").clone();
    assert_eq!(started.len(), 2);
    started.sort();
    deletes.sort();
    assert_eq!(deletes, started, "exactly the started clones are removed");
    // Nothing printed as if they had started.
    assert!(
        String::from_utf8_lossy(&out.stdout).trim().is_empty(),
        "{out:?}"
    );
}
