//! Harness for kiln's end-to-end tests, which drive the real `kiln` binary against real QEMU
//! guests (under TCG on machines without usable KVM).
//!
//! The tests are `#[ignore]`d so that a plain `cargo nextest run --workspace` stays fast and
//! needs no QEMU; `scripts/test` runs them with `--run-ignored only` after building the
//! release binaries and the built-in images (`base`, `python`, `postgres` and the language
//! images) into `$KILN_E2E_HOME`.
//!
//! Most tests share that home (and so one daemon). Tests that kill or restart the daemon get
//! an isolated home of their own ([`Kiln::isolated`]) whose `images` directory links to the
//! shared one, and whose daemon is stopped when the test ends. Published snapshot and image
//! files are immutable (issue 8): an isolated home clears their flags before it is removed,
//! and tests that damage such a file on purpose call [`unseal`] first.

pub mod testnet;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// A kiln installation under test: the binary and a state directory.
pub struct Kiln {
    bin: PathBuf,
    home: PathBuf,
    /// A file system mounted at `home` by [`Kiln::on_tmpfs`], unmounted on drop.
    mounted: bool,
    /// Extra environment of every `kiln` command (and so of the daemon it starts).
    env: Vec<(String, String)>,
    _own: Option<tempfile::TempDir>,
}

fn shared_home() -> PathBuf {
    match std::env::var_os("KILN_E2E_HOME") {
        Some(h) if !h.is_empty() => PathBuf::from(h),
        _ => panic!("KILN_E2E_HOME is not set: run the end-to-end suite through scripts/test"),
    }
}

fn kiln_bin() -> PathBuf {
    match std::env::var_os("KILN_BIN") {
        Some(b) if !b.is_empty() => PathBuf::from(b),
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/release/kiln"),
    }
}

impl Kiln {
    /// The shared home with prebuilt images.
    pub fn shared() -> Kiln {
        Kiln {
            bin: kiln_bin(),
            home: shared_home(),
            mounted: false,
            env: Vec::new(),
            _own: None,
        }
    }

    /// A fresh home whose images are the shared ones; its daemon is stopped on drop.
    pub fn isolated() -> Kiln {
        let dir = tempfile::Builder::new()
            .prefix("kiln-e2e-")
            .tempdir()
            .expect("create temp home");
        std::os::unix::fs::symlink(shared_home().join("images"), dir.path().join("images"))
            .expect("link shared images");
        Kiln {
            bin: kiln_bin(),
            home: dir.path().to_owned(),
            mounted: false,
            env: Vec::new(),
            _own: Some(dir),
        }
    }

    /// A fresh home with its own copies of the shared images `names` (sparse copies, not a
    /// link): for tests that measure or watch the images directory, which other tests build
    /// into while they run. Its daemon is stopped on drop.
    pub fn isolated_with_images(names: &[&str]) -> Kiln {
        let dir = tempfile::Builder::new()
            .prefix("kiln-e2e-")
            .tempdir()
            .expect("create temp home");
        let images = dir.path().join("images");
        std::fs::create_dir(&images).expect("mkdir images");
        for name in names {
            let out = Command::new("cp")
                .args(["-a", "--sparse=always"])
                .arg(shared_home().join("images").join(name))
                .arg(&images)
                .output()
                .expect("run cp");
            assert_success(&out, "copy an image");
        }
        Kiln {
            bin: kiln_bin(),
            home: dir.path().to_owned(),
            mounted: false,
            env: Vec::new(),
            _own: Some(dir),
        }
    }

    /// Like [`Kiln::isolated`], on a tmpfs of `size_mib` MiB of its own (needs root): for
    /// filling the file system under a running sandbox. Unmounted when dropped.
    pub fn on_tmpfs(size_mib: u32) -> Kiln {
        let dir = tempfile::Builder::new()
            .prefix("kiln-e2e-small-")
            .tempdir()
            .expect("create temp home");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={size_mib}m,mode=0700"))
            .arg("tmpfs")
            .arg(dir.path())
            .output()
            .expect("run mount");
        assert_success(&out, "mount a tmpfs home");
        std::os::unix::fs::symlink(shared_home().join("images"), dir.path().join("images"))
            .expect("link shared images");
        Kiln {
            bin: kiln_bin(),
            home: dir.path().to_owned(),
            mounted: true,
            env: Vec::new(),
            _own: Some(dir),
        }
    }

