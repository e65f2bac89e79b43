//! The root filesystem: mmdebstrap a trimmed Debian tree, tidy it, pack it into a sparse ext4.
//!
//! Owns: choosing the Debian mirrors (explicit override, else the host's apt sources, else
//! deb.debian.org), the mmdebstrap invocation and its dpkg
//! path-excludes (which also stay in the guest's `/etc/dpkg/dpkg.cfg.d/`, so later installs
//! stay trimmed), post-install cleanup (apt lists and caches, logs), guest identity files, and
//! `mkfs.ext4 -d`.
//!
//! Invariants: needs root (mmdebstrap's root mode; `mkfs.ext4 -d` copies the ownership it
//! sees); the rootfs image is sparse with an apparent size of at least [`MIN_ROOTFS_BYTES`] so
//! sandboxes have room to write, while unused blocks stay holes; the filesystem has no journal
//! (sandbox disks are disposable overlays) and a UUID derived from the fingerprint.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::aptcache::AptCache;
use crate::cmd;
use crate::error::{ImageError, IoContext};
use crate::recipe::Recipe;

/// Smallest apparent size of `rootfs.ext4`.
pub const MIN_ROOTFS_BYTES: u64 = 2 << 30;
/// Free space kept on top of the content, at least.
pub const MIN_HEADROOM_BYTES: u64 = 1 << 30;

/// Debian's redirector, used when nothing else is configured.
pub const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";

/// The hostname every guest starts with (the agent may change it after a restore).
pub const GUEST_HOSTNAME: &str = "kiln";

/// The Debian archive and security archive to bootstrap from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mirror {
    /// Main archive URI, e.g. `http://deb.debian.org/debian`.
    pub uri: String,
    /// Security archive URI, e.g. `http://deb.debian.org/debian-security`.
    pub security_uri: String,
}

impl Mirror {
    /// A mirror from a main archive URI; the security archive is its sibling `…-security`
    /// (the layout of deb.debian.org and of common mirrors and caching proxies).
    pub fn from_uri(uri: &str) -> Self {
        let uri = uri.trim().trim_end_matches('/').to_owned();
        Self {
            security_uri: format!("{uri}-security"),
            uri,
        }
    }

    /// Resolves the mirror: `explicit` (from `--mirror`/`KILN_DEBIAN_MIRROR`) if given, else
    /// the host's apt sources, else [`DEFAULT_MIRROR`].
    pub fn resolve(explicit: Option<&str>) -> Self {
        if let Some(uri) = explicit.filter(|u| !u.trim().is_empty()) {
            return Self::from_uri(uri);
        }
        let entries = host_sources();
        from_sources(&entries).unwrap_or_else(|| Self::from_uri(DEFAULT_MIRROR))
    }

    /// The apt source lines for `suite` (main, `-updates` and `-security` for releases).
    pub fn source_lines(&self, suite: &str) -> Vec<String> {
        let mut lines = vec![format!("deb {} {suite} main", self.uri)];
        if !matches!(suite, "sid" | "unstable" | "experimental" | "rc-buggy") {
            lines.push(format!("deb {} {suite}-updates main", self.uri));
            lines.push(format!("deb {} {suite}-security main", self.security_uri));
        }
        lines
    }
}

/// One apt source: URI and suites (both one-line and deb822 formats reduce to this).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SourceEntry {
    pub uri: String,
    pub suites: Vec<String>,
}

/// Parses one-line `sources.list` text (`deb [opts] URI SUITE COMPONENTS...`).
pub(crate) fn parse_one_line(text: &str) -> Vec<SourceEntry> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let mut words = line.split_whitespace().peekable();
        if words.next() != Some("deb") {
            continue;
        }
        if words.peek().is_some_and(|w| w.starts_with('[')) {
            for w in words.by_ref() {
                if w.ends_with(']') {
                    break;
                }
            }
        }
        if let (Some(uri), Some(suite)) = (words.next(), words.next()) {
            out.push(SourceEntry {
                uri: uri.to_owned(),
                suites: vec![suite.to_owned()],
            });
        }
    }
    out
}

