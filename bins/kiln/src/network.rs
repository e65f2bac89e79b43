//! `kiln network set ID RULES`: a running sandbox's new network policy. The network itself is
//! chosen at create (`--network` on run, create and clone); `kiln inspect` shows it with its
//! counters and refused connections.

use clap::Subcommand;
use kiln_api_types::{NetworkSpec, NetworkUpdate};
use kiln_client::Client;

/// `kiln network ...`.
#[derive(Debug, Subcommand)]
pub enum NetworkCmd {
    /// Change a running sandbox's policy: `nat`, `allow=RULE[,RULE...]`, or just the rules
    /// (`example.org,*.example.org,10.1.2.0/24:5432`). Connections the new policy forbids are
    /// reset at once.
    Set {
        /// Sandbox id, name or unambiguous id prefix.
        id: String,
        /// The new policy.
        rules: String,
        /// Print the sandbox as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Runs a `kiln network` subcommand.
pub async fn run(client: &Client, cmd: &NetworkCmd) -> anyhow::Result<i32> {
    match cmd {
        NetworkCmd::Set { id, rules, json } => {
            let network = parse_policy(rules)?;
            let id = crate::ps::resolve(client, id).await?;
            let info = client
                .sandbox_network_set(&id, &NetworkUpdate { network })
                .await?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                println!("{}: network {}", info.id, info.spec.network);
            }
            Ok(0)
        }
    }
}

/// A mode (`nat`, `allow=...`, ...) or, when it names none, the rules of `allow`.
fn parse_policy(s: &str) -> anyhow::Result<NetworkSpec> {
    let is_mode = matches!(s, "none" | "nat" | "bridge" | "allow") || s.starts_with("allow=");
    if is_mode {
        return s.parse().map_err(|e| anyhow::anyhow!("{e}"));
    }
    Ok(NetworkSpec::Allow {
        rules: s.parse().map_err(|e| anyhow::anyhow!("{e}"))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_rules_mean_allow_and_modes_parse() {
        assert_eq!(parse_policy("nat").unwrap(), NetworkSpec::Nat);
        assert_eq!(
            parse_policy("example.org,10.1.2.0/24:5432").unwrap(),
            "allow=example.org,10.1.2.0/24:5432".parse().unwrap()
        );
        assert_eq!(
            parse_policy("allow=example.org").unwrap(),
            parse_policy("example.org").unwrap()
        );
        let e = parse_policy("exa mple.org").unwrap_err().to_string();
        assert!(e.contains("not a DNS label"), "{e}");
    }
}
