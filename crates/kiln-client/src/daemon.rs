//! Starting `kilnd` on demand: locate the binary, spawn it detached with its output in
//! `kilnd.log`. Waiting for it to answer is [`crate::Client::connect`]'s job.
//!
//! Must not wait on or own the child: the daemon outlives the client (it runs in its own
//! process group, so a Ctrl-C in the client's terminal does not reach it).

use std::path::{Path, PathBuf};
use std::process::Stdio;

use crate::{ClientError, ClientHome, Result};

/// The `kilnd` binary: `$KILN_KILND` if set, else `kilnd` beside the current executable.
pub fn kilnd_path() -> Result<PathBuf> {
    let kilnd = match std::env::var_os("KILN_KILND").filter(|v| !v.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => std::env::current_exe()
            .map_err(|source| ClientError::Start {
                what: "failed to locate the current executable",
                path: PathBuf::from("/proc/self/exe"),
                source,
            })?
            .with_file_name("kilnd"),
    };
    if !kilnd.exists() {
        return Err(ClientError::KilndMissing { path: kilnd });
    }
    Ok(kilnd)
}

/// Starts `kilnd` detached, logging to `kilnd.log`.
pub(crate) fn start(home: &ClientHome, env: &[(&str, &str)]) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let kilnd = kilnd_path()?;
    let start_err = |what, path: &Path| {
        let path = path.to_owned();
        move |source| ClientError::Start { what, path, source }
    };
    home.ensure()
        .map_err(start_err("failed to create", home.root()))?;
    let log_path = home.daemon_log();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(start_err("failed to open", &log_path))?;
    let log2 = log
        .try_clone()
        .map_err(start_err("failed to open", &log_path))?;
    let mut cmd = std::process::Command::new(&kilnd);
    cmd.env("KILN_HOME", home.root())
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(log2)
        .stderr(log)
        .process_group(0);
    cmd.spawn().map_err(start_err("failed to start", &kilnd))?;
    Ok(())
}

/// The last `max` bytes of a file, as text.
pub fn tail_of(path: &Path, max: usize) -> String {
    match std::fs::read(path) {
        Ok(b) => String::from_utf8_lossy(&b[b.len().saturating_sub(max)..]).into_owned(),
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}