/// Parses deb822 `.sources` text (stanzas with `Types:`, `URIs:`, `Suites:`).
pub(crate) fn parse_deb822(text: &str) -> Vec<SourceEntry> {
    let mut out = Vec::new();
    for stanza in text.split("\n\n") {
        let (mut types, mut uris, mut suites) = (Vec::new(), Vec::new(), Vec::new());
        let mut enabled = true;
        for line in stanza.lines() {
            if line.starts_with('#') {
                continue;
            }
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let values = value.split_whitespace().map(str::to_owned);
            match key.trim().to_ascii_lowercase().as_str() {
                "types" => types.extend(values),
                "uris" => uris.extend(values),
                "suites" => suites.extend(values),
                "enabled" => enabled = value.trim() != "no",
                _ => {}
            }
        }
        if enabled && types.iter().any(|t| t == "deb") {
            out.extend(uris.into_iter().map(|uri| SourceEntry {
                uri,
                suites: suites.clone(),
            }));
        }
    }
    out
}

/// The host's apt sources (`/etc/apt/sources.list` and `/etc/apt/sources.list.d/`).
fn host_sources() -> Vec<SourceEntry> {
    let mut out = Vec::new();
    if let Ok(text) = std::fs::read_to_string("/etc/apt/sources.list") {
        out.extend(parse_one_line(&text));
    }
    let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") else {
        return out;
    };
    let mut files: Vec<PathBuf> = dir.flatten().map(|e| e.path()).collect();
    files.sort();
    for f in files {
        let Ok(text) = std::fs::read_to_string(&f) else {
            continue;
        };
        match f.extension().and_then(|e| e.to_str()) {
            Some("list") => out.extend(parse_one_line(&text)),
            Some("sources") => out.extend(parse_deb822(&text)),
            _ => {}
        }
    }
    out
}

/// Picks Debian's archive and security archive from apt source entries. Non-Debian archives
/// (an Ubuntu host, third-party repositories) are ignored: only URIs whose path ends in
/// `/debian` (main) or `/debian-security` count.
pub(crate) fn from_sources(entries: &[SourceEntry]) -> Option<Mirror> {
    let norm = |u: &str| u.trim_end_matches('/').to_owned();
    let main = entries
        .iter()
        .map(|e| norm(&e.uri))
        .find(|u| u.ends_with("/debian"))?;
    let security = entries
        .iter()
        .map(|e| norm(&e.uri))
        .find(|u| u.ends_with("/debian-security"))
        .unwrap_or_else(|| format!("{main}-security"));
    Some(Mirror {
        uri: main,
        security_uri: security,
    })
}

/// dpkg path filters: no docs (copyright files kept), man pages, info pages, translations,
/// or lintian overrides.
pub const DPKG_FILTERS: &[&str] = &[
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
    "path-exclude=/usr/share/lintian/*",
    "path-exclude=/usr/share/linda/*",
];

