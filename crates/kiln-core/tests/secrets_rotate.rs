//! `secret rotate` (`Engine::sandbox_secrets_update`) on a sandbox the engine re-attached at
//! start, with fakes where a VM would be:
//!
//! - "QEMU" is a `sleep` process: its pidfile and `vm.json` are what a daemon leaves in the
//!   sandbox's runtime directory, so the janitor hands the sandbox to re-attach;
//! - its QMP socket is a fake QMP server in this test (greeting, then `{"return": {}}` to
//!   everything, `query-status` answered `running`);
//! - its agent socket is served by the real guest agent (`kiln_agent`), run by this test
//!   binary as a helper process in a private mount namespace with a tmpfs on `/run`, so the
//!   secrets it writes to `/run/secrets` never touch the host's `/run`. That needs root and
//!   util-linux `unshare` (CI runs the tests as root; `scripts/setup-host` installs both).
//!
//! The image's on-restore hook appends the secret's current value to `/run/hook.log`; each
//! rotation must deliver the new value and run the hook again.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kiln_api_types::{
    ExecRequest, SandboxId, SandboxInfo, SandboxSpec, SandboxState, SandboxStatus, Secrets,
    StartSource,
};
use kiln_core::{Engine, ExecOutput, Home};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;

const AGENT_SOCKET_ENV: &str = "KILN_TEST_AGENT_SOCKET";
const IMAGE_ID: &str = "0123456789ab";

/// The guest side, run by [`start_agent`] in its own process: the real agent serving every
/// connection to the socket named by `$KILN_TEST_AGENT_SOCKET`.
#[tokio::test]
#[ignore = "helper of secret_rotate_delivers_the_new_value_and_reruns_the_hook: run by it in a private mount namespace"]
async fn agent_helper() {
    let socket = std::env::var_os(AGENT_SOCKET_ENV).expect("run by the rotation test");
    let listener = UnixListener::bind(&socket).expect("bind the agent socket");
    let reaper =
        kiln_agent::Reaper::start(kiln_agent::ReapMode::RegisteredOnly).expect("sigchld listener");
    let agent = kiln_agent::Agent::new(kiln_agent::AgentConfig::default(), reaper);
    loop {
        let (conn, _) = listener.accept().await.expect("accept");
        let _ = agent.serve(conn).await;
    }
}

/// Starts [`agent_helper`] in a private mount namespace with a tmpfs on `/run`.
fn start_agent(socket: &Path) -> tokio::process::Child {
    let exe = std::env::current_exe().expect("this test binary");
    tokio::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg("mount -t tmpfs kiln-test-run /run && exec \"$0\" agent_helper --exact --ignored --nocapture")
        .arg(exe)
        .env(AGENT_SOCKET_ENV, socket)
        .kill_on_drop(true)
        .spawn()
        .expect("unshare (util-linux) runs; the test needs root")
}

