//! Recipe files: TOML text → [`Recipe`], with errors that name the file, line, column and key
//! and say what was expected.
//!
//! Owns the recipe file format (documented in docs/images.md): which keys exist, their
//! shapes, their defaults (timeouts), and the checks that need no host state (paths absolute,
//! modes in range, names valid). Reading `[[files]]` sources (their sha256) happens here too,
//! relative to the recipe's directory. Must not: look at built images or the home (a
//! recipe's parent is resolved by `build`).
//!
//! Command forms, for `run`, `on_boot`, `on_restore`, `test`, `entrypoint`-less defaults:
//! a string is run by `/bin/sh -c`; an array is the argv itself; a table
//! `{ command = STRING|ARRAY, timeout_secs = N }` sets the timeout.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use toml::Spanned;

use super::{
    Base, DesktopSpec, FileSource, GuestCommand, KernelFlavour, ProbeCheck, ReadinessProbe, Recipe,
    RecipeFile, validate_name,
};
use crate::error::ImageError;

/// Timeout of one build step (`run`) when the recipe gives none.
pub const RUN_TIMEOUT_SECS: u64 = 1800;
/// Timeout of one `on_boot` command when the recipe gives none.
pub const ON_BOOT_TIMEOUT_SECS: u64 = 120;
/// Timeout of the `on_restore` hook when the recipe gives none.
pub const ON_RESTORE_TIMEOUT_SECS: u64 = 30;
/// Timeout of the self-test's `test` command when the recipe gives none.
pub const TEST_TIMEOUT_SECS: u64 = 120;
/// Readiness probe defaults: one attempt's timeout, the pause between attempts, the overall
/// deadline.
pub const PROBE_TIMEOUT_SECS: u64 = 5;
/// See [`PROBE_TIMEOUT_SECS`].
pub const PROBE_INTERVAL_MS: u64 = 100;
/// See [`PROBE_TIMEOUT_SECS`].
pub const PROBE_DEADLINE_SECS: u64 = 60;
/// Largest file a recipe may copy into an image (`[[files]]`).
pub const MAX_FILE_BYTES: u64 = 1 << 30;

/// The keys of a recipe file, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRecipe {
    name: Option<Spanned<String>>,
    from: Option<Spanned<String>>,
    #[serde(default)]
    packages: Vec<Spanned<String>>,
    #[serde(default)]
    files: Vec<RawFile>,
    #[serde(default)]
    env: BTreeMap<Spanned<String>, String>,
    workdir: Option<Spanned<String>>,
    user: Option<Spanned<String>>,
    entrypoint: Option<Spanned<Vec<String>>>,
    cmd: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    run: Vec<Spanned<RawCommand>>,
    on_boot: Option<Spanned<OneOrMany>>,
    readiness: Option<Spanned<RawReadiness>>,
    on_restore: Option<Spanned<RawCommand>>,
    test: Option<Spanned<RawCommand>>,
    cpus: Option<Spanned<u32>>,
    memory_mib: Option<Spanned<u32>>,
    disk_mib: Option<Spanned<u32>>,
    kernel: Option<Spanned<String>>,
    #[serde(default)]
    modules: Vec<Spanned<String>>,
    desktop: Option<Spanned<RawDesktop>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDesktop {
    user: Option<String>,
    display: Option<String>,
    screen: Option<String>,
}