/// Runs mmdebstrap for `recipe` into `target` (which must not exist yet), passing each line it
/// prints to `on_line`. With a package `cache`, the build first takes the cache's verified
/// `.deb` files (hard links in `staging`, which is removed again), mmdebstrap downloads only
/// what they lack, and what the tree then holds goes back into the cache for image `image`
/// (see `aptcache.rs`).
pub fn bootstrap(
    recipe: &Recipe,
    mirror: &Mirror,
    target: &Path,
    cache: Option<(&AptCache, &Path)>,
    on_line: &mut dyn FnMut(&str),
) -> Result<(), ImageError> {
    let Some((cache, staging)) = cache else {
        return cmd::run_streaming(mmdebstrap_command(recipe, mirror, target, None), on_line);
    };
    let staged = cache.stage(staging)?;
    for (name, why) in &staged.dropped {
        on_line(&format!("package cache: deleted {name}: {why}"));
    }
    on_line(&format!(
        "package cache: {} files ({:.1} MiB) verified in {} ms",
        staged.files,
        mib(staged.bytes),
        staged.elapsed_ms
    ));
    let ran = cmd::run_streaming(
        mmdebstrap_command(recipe, mirror, target, Some(staging)),
        on_line,
    );
    crate::publish::safe_remove(staging)?;
    ran?;
    let harvested = cache.harvest(&recipe.name, target)?;
    on_line(&format!(
        "package cache: {} packages used, {} downloaded ({:.1} MiB) and kept, {} reused; \
         {} no longer used removed ({:.1} MiB); {} files ({:.1} MiB) cached",
        harvested.used,
        harvested.added,
        mib(harvested.added_bytes),
        harvested.used - harvested.added,
        harvested.pruned,
        mib(harvested.pruned_bytes),
        harvested.total_files,
        mib(harvested.total_bytes)
    ));
    Ok(())
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

/// `s` as one shell word.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The mmdebstrap invocation for `recipe`: options and packages, then suite, target,
/// sources. (A recipe's own steps run later, in a build guest: nothing of a recipe runs as
/// root on the host.)
///
/// mmdebstrap runs in mount and PID namespaces of its own, and dies with the daemon:
/// - `unshare --mount --propagation private`: the `proc`, `sys`, `dev/pts` and `dev/shm` it
///   mounts in the target vanish with it however it ends (run in the daemon's namespace, a
///   build killed with its daemon left them mounted on the host, and the build directory
///   could never be removed);
/// - `--pid --fork --kill-child=KILL`: mmdebstrap is the init of a PID namespace, so when it
///   dies the kernel kills every process of the build (apt, dpkg, maintainer scripts), and
///   it is killed when `unshare` dies;
/// - `setpriv --pdeathsig KILL` (which execs `unshare`): `unshare` is killed when the thread
///   that spawned it ends, i.e. when the daemon dies (the spawning thread blocks in `wait`
///   until the build ends, so it never ends first). A daemon killed mid-build leaves no
///   helper working in the home.
///
/// With `staging` (the package cache's verified files), a setup hook hard-links them into
/// the tree's `/var/cache/apt/archives` before apt runs (apt then downloads only the rest),
/// and the tree keeps every `.deb` for the harvest: `--skip=essential/unlink` (mmdebstrap
/// would delete the Essential set's files after installing them) and
/// `--skip=cleanup/apt/cache` (and the apt cache at the end); [`finish`] empties it.
fn mmdebstrap_command(
    recipe: &Recipe,
    mirror: &Mirror,
    target: &Path,
    staging: Option<&Path>,
) -> Command {
    let mut c = Command::new("setpriv");
    c.args(["--pdeathsig", "KILL", "--", "unshare"]);
    c.args(["--mount", "--propagation", "private"]);
    c.args(["--pid", "--fork", "--kill-child=KILL", "--", "mmdebstrap"]);
    c.args(["--mode=root", "--variant=essential", "--format=directory"]);
    if !recipe.packages.is_empty() {
        c.arg(format!("--include={}", recipe.packages.join(",")));
    }
    for filter in DPKG_FILTERS {
        c.arg(format!("--dpkgopt={filter}"));
    }
    if let Some(staging) = staging {
        c.args(["--skip=essential/unlink", "--skip=cleanup/apt/cache"]);
        c.arg(format!(
            "--setup-hook=mkdir -p \"$1/var/cache/apt/archives\" && cp -al -- {}/. \"$1/var/cache/apt/archives/\"",
            shell_quote(&staging.to_string_lossy())
        ));
    }
    c.arg(&recipe.suite).arg(target);
    c.args(mirror.source_lines(&recipe.suite));
    c
}

/// Removes what a sandbox never needs (apt lists and caches, build logs) and writes the guest
/// identity files.
pub fn finish(root: &Path) -> Result<(), ImageError> {
    for dir in [
        "var/lib/apt/lists",
        "var/cache/apt",
        "var/log/apt",
        "var/cache/debconf",
    ] {
        empty_dir(&root.join(dir), &["partial", "lock", "archives"])?;
    }
    empty_dir(&root.join("var/cache/apt/archives"), &["partial", "lock"])?;
    for file in [
        "var/log/dpkg.log",
        "var/log/alternatives.log",
        "var/log/bootstrap.log",
        "var/lib/dpkg/status-old",
        "var/lib/dpkg/available-old",
        "var/lib/dpkg/diversions-old",
    ] {
        remove_file_if_exists(&root.join(file))?;
    }
    let write = |rel: &str, content: &str| -> Result<(), ImageError> {
        let path = root.join(rel);
        std::fs::write(&path, content).ctx("write", &path)
    };
    write("etc/hostname", &format!("{GUEST_HOSTNAME}\n"))?;
    write(
        "etc/hosts",
        &format!(
            "127.0.0.1\tlocalhost\n127.0.1.1\t{GUEST_HOSTNAME}\n::1\tlocalhost ip6-localhost ip6-loopback\n"
        ),
    )?;
    write(
        "etc/fstab",
        "# The kiln agent mounts the root filesystem (/dev/vda) itself.\n\
         /dev/vda\t/\text4\tdefaults\t0\t0\n",
    )?;
    // Empty, so nothing mistakes the builder's identity for the guest's.
    write("etc/machine-id", "")?;
    // mmdebstrap may leave the builder's resolver configuration: the guest gets its own.
    remove_file_if_exists(&root.join("etc/resolv.conf"))?;
    Ok(())
}

/// Removes the contents of `dir` except the entries named in `keep` (missing dir: no-op).
fn empty_dir(dir: &Path, keep: &[&str]) -> Result<(), ImageError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(ImageError::io("read directory", dir, e)),
    };
    for entry in entries {
        let entry = entry.ctx("read directory", dir)?;
        if keep.iter().any(|k| entry.file_name() == **k) {
            continue;
        }
        let path = entry.path();
        let ft = entry.file_type().ctx("stat", &path)?;
        if ft.is_dir() {
            crate::publish::safe_remove(&path)?;
        } else {
            std::fs::remove_file(&path).ctx("remove", &path)?;
        }
    }
    Ok(())
}

