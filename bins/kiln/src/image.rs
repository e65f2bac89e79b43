//! `kiln image build|import|ls|warm|rm`: guest images, built by the daemon (from built-in
//! recipes or recipe files) or imported (container images, disk images), with progress shown
//! here: a status line on a terminal, `==> ` marked lines otherwise, or JSON events.

use anyhow::bail;
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use kiln_api_types::{
    ImageBuildEvent, ImageBuildRecipeRequest, ImageBuildRequest, ImageImportRequest, ImageInfo,
    ImageList,
};

use kiln_client::Client;

/// `kiln image ...`.
#[derive(Debug, Subcommand)]
pub enum ImageCmd {
    /// Build an image from a recipe: a built-in name (`base`, `python`, `postgres`), an
    /// image built before from a recipe file, or a recipe file (`PATH.toml`); a no-op when
    /// nothing changed.
    Build {
        /// Recipe name or recipe file.
        recipe: String,
        /// Image name for a recipe file (default: the file's `name`).
        #[arg(long)]
        name: Option<String>,
        /// Rebuild even if the inputs are unchanged.
        #[arg(long)]
        force: bool,
        /// How to show progress: `tty` (a status line; the default on a terminal), `plain`
        /// (one line per event, with `==> ` markers for stages and steps), `json` (one
        /// event per line on stdout).
        #[arg(long, value_enum)]
        progress: Option<Progress>,
        /// Same as `--progress json`.
        #[arg(long)]
        json: bool,
    },
    /// Import a container image (`oci-archive:PATH`, `docker-archive:PATH` as `docker save`
    /// writes, `oci:DIR[:TAG]`) or a disk image (`qcow2:PATH`, `raw:PATH`, e.g. a Debian
    /// or Ubuntu cloud image) as an image booted by kiln's kernel and agent.
    Import {
        /// `SCHEME:PATH`.
        source: String,
        /// Image name (default for container images: the file name without extension;
        /// required for disk images).
        #[arg(long)]
        name: Option<String>,
        /// How to show progress (see `kiln image build --progress`).
        #[arg(long, value_enum)]
        progress: Option<Progress>,
        /// Same as `--progress json`.
        #[arg(long)]
        json: bool,
    },
    /// List built images.
    Ls {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Capture the image's warm snapshot now (built first if missing), so that the next
    /// start restores instead of booting.
    Warm {
        /// Image name.
        name: String,
        /// vCPUs of the sandboxes that will use it.
        #[arg(long, default_value_t = kiln_api_types::DEFAULT_CPUS)]
        cpus: u32,
        /// Guest memory (MiB) of the sandboxes that will use it.
        #[arg(long, default_value_t = kiln_api_types::DEFAULT_MEMORY_MIB)]
        memory: u32,
        /// Print the snapshot that was captured or found as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a built image.
    Rm {
        /// Image name.
        name: String,
        /// Print `{"removed": NAME}`.
        #[arg(long)]
        json: bool,
    },
}

/// Runs `kiln image ...`.
pub async fn run(client: &Client, cmd: &ImageCmd) -> anyhow::Result<i32> {
    match cmd {
        ImageCmd::Build {
            recipe,
            name,
            force,
            progress,
            json,
        } => {
            let progress = Progress::chosen(*json, *progress);
            let target = Target::parse(recipe, name.as_deref())?;
            let (image, up_to_date) =
                build(client, &target, *force, false, progress, false).await?;
            if progress != Progress::Json {
                report(&image, up_to_date);
            }
            Ok(0)
        }
        ImageCmd::Import {
            source,
            name,
            progress,
            json,
        } => {
            let progress = Progress::chosen(*json, *progress);
            let target = Target::Import(absolute_source(source)?, name.clone());
            let (image, _) = build(client, &target, false, false, progress, false).await?;
            if progress != Progress::Json {
                report(&image, false);
            }
            Ok(0)
        }
        ImageCmd::Ls { json } => {
            let list: ImageList = client.image_list().await?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                println!(
                    "{:<14} {:<16} {:<18} {:>10}  CREATED",
                    "ID", "NAME", "FROM", "SIZE"
                );
                for i in &list.images {
                    println!(
                        "{:<14} {:<16} {:<18} {:>10}  {}",
                        i.id,
                        i.name,
                        i.from,
                        human_bytes(i.size_bytes),
                        crate::ps::ago(i.created_unix)
                    );
                }
            }
            Ok(0)
        }
        ImageCmd::Warm {
            name,
            cpus,
            memory,
            json,
        } => {
            // A start captures the snapshot if it is missing and proves it restores.
            let req = kiln_api_types::SandboxSpec {
                source: kiln_api_types::SandboxSource::Image {
                    image: name.parse()?,
                    machine: kiln_api_types::MachineSpec {
                        cpus: *cpus,
                        memory_mib: *memory,
                        screen: None,
                    },
                    cold: false,
                },
                ..Default::default()
            };
            req.validate().map_err(|e| {
                anyhow::anyhow!(
                    e.to_string()
                        .replace("memory_mib", "--memory")
                        .replace("cpus", "--cpus")
                )
            })?;
            ensure_built(client, name).await?;
            let info = client.sandbox_create(&req).await?;
            client.sandbox_delete(&info.id).await?;
            if info.status.source != kiln_api_types::StartSource::Snapshot {
                bail!(
                    "no warm snapshot for {name}: the sandbox cold-booted (see kilnd.log for why)"
                );
            }
            eprintln!(
                "warm snapshot of {name} ready ({cpus} vCPU, {memory} MiB): restored in {} ms",
                info.status.boot_ms.unwrap_or(0)
            );
            if *json {
                println!(
                    "{}",
                    serde_json::json!({
                        "image": name,
                        "snapshot": info.status.snapshot,
                        "restore_ms": info.status.boot_ms,
                    })
                );
            }
            Ok(0)
        }
        ImageCmd::Rm { name, json } => {
            client.image_delete(name).await?;
            if *json {
                println!("{}", serde_json::json!({ "removed": name }));
                return Ok(0);
            }
            println!("removed image {name}");
            Ok(0)
        }
    }
}

/// How build progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Progress {
    /// A status line that redraws (stage, last line, elapsed).
    Tty,
    /// One line per event; stages and steps as `==> ` lines.
    Plain,
    /// One JSON event per line on stdout.
    Json,
}