/// A fake QMP server on `socket`: QEMU's greeting, `running` for `query-status`, an empty
/// return for every other command.
fn start_qmp(socket: &Path) {
    let listener = UnixListener::bind(socket).expect("bind the QMP socket");
    tokio::spawn(async move {
        loop {
            let Ok((conn, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (rd, mut wr) = conn.into_split();
                let greeting = r#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": ""}, "capabilities": []}}"#;
                if wr
                    .write_all(format!("{greeting}\r\n").as_bytes())
                    .await
                    .is_err()
                {
                    return;
                }
                let mut lines = BufReader::new(rd).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let Ok(cmd) = serde_json::from_str::<serde_json::Value>(&line) else {
                        return;
                    };
                    let ret = match cmd["execute"].as_str() {
                        Some("query-status") => serde_json::json!({
                            "status": "running", "running": true, "singlestep": false
                        }),
                        _ => serde_json::json!({}),
                    };
                    let reply = serde_json::json!({ "return": ret, "id": cmd["id"] });
                    if wr
                        .write_all(format!("{reply}\r\n").as_bytes())
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
}

/// An image `fake` whose on-restore hook appends `$TOKEN`'s file to `/run/hook.log`.
fn write_image(home: &Path) {
    let dir = home.join("images/fake");
    std::fs::create_dir_all(&dir).expect("image dir");
    let mut recipe = kiln_image::builtin("base").expect("the base recipe");
    recipe.on_restore = Some(kiln_image::GuestCommand {
        argv: vec![
            "/bin/sh".into(),
            "-c".into(),
            "cat /run/secrets/TOKEN >> /run/hook.log && echo >> /run/hook.log".into(),
        ],
        timeout_ms: 10_000,
    });
    let manifest = kiln_image::ImageManifest {
        schema: kiln_image::MANIFEST_SCHEMA,
        id: kiln_image::ImageId(IMAGE_ID.to_owned()),
        name: "fake".to_owned(),
        inputs: kiln_image::FingerprintInputs::new(&recipe, "", "6.1.0", "agent", "m", "s"),
        recipe,
        fingerprint: "f".into(),
        kernel_version: "6.1.0".into(),
        kernel_release: "6.1.0-test".into(),
        created_unix: 1,
        files: Vec::new(),
        rootfs_sha256: None,
        recipe_path: None,
        origin: None,
    };
    std::fs::write(
        dir.join("manifest.json"),
        serde_json::to_vec_pretty(&manifest).expect("manifest json"),
    )
    .expect("manifest");
}

/// A `running` row for `id` with secret `TOKEN`, as a previous daemon recorded it.
fn row(id: &SandboxId) -> SandboxInfo {
    let spec: SandboxSpec = serde_json::from_value(serde_json::json!({
        "source": { "kind": "image", "image": "fake" },
        "secrets": { "TOKEN": "" }
    }))
    .expect("spec");
    SandboxInfo {
        id: id.clone(),
        spec,
        status: SandboxStatus {
            network: None,
            state: SandboxState::Running,
            image: "fake".parse().expect("image name"),
            image_id: IMAGE_ID.into(),
            cpus: 1,
            memory_mib: 256,
            accel: "tcg".into(),
            created_unix: 1,
            boot_ms: Some(1),
            error: None,
            warnings: Vec::new(),
            source: StartSource::Cold,
            snapshot: None,
            expires_unix: None,
        },
    }
}

/// The stand-in QEMU process, killed however the test ends.
struct FakeQemu(std::process::Child);

impl Drop for FakeQemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What a daemon leaves in a running sandbox's runtime directory: `vm.json` and the pidfile
/// of its "QEMU" (a `sleep`).
fn write_run_dir(run: &Path) -> FakeQemu {
    std::fs::create_dir_all(run).expect("run dir");
    let cfg = kiln_vmm::VmConfig {
        nic: None,
        qemu: PathBuf::from("/nonexistent/qemu-system-x86_64"),
        accel: kiln_vmm::Accel::Tcg,
        cpus: 1,
        memory_mib: 256,
        kernel: run.join("vmlinuz"),
        initramfs: run.join("initramfs.cpio"),
        extra_cmdline: String::new(),
        disk: None,
        memory_file: run.join("mem"),
        memory_shared: false,
        run_dir: run.to_owned(),
        incoming: None,
    };
    std::fs::write(
        run.join("vm.json"),
        serde_json::to_vec(&cfg).expect("vm.json"),
    )
    .expect("write vm.json");
    let qemu = std::process::Command::new("sleep")
        .arg("600")
        .spawn()
        .expect("sleep");
    kiln_vmm::procid::ProcessIdentity::of_pid(qemu.id())
        .expect("identity")
        .write(&run.join("qemu.pid"))
        .expect("pidfile");
    FakeQemu(qemu)
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
    write_image(home.root());
    let id = SandboxId::random();
    kiln_store::Store::open(&home.database())
        .expect("store")
        .sandbox_insert(&row(&id))
        .expect("row");
    let run = home.sandbox_dir(&id);
    let _qemu = write_run_dir(&run);
    start_qmp(&run.join("qmp.sock"));
    let _agent = start_agent(&run.join("agent.sock"));
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
