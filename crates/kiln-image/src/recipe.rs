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
    &["base", "python", "postgres"]
}

/// The built-in recipe called `name`, if there is one.
pub fn builtin(name: &str) -> Option<Recipe> {
    let mut recipe = Recipe {
        name: name.to_owned(),
        suite: DEFAULT_SUITE.to_owned(),
        packages: BASE_PACKAGES.iter().map(|p| (*p).to_owned()).collect(),
        customize: Vec::new(),
        on_boot: Vec::new(),
        readiness_probe: None,
        on_restore: None,
    };
    match name {
        "base" => {}
        // `python3` is the full interpreter with its standard library (python3-minimal alone
        // lacks most of it).
        "python" => recipe.packages.push("python3".to_owned()),
        "postgres" => postgres(&mut recipe),
        _ => return None,
    }
    Some(recipe)
}

/// Build-time checks of what the `postgresql-15` package leaves behind under mmdebstrap: its
/// postinst creates the cluster `15/main` (initdb as `postgres`, UTF-8 since mmdebstrap runs
/// with `LC_ALL=C.UTF-8`), and Debian's `pg_hba.conf` allows password logins over TCP from
/// 127.0.0.1. A later package that stops doing either fails the build here instead of
/// producing an image whose server never starts or never accepts the password.
const POSTGRES_CHECK_HOOK: &str = r#"set -e
c="$1/etc/postgresql/15/main"
if ! test -f "$1/var/lib/postgresql/15/main/PG_VERSION" || ! test -f "$c/postgresql.conf"; then
  echo "kiln postgres recipe: the postgresql package did not create the cluster 15/main" >&2
  exit 1
fi
if ! grep -Eq '^host[[:space:]]+all[[:space:]]+all[[:space:]]+127\.0\.0\.1/32[[:space:]]+scram-sha-256' "$c/pg_hba.conf"; then
  echo "kiln postgres recipe: $c/pg_hba.conf lacks 'host all all 127.0.0.1/32 scram-sha-256'" >&2
  exit 1
fi"#;

/// Server settings for a small guest, as a `conf.d` file (Debian's `postgresql.conf` includes
/// `conf.d/`): TCP on the loopback address only, 32 MiB of shared buffers and few connections
/// so the server fits next to a workload in 256 MiB, no JIT (it would load the 100 MiB
/// LLVM library and compile under TCG, slower than interpreting), and no TLS: clients arrive
/// through kiln's loopback tunnel, and a TLS handshake per connection costs ~0.5 s under TCG
/// with a key every sandbox of the image would share anyway.
const POSTGRES_CONF_HOOK: &str = r#"cat > "$1/etc/postgresql/15/main/conf.d/kiln.conf" <<'EOF'
# Written by kiln's postgres recipe: sized for a small (256 MiB) guest.
listen_addresses = '127.0.0.1'
port = 5432
max_connections = 20
shared_buffers = 32MB
maintenance_work_mem = 16MB
huge_pages = off
jit = off
ssl = off
EOF"#;

/// Starts the cluster. No systemd in the guest: `/run` is an empty tmpfs at every boot, so the
/// socket directory is created here (as Debian's tmpfiles.d entry would). `pg_ctl` starts the
/// postmaster in its own session (setsid) with its output in the cluster log, and with `-w`
/// waits until it accepts connections; so it outlives this exec. `pg_ctl` rather than
/// Debian's `pg_ctlcluster 15 main start`, which does the same through Perl: measured under
/// TCG, 0.7 s instead of 4.1 s.
const POSTGRES_START: &str = r#"set -e
install -d -o postgres -g postgres -m 2775 /run/postgresql
cd /
log=/var/log/postgresql/postgresql-15-main.log
if ! runuser -u postgres -- /usr/lib/postgresql/15/bin/pg_ctl start -w -t 100 -s \
  -D /var/lib/postgresql/15/main -o '-c config_file=/etc/postgresql/15/main/postgresql.conf' -l "$log"
then
  echo "kiln postgres: the server did not start; the end of $log:" >&2
  tail -n 20 "$log" >&2
  exit 1
fi"#;

/// Sets the `postgres` role's password to the exact content of `/run/secrets/PGPASSWORD`
/// (trailing newlines included; nothing when the file is absent). The value never appears on
/// a command line: the `sed` reads the file and doubles single quotes (an SQL literal with
/// `standard_conforming_strings`, the default, needs nothing else), the `printf` builtin
/// writes the statement into psql's stdin. `log_min_error_statement = panic` keeps a failing
/// statement, and with it the password, out of the server log.
const POSTGRES_SET_PASSWORD: &str = r#"set -eu
f=/run/secrets/PGPASSWORD
[ -e "$f" ] || exit 0
cd /
pw=$(sed "s/'/''/g" "$f" && printf x) || {
  echo "kiln postgres: cannot read $f" >&2
  exit 1
}
pw=${pw%x}
if ! printf "SET log_min_error_statement = panic;\nALTER ROLE postgres PASSWORD '%s';\n" "$pw" |
  runuser -u postgres -- /usr/lib/postgresql/15/bin/psql -X -q -v ON_ERROR_STOP=1 -d postgres >/dev/null
then
  echo "kiln postgres: setting the postgres role's password from $f failed" >&2
  exit 1
fi"#;