impl Progress {
    /// What `--json` and `--progress` ask for: JSON with `--json`, else the flag, else
    /// [`Progress::auto`].
    fn chosen(json: bool, progress: Option<Progress>) -> Progress {
        match (json, progress) {
            (true, _) => Progress::Json,
            (false, Some(p)) => p,
            (false, None) => Progress::auto(),
        }
    }

    /// `tty` when stderr is a terminal, else `plain`.
    pub fn auto() -> Progress {
        if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            Progress::Tty
        } else {
            Progress::Plain
        }
    }
}

/// What to build: an image by name or a recipe file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A built-in recipe or an image built before.
    Name(String),
    /// A recipe file (absolute) and an optional name for it.
    File(std::path::PathBuf, Option<String>),
    /// An import source (`SCHEME:/absolute/path`) and an optional name.
    Import(String, Option<String>),
}

/// `SCHEME:PATH` with a relative path made absolute (the daemon resolves nothing against its
/// own working directory).
fn absolute_source(source: &str) -> anyhow::Result<String> {
    let Some((scheme, path)) = source.split_once(':') else {
        bail!(
            "import source {source:?}: expected SCHEME:PATH (oci-archive:, docker-archive:, oci:, qcow2:, raw:)"
        );
    };
    if path.starts_with('/') || path.is_empty() {
        return Ok(source.to_owned());
    }
    let cwd = std::env::current_dir()?;
    Ok(format!("{scheme}:{}/{path}", cwd.display()))
}

impl Target {
    /// A recipe file when `arg` ends in `.toml` or holds a `/`, else a name.
    pub fn parse(arg: &str, name: Option<&str>) -> anyhow::Result<Target> {
        if arg.ends_with(".toml") || arg.contains('/') {
            let path = std::fs::canonicalize(arg)
                .map_err(|e| anyhow::anyhow!("recipe file {arg}: {e}"))?;
            return Ok(Target::File(path, name.map(str::to_owned)));
        }
        if name.is_some() {
            bail!("--name is for recipe files; {arg} is an image name");
        }
        Ok(Target::Name(arg.to_owned()))
    }
}

