//! `kiln cp` and `kiln ls`: files between the host and a sandbox, in `docker cp` syntax.
//!
//! ```text
//!   kiln cp ./file ID:/dst       a file in (into /dst/file when /dst is a directory)
//!   kiln cp ./dir  ID:/dst       a directory in, recursively (as a tar stream)
//!   kiln cp ID:/src ./dst        a file or directory out
//!   kiln cp - ID:/dir            a tar archive from stdin, unpacked into /dir
//!   kiln cp ID:/src -            a tar archive of /src to stdout
//!   kiln ls ID:/path [--json]
//! ```
//!
//! Directories travel as tar archives built and unpacked with the `tar` crate on this side
//! and by the agent in the guest; bytes stream through in 64 KiB pieces, so memory stays
//! bounded whatever the size. What the guest sends is untrusted: archives are unpacked with
//! `tar`'s `unpack_in` rules (no absolute paths, no `..`, nothing through a symlink outside
//! the destination).

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use kiln_api_types::{FileInfo, FileKind, SandboxId};
use kiln_client::Client;
use tokio::io::AsyncWriteExt;
use tokio_util::io::SyncIoBridge;

/// Bytes buffered between the tar builder or unpacker thread and the HTTP stream.
const PIPE_BYTES: usize = 256 << 10;

/// One side of a copy.
#[derive(Debug, Clone, PartialEq, Eq)]
enum End {
    /// A host path.
    Host(PathBuf),
    /// `-`: a tar archive on stdin or stdout.
    Stdio,
    /// `ID:/path` in a sandbox.
    Sandbox(String, String),
}

fn parse_end(s: &str) -> anyhow::Result<End> {
    if s == "-" {
        return Ok(End::Stdio);
    }
    // `ID:/path`; a host path with a colon can be written `./a:b`.
    if let Some((id, path)) = s.split_once(':')
        && !id.is_empty()
        && !id.contains('/')
    {
        if !path.starts_with('/') {
            bail!("{s:?}: the path in the sandbox must be absolute (ID:/path)");
        }
        return Ok(End::Sandbox(id.to_owned(), path.to_owned()));
    }
    Ok(End::Host(PathBuf::from(s)))
}

/// The last component of a guest path (`/a/b/` → `b`).
fn guest_basename(path: &str) -> &str {
    path.trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or_default()
}

/// The directory part of a guest path (`/a/b` → `/a`, `/a` → `/`).
fn guest_parent(path: &str) -> &str {
    match path.trim_end_matches('/').rsplit_once('/') {
        Some(("", _)) | None => "/",
        Some((dir, _)) => dir,
    }
}

fn join_guest(dir: &str, name: &str) -> String {
    format!("{}/{name}", dir.trim_end_matches('/'))
}

/// `kiln cp SRC DST`.
pub async fn cp(client: &Client, src: &str, dst: &str, json: bool) -> anyhow::Result<i32> {
    let info = match (parse_end(src)?, parse_end(dst)?) {
        (End::Sandbox(..), End::Sandbox(..)) => {
            bail!("copy between two sandboxes is not supported: copy through the host")
        }
        (End::Host(_) | End::Stdio, End::Host(_) | End::Stdio) => {
            bail!("one side of `kiln cp` must be ID:/path in a sandbox")
        }
        (End::Host(local), End::Sandbox(key, path)) => {
            let id = crate::ps::resolve(client, &key).await?;
            copy_in(client, &id, &local, &path).await?
        }
        (End::Stdio, End::Sandbox(key, path)) => {
            let id = crate::ps::resolve(client, &key).await?;
            // Errors the daemon would give before reading the body come first, plainly.
            preflight(client, &id, &path).await?;
            let stdin = tokio::io::stdin();
            Some(client.file_write(&id, &path, None, true, stdin).await?)
        }
        (End::Sandbox(key, path), End::Host(local)) => {
            let id = crate::ps::resolve(client, &key).await?;
            copy_out(client, &id, &path, &local).await?;
            None
        }
        (End::Sandbox(key, path), End::Stdio) => {
            let id = crate::ps::resolve(client, &key).await?;
            let mut tar = client.file_read(&id, &path, true).await?;
            let mut out = tokio::io::stdout();
            tokio::io::copy(&mut tar, &mut out)
                .await
                .context("writing the archive to stdout")?;
            out.flush().await?;
            None
        }
    };
    if json && let Some(info) = info {
        println!("{}", serde_json::to_string_pretty(&info)?);
    }
    Ok(0)
}

