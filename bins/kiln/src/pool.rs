//! `kiln pool set IMAGE --size N` and `kiln pool ls`: the daemon's warm pools, sandboxes of
//! an image restored ahead of demand so that `kiln run`, `kiln create` and clones of that
//! image and machine size start by taking one.

use clap::Subcommand;
use kiln_api_types::{PoolInfo, PoolSetRequest};
use kiln_client::Client;
use kiln_client::config::{self, Config};

/// `kiln pool ...`.
#[derive(Debug, Subcommand)]
pub enum PoolCmd {
    /// Keep N sandboxes of IMAGE ready (0 empties the pool). Kept by the daemon across
    /// restarts; wins over `[[pool]]` in config.toml. A start takes from the pool when it asks
    /// for the pool's machine size, has no network and is not `--cold`.
    Set {
        /// The image.
        image: String,
        /// Sandboxes to keep ready.
        #[arg(long)]
        size: u32,
        /// vCPUs of the pooled sandboxes [default: $KILN_CPUS, else `cpus` in config.toml,
        /// else the image's, else 1] — as `kiln run` would ask.
        #[arg(long)]
        cpus: Option<u32>,
        /// Memory of the pooled sandboxes in MiB [default: $KILN_MEMORY_MIB, else
        /// `memory_mib` in config.toml, else the image's, else 256].
        #[arg(long)]
        memory: Option<u32>,
        /// A command each pooled sandbox runs once after its restore, before it is ready
        /// (e.g. `--warmup python3 -c pass`); all arguments after it belong to it.
        #[arg(long, num_args = 1.., allow_hyphen_values = true)]
        warmup: Option<Vec<String>>,
        /// Longest the warm-up may run, seconds [default: 60].
        #[arg(long)]
        warmup_timeout: Option<u64>,
        /// Print the pool as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the pools: size, ready, being restored, handed out, misses.
    Ls {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Runs a `kiln pool` subcommand.
pub async fn run(client: &Client, cmd: &PoolCmd) -> anyhow::Result<i32> {
    match cmd {
        PoolCmd::Set {
            image,
            size,
            cpus,
            memory,
            warmup,
            warmup_timeout,
            json,
        } => {
            let file = Config::load(&kiln_client::ClientHome::from_env().config())?;
            let req = PoolSetRequest {
                size: *size,
                cpus: cpus
                    .or(config::env("KILN_CPUS", "a number of vCPUs")?)
                    .or(file.cpus),
                memory_mib: memory
                    .or(config::env("KILN_MEMORY_MIB", "a number of MiB")?)
                    .or(file.memory_mib),
                warmup: warmup.clone(),
                warmup_timeout_secs: *warmup_timeout,
            };
            req.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
            let info = client.pool_set(image, &req).await?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                println!(
                    "pool {} ({} vCPU, {} MiB): size {}, {} ready",
                    info.image, info.machine.cpus, info.machine.memory_mib, info.size, info.ready
                );
            }
            Ok(0)
        }
        PoolCmd::Ls { json } => {
            let list = client.pool_list().await?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                print!("{}", table(&list.pools));
            }
            Ok(0)
        }
    }
}

fn table(pools: &[PoolInfo]) -> String {
    let mut out = format!(
        "{:<20} {:>5} {:>8} {:>5} {:>6} {:>8} {:>11} {:>7}  {}\n",
        "IMAGE", "CPUS", "MEMORY", "SIZE", "READY", "FILLING", "HANDED OUT", "MISSES", "WARM-UP"
    );
    for p in pools {
        out.push_str(&format!(
            "{:<20} {:>5} {:>7}M {:>5} {:>6} {:>8} {:>11} {:>7}  {}\n",
            p.image.as_str(),
            p.machine.cpus,
            p.machine.memory_mib,
            p.size,
            p.ready,
            p.filling,
            p.handed_out,
            p.misses,
            p.warmup.as_ref().map_or("-".to_owned(), |w| w.join(" "))
        ));
        if let Some(e) = &p.last_error {
            out.push_str(&format!("  last refill failed: {e}\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_api_types::{MachineSpec, PoolOrigin};

    #[test]
    fn table_shows_counts_and_the_last_error() {
        let t = table(&[PoolInfo {
            image: "python".parse().unwrap(),
            machine: MachineSpec::default(),
            size: 2,
            ready: 1,
            filling: 1,
            handed_out: 7,
            misses: 3,
            warmup: Some(vec!["python3".into(), "-c".into(), "pass".into()]),
            origin: PoolOrigin::Api,
            last_error: Some("image python is not built".into()),
        }]);
        let row = t.lines().nth(1).unwrap();
        let cols: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(
            cols[..8],
            ["python", "1", "256M", "2", "1", "1", "7", "3"],
            "{t}"
        );
        assert!(row.ends_with("python3 -c pass"), "{t}");
        assert!(
            t.contains("last refill failed: image python is not built"),
            "{t}"
        );
    }
}
