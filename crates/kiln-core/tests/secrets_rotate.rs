//! `secret rotate` (`Engine::sandbox_secrets_update`) on a sandbox the engine re-attached at
//! start, with fakes where a VM would be: a `sleep` for QEMU, a fake QMP server, and the real guest agent in a private mount
//! namespace (so the secrets it writes to `/run/secrets` never touch the host's `/run`), all
//! from `kiln_testkit`. Needs root and util-linux `unshare` (CI runs the tests as root;
//! `scripts/setup-host` installs both).
//!
//! The image's on-restore hook appends the secret's current value to `/run/hook.log`; each
//! rotation must deliver the new value and run the hook again.

use std::sync::Arc;
use std::time::Duration;

use kiln_api_types::{ExecRequest, SandboxId, SandboxState, Secrets};
use kiln_core::{Engine, ExecOutput, Home};

/// The guest side, run by `kiln_testkit::start_agent` in its own process.
#[tokio::test]
#[ignore = "helper of secret_rotate_delivers_the_new_value_and_reruns_the_hook: run by it in a private mount namespace"]
async fn agent_helper() {
    kiln_testkit::serve_agent().await;
}

/// The image's on-restore hook: appends `$TOKEN`'s file to `/run/hook.log`.
fn hook() -> kiln_image::GuestCommand {
    kiln_image::GuestCommand {
        argv: vec![
            "/bin/sh".into(),
            "-c".into(),
            "cat /run/secrets/TOKEN >> /run/hook.log && echo >> /run/hook.log".into(),
        ],
        timeout_ms: 10_000,
    }
}

/// Runs `sh -c script` in the sandbox; returns its stdout.
async fn sh(engine: &Arc<Engine>, id: &SandboxId, script: &str) -> String {
    let req = ExecRequest::new(vec!["/bin/sh".into(), "-c".into(), script.into()]);
    let mut exec = engine.sandbox_exec(id, &req).await.expect("exec starts");
    let mut out = Vec::new();
    loop {
        match exec.next().await.expect("exec runs") {
            ExecOutput::Stdout(b) => out.extend_from_slice(&b),
            ExecOutput::Stderr(_) => {}
            ExecOutput::Exit(status) => {
                assert_eq!(status.code, Some(0), "{script}: {status:?}");
                break;
            }
        }
    }
    String::from_utf8(out).expect("utf-8")
}

fn secrets(value: &str) -> Secrets {
    serde_json::from_value(serde_json::json!({ "TOKEN": value })).expect("secrets")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_rotate_delivers_the_new_value_and_reruns_the_hook() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let home = Home::new(tmp.path().join("home"));
    home.ensure().expect("home");
    kiln_testkit::write_image(home.root(), Some(hook()), false);
    let id = SandboxId::random();
    kiln_store::Store::open(&home.database())
        .expect("store")
        .sandbox_insert(&kiln_testkit::running_row(
            &id,
            serde_json::json!({ "secrets": { "TOKEN": "" } }),
        ))
        .expect("row");
    let run = home.sandbox_dir(&id);
    let _qemu = kiln_testkit::write_run_dir(&run);
    kiln_testkit::start_qmp(&run.join("qmp.sock"));
    let _agent = kiln_testkit::start_agent(&run.join("agent.sock"), "agent_helper");
    // The helper binds the agent socket once its namespace is set up.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !run.join("agent.sock").exists() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the agent helper never bound its socket"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let engine = Engine::start(home.clone()).await.expect("engine starts");
    assert_eq!(
        engine.janitor_report().sandboxes_reattached,
        1,
        "{:?}",
        engine.janitor_report()
    );
    assert_eq!(
        engine.sandbox_get(&id).expect("row").status.state,
        SandboxState::Running
    );

    engine
        .sandbox_secrets_update(&id, &secrets("first"))
        .await
        .expect("rotate");
    assert_eq!(sh(&engine, &id, "cat /run/secrets/TOKEN").await, "first");
    assert_eq!(sh(&engine, &id, "cat /run/hook.log").await, "first\n");
    engine
        .sandbox_secrets_update(&id, &secrets("second"))
        .await
        .expect("rotate again");
    assert_eq!(sh(&engine, &id, "cat /run/secrets/TOKEN").await, "second");
    assert_eq!(
        sh(&engine, &id, "cat /run/hook.log").await,
        "first\nsecond\n",
        "the hook ran once per rotation, after the new value was in place"
    );
}