    /// Adds `key=value` to the environment of every `kiln` command of this home, and so of
    /// the daemon the first one starts: for daemon settings such as `KILN_NET_DNS`. Only
    /// meaningful on a home whose daemon is not running yet (an isolated one).
    pub fn with_env(mut self, key: &str, value: &str) -> Kiln {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// The state directory.
    pub fn home(&self) -> &Path {
        &self.home
    }

    /// The `kiln` binary under test (`kilnd` is beside it; for wrappers such as `script`
    /// that run it themselves, give them `KILN_HOME` = [`Kiln::home`]).
    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// A `kiln` command with this home.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.args(args)
            .env("KILN_HOME", &self.home)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null());
        c
    }

    /// Runs `kiln args` to completion.
    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("spawn kiln")
    }

    /// Runs `kiln args` with `input` on stdin.
    pub fn run_with_stdin(&self, args: &[&str], input: &[u8]) -> Output {
        let mut child = self
            .cmd(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn kiln");
        let mut stdin = child.stdin.take().expect("piped stdin");
        let input = input.to_vec();
        let writer = std::thread::spawn(move || {
            let _ = stdin.write_all(&input);
        });
        let out = child.wait_with_output().expect("wait for kiln");
        writer.join().expect("stdin writer");
        out
    }

    /// `kiln create`, returning the new sandbox id.
    pub fn create(&self, image: &str) -> String {
        let out = self.run(&["create", "--image", image]);
        assert_success(&out, "kiln create");
        String::from_utf8(out.stdout)
            .expect("utf-8 id")
            .trim()
            .to_owned()
    }

    /// `kiln create --json ARGS` → (id, source: `cold` or `snapshot`).
    pub fn create_json(&self, args: &[&str]) -> (String, String) {
        let mut all = vec!["create", "--json"];
        all.extend_from_slice(args);
        let out = self.run(&all);
        assert_success(&out, "kiln create");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("create json");
        (
            v["id"].as_str().expect("id").to_owned(),
            v["source"].as_str().expect("source").to_owned(),
        )
    }

    /// The home's one warm snapshot directory.
    pub fn warm_dir(&self) -> PathBuf {
        let dirs: Vec<PathBuf> = std::fs::read_dir(self.home.join("snapshots"))
            .expect("snapshots dir")
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("warm-"))
            .map(|e| e.path())
            .collect();
        assert_eq!(dirs.len(), 1, "{dirs:?}");
        dirs.into_iter().next().expect("one warm snapshot")
    }

    /// `kiln ps --json` as JSON.
    pub fn ps(&self) -> serde_json::Value {
        let out = self.run(&["ps", "--json"]);
        assert_success(&out, "kiln ps");
        serde_json::from_slice(&out.stdout).expect("ps json")
    }

    /// The state of one sandbox per `kiln ps`, if listed.
    pub fn state_of(&self, id: &str) -> Option<String> {
        self.ps()["sandboxes"]
            .as_array()
            .expect("sandboxes array")
            .iter()
            .find(|s| s["id"] == id)
            .map(|s| s["state"].as_str().unwrap_or_default().to_owned())
    }

    /// The QEMU process of a sandbox, from its pidfile (`<pid> <start time>`).
    pub fn qemu_pid(&self, id: &str) -> i32 {
        let text = std::fs::read_to_string(self.home.join("run").join(id).join("qemu.pid"))
            .expect("read qemu.pid");
        text.split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
            .expect("pid in qemu.pid")
    }

    /// The daemon's pid, if one runs.
    pub fn daemon_pid(&self) -> Option<i32> {
        let out = self.run(&["daemon", "status", "--json"]);
        if !out.status.success() {
            return None;
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        v["pid"].as_i64().map(|p| p as i32)
    }
}

impl Drop for Kiln {
    fn drop(&mut self) {
        if self._own.is_some() {
            let _ = self.run(&["daemon", "stop", "--all"]);
            // Published snapshot (and image) files are immutable; the temporary home can only
            // be removed once their flags are cleared. Symlinks (the shared `images`) are not
            // followed.
            if let Err(e) = kiln_snapshot::unseal_tree(&self.home) {
                eprintln!("cannot unseal {}: {e}", self.home.display());
            }
        }
        if self.mounted {
            let _ = Command::new("umount")
                .arg("--lazy")
                .arg(&self.home)
                .status();
        }
    }
}

/// Bytes free on the file system holding `path`.
pub fn free_bytes(path: &Path) -> u64 {
    let out = Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(path)
        .output()
        .expect("run df");
    assert_success(&out, "df");
    stdout(&out)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .expect("df avail")
}

