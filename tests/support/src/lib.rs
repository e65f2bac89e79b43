//! Fakes where a VM would be, shared by kiln's integration tests (`kiln-core`'s and
//! `kilnd`'s `tests/`): what a daemon leaves behind for a running sandbox, so that the next
//! engine re-attaches it and talks to a real agent without QEMU.
//!
//! - [`write_run_dir`]: "QEMU" is a `sleep` process; its pidfile and `vm.json` are what a
//!   daemon leaves in the sandbox's runtime directory, so the janitor hands it to re-attach;
//! - [`start_qmp`]: a fake QMP server (QEMU's greeting, `running` for `query-status`, an
//!   empty return for everything else);
//! - [`start_agent`] / [`serve_agent`]: the real guest agent (`kiln_agent`) serving the
//!   sandbox's agent socket, run by the test binary itself as a helper process in a private
//!   mount namespace with a tmpfs on `/run`, so what it writes there (secrets) never touches
//!   the host's `/run`. Needs root and util-linux `unshare`;
//! - [`write_image`], [`running_row`]: an image `fake` (id [`IMAGE_ID`]) and a `running` row
//!   of it, as a previous daemon recorded them.
//!
//! Must not: start QEMU or need a built image.

use std::path::{Path, PathBuf};

use kiln_api_types::{
    SandboxId, SandboxInfo, SandboxSpec, SandboxState, SandboxStatus, StartSource,
};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;

/// The variable naming the agent socket the helper process serves.
pub const AGENT_SOCKET_ENV: &str = "KILN_TEST_AGENT_SOCKET";
/// The id of the fake image.
pub const IMAGE_ID: &str = "0123456789ab";

/// The guest side, for the helper test of each test binary (`#[ignore]`d, named in
/// [`start_agent`]): the real agent serving every connection to `$KILN_TEST_AGENT_SOCKET`.
pub async fn serve_agent() {
    let socket = std::env::var_os(AGENT_SOCKET_ENV).expect("run by start_agent");
    let listener = UnixListener::bind(&socket).expect("bind the agent socket");
    let reaper =
        kiln_agent::Reaper::start(kiln_agent::ReapMode::RegisteredOnly).expect("sigchld listener");
    let agent = kiln_agent::Agent::new(kiln_agent::AgentConfig::default(), reaper);
    loop {
        let (conn, _) = listener.accept().await.expect("accept");
        let _ = agent.serve(conn).await;
    }
}

/// Runs this test binary's helper test `helper` (which calls [`serve_agent`]) in a private
/// mount namespace with a tmpfs on `/run`, serving `socket`.
pub fn start_agent(socket: &Path, helper: &str) -> tokio::process::Child {
    let exe = std::env::current_exe().expect("this test binary");
    tokio::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg(format!(
            "mount -t tmpfs kiln-test-run /run && exec \"$0\" {helper} --exact --ignored --nocapture"
        ))
        .arg(exe)
        .env(AGENT_SOCKET_ENV, socket)
        .kill_on_drop(true)
        .spawn()
        .expect("unshare (util-linux) runs; the test needs root")
}

/// A fake QMP server on `socket`: QEMU's greeting, `running` for `query-status`, an empty
/// return for every other command. Runs until the runtime ends.
pub fn start_qmp(socket: &Path) {
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

/// Writes image `fake` (id [`IMAGE_ID`], the base recipe with `on_restore`) into `home`;
/// with `files`, also a kernel, an initramfs and a sparse rootfs (not bootable).
pub fn write_image(home: &Path, on_restore: Option<kiln_image::GuestCommand>, files: bool) {
    let dir = home.join("images/fake");
    std::fs::create_dir_all(&dir).expect("image dir");
    if files {
        std::fs::write(dir.join("vmlinuz"), b"not a kernel").expect("kernel");
        std::fs::write(dir.join("initramfs.cpio"), b"not an initramfs").expect("initramfs");
        std::fs::File::create(dir.join("rootfs.ext4"))
            .and_then(|f| f.set_len(64 << 20))
            .expect("rootfs");
    }
    let mut recipe = kiln_image::builtin("base").expect("the base recipe");
    recipe.on_restore = on_restore;
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

/// A `running` row of image `fake` for `id` with `spec` (JSON; `source` is filled in), as a
/// previous daemon recorded it.
pub fn running_row(id: &SandboxId, mut spec: serde_json::Value) -> SandboxInfo {
    spec["source"] = serde_json::json!({ "kind": "image", "image": "fake" });
    let spec: SandboxSpec = serde_json::from_value(spec).expect("spec");
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
pub struct FakeQemu(std::process::Child);

impl Drop for FakeQemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What a daemon leaves in a running sandbox's runtime directory: `vm.json` and the pidfile
/// of its "QEMU" (a `sleep`).
pub fn write_run_dir(run: &Path) -> FakeQemu {
    std::fs::create_dir_all(run).expect("run dir");
    let cfg = kiln_vmm::VmConfig {
        nic: None,
        display: None,
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