fn remove_file_if_exists(path: &Path) -> Result<(), ImageError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ImageError::io("remove", path, e)),
    }
}

/// Approximate space the tree at `root` needs in ext4: file sizes rounded up to 4 KiB blocks,
/// plus one block per directory and symlink. Does not follow symlinks or cross filesystems.
pub fn tree_bytes(root: &Path) -> Result<u64, ImageError> {
    use std::os::unix::fs::MetadataExt;
    let root_dev = std::fs::symlink_metadata(root).ctx("stat", root)?.dev();
    let mut total = 0u64;
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).ctx("read directory", &dir)? {
            let entry = entry.ctx("read directory", &dir)?;
            let path = entry.path();
            let m = std::fs::symlink_metadata(&path).ctx("stat", &path)?;
            total += m.len().div_ceil(4096).max(1) * 4096;
            if m.is_dir() && m.dev() == root_dev {
                stack.push(path);
            }
        }
    }
    Ok(total)
}

/// Apparent size for a rootfs holding `content` bytes: content plus headroom (half the
/// content, at least [`MIN_HEADROOM_BYTES`]), at least [`MIN_ROOTFS_BYTES`], rounded up to
/// whole MiB.
pub fn rootfs_size(content: u64) -> u64 {
    let size = content + (content / 2).max(MIN_HEADROOM_BYTES);
    size.max(MIN_ROOTFS_BYTES).div_ceil(1 << 20) << 20
}

/// A UUID (8-4-4-4-12) made from the first 32 hex digits of `fingerprint`, version 4 bits set.
pub fn uuid_from_fingerprint(fingerprint: &str) -> String {
    let mut hex: Vec<u8> = fingerprint
        .bytes()
        .filter(u8::is_ascii_hexdigit)
        .chain(std::iter::repeat(b'0'))
        .take(32)
        .collect();
    hex[12] = b'4';
    hex[16] = b"89ab"[usize::from(hex[16] % 4)];
    let s = String::from_utf8_lossy(&hex).into_owned();
    format!(
        "{}-{}-{}-{}-{}",
        &s[..8],
        &s[8..12],
        &s[12..16],
        &s[16..20],
        &s[20..]
    )
}