/// The `postgres` recipe: Debian bookworm's PostgreSQL 15, cluster `15/main` listening on
/// 127.0.0.1:5432, started after boot, ready once `pg_isready` says so; the role `postgres`
/// gets its password from the secret `PGPASSWORD` (`scram-sha-256` over TCP from 127.0.0.1;
/// root in the guest still gets in through the Unix socket with peer authentication).
///
/// Guest commands call the version's binaries directly where they run often or early:
/// `/usr/bin/pg_isready` and `psql` are Debian's Perl `pg_wrapper`, whose start-up alone is
/// slow under TCG.
fn postgres(recipe: &mut Recipe) {
    let sh = |script: &str| vec!["sh".to_owned(), "-c".to_owned(), script.to_owned()];
    recipe.packages.push("postgresql".to_owned());
    recipe.customize = vec![
        POSTGRES_CHECK_HOOK.to_owned(),
        POSTGRES_CONF_HOOK.to_owned(),
    ];
    recipe.on_boot = vec![GuestCommand {
        argv: sh(POSTGRES_START),
        timeout_ms: 120_000,
    }];
    recipe.readiness_probe = Some(ReadinessProbe {
        check: ProbeCheck::Command(GuestCommand {
            argv: [
                "/usr/lib/postgresql/15/bin/pg_isready",
                "-h",
                "127.0.0.1",
                "-p",
                "5432",
                "-q",
            ]
            .map(str::to_owned)
            .to_vec(),
            timeout_ms: 5_000,
        }),
        interval_ms: 100,
        deadline_ms: 60_000,
    });
    recipe.on_restore = Some(GuestCommand {
        argv: sh(POSTGRES_SET_PASSWORD),
        timeout_ms: 30_000,
    });
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
    fn builtin_postgres_is_base_plus_postgresql() {
        let base = builtin("base").expect("base");
        let pg = builtin("postgres").expect("postgres");
        assert!(builtin_names().contains(&"postgres"));
        assert_eq!(
            pg.suite, "bookworm",
            "the hooks hard-code bookworm's major version 15"
        );
        assert!(pg.packages.contains(&"postgresql".to_owned()));
        assert!(base.packages.iter().all(|p| pg.packages.contains(p)));
    }

    #[test]
    fn builtin_postgres_has_hooks_probe_and_password_hook() {
        let pg = builtin("postgres").expect("postgres");
        assert!(pg.customize.iter().any(|h| h.contains("conf.d/kiln.conf")));
        let [start] = pg.on_boot.as_slice() else {
            panic!("one on_boot command: {:?}", pg.on_boot)
        };
        assert!(start.argv.join(" ").contains("pg_ctl start -w"));
        assert!(start.argv.join(" ").contains("/run/postgresql"));
        let probe = pg.readiness_probe.as_ref().expect("probe");
        let ProbeCheck::Command(check) = &probe.check else {
            panic!("command probe: {probe:?}")
        };
        assert!(check.argv[0].ends_with("pg_isready"));
        assert!(check.argv.windows(2).any(|w| w == ["-h", "127.0.0.1"]));
        assert!(probe.interval_ms > 0 && probe.interval_ms < probe.deadline_ms);
        assert!(check.timeout_ms <= probe.deadline_ms);
        let hook = pg.on_restore.as_ref().expect("on_restore");
        let script = hook.argv.join(" ");
        assert!(script.contains("/run/secrets/PGPASSWORD"), "{script}");
        assert!(script.contains("ON_ERROR_STOP=1"), "{script}");
        for cmd in pg.on_boot.iter().chain([check, hook]) {
            assert!(cmd.timeout_ms > 0, "{cmd:?}");
        }
    }

    #[test]
    fn builtin_shell_snippets_parse() {
        for name in builtin_names() {
            let r = builtin(name).expect("listed");
            let probe = r.readiness_probe.iter().filter_map(|p| match &p.check {
                ProbeCheck::Command(c) => Some(c),
                ProbeCheck::TcpPort { .. } => None,
            });
            let guest = r.on_boot.iter().chain(probe).chain(r.on_restore.iter());
            let guest_scripts = guest
                .filter(|c| c.argv.len() == 3 && c.argv[0] == "sh" && c.argv[1] == "-c")
                .map(|c| c.argv[2].clone());
            for script in r.customize.iter().cloned().chain(guest_scripts) {
                let out = std::process::Command::new("sh")
                    .args(["-n", "-c", &script])
                    .output()
                    .expect("run sh -n");
                assert!(
                    out.status.success(),
                    "{name}: {script}\n{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }

    #[test]
    fn builtin_without_hooks_serializes_without_hook_fields() {
        // Manifests (and so image ids) of recipes without hooks stay as they were.
        for name in ["base", "python"] {
            let json = serde_json::to_string(&builtin(name).expect("listed")).expect("json");
            for field in ["customize", "on_boot", "readiness_probe", "on_restore"] {
                assert!(!json.contains(field), "{name}: {json}");
            }
        }
    }

    #[test]
    fn builtin_postgres_round_trips_through_json() {
        let pg = builtin("postgres").expect("postgres");
        let json = serde_json::to_string(&pg).expect("json");
        let back: Recipe = serde_json::from_str(&json).expect("parse");
        assert_eq!(back, pg);
    }

    #[test]
    fn lookup_unknown_lists_known_recipes() {
        let err = lookup("ruby").expect_err("unknown");
        let msg = err.to_string();
        assert!(
            msg.contains("ruby") && msg.contains("base, python, postgres"),
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