/// The desktop user and screen of a `[desktop]` table that names none.
const DEFAULT_DESKTOP_USER: &str = "kiln";
const DEFAULT_DISPLAY: &str = ":0";
const DEFAULT_SCREEN: (u32, u32) = (1280, 800);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    src: Option<Spanned<String>>,
    content: Option<String>,
    dst: Spanned<String>,
    mode: Option<Spanned<RawMode>>,
    owner: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawMode {
    Int(u32),
    Text(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum Argv {
    Shell(String),
    Exec(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawCommand {
    Plain(Argv),
    Table(CommandTable),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CommandTable {
    command: Argv,
    timeout_secs: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(RawCommand),
    Many(Vec<RawCommand>),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawReadiness {
    Plain(Argv),
    Table(ProbeTable),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProbeTable {
    command: Option<Argv>,
    port: Option<u16>,
    timeout_secs: Option<u64>,
    interval_ms: Option<u64>,
    deadline_secs: Option<u64>,
}

/// Where a problem is: the file's name and its text (to turn byte offsets into lines).
struct Source<'a> {
    file: &'a str,
    text: &'a str,
}

impl Source<'_> {
    fn err(&self, at: Option<std::ops::Range<usize>>, field: &str, message: String) -> ImageError {
        let (line, column) = match at {
            Some(span) => line_column(self.text, span.start),
            None => (0, 0),
        };
        ImageError::BadRecipe {
            file: self.file.to_owned(),
            line,
            column,
            field: field.to_owned(),
            message,
        }
    }

    fn at<T>(&self, v: &Spanned<T>, field: &str, message: String) -> ImageError {
        self.err(Some(v.span()), field, message)
    }
}

/// 1-based line and column of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text.as_bytes()[..offset.min(text.len())];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |p| p + 1);
    (line, offset - line_start + 1)
}

/// The key written at the start of the line holding `offset` (`key = ...`), for errors of the
/// TOML decoder, which point at the value.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let start = text[..offset.min(text.len())]
        .rfind('\n')
        .map_or(0, |p| p + 1);
    let line = text[start..].lines().next()?;
    let (key, _) = line.split_once('=')?;
    let key = key.trim();
    (!key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.\"".contains(&b)))
    .then(|| key.trim_matches('"').to_owned())
}

/// Parses the recipe file at `path`. `[[files]]` sources are read (and hashed) relative to
/// its directory; `name` overrides the file's `name` (`--name`).
pub fn load(path: &Path, name: Option<&str>) -> Result<Recipe, ImageError> {
    // The caller named a file that cannot be read: a bad request, not a host failure.
    let text = std::fs::read_to_string(path).map_err(|e| ImageError::BadRecipe {
        file: path.display().to_string(),
        line: 0,
        column: 0,
        field: "recipe".to_owned(),
        message: format!("cannot read the recipe file: {e}"),
    })?;
    let dir = path.parent().unwrap_or(Path::new("."));
    parse(&path.display().to_string(), &text, dir, name)
}

/// Parses recipe `text` (named `file` in errors); relative `src` paths are resolved against
/// `dir`.
pub fn parse(file: &str, text: &str, dir: &Path, name: Option<&str>) -> Result<Recipe, ImageError> {
    let src = Source { file, text };
    let raw: RawRecipe = toml::from_str(text).map_err(|e| {
        let span = e.span();
        let field = span
            .clone()
            .and_then(|s| key_at(text, s.start))
            .unwrap_or_else(|| "recipe".to_owned());
        let message = e.message().trim().replace('\n', " ");
        src.err(span, &field, explain(&field, &message))
    })?;

    let name = match (name, &raw.name) {
        (Some(n), _) => {
            validate_name(n).map_err(|e| src.err(None, "name", e.to_string()))?;
            n.to_owned()
        }
        (None, Some(n)) => {
            validate_name(n.get_ref()).map_err(|e| src.at(n, "name", e.to_string()))?;
            n.get_ref().clone()
        }
        (None, None) => {
            return Err(src.err(
                None,
                "name",
                "missing: give the image a name (`name = \"myimage\"`, or --name)".to_owned(),
            ));
        }
    };
    let mut recipe = Recipe::debian(&name, super::DEFAULT_SUITE);
    if let Some(from) = &raw.from {
        let from_str = from.get_ref().as_str();
        if let Some(suite) = from_str.strip_prefix("debian:") {
            if suite.is_empty()
                || !suite
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            {
                return Err(src.at(
                    from,
                    "from",
                    format!("{from_str:?}: expected a Debian suite such as \"debian:bookworm\""),
                ));
            }
            recipe.suite = suite.to_owned();
        } else {
            validate_name(from_str).map_err(|e| {
                src.at(
                    from,
                    "from",
                    format!("expected \"debian:SUITE\" or the name of a kiln image to extend: {e}"),
                )
            })?;
            if from_str == name {
                return Err(src.at(from, "from", format!("image {name} cannot extend itself")));
            }
            recipe.suite = String::new();
            recipe.from = Base::Image {
                name: from_str.to_owned(),
            };
        }
    }
    for p in &raw.packages {
        let ok = !p.get_ref().is_empty()
            && p.get_ref()
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+-.:=~".contains(&b));
        if !ok {
            return Err(src.at(
                p,
                "packages",
                format!("{:?} is not a Debian package name", p.get_ref()),
            ));
        }
    }
    recipe.packages = raw.packages.iter().map(|p| p.get_ref().clone()).collect();

    for (i, f) in raw.files.iter().enumerate() {
        recipe.files.push(file_entry(&src, dir, i, f)?);
    }
    for (k, v) in &raw.env {
        let key = k.get_ref();
        if key.is_empty() || key.contains('=') || key.contains('\0') || v.contains('\0') {
            return Err(src.at(
                k,
                "env",
                format!("{key:?}: names must be non-empty without '=' or NUL, values without NUL"),
            ));
        }
        recipe.env.insert(key.clone(), v.clone());
    }
    if let Some(w) = &raw.workdir {
        guest_path(&src, w, "workdir")?;
        recipe.workdir = Some(w.get_ref().clone());
    }
    if let Some(u) = &raw.user {
        let v = u.get_ref();
        let ok = !v.is_empty()
            && v.len() <= 64
            && v.matches(':').count() <= 1
            && !v.split(':').any(str::is_empty)
            && v.bytes().all(|b| b.is_ascii_graphic());
        if !ok {
            return Err(src.at(
                u,
                "user",
                format!("{v:?}: expected `name`, `uid`, `name:group` or `uid:gid`"),
            ));
        }
        recipe.user = Some(v.clone());
    }
    for (field, value, out) in [
        ("entrypoint", &raw.entrypoint, &mut recipe.entrypoint),
        ("cmd", &raw.cmd, &mut recipe.cmd),
    ] {
        if let Some(v) = value {
            if v.get_ref().iter().any(|a| a.contains('\0')) {
                return Err(src.at(v, field, "arguments must not contain NUL".to_owned()));
            }
            *out = v.get_ref().clone();
        }
    }
    if let Some(e) = &raw.entrypoint
        && e.get_ref().is_empty()
    {
        return Err(src.at(e, "entrypoint", "must not be empty".to_owned()));
    }

    for (i, step) in raw.run.iter().enumerate() {
        let field = format!("run[{}]", i + 1);
        recipe
            .run
            .push(command(&src, step, &field, RUN_TIMEOUT_SECS)?);
    }
    if let Some(b) = &raw.on_boot {
        let span = b.span();
        let list: Vec<&RawCommand> = match b.get_ref() {
            OneOrMany::One(c) => vec![c],
            OneOrMany::Many(cs) => cs.iter().collect(),
        };
        for (i, c) in list.into_iter().enumerate() {
            let field = format!("on_boot[{}]", i + 1);
            recipe.on_boot.push(command_at(
                &src,
                c,
                span.clone(),
                &field,
                ON_BOOT_TIMEOUT_SECS,
            )?);
        }
    }
    if let Some(r) = &raw.readiness {
        recipe.readiness_probe = Some(readiness(&src, r)?);
    }
    if let Some(h) = &raw.on_restore {
        recipe.on_restore = Some(command(&src, h, "on_restore", ON_RESTORE_TIMEOUT_SECS)?);
    }
    if let Some(t) = &raw.test {
        recipe.test = Some(command(&src, t, "test", TEST_TIMEOUT_SECS)?);
    }
    if let Some(c) = &raw.cpus {
        if !(1..=255).contains(c.get_ref()) {
            return Err(src.at(c, "cpus", format!("{}: expected 1 to 255", c.get_ref())));
        }
        recipe.cpus = Some(*c.get_ref());
    }
    if let Some(m) = &raw.memory_mib {
        if !(64..=1 << 20).contains(m.get_ref()) {
            return Err(src.at(
                m,
                "memory_mib",
                format!("{}: expected 64 to 1048576 (MiB)", m.get_ref()),
            ));
        }
        recipe.memory_mib = Some(*m.get_ref());
    }
    if let Some(d) = &raw.disk_mib {
        if !(256..=1 << 22).contains(d.get_ref()) {
            return Err(src.at(
                d,
                "disk_mib",
                format!("{}: expected 256 to 4194304 (MiB)", d.get_ref()),
            ));
        }
        recipe.disk_mib = Some(*d.get_ref());
    }
    if let Some(k) = &raw.kernel {
        recipe.kernel = match k.get_ref().as_str() {
            "cloud" => KernelFlavour::Cloud,
            "generic" => KernelFlavour::Generic,
            other => {
                return Err(src.at(
                    k,
                    "kernel",
                    format!("{other:?}: expected \"cloud\" or \"generic\""),
                ));
            }
        };
        if !recipe.from.is_debian() {
            return Err(src.at(
                k,
                "kernel",
                "an image that extends another boots its parent's kernel".to_owned(),
            ));
        }
    }
    for m in &raw.modules {
        let v = m.get_ref();
        let ok = !v.is_empty()
            && v.len() <= 64
            && v.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-".contains(&b));
        if !ok {
            return Err(src.at(m, "modules", format!("{v:?} is not a kernel module name")));
        }
        if !recipe.modules.contains(v) {
            recipe.modules.push(v.clone());
        }
    }
    if let Some(d) = &raw.desktop {
        let raw_d = d.get_ref();
        let user = raw_d.user.as_deref().unwrap_or(DEFAULT_DESKTOP_USER);
        let user_ok = !user.is_empty()
            && user.len() <= 32
            && user != "root"
            && user
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-".contains(&b));
        if !user_ok {
            return Err(src.at(
                d,
                "desktop.user",
                format!("{user:?}: expected the name of an unprivileged user (not root)"),
            ));
        }
        let display = raw_d.display.as_deref().unwrap_or(DEFAULT_DISPLAY);
        let display_ok = display.strip_prefix(':').is_some_and(|n| {
            !n.is_empty() && n.len() <= 3 && n.bytes().all(|b| b.is_ascii_digit())
        });
        if !display_ok {
            return Err(src.at(
                d,
                "desktop.display",
                format!("{display:?}: expected an X display such as \":0\""),
            ));
        }
        let (width, height) = match &raw_d.screen {
            None => DEFAULT_SCREEN,
            Some(s) => super::parse_screen(s).map_err(|e| src.at(d, "desktop.screen", e))?,
        };
        recipe.desktop = Some(DesktopSpec {
            user: user.to_owned(),
            display: display.to_owned(),
            width,
            height,
        });
        if recipe.from.is_debian() && recipe.kernel.is_cloud() {
            return Err(src.at(
                d,
                "desktop",
                "a desktop needs kernel = \"generic\" (the cloud kernel has no display driver)"
                    .to_owned(),
            ));
        }
    }
    Ok(recipe)
}

/// Adds what was expected to the TOML decoder's message for the keys whose shape is ours.
fn explain(field: &str, message: &str) -> String {
    let expected = match field.split('.').next().unwrap_or(field) {
        "run" => {
            "a list of commands (each a string, an array of strings, or { command, timeout_secs })"
        }
        "on_boot" => {
            "a command or a list of commands (string, array of strings, or { command, timeout_secs })"
        }
        "on_restore" | "test" => {
            "a command (string, array of strings, or { command, timeout_secs })"
        }
        "readiness" => {
            "a command, or { command = ..., timeout_secs, interval_ms, deadline_secs }, or { port = N, ... }"
        }
        "mode" => "an octal string such as \"0644\" or an integer such as 0o644",
        "files" => "[[files]] tables with dst and src or content",
        "packages" | "entrypoint" | "cmd" => "an array of strings",
        "env" => "a table of strings, e.g. env = { KEY = \"value\" }",
        _ => return message.to_owned(),
    };
    if message.contains("did not match any variant") || message.contains("invalid type") {
        format!("expected {expected}")
    } else {
        format!("{message} (expected {expected})")
    }
}

fn guest_path(src: &Source<'_>, v: &Spanned<String>, field: &str) -> Result<(), ImageError> {
    let p = v.get_ref();
    if !p.starts_with('/') || p.contains('\0') || p.split('/').any(|c| c == "..") {
        return Err(src.at(
            v,
            field,
            format!("{p:?}: expected an absolute guest path without `..`"),
        ));
    }
    Ok(())
}

fn file_entry(
    src: &Source<'_>,
    dir: &Path,
    i: usize,
    f: &RawFile,
) -> Result<RecipeFile, ImageError> {
    let field = |k: &str| format!("files[{}].{k}", i + 1);
    guest_path(src, &f.dst, &field("dst"))?;
    if f.dst.get_ref().ends_with('/') || f.dst.get_ref() == "/" {
        return Err(src.at(
            &f.dst,
            &field("dst"),
            "expected the path of a file, not a directory".to_owned(),
        ));
    }
    let mode = match &f.mode {
        None => 0o644,
        Some(m) => {
            let value = match m.get_ref() {
                RawMode::Int(v) => Some(*v),
                RawMode::Text(t) => u32::from_str_radix(t.trim_start_matches("0o"), 8).ok(),
            };
            match value {
                Some(v) if v <= 0o7777 => v,
                _ => {
                    return Err(src.at(
                        m,
                        &field("mode"),
                        "expected permission bits such as \"0644\" or 0o755 (at most 0o7777)"
                            .to_owned(),
                    ));
                }
            }
        }
    };
    if let Some(o) = &f.owner {
        let v = o.get_ref();
        let ok = !v.is_empty()
            && v.len() <= 64
            && v.matches(':').count() <= 1
            && !v.split(':').any(str::is_empty)
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-:".contains(&b));
        if !ok {
            return Err(src.at(
                o,
                &field("owner"),
                format!("{v:?}: expected `user` or `user:group` (names or ids)"),
            ));
        }
    }
    let (sha256, source) = match (&f.src, &f.content) {
        (Some(s), None) => {
            let path = dir.join(s.get_ref());
            let meta = std::fs::metadata(&path).map_err(|e| {
                src.at(
                    s,
                    &field("src"),
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            if !meta.is_file() {
                return Err(src.at(
                    s,
                    &field("src"),
                    format!("{} is not a regular file", path.display()),
                ));
            }
            if meta.len() > MAX_FILE_BYTES {
                return Err(src.at(
                    s,
                    &field("src"),
                    format!(
                        "{} is {} bytes; files copied by a recipe are at most {MAX_FILE_BYTES}",
                        path.display(),
                        meta.len()
                    ),
                ));
            }
            let sha = crate::fingerprint::sha256_file(&path)
                .map_err(|e| src.at(s, &field("src"), crate::error_chain(&e)))?;
            (sha, FileSource::Path(path))
        }
        (None, Some(c)) => {
            use sha2::Digest;
            let sha = hex::encode(sha2::Sha256::digest(c.as_bytes()));
            (sha, FileSource::Inline(c.as_bytes().to_vec()))
        }
        _ => {
            return Err(src.at(
                &f.dst,
                &field("src"),
                "give exactly one of `src` (a file next to the recipe) or `content`".to_owned(),
            ));
        }
    };
    Ok(RecipeFile {
        dst: f.dst.get_ref().clone(),
        mode,
        owner: f.owner.as_ref().map(|o| o.get_ref().clone()),
        sha256,
        source: Some(source),
    })
}

fn argv_of(a: &Argv) -> Vec<String> {
    match a {
        Argv::Shell(s) => vec!["/bin/sh".to_owned(), "-c".to_owned(), s.clone()],
        Argv::Exec(v) => v.clone(),
    }
}

fn command(
    src: &Source<'_>,
    c: &Spanned<RawCommand>,
    field: &str,
    default_timeout_secs: u64,
) -> Result<GuestCommand, ImageError> {
    command_at(src, c.get_ref(), c.span(), field, default_timeout_secs)
}

fn command_at(
    src: &Source<'_>,
    c: &RawCommand,
    span: std::ops::Range<usize>,
    field: &str,
    default_timeout_secs: u64,
) -> Result<GuestCommand, ImageError> {
    let (argv, timeout) = match c {
        RawCommand::Plain(a) => (argv_of(a), None),
        RawCommand::Table(t) => (argv_of(&t.command), t.timeout_secs),
    };
    check_argv(src, &argv, span.clone(), field)?;
    let timeout_secs = timeout.unwrap_or(default_timeout_secs);
    if !(1..=86_400).contains(&timeout_secs) {
        return Err(src.err(
            Some(span),
            field,
            format!("timeout_secs {timeout_secs}: expected 1 to 86400"),
        ));
    }
    Ok(GuestCommand {
        argv,
        timeout_ms: timeout_secs * 1000,
    })
}

fn check_argv(
    src: &Source<'_>,
    argv: &[String],
    span: std::ops::Range<usize>,
    field: &str,
) -> Result<(), ImageError> {
    if argv.is_empty() || argv[0].is_empty() {
        return Err(src.err(Some(span), field, "the command is empty".to_owned()));
    }
    if argv.iter().any(|a| a.contains('\0')) {
        return Err(src.err(
            Some(span),
            field,
            "arguments must not contain NUL".to_owned(),
        ));
    }
    Ok(())
}

fn readiness(src: &Source<'_>, r: &Spanned<RawReadiness>) -> Result<ReadinessProbe, ImageError> {
    let span = r.span();
    let (check, interval_ms, deadline_secs) = match r.get_ref() {
        RawReadiness::Plain(a) => {
            let argv = argv_of(a);
            check_argv(src, &argv, span.clone(), "readiness")?;
            let check = ProbeCheck::Command(GuestCommand {
                argv,
                timeout_ms: PROBE_TIMEOUT_SECS * 1000,
            });
            (check, None, None)
        }
        RawReadiness::Table(t) => {
            let check = match (&t.command, t.port) {
                (Some(a), None) => {
                    let argv = argv_of(a);
                    check_argv(src, &argv, span.clone(), "readiness.command")?;
                    ProbeCheck::Command(GuestCommand {
                        argv,
                        timeout_ms: t.timeout_secs.unwrap_or(PROBE_TIMEOUT_SECS).max(1) * 1000,
                    })
                }
                (None, Some(port)) if port > 0 => ProbeCheck::TcpPort { port },
                _ => {
                    return Err(src.err(
                        Some(span),
                        "readiness",
                        "give exactly one of `command` or `port` (1 to 65535)".to_owned(),
                    ));
                }
            };
            (check, t.interval_ms, t.deadline_secs)
        }
    };
    let interval_ms = interval_ms.unwrap_or(PROBE_INTERVAL_MS);
    let deadline_ms = deadline_secs.unwrap_or(PROBE_DEADLINE_SECS) * 1000;
    if interval_ms == 0 || interval_ms >= deadline_ms {
        return Err(src.err(
            Some(span),
            "readiness",
            format!(
                "interval_ms {interval_ms} must be above 0 and below the deadline ({deadline_ms} ms)"
            ),
        ));
    }
    Ok(ReadinessProbe {
        check,
        interval_ms,
        deadline_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_ok(text: &str) -> Recipe {
        parse("r.toml", text, Path::new("/nonexistent"), None).expect("parses")
    }

    fn parse_err(text: &str) -> (usize, String, String) {
        match parse("r.toml", text, Path::new("/nonexistent"), None) {
            Err(ImageError::BadRecipe {
                line,
                field,
                message,
                file,
                ..
            }) => {
                assert_eq!(file, "r.toml");
                (line, field, message)
            }
            other => panic!("expected BadRecipe, got {other:?}"),
        }
    }

    #[test]
    fn parse_every_key() {
        let r = parse_ok(
            r#"
name = "app"
from = "debian:trixie"
packages = ["git", "python3"]
env = { A = "1", B = "two" }
workdir = "/srv"
user = "app:app"
entrypoint = ["/usr/bin/python3"]
cmd = ["-m", "http.server"]
run = ["echo one", ["/bin/true"], { command = "sleep 1", timeout_secs = 9 }]
on_boot = "echo booted"
readiness = { port = 8000, deadline_secs = 30 }
on_restore = ["/bin/true"]
test = "curl -s localhost:8000"
cpus = 2
memory_mib = 512
disk_mib = 4096

[[files]]
content = "hello"
dst = "/etc/app.conf"
mode = "0600"
owner = "app"
"#,
        );
        assert_eq!(r.name, "app");
        assert_eq!(r.suite, "trixie");
        assert_eq!(r.from, Base::Debian);
        assert_eq!(r.packages, ["git", "python3"]);
        assert_eq!(r.env["B"], "two");
        assert_eq!(r.workdir.as_deref(), Some("/srv"));
        assert_eq!(r.user.as_deref(), Some("app:app"));
        assert_eq!(
            r.default_argv(&[]),
            ["/usr/bin/python3", "-m", "http.server"]
        );
        assert_eq!(r.run.len(), 3);
        assert_eq!(r.run[0].argv, ["/bin/sh", "-c", "echo one"]);
        assert_eq!(r.run[0].timeout_ms, RUN_TIMEOUT_SECS * 1000);
        assert_eq!(r.run[1].argv, ["/bin/true"]);
        assert_eq!(r.run[2].timeout_ms, 9000);
        assert_eq!(r.on_boot.len(), 1);
        let probe = r.readiness_probe.expect("probe");
        assert_eq!(probe.check, ProbeCheck::TcpPort { port: 8000 });
        assert_eq!(probe.deadline_ms, 30_000);
        assert_eq!(r.on_restore.expect("hook").argv, ["/bin/true"]);
        assert_eq!(r.cpus, Some(2));
        assert_eq!(r.memory_mib, Some(512));
        assert_eq!(r.disk_mib, Some(4096));
        let [f] = r.files.as_slice() else {
            panic!("{:?}", r.files)
        };
        assert_eq!(f.mode, 0o600);
        assert_eq!(
            f.sha256,
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(f.source, Some(FileSource::Inline(b"hello".to_vec())));
    }

    #[test]
    fn parse_from_image_and_src_relative_to_recipe() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("app.py"), "print(1)\n").expect("write");
        let path = dir.path().join("app.toml");
        std::fs::write(
            &path,
            "name = \"app\"\nfrom = \"python\"\n[[files]]\nsrc = \"app.py\"\ndst = \"/srv/app.py\"\nmode = 0o755\n",
        )
        .expect("write");
        let r = load(&path, None).expect("load");
        assert_eq!(
            r.from,
            Base::Image {
                name: "python".into()
            }
        );
        assert_eq!(r.suite, "");
        assert_eq!(r.files[0].mode, 0o755);
        assert_eq!(
            r.files[0].source,
            Some(FileSource::Path(dir.path().join("app.py")))
        );
        // A missing file is a bad recipe (400), not an I/O failure of the host.
        let err = load(&dir.path().join("none.toml"), None).expect_err("missing");
        assert!(
            matches!(&err, ImageError::BadRecipe { field, .. } if field == "recipe"),
            "{err:?}"
        );
        // --name wins over the file's name.
        assert_eq!(load(&path, Some("other")).expect("load").name, "other");
    }

    #[test]
    fn parse_errors_name_line_field_and_expectation() {
        let (line, field, msg) = parse_err("name = \"a\"\npackages = [\"ok\", \"no way\"]\n");
        assert_eq!((line, field.as_str()), (2, "packages"));
        assert!(msg.contains("\"no way\""), "{msg}");

        let (line, field, msg) = parse_err("name = \"a\"\n\npakages = [\"git\"]\n");
        assert_eq!((line, field.as_str()), (3, "pakages"));
        assert!(msg.contains("unknown field"), "{msg}");

        let (line, field, msg) = parse_err("name = \"a\"\ncpus = \"two\"\n");
        assert_eq!((line, field.as_str()), (2, "cpus"));
        assert!(msg.contains("integer") || msg.contains("u32"), "{msg}");

        let (line, field, msg) = parse_err("name = \"a\"\nrun = [3]\n");
        assert_eq!((line, field.as_str()), (2, "run"));
        assert!(msg.contains("expected a list of commands"), "{msg}");

        let (line, field, _) =
            parse_err("name = \"a\"\n[[files]]\ncontent = \"x\"\ndst = \"/a\"\nmode = \"0999\"\n");
        assert_eq!((line, field.as_str()), (5, "files[1].mode"));

        let (line, field, msg) =
            parse_err("name = \"a\"\n[[files]]\nsrc = \"missing.txt\"\ndst = \"/a\"\n");
        assert_eq!((line, field.as_str()), (3, "files[1].src"));
        assert!(msg.contains("missing.txt"), "{msg}");

        let (_, field, _) = parse_err("name = \"a\"\n[[files]]\ndst = \"/a\"\n");
        assert_eq!(field, "files[1].src");

        let (line, field, _) = parse_err("name = \"a\"\nworkdir = \"srv\"\n");
        assert_eq!((line, field.as_str()), (2, "workdir"));

        // Packages on top of an image are allowed (the build bootstraps again).
        let r = parse_ok("name = \"a\"\nfrom = \"base\"\npackages = [\"git\"]\n");
        assert_eq!(r.packages, ["git"]);

        let (_, field, _) = parse_err("from = \"base\"\n");
        assert_eq!(field, "name");

        let (line, field, _) = parse_err("name = \"Bad Name\"\n");
        assert_eq!((line, field.as_str()), (1, "name"));

        let (line, field, _) =
            parse_err("name = \"a\"\nreadiness = { port = 80, command = \"x\" }\n");
        assert_eq!((line, field.as_str()), (2, "readiness"));

        let (line, field, msg) = parse_err("name = \"a\"\nrun = [\"x\"\n");
        assert_eq!((line, field.as_str()), (2, "run"));
        assert!(msg.contains("unclosed array"), "{msg}");
    }

    #[test]
    fn builtin_recipe_files_parse() {
        for name in super::super::builtin_names() {
            let r = super::super::builtin(name).expect("listed");
            assert_eq!(r.name, *name);
        }
    }

    #[test]
    fn desktop_kernel_and_modules_parse_with_defaults() {
        let r = parse_ok(
            "name = \"d\"\nkernel = \"generic\"\nmodules = [\"bochs\", \"evdev\", \"bochs\"]\n\
             [desktop]\nscreen = \"1024x768\"\n",
        );
        assert_eq!(r.kernel, KernelFlavour::Generic);
        assert_eq!(
            r.modules,
            ["bochs", "evdev"],
            "duplicates dropped, order kept"
        );
        let d = r.desktop.expect("desktop");
        assert_eq!((d.user.as_str(), d.display.as_str()), ("kiln", ":0"));
        assert_eq!((d.width, d.height), (1024, 768));
        let plain = parse_ok("name = \"p\"\n");
        assert!(plain.kernel.is_cloud() && plain.modules.is_empty() && plain.desktop.is_none());
    }

    #[test]
    fn desktop_kernel_and_modules_errors_name_the_field() {
        let cases = [
            (
                "name = \"d\"\nkernel = \"rt\"\n",
                "kernel",
                "\"cloud\" or \"generic\"",
            ),
            (
                "name = \"d\"\nmodules = [\"../x\"]\n",
                "modules",
                "not a kernel module",
            ),
            (
                "name = \"d\"\n[desktop]\n",
                "desktop",
                "kernel = \"generic\"",
            ),
            (
                "name = \"d\"\nkernel = \"generic\"\n[desktop]\nuser = \"root\"\n",
                "desktop.user",
                "unprivileged",
            ),
            (
                "name = \"d\"\nkernel = \"generic\"\n[desktop]\nscreen = \"99x99\"\n",
                "desktop.screen",
                "640x480 to 2560x1600",
            ),
            (
                "name = \"d\"\nkernel = \"generic\"\n[desktop]\ndisplay = \"0\"\n",
                "desktop.display",
                "X display",
            ),
            (
                "name = \"d\"\nfrom = \"desktop\"\nkernel = \"generic\"\n",
                "kernel",
                "parent's kernel",
            ),
        ];
        for (text, field, needle) in cases {
            let (_, f, message) = parse_err(text);
            assert_eq!(f, field, "{text}");
            assert!(message.contains(needle), "{text}: {message}");
        }
    }

    #[test]
    fn extension_keeps_the_parents_kernel_modules_and_desktop() {
        let parent = super::super::builtin("desktop").expect("desktop recipe");
        let mut child = parse_ok("name = \"mine\"\nfrom = \"desktop\"\nmodules = [\"uinput\"]\n");
        child.inherit(&parent);
        assert_eq!(child.kernel, KernelFlavour::Generic);
        assert_eq!(child.modules, ["bochs", "virtio_input", "evdev", "uinput"]);
        assert_eq!(child.desktop, parent.desktop);
    }
}
