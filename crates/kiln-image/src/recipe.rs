//! Recipes: what goes into an image (name, Debian suite, packages, build hooks) and how the host
//! drives a sandbox of it: commands after boot, a readiness probe, a hook after secrets arrive.
//!
//! Owns the built-in recipes. A recipe is pure data: building it is `build`'s job. The name of
//! a recipe is also the name of its image directory, so it is validated like one.

use serde::{Deserialize, Serialize};

use crate::error::ImageError;

/// A command the host runs in the guest through the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestCommand {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// How long one run may take before it is killed and counted as failed.
    pub timeout_ms: u64,
}

/// How the host tells that a freshly booted guest is ready to be snapshotted or used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ProbeCheck {
    /// A guest command that exits 0 once the service is ready.
    Command(GuestCommand),
    /// A TCP port on the guest's loopback that accepts a connection once the service is ready.
    TcpPort {
        /// Guest port.
        port: u16,
    },
}

/// A readiness probe: `check` is retried every `interval_ms` until it passes or `deadline_ms`
/// have passed since the first attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadinessProbe {
    /// What is checked.
    pub check: ProbeCheck,
    /// Pause between failed attempts.
    pub interval_ms: u64,
    /// Give up after this long.
    pub deadline_ms: u64,
}

/// A guest command run after every start that delivers secrets (restore or cold boot), once
/// the secrets are in `/run/secrets`; e.g. to set a database password. Its failure fails the
/// start. `kiln secret rotate` reruns it.
pub type RestoreHook = GuestCommand;

/// What an image is built from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recipe {
    /// Recipe name; also the image name and directory (`images/<name>/`).
    pub name: String,
    /// Debian suite, e.g. `bookworm`.
    pub suite: String,
    /// Packages installed on top of mmdebstrap's `essential` variant (Essential: yes packages:
    /// coreutils, bash, dash, util-linux, findutils, grep, sed, tar, gzip, ...).
    pub packages: Vec<String>,
    /// Shell commands run by mmdebstrap as `--customize-hook`s once the packages are
    /// installed; `$1` is the root directory (use `chroot "$1" ...` to run inside it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub customize: Vec<String>,
    /// Guest commands run in order after a cold boot (also in the capture VM, so their effect
    /// is part of the warm snapshot); each must exit 0. Services started here must detach
    /// (their own session), as the agent kills an exec's process group when it ends.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub on_boot: Vec<GuestCommand>,
    /// Checked after `on_boot`: a sandbox (or warm snapshot) is ready only once it passes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readiness_probe: Option<ReadinessProbe>,
    /// Run after secrets are delivered (see [`RestoreHook`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_restore: Option<RestoreHook>,
}

/// The Debian suite of the built-in recipes (the host machines run Debian 12).
pub const DEFAULT_SUITE: &str = "bookworm";

/// What a sandbox user expects beyond the Essential set: `ps`/`top`/`free` (procps), TLS roots,
/// `/etc/services` and `/etc/protocols` (netbase), `ip` (iproute2) and a pager.
const BASE_PACKAGES: &[&str] = &["procps", "ca-certificates", "netbase", "iproute2", "less"];

/// Names of the built-in recipes, in presentation order.
pub fn builtin_names() -> &'static [&'static str] {
    &["base", "python"]
}

/// The built-in recipe called `name`, if there is one.
pub fn builtin(name: &str) -> Option<Recipe> {
    let mut packages: Vec<String> = BASE_PACKAGES.iter().map(|p| (*p).to_owned()).collect();
    match name {
        "base" => {}
        // `python3` is the full interpreter with its standard library (python3-minimal alone
        // lacks most of it).
        "python" => packages.push("python3".to_owned()),
        _ => return None,
    }
    Some(Recipe {
        name: name.to_owned(),
        suite: DEFAULT_SUITE.to_owned(),
        packages,
        customize: Vec::new(),
        on_boot: Vec::new(),
        readiness_probe: None,
        on_restore: None,
    })
}

/// Like [`builtin`], but an unknown name is an error that lists the known ones.
pub fn lookup(name: &str) -> Result<Recipe, ImageError> {
    builtin(name).ok_or_else(|| ImageError::UnknownRecipe {
        name: name.to_owned(),
        known: builtin_names().join(", "),
    })
}

/// Checks that `name` can serve as an image directory name: 1–64 characters of `[a-z0-9._-]`,
/// starting with a letter or digit.
pub fn validate_name(name: &str) -> Result<(), ImageError> {
    let invalid = |reason| ImageError::InvalidName {
        name: name.to_owned(),
        reason,
    };
    if name.is_empty() || name.len() > 64 {
        return Err(invalid("must be 1 to 64 characters long"));
    }
    if !name
        .bytes()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"._-".contains(&c))
    {
        return Err(invalid(
            "only lowercase letters, digits, '.', '_' and '-' are allowed",
        ));
    }
    if !name.as_bytes()[0].is_ascii_alphanumeric() {
        return Err(invalid("must start with a letter or digit"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_every_name_resolves_and_is_valid() {
        for name in builtin_names() {
            let r = builtin(name).expect("listed recipes exist");
            assert_eq!(r.name, *name);
            validate_name(name).expect("valid name");
        }
    }

    #[test]
    fn builtin_python_is_base_plus_full_python3() {
        let base = builtin("base").expect("base");
        let python = builtin("python").expect("python");
        assert!(python.packages.contains(&"python3".to_owned()));
        assert!(base.packages.iter().all(|p| python.packages.contains(p)));
        assert!(!base.packages.iter().any(|p| p.starts_with("python")));
    }

    #[test]
    fn lookup_unknown_lists_known_recipes() {
        let err = lookup("ruby").expect_err("unknown");
        let msg = err.to_string();
        assert!(
            msg.contains("ruby") && msg.contains("base, python"),
            "{msg}"
        );
    }

    #[test]
    fn validate_name_rejects_paths_and_dots() {
        for bad in ["", "../x", "a/b", ".tmp-x", "-x", "Base", &"a".repeat(65)] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
        validate_name("py3.11-slim_x").expect("valid");
    }
}