/// Host → sandbox; answers the metadata of what was written.
async fn copy_in(
    client: &Client,
    id: &SandboxId,
    local: &Path,
    dst: &str,
) -> anyhow::Result<Option<FileInfo>> {
    let meta = std::fs::metadata(local).with_context(|| format!("{}", local.display()))?;
    let name = local
        .file_name()
        .and_then(|n| n.to_str())
        .map(str::to_owned)
        .with_context(|| format!("{}: no file name to copy", local.display()))?;
    // docker cp: into an existing directory, the source keeps its name.
    let target = match preflight(client, id, dst).await? {
        Some(st) if st.kind == FileKind::Dir => join_guest(dst, &name),
        Some(_) => dst.to_owned(),
        None => {
            // A new path: its directory must exist (said plainly, before any byte is sent).
            let parent = guest_parent(dst);
            if preflight(client, id, parent).await?.is_none() {
                bail!("{parent}: no such directory in sandbox {id}");
            }
            dst.to_owned()
        }
    };
    if meta.is_dir() {
        let (reader, writer) = tokio::io::duplex(PIPE_BYTES);
        let src = local.to_owned();
        let builder = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let mut tar = tar::Builder::new(SyncIoBridge::new(writer));
            tar.follow_symlinks(false);
            tar.append_dir_all(".", &src)?;
            tar.into_inner()?;
            Ok(())
        });
        let written = client.file_write(id, &target, None, true, reader).await;
        builder
            .await
            .context("the archive builder failed")?
            .with_context(|| format!("reading {}", local.display()))?;
        Ok(Some(written?))
    } else {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o7777;
        let file = tokio::fs::File::open(local)
            .await
            .with_context(|| format!("{}", local.display()))?;
        Ok(Some(
            client
                .file_write(id, &target, Some(mode), false, file)
                .await?,
        ))
    }
}

/// What is at `path` in the sandbox (`None`: nothing yet). Asked before an upload so that
/// what the daemon would refuse at once (a paused sandbox, a bad path) is reported as such,
/// not as a connection closed under a body still being sent.
async fn preflight(
    client: &Client,
    id: &SandboxId,
    path: &str,
) -> anyhow::Result<Option<FileInfo>> {
    match client.file_stat(id, path).await {
        Ok(st) => Ok(Some(st)),
        Err(kiln_client::ClientError::Api { body, .. }) if body.code == "file_not_found" => {
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

/// Sandbox → host.
async fn copy_out(client: &Client, id: &SandboxId, src: &str, local: &Path) -> anyhow::Result<()> {
    let st = client.file_stat(id, src).await?;
    let into_dir = local.is_dir();
    let name = guest_basename(src);
    let target = if into_dir {
        local.join(name)
    } else {
        local.to_owned()
    };
    match st.kind {
        FileKind::Dir => {
            if target.exists() {
                bail!(
                    "{} exists already: copy the directory somewhere new",
                    target.display()
                );
            }
            std::fs::create_dir_all(&target)
                .with_context(|| format!("creating {}", target.display()))?;
            let stream = client.file_read(id, src, true).await?;
            let dest = target.clone();
            tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                let mut archive = tar::Archive::new(SyncIoBridge::new(stream));
                archive.set_preserve_permissions(true);
                archive.set_overwrite(false);
                archive.unpack(&dest)
            })
            .await
            .context("the archive unpacker failed")?
            .with_context(|| format!("unpacking into {}", target.display()))?;
        }
        FileKind::File => {
            use std::os::unix::fs::PermissionsExt;
            // Written beside the target and renamed: a broken transfer leaves nothing.
            let tmp = target.with_file_name(format!(
                ".{}.kiln-cp-{}",
                target
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or("file"),
                std::process::id()
            ));
            let copied = async {
                let mut stream = client.file_read(id, src, false).await?;
                let mut file = tokio::fs::File::create(&tmp)
                    .await
                    .with_context(|| format!("creating {}", tmp.display()))?;
                tokio::io::copy(&mut stream, &mut file)
                    .await
                    .with_context(|| format!("copying {src} to {}", target.display()))?;
                file.sync_all().await?;
                std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(st.mode & 0o777))?;
                std::fs::rename(&tmp, &target)
                    .with_context(|| format!("renaming into {}", target.display()))?;
                Ok::<_, anyhow::Error>(())
            }
            .await;
            if copied.is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
            copied?;
        }
        FileKind::Symlink | FileKind::Other => {
            bail!("{src} is not a regular file or a directory; copy what it points to")
        }
    }
    Ok(())
}