/// Packs the tree at `root` into a sparse ext4 image at `out` (which must not exist).
pub fn pack_ext4(
    root: &Path,
    out: &Path,
    uuid: &str,
    disk_mib: Option<u32>,
    on_line: &mut dyn FnMut(&str),
) -> Result<u64, ImageError> {
    let content = tree_bytes(root)?;
    let size = match disk_mib {
        None => rootfs_size(content),
        Some(mib) => {
            let size = u64::from(mib) << 20;
            // ext4's own metadata (inode tables, bitmaps) needs room beside the content.
            let need = content + content / 8 + (64 << 20);
            if size < need {
                return Err(ImageError::BadRecipe {
                    file: "recipe".to_owned(),
                    line: 0,
                    column: 0,
                    field: "disk_mib".to_owned(),
                    message: format!(
                        "{mib} MiB is too small for the root file system's {} MiB of content (at least {} MiB)",
                        content >> 20,
                        need.div_ceil(1 << 20)
                    ),
                });
            }
            size
        }
    };
    let file = std::fs::File::create_new(out).ctx("create", out)?;
    file.set_len(size).ctx("resize", out)?;
    drop(file);
    let mut c = Command::new("mkfs.ext4");
    c.args(["-q", "-F", "-t", "ext4", "-O", "^has_journal", "-m", "0"])
        .args(["-L", "kiln-root", "-U", uuid])
        .args(["-E", &format!("hash_seed={uuid}")])
        .arg("-d")
        .arg(root)
        .arg(out);
    cmd::run_streaming(c, on_line)?;
    std::fs::File::open(out)
        .and_then(|f| f.sync_all())
        .ctx("sync", out)?;
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_deb822_host_style_file() {
        let text = "Types: deb\n# comment\nURIs: http://deb.debian.org/debian\n\
                    Suites: bookworm bookworm-updates\nComponents: main\n\n\
                    Types: deb\nURIs: http://deb.debian.org/debian-security\n\
                    Suites: bookworm-security\nComponents: main\n\n\
                    Types: deb-src\nURIs: http://src.example/debian\nSuites: bookworm\n";
        let entries = parse_deb822(text);
        assert_eq!(entries.len(), 2);
        assert_eq!(
            from_sources(&entries),
            Some(Mirror {
                uri: "http://deb.debian.org/debian".into(),
                security_uri: "http://deb.debian.org/debian-security".into(),
            })
        );
    }

    #[test]
    fn parse_one_line_with_options_and_comments() {
        let text = "# deb http://old/debian buster main\n\
                    deb [arch=amd64 signed-by=/k.gpg] http://mirror.example/debian/ bookworm main\n\
                    deb-src http://mirror.example/debian bookworm main\n";
        let entries = parse_one_line(text);
        assert_eq!(
            entries,
            [SourceEntry {
                uri: "http://mirror.example/debian/".into(),
                suites: vec!["bookworm".into()]
            }]
        );
        let m = from_sources(&entries).expect("debian mirror");
        assert_eq!(m.uri, "http://mirror.example/debian");
        assert_eq!(m.security_uri, "http://mirror.example/debian-security");
    }

    #[test]
    fn from_sources_ubuntu_host_is_none() {
        let entries = parse_one_line("deb http://archive.ubuntu.com/ubuntu jammy main\n");
        assert_eq!(from_sources(&entries), None);
    }

    #[test]
    fn mirror_resolve_explicit_wins() {
        let m = Mirror::resolve(Some("http://proxy:3142/debian/"));
        assert_eq!(m.uri, "http://proxy:3142/debian");
        assert_eq!(m.security_uri, "http://proxy:3142/debian-security");
    }

    #[test]
    fn source_lines_release_has_updates_and_security() {
        let m = Mirror::from_uri(DEFAULT_MIRROR);
        assert_eq!(
            m.source_lines("bookworm"),
            [
                "deb http://deb.debian.org/debian bookworm main",
                "deb http://deb.debian.org/debian bookworm-updates main",
                "deb http://deb.debian.org/debian-security bookworm-security main",
            ]
        );
        assert_eq!(m.source_lines("sid").len(), 1);
    }

    #[test]
    fn rootfs_size_has_floor_headroom_and_mib_alignment() {
        assert_eq!(rootfs_size(0), MIN_ROOTFS_BYTES);
        assert_eq!(rootfs_size(200 << 20), MIN_ROOTFS_BYTES);
        let big = rootfs_size((3 << 30) + 5);
        assert!(big >= (3 << 30) + (3 << 29));
        assert_eq!(big % (1 << 20), 0);
    }

    #[test]
    fn uuid_from_fingerprint_is_well_formed_and_stable() {
        let fp = "0123456789abcdef0123456789abcdef0123456789abcdef";
        let u = uuid_from_fingerprint(fp);
        assert_eq!(u, uuid_from_fingerprint(fp));
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        assert!("89ab".contains(&u[19..20]), "{u}");
    }

    #[test]
    fn mmdebstrap_command_packages_then_suite_target_sources() {
        let recipe = crate::recipe::builtin("python").expect("python");
        let c = mmdebstrap_command(
            &recipe,
            &Mirror::from_uri(DEFAULT_MIRROR),
            Path::new("/t"),
            None,
        );
        let args: Vec<String> = c
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let include = args
            .iter()
            .position(|a| a.starts_with("--include=") && a.contains("python3"))
            .expect("packages");
        let suite = args.iter().position(|a| a == "bookworm").expect("suite");
        assert!(include < suite, "{args:?}");
        assert_eq!(args[suite + 1], "/t");
        assert!(args[suite + 2].starts_with("deb http://deb.debian.org/debian bookworm main"));
    }

    #[test]
    fn mmdebstrap_command_runs_in_private_namespaces_and_dies_with_the_daemon() {
        let recipe = crate::recipe::builtin("base").expect("base");
        let c = mmdebstrap_command(
            &recipe,
            &Mirror::from_uri(DEFAULT_MIRROR),
            Path::new("/t"),
            None,
        );
        assert_eq!(c.get_program(), "setpriv");
        let args: Vec<String> = c
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args[..13],
            [
                "--pdeathsig",
                "KILL",
                "--",
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "--pid",
                "--fork",
                "--kill-child=KILL",
                "--",
                "mmdebstrap",
                "--mode=root"
            ],
            "{args:?}"
        );
    }

    #[test]
    fn mmdebstrap_command_no_customize_no_hook_args() {
        let recipe = crate::recipe::builtin("base").expect("base");
        let c = mmdebstrap_command(
            &recipe,
            &Mirror::from_uri(DEFAULT_MIRROR),
            Path::new("/t"),
            None,
        );
        assert!(
            !c.get_args()
                .any(|a| a.to_string_lossy().starts_with("--customize-hook"))
        );
    }

    #[test]
    fn mmdebstrap_command_with_cache_links_staged_files_and_keeps_every_deb() {
        let recipe = crate::recipe::builtin("base").expect("base");
        let mirror = Mirror::from_uri(DEFAULT_MIRROR);
        let staging = Path::new("/home/it's/debs.in");
        let c = mmdebstrap_command(&recipe, &mirror, Path::new("/t"), Some(staging));
        let args: Vec<String> = c
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert!(
            args.contains(&"--skip=essential/unlink".to_owned()),
            "{args:?}"
        );
        assert!(
            args.contains(&"--skip=cleanup/apt/cache".to_owned()),
            "{args:?}"
        );
        let hook = args
            .iter()
            .find_map(|a| a.strip_prefix("--setup-hook="))
            .expect("a setup hook");
        // The hook is kiln's own, with the staging path as one shell word.
        assert_eq!(
            hook,
            r#"mkdir -p "$1/var/cache/apt/archives" && cp -al -- '/home/it'\''s/debs.in'/. "$1/var/cache/apt/archives/""#
        );
        let suite = args.iter().position(|a| a == "bookworm").expect("suite");
        assert!(args.iter().position(|a| a.starts_with("--setup-hook")) < Some(suite));
        let plain = mmdebstrap_command(&recipe, &mirror, Path::new("/t"), None);
        assert!(
            !plain
                .get_args()
                .any(|a| a.to_string_lossy().starts_with("--s"))
        );
    }

    /// A real bootstrap with the cache, then the same with one cached package changed in
    /// place (same size): the second build must delete it, download it again and leave the
    /// cache with the bytes the first one verified. Needs root and the Debian mirror; two
    /// bootstraps of the Essential set (about 1–2 min).
    #[test]
    #[ignore = "root and the Debian mirror: two real bootstraps"]
    fn bootstrap_with_a_poisoned_cache_downloads_the_package_again() {
        let home = tempfile::tempdir().expect("tempdir");
        let h = home.path();
        std::fs::create_dir_all(h.join("images")).expect("mkdir");
        let cache = AptCache::new(h);
        let recipe = Recipe::debian("poison-test", "bookworm");
        let mirror = Mirror::resolve(std::env::var("KILN_DEBIAN_MIRROR").ok().as_deref());
        let mut first = Vec::new();
        bootstrap(
            &recipe,
            &mirror,
            &h.join("tree1"),
            Some((&cache, &h.join("staging1"))),
            &mut |l| first.push(l.to_owned()),
        )
        .expect("first bootstrap");
        assert!(!h.join("staging1").exists(), "staging removed");
        let deb = std::fs::read_dir(cache.archives())
            .expect("cache")
            .map(|e| e.expect("entry").path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("dash_"))
            })
            .expect("dash is cached");
        let good = crate::fingerprint::sha256_file(&deb).expect("hash");
        let mut bytes = std::fs::read(&deb).expect("read");
        let mid = bytes.len() / 2;
        bytes[mid..mid + 8].copy_from_slice(b"POISONED");
        std::fs::remove_file(&deb).expect("unlink");
        std::fs::write(&deb, &bytes).expect("poison");

        let mut second = Vec::new();
        bootstrap(
            &recipe,
            &mirror,
            &h.join("tree2"),
            Some((&cache, &h.join("staging2"))),
            &mut |l| second.push(l.to_owned()),
        )
        .expect("second bootstrap");
        let name = deb
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        assert!(
            second
                .iter()
                .any(|l| l.starts_with(&format!("package cache: deleted {name}: sha256"))),
            "{second:#?}"
        );
        assert!(
            second.iter().any(|l| l.contains(" 1 downloaded")),
            "{second:#?}"
        );
        assert_eq!(crate::fingerprint::sha256_file(&deb).expect("hash"), good);
        let installed = std::fs::read(h.join("tree2/bin/dash")).expect("dash installed");
        assert_eq!(
            installed,
            std::fs::read(h.join("tree1/bin/dash")).expect("first dash")
        );
    }

    #[test]
    fn shell_quote_survives_sh() {
        for s in ["plain", "it's", "a b", "$HOME", "'\"`"] {
            let out = Command::new("sh")
                .args(["-c", &format!("printf %s {}", shell_quote(s))])
                .output()
                .expect("sh");
            assert_eq!(String::from_utf8_lossy(&out.stdout), s);
        }
    }

    #[test]
    fn finish_removes_lists_and_writes_identity() {
        let root = tempfile::tempdir().expect("tempdir");
        let r = root.path();
        for d in [
            "etc",
            "var/lib/apt/lists/partial",
            "var/cache/apt/archives/partial",
        ] {
            std::fs::create_dir_all(r.join(d)).expect("mkdir");
        }
        std::fs::write(r.join("var/lib/apt/lists/x_Packages"), "x").expect("write");
        std::fs::write(r.join("var/cache/apt/pkgcache.bin"), "x").expect("write");
        std::fs::write(r.join("var/cache/apt/archives/a.deb"), "x").expect("write");
        std::fs::write(r.join("etc/resolv.conf"), "nameserver 1.1.1.1").expect("write");
        finish(r).expect("finish");
        assert!(!r.join("var/lib/apt/lists/x_Packages").exists());
        assert!(r.join("var/lib/apt/lists/partial").is_dir());
        assert!(!r.join("var/cache/apt/pkgcache.bin").exists());
        assert!(!r.join("var/cache/apt/archives/a.deb").exists());
        assert!(!r.join("etc/resolv.conf").exists());
        assert_eq!(
            std::fs::read_to_string(r.join("etc/hostname")).expect("read"),
            "kiln\n"
        );
    }
}
