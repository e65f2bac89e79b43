//! `kiln image build|ls|rm`: guest images, built by the daemon with progress shown here.

use anyhow::bail;
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use kiln_api_types::{ImageBuildEvent, ImageBuildRequest, ImageInfo, ImageList};

use kiln_client::Client;

/// `kiln image ...`.
#[derive(Debug, Subcommand)]
pub enum ImageCmd {
    /// Build an image from a built-in recipe (`base`, `python`, `postgres`); a no-op when nothing
    /// changed.
    Build {
        /// Recipe name.
        recipe: String,
        /// Rebuild even if the inputs are unchanged.
        #[arg(long)]
        force: bool,
        /// Print events as JSON lines instead of a progress bar.
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
            force,
            json,
        } => {
            build(client, recipe, *force, *json).await?;
            Ok(0)
        }
        ImageCmd::Ls { json } => {
            let list: ImageList = client.image_list().await?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                println!(
                    "{:<18} {:<10} {:<10} {:>10}  CREATED",
                    "ID", "NAME", "RECIPE", "SIZE"
                );
                for i in &list.images {
                    println!(
                        "{:<18} {:<10} {:<10} {:>10}  {}",
                        i.id,
                        i.name,
                        i.recipe,
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

/// Builds `name` if it does not exist yet (what `kiln run` does before starting a sandbox).
pub async fn ensure_built(client: &Client, name: &str) -> anyhow::Result<()> {
    let list: ImageList = client.image_list().await?;
    if list.images.iter().any(|i| i.name == name) {
        return Ok(());
    }
    eprintln!("kiln: image {name} is not built yet; building it first");
    build(client, name, false, false).await.map(|_| ())
}

/// Builds an image, showing progress on stderr; prints the size report.
pub async fn build(
    client: &Client,
    name: &str,
    force: bool,
    json: bool,
) -> anyhow::Result<ImageInfo> {
    let bar = if json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new_spinner()
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {prefix} {wide_msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    let mut result: Option<ImageInfo> = None;
    let mut failure: Option<String> = None;
    let mut up_to_date = false;
    client
        .image_build(
            name,
            &ImageBuildRequest { force },
            |ev: ImageBuildEvent| -> anyhow::Result<()> {
                if json {
                    println!("{}", serde_json::to_string(&ev)?);
                }
                match ev {
                    ImageBuildEvent::Stage { index, total, name } => {
                        bar.set_prefix(format!("[{index}/{total}] {name}"));
                        bar.set_message("");
                        if !json {
                            bar.println(format!("[{index}/{total}] {name}"));
                        }
                    }
                    ImageBuildEvent::Log { line } => bar.set_message(line),
                    ImageBuildEvent::Progress { done, total } => {
                        bar.set_message(format!("{done}/{total}"))
                    }
                    ImageBuildEvent::Done {
                        up_to_date: u,
                        image,
                    } => {
                        up_to_date = u;
                        result = Some(image);
                    }
                    ImageBuildEvent::Error(e) => failure = Some(e.message),
                }
                Ok(())
            },
        )
        .await?;
    bar.finish_and_clear();
    if let Some(msg) = failure {
        bail!("{msg}");
    }
    let Some(image) = result else {
        bail!("kilnd ended the build stream without a result")
    };
    if !json {
        if up_to_date {
            eprintln!(
                "image {} is up to date ({}): inputs unchanged, nothing rebuilt",
                image.name, image.id
            );
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
    Ok(image)
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
    fn human_bytes_picks_unit() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
    }
}