/// Polls `cond` every 200 ms until it holds; panics naming `what` after `secs` seconds
/// (a guard against a hang, not a speed check).
pub fn wait_until(what: &str, secs: u64, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not within {secs} s"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// Waits for `child` to end, killing it and panicking after `secs` seconds: for commands
/// that must not hang.
pub fn wait_bounded(mut child: std::process::Child, what: &str, secs: u64) -> Output {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        if child.try_wait().expect("try_wait").is_some() {
            return child.wait_with_output().expect("collect output");
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("collect output");
            panic!(
                "{what} still running after {secs} s (killed)\nstderr:\n{}",
                stderr(&out)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Lifts the seal of a published file (immutable flag, read-only mode) so that a test can
/// damage it on purpose, as a writer below kiln could.
pub fn unseal(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    kiln_snapshot::unseal_file(path).expect("clear the immutable flag");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod u+w");
}

/// Whether a process exists (and is not a zombie).
pub fn process_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                != Some("Z")
        }
        Err(_) => false,
    }
}

/// Sends a signal.
pub fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::kill(pid, sig) };
    assert_eq!(
        rc,
        0,
        "kill({pid}, {sig}): {}",
        std::io::Error::last_os_error()
    );
}

/// Panics with kiln's output if it failed.
pub fn assert_success(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({:?})\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Lowercase hex sha256.
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

/// stdout as text.
pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// stderr as text.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `GET /` on 127.0.0.1:`port` (HTTP/1.0); the whole response, or `None` if nothing answers.
pub fn http_get(port: u16) -> Option<String> {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .ok()?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    (!body.is_empty()).then_some(body)
}

/// Polls until the published port answers (the guest server starts asynchronously).
pub fn wait_http(port: u16) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        if let Some(b) = http_get(port) {
            return b;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "port {port} never answered"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// A TCP port free on 127.0.0.1 right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// One raw HTTP/1.0 request to the daemon of `home` over its unix socket: (status, body).
/// For checking what the API answers to input the CLI would refuse before sending.
pub fn api_request(home: &Path, method: &str, path: &str, body: &[u8]) -> (u16, String) {
    let r = api_call(home, method, path, body, 60);
    (r.status, r.body)
}

/// A daemon's answer read by [`api_call`].
pub struct ApiResponse {
    /// The HTTP status, 0 if the answer had none.
    pub status: u16,
    /// The status line and headers, as sent.
    pub head: String,
    /// The body (a streamed one, such as server-sent events, read to its end).
    pub body: String,
}

impl ApiResponse {
    /// The value of header `name` (case-insensitive), if sent.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// Like [`api_request`], with the headers, and waiting up to `read_secs` for each read: for
/// answers that take longer than a minute to start (a long poll) or stream (events).
pub fn api_call(home: &Path, method: &str, path: &str, body: &[u8], read_secs: u64) -> ApiResponse {
    use std::io::Read;
    let mut s = std::os::unix::net::UnixStream::connect(home.join("kilnd.sock"))
        .expect("connect to kilnd.sock");
    s.set_read_timeout(Some(std::time::Duration::from_secs(read_secs)))
        .expect("timeout");
    let head = format!(
        "{method} {path} HTTP/1.0\r\nHost: kilnd\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    // One write, and its error ignored: a daemon that refuses a request answers and closes
    // without reading the body, and the answer is what is checked.
    let mut request = head.into_bytes();
    request.extend_from_slice(body);
    let _ = s.write_all(&request);
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    let text = String::from_utf8_lossy(&resp).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .map(|(h, b)| (h.to_owned(), b.to_owned()))
        .unwrap_or((text.clone(), String::new()));
    ApiResponse { status, head, body }
}

/// `POST /v1/jobs` with `request`; the new job's id (the answer must be 202).
pub fn job_submit(home: &Path, request: &serde_json::Value) -> String {
    let (status, body) = api_request(home, "POST", "/v1/jobs", request.to_string().as_bytes());
    assert_eq!(status, 202, "POST /v1/jobs {request}: {body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("job created json");
    v["id"].as_str().expect("job id").to_owned()
}

/// `GET /v1/jobs/{id}` as JSON (the answer must be 200).
pub fn job_get(home: &Path, id: &str) -> serde_json::Value {
    let (status, body) = api_request(home, "GET", &format!("/v1/jobs/{id}"), b"");
    assert_eq!(status, 200, "GET /v1/jobs/{id}: {body}");
    serde_json::from_str(&body).expect("job json")
}

/// Whether a job's status is final (not `queued` or `running`).
pub fn job_is_final(job: &serde_json::Value) -> bool {
    !matches!(job["status"].as_str(), Some("queued" | "running"))
}

/// Long-polls `GET /v1/jobs/{id}?wait=50` until the job has ended; panics after `secs`
/// seconds (a guard against a hang, not a speed check).
pub fn job_wait(home: &Path, id: &str, secs: u64) -> serde_json::Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        let r = api_call(home, "GET", &format!("/v1/jobs/{id}?wait=50"), b"", 120);
        assert_eq!(r.status, 200, "GET /v1/jobs/{id}?wait=50: {}", r.body);
        let job: serde_json::Value = serde_json::from_str(&r.body).expect("job json");
        if job_is_final(&job) {
            return job;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "job {id} not over within {secs} s: {job:#}"
        );
    }
}

/// The sandboxes of jobs per `kiln ps`: (sandbox id, job id from its `kiln.job` label).
pub fn job_sandboxes(k: &Kiln) -> Vec<(String, String)> {
    k.ps()["sandboxes"]
        .as_array()
        .expect("sandboxes array")
        .iter()
        .filter_map(|s| {
            let job = s["spec"]["labels"]["kiln.job"].as_str()?;
            Some((
                s["id"].as_str().unwrap_or_default().to_owned(),
                job.to_owned(),
            ))
        })
        .collect()
}

/// Resident and peak memory of a process, in KiB (`VmRSS`, `VmHWM`).
pub fn rss_kib(pid: i32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// What a scan for a needle read: the files that hold it and every file read.
pub struct Scan {
    /// The files that hold the needle.
    pub hits: Vec<PathBuf>,
    /// Every file read.
    pub files: Vec<PathBuf>,
}

/// Reads every regular file under `root` (symlinks not followed) and notes those containing
/// `needle`. A missing or unreadable root or file fails the test (a scan that reads nothing
/// must not pass); only a file removed between listing and reading is skipped.
pub fn scan(root: &Path, needle: &[u8]) -> Scan {
    assert!(root.is_dir(), "nothing to scan at {}", root.display());
    let mut scan = Scan {
        hits: Vec::new(),
        files: Vec::new(),
    };
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && dir != root => continue,
            Err(e) => panic!("cannot list {}: {e}", dir.display()),
        };
        for e in entries {
            let e = e.expect("directory entry");
            let (path, ft) = (e.path(), e.file_type().expect("file type"));
            if ft.is_dir() {
                stack.push(path);
            } else if ft.is_file() {
                let data = match std::fs::read(&path) {
                    Ok(data) => data,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => panic!("cannot read {}: {e}", path.display()),
                };
                if data.windows(needle.len()).any(|w| w == needle) {
                    scan.hits.push(path.clone());
                }
                scan.files.push(path);
            }
        }
    }
    scan
}

impl Scan {
    /// Fails unless a file named `name` was read.
    pub fn read_a(&self, name: &str) -> &Self {
        assert!(
            self.files
                .iter()
                .any(|f| f.file_name().is_some_and(|n| n == name)),
            "the scan read no `{name}` (it read {:?})",
            self.files
        );
        self
    }
}

/// A PNG decoded into (width, height, RGB bytes); kiln's screenshots are 8-bit RGB.
pub fn decode_png(bytes: &[u8]) -> (u32, u32, Vec<u8>) {
    let mut decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = decoder.read_info().expect("a PNG");
    let mut rgb = vec![0; reader.output_buffer_size().expect("a frame size")];
    let frame = reader.next_frame(&mut rgb).expect("a PNG frame");
    assert_eq!(frame.color_type, png::ColorType::Rgb, "an RGB screenshot");
    rgb.truncate(frame.buffer_size());
    (frame.width, frame.height, rgb)
}

/// `kiln desktop screenshot ID -o PATH`, decoded.
pub fn desktop_screenshot(k: &Kiln, id: &str, path: &Path) -> (u32, u32, Vec<u8>) {
    let out = k.run(&[
        "desktop",
        "screenshot",
        id,
        "-o",
        path.to_str().expect("utf-8 path"),
    ]);
    assert_success(&out, "kiln desktop screenshot");
    decode_png(&std::fs::read(path).expect("screenshot file"))
}

/// `kiln exec ID --user kiln --env DISPLAY=:0 -- ARGS`: a command in a desktop's session
/// (the built-in desktop image's user and display).
pub fn desktop_exec(k: &Kiln, id: &str, args: &[&str]) -> Output {
    let mut all = vec!["exec", id, "--user", "kiln", "--env", "DISPLAY=:0", "--"];
    all.extend_from_slice(args);
    k.run(&all)
}