/// Makes sure the image `image` (a name or a recipe file) is built and up to date, building
/// it first (with progress on stderr) when it is missing or stale; what `kiln run` and
/// `kiln create` do before they start a sandbox. The kernel package is not re-resolved
/// here (`kiln image build` does that).
pub async fn ensure_built(client: &Client, image: &str) -> anyhow::Result<ImageInfo> {
    let target = Target::parse(image, None)?;
    let (info, _) = build(client, &target, false, true, Progress::auto(), true).await?;
    Ok(info)
}

/// Prints what a build produced (stderr).
fn report(image: &ImageInfo, up_to_date: bool) {
    if up_to_date {
        eprintln!(
            "image {} is up to date ({}): inputs unchanged, nothing rebuilt",
            image.name, image.id
        );
    } else if let Some(o) = &image.origin {
        eprintln!(
            "imported image {} ({}) from {}",
            image.name, image.id, o.source
        );
        eprintln!(
            "  {}, {} file system of {}{}",
            o.os_release.as_deref().unwrap_or("no /etc/os-release"),
            o.filesystem,
            human_bytes(o.size_bytes),
            o.partition
                .as_deref()
                .map(|p| format!(", partition {p}"))
                .unwrap_or_default()
        );
        eprintln!("  digest {}", o.digest);
    } else {
        eprintln!("built image {} ({})", image.name, image.id);
    }
    for f in &image.files {
        eprintln!(
            "  {:<16} {:>10} ({} on disk)",
            f.name,
            human_bytes(f.apparent_bytes),
            human_bytes(f.allocated_bytes)
        );
    }
    eprintln!(
        "  {:<16} {:>10} on disk, kernel {}",
        "total",
        human_bytes(image.size_bytes),
        image.kernel_version
    );
}

/// Shows build events as `progress` says. With `quiet`, nothing is shown until the build
/// does real work (an up-to-date check prints nothing).
struct Renderer {
    progress: Progress,
    bar: ProgressBar,
    quiet: bool,
    held: Vec<String>,
}

