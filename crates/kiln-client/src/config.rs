//! `$KILN_HOME/config.toml`: defaults for the CLI and the daemon (`docs/config.md`).
//!
//! Owns parsing and the precedence rule, nothing else: command-line flags win over
//! environment variables, which win over this file, which wins over the built-in defaults
//! ([`pick`]). Invariants: an unknown key or a value of the wrong type is an error that names
//! the key and its line (a typo must not be silently ignored); a missing file is the same as
//! an empty one.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The keys of `config.toml`; every key is optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Image of `kiln run` and `kiln create` (`--image`, `$KILN_IMAGE`).
    pub image: Option<String>,
    /// vCPUs of new sandboxes (`--cpus`, `$KILN_CPUS`).
    pub cpus: Option<u32>,
    /// Guest memory of new sandboxes in MiB (`--memory`, `$KILN_MEMORY_MIB`).
    pub memory_mib: Option<u32>,
    /// TCP address for `kilnd` to serve the API on as well, e.g. `127.0.0.1:7070`
    /// (`kilnd --listen`, `$KILN_LISTEN`).
    pub listen: Option<String>,
    /// Allow a `listen` address that is not loopback (`kilnd --listen-public`,
    /// `$KILN_LISTEN_PUBLIC`).
    pub listen_public: Option<bool>,
    /// Largest HTTP request body `kilnd` accepts, in bytes (`$KILN_MAX_BODY_BYTES`).
    pub max_body_bytes: Option<u64>,
    /// Connections `kilnd` serves at once per listener (`$KILN_MAX_CONNECTIONS`).
    pub max_connections: Option<u32>,
    /// Seconds a client has to send a request's head to `kilnd`
    /// (`$KILN_REQUEST_HEADER_TIMEOUT_SECS`).
    pub request_header_timeout_secs: Option<u64>,
    /// Seconds a request body may send nothing while `kilnd` waits for it
    /// (`$KILN_REQUEST_BODY_TIMEOUT_SECS`).
    pub request_body_timeout_secs: Option<u64>,
    /// Address of `kilnd`'s viewer listener for desktop sandboxes' live view, e.g.
    /// `127.0.0.1:7080` (`$KILN_VIEW_LISTEN`; default: loopback, a port picked at start).
    pub view_listen: Option<String>,
    /// Lifetime of a viewer link in seconds (`$KILN_VIEW_TTL_SECS`; default 24 h).
    pub view_ttl_secs: Option<u64>,
    /// Where noVNC's files are (`$KILN_NOVNC_DIR`; default `/usr/share/novnc`).
    pub novnc_dir: Option<PathBuf>,
    /// Warm pools of `kilnd` (`[[pool]]` tables); `kiln pool set` wins over them.
    #[serde(default)]
    pub pool: Vec<PoolConfig>,
}

/// One `[[pool]]` table: sandboxes of an image `kilnd` keeps restored ahead of demand.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// The image.
    pub image: String,
    /// Sandboxes to keep ready.
    pub size: u32,
    /// vCPUs of the pooled sandboxes (default: the sandbox default).
    pub cpus: Option<u32>,
    /// Memory of the pooled sandboxes in MiB (default: the sandbox default).
    pub memory_mib: Option<u32>,
    /// A command each pooled sandbox runs once after its restore.
    pub warmup: Option<Vec<String>>,
    /// Longest the warm-up may run (seconds, default 60).
    pub warmup_timeout_secs: Option<u64>,
}

/// Errors loading the config file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file exists but cannot be read.
    #[error("failed to read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or has an unknown key or a wrongly typed value.
    #[error("invalid config file {}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// Cause, with the line and the key.
        #[source]
        source: Box<toml::de::Error>,
    },
    /// An environment variable has a value that does not parse.
    #[error("invalid value {value:?} of ${name}: {expected}")]
    Env {
        /// The variable.
        name: &'static str,
        /// Its value.
        value: String,
        /// What it should look like.
        expected: &'static str,
    },
}

impl Config {
    /// The config at `path`; a missing file is an empty config.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Config::parse(&text, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Config::default()),
            Err(source) => Err(ConfigError::Read {
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// Parses config text; `path` only names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(e),
        })
    }
}

/// An environment variable parsed as `T`, if set and not empty.
pub fn env<T: std::str::FromStr>(
    name: &'static str,
    expected: &'static str,
) -> Result<Option<T>, ConfigError> {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => v.parse().map(Some).map_err(|_| ConfigError::Env {
            name,
            value: v,
            expected,
        }),
        _ => Ok(None),
    }
}

/// A boolean environment variable: `1`/`true`/`yes` or `0`/`false`/`no`.
pub fn env_bool(name: &'static str) -> Result<Option<bool>, ConfigError> {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => match v.to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" => Ok(Some(true)),
            "0" | "false" | "no" => Ok(Some(false)),
            _ => Err(ConfigError::Env {
                name,
                value: v,
                expected: "1, true, yes, 0, false or no",
            }),
        },
        _ => Ok(None),
    }
}

/// The precedence rule: flag, then environment, then config file, then built-in default.
pub fn pick<T>(flag: Option<T>, env: Option<T>, file: Option<T>, default: T) -> T {
    flag.or(env).or(file).unwrap_or(default)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_known_keys_fill_config() {
        let c = Config::parse(
            "image = \"base\"\ncpus = 2\nmemory_mib = 512\nlisten = \"127.0.0.1:7070\"\nlisten_public = false\nmax_body_bytes = 1024\n",
            Path::new("config.toml"),
        )
        .unwrap();
        assert_eq!(c.image.as_deref(), Some("base"));
        assert_eq!((c.cpus, c.memory_mib), (Some(2), Some(512)));
        assert_eq!(c.listen.as_deref(), Some("127.0.0.1:7070"));
        assert_eq!(c.listen_public, Some(false));
        assert_eq!(c.max_body_bytes, Some(1024));
    }

    #[test]
    fn parse_unknown_key_names_key_and_line() {
        let err = Config::parse(
            "cpus = 2\n\nmemroy_mib = 512\n",
            Path::new("/k/config.toml"),
        )
        .unwrap_err();
        let chain = format!("{err}: {}", std::error::Error::source(&err).unwrap());
        assert!(chain.contains("/k/config.toml"), "{chain}");
        assert!(chain.contains("memroy_mib"), "{chain}");
        assert!(chain.contains("line 3"), "{chain}");
    }

    #[test]
    fn parse_wrong_type_is_an_error() {
        assert!(Config::parse("cpus = \"two\"\n", Path::new("c")).is_err());
    }

    #[test]
    fn load_missing_file_is_empty_config() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            Config::load(&dir.path().join("config.toml")).unwrap(),
            Config::default()
        );
    }

    #[test]
    fn pick_flag_beats_env_beats_file_beats_default() {
        assert_eq!(pick(Some(1), Some(2), Some(3), 4), 1);
        assert_eq!(pick(None, Some(2), Some(3), 4), 2);
        assert_eq!(pick(None, None, Some(3), 4), 3);
        assert_eq!(pick(None, None, None, 4), 4);
    }
}