/// `kiln ls ID:/path [--json]`: every page of a listing.
pub async fn ls(client: &Client, target: &str, json: bool) -> anyhow::Result<i32> {
    let End::Sandbox(key, path) = parse_end(target)? else {
        bail!("expected ID:/path, got {target:?}");
    };
    let id = crate::ps::resolve(client, &key).await?;
    let st = client.file_stat(&id, &path).await?;
    let mut entries = Vec::new();
    if st.kind == FileKind::Dir {
        let mut after: Option<String> = None;
        loop {
            let page = client.file_list(&id, &path, after.as_deref()).await?;
            entries.extend(page.entries);
            match page.next_after {
                Some(next) => after = Some(next),
                None => break,
            }
        }
    } else {
        entries.push(st);
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&kiln_api_types::FileList {
                path,
                entries,
                next_after: None,
            })?
        );
        return Ok(0);
    }
    for e in &entries {
        let name = guest_basename(&e.path);
        let suffix = match (&e.kind, &e.symlink_target) {
            (FileKind::Dir, _) => "/".to_owned(),
            (FileKind::Symlink, Some(t)) => format!(" -> {t}"),
            _ => String::new(),
        };
        println!(
            "{} {:>10}  {}  {name}{suffix}",
            mode_string(e.kind, e.mode),
            e.size,
            crate::ps::ago((e.mtime_unix_ms.max(0) / 1000) as u64)
        );
    }
    Ok(0)
}

/// `drwxr-xr-x`-style mode.
fn mode_string(kind: FileKind, mode: u32) -> String {
    let t = match kind {
        FileKind::Dir => 'd',
        FileKind::Symlink => 'l',
        FileKind::File => '-',
        FileKind::Other => '?',
    };
    let mut s = String::from(t);
    for shift in [6, 3, 0] {
        let bits = (mode >> shift) & 7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        s.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_end_reads_docker_cp_syntax() {
        assert_eq!(parse_end("-").unwrap(), End::Stdio);
        assert_eq!(
            parse_end("web:/srv/a").unwrap(),
            End::Sandbox("web".into(), "/srv/a".into())
        );
        assert_eq!(parse_end("./a:b").unwrap(), End::Host("./a:b".into()));
        assert_eq!(parse_end("dir/x").unwrap(), End::Host("dir/x".into()));
        assert!(parse_end("web:relative").is_err());
    }

    #[test]
    fn guest_names_and_modes() {
        assert_eq!(guest_basename("/a/b/"), "b");
        assert_eq!(join_guest("/a/", "f"), "/a/f");
        assert_eq!(guest_parent("/a/b"), "/a");
        assert_eq!(guest_parent("/a"), "/");
        assert_eq!(guest_parent("/a/b/"), "/a");
        assert_eq!(mode_string(FileKind::Dir, 0o755), "drwxr-xr-x");
        assert_eq!(mode_string(FileKind::File, 0o640), "-rw-r-----");
    }
}