impl Renderer {
    fn new(progress: Progress, quiet: bool) -> Renderer {
        let bar = if progress == Progress::Tty {
            let bar = ProgressBar::new_spinner();
            bar.set_style(
                ProgressStyle::with_template("{spinner} [{elapsed_precise}] {prefix} {wide_msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar.enable_steady_tick(std::time::Duration::from_millis(120));
            bar
        } else {
            ProgressBar::hidden()
        };
        Renderer {
            progress,
            bar,
            quiet,
            held: Vec::new(),
        }
    }

    /// A line of plain output (or, on a terminal, a line above the status line).
    fn line(&mut self, text: String) {
        if self.quiet {
            self.held.push(text);
            return;
        }
        match self.progress {
            Progress::Tty => self.bar.println(text),
            Progress::Plain => eprintln!("{text}"),
            Progress::Json => {}
        }
    }

    /// Ends quiet mode: the build does work; what was held is shown.
    fn wake(&mut self) {
        if self.quiet {
            self.quiet = false;
            for text in std::mem::take(&mut self.held) {
                self.line(text);
            }
        }
    }

    fn event(&mut self, ev: &ImageBuildEvent) -> anyhow::Result<()> {
        if self.progress == Progress::Json {
            println!("{}", serde_json::to_string(ev)?);
            return Ok(());
        }
        match ev {
            ImageBuildEvent::Stage { index, total, name } => {
                if *index >= 2 {
                    self.wake();
                }
                self.bar.set_prefix(format!("[{index}/{total}] {name}"));
                self.bar.set_message("");
                self.line(format!("==> [{index}/{total}] {name}"));
            }
            ImageBuildEvent::StageDone {
                index,
                name,
                elapsed_ms,
            } => self.line(format!(
                "==> [{index}] {name}: done in {:.1} s",
                *elapsed_ms as f64 / 1000.0
            )),
            ImageBuildEvent::Log { line } => {
                if line.starts_with("rebuilding ") {
                    self.wake();
                }
                if self.progress == Progress::Tty {
                    self.bar.set_message(line.clone());
                    // Build-step output is the user's own: keep all of it on screen.
                    if self.bar.prefix().contains("steps")
                        || self.bar.prefix().contains("self-test")
                    {
                        self.line(format!("    {line}"));
                    }
                } else {
                    self.line(format!("    {line}"));
                }
            }
            ImageBuildEvent::Progress { done, total } => {
                self.bar.set_message(format!("{done}/{total}"))
            }
            ImageBuildEvent::Step { index, total, what } => {
                self.line(format!("==> step {index}/{total}: {what}"))
            }
            ImageBuildEvent::StepDone {
                index,
                exit_code,
                elapsed_ms,
            } => self.line(format!(
                "==> step {index}: exit {exit_code} in {:.1} s",
                *elapsed_ms as f64 / 1000.0
            )),
            ImageBuildEvent::Compacted {
                apparent_bytes,
                before_bytes,
                after_bytes,
            } => self.line(format!(
                "==> compacted: {} -> {} on disk ({} apparent)",
                human_bytes(*before_bytes),
                human_bytes(*after_bytes),
                human_bytes(*apparent_bytes)
            )),
            ImageBuildEvent::Done { .. } | ImageBuildEvent::Error(_) => {}
        }
        Ok(())
    }
}

/// Builds `target`, showing progress; returns the image and whether it was up to date.
pub async fn build(
    client: &Client,
    target: &Target,
    force: bool,
    keep_kernel: bool,
    progress: Progress,
    quiet_when_up_to_date: bool,
) -> anyhow::Result<(ImageInfo, bool)> {
    let mut r = Renderer::new(progress, quiet_when_up_to_date);
    let mut result: Option<(ImageInfo, bool)> = None;
    let mut failure: Option<String> = None;
    let mut on_event = |ev: ImageBuildEvent| -> anyhow::Result<()> {
        r.event(&ev)?;
        match ev {
            ImageBuildEvent::Done { up_to_date, image } => result = Some((*image, up_to_date)),
            ImageBuildEvent::Error(e) => failure = Some(e.message),
            _ => {}
        }
        Ok(())
    };
    match target {
        Target::Name(name) => {
            client
                .image_build(
                    name,
                    &ImageBuildRequest { force, keep_kernel },
                    &mut on_event,
                )
                .await?
        }
        Target::File(path, name) => {
            client
                .image_build_recipe(
                    &ImageBuildRecipeRequest {
                        recipe_path: path.display().to_string(),
                        name: name.clone(),
                        force,
                        keep_kernel,
                    },
                    &mut on_event,
                )
                .await?
        }
        Target::Import(source, name) => {
            client
                .image_import(
                    &ImageImportRequest {
                        source: source.clone(),
                        name: name.clone(),
                    },
                    &mut on_event,
                )
                .await?
        }
    }
    r.bar.finish_and_clear();
    if let Some(msg) = failure {
        // What the build printed (held while it looked like a no-op) explains the failure.
        r.wake();
        bail!("{msg}");
    }
    let Some((image, up_to_date)) = result else {
        bail!("kilnd ended the build stream without a result")
    };
    if quiet_when_up_to_date && !up_to_date && progress != Progress::Json {
        eprintln!("kiln: image {} ({}) is ready", image.name, image.id);
    }
    Ok((image, up_to_date))
}

/// `1.5 MiB`-style sizes.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absolute_source_resolves_relative_paths_only() {
        assert_eq!(
            absolute_source("oci-archive:/a/b.tar").expect("abs"),
            "oci-archive:/a/b.tar"
        );
        let cwd = std::env::current_dir().expect("cwd");
        assert_eq!(
            absolute_source("oci:lay:v1").expect("rel"),
            format!("oci:{}/lay:v1", cwd.display())
        );
        let err = absolute_source("app.tar").expect_err("no scheme");
        assert!(err.to_string().contains("SCHEME:PATH"), "{err}");
    }

    #[test]
    fn human_bytes_picks_unit() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
    }
}
