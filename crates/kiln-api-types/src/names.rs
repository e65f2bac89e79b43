//! Names that cross crate boundaries: [`ImageName`], [`SnapshotName`], [`SandboxName`] and
//! [`Labels`], each validated once when it is parsed (from JSON, a CLI argument or a path
//! segment), with a typed [`InvalidInput`] naming what was wrong.
//!
//! Must not: touch the file system. Invariant: a value of one of these types is valid; code
//! that holds one never checks it again (image and snapshot names become directory names).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Input that breaks one of the API's rules. The message names the field or kind of value,
/// the value (never a secret's) and the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidInput {
    /// A name that does not follow its kind's character rules.
    #[error("invalid {kind} {value:?}: {rule}")]
    Name {
        /// What kind of name (`image name`, `snapshot name`, ...).
        kind: &'static str,
        /// The value given.
        value: String,
        /// The rule it breaks.
        rule: &'static str,
    },
    /// A number outside its allowed range.
    #[error("{field} must be between {min} and {max}, got {got}")]
    Range {
        /// Field name as in the API.
        field: &'static str,
        /// Least allowed value.
        min: u64,
        /// Largest allowed value.
        max: u64,
        /// The value given.
        got: u64,
    },
    /// Too many entries in a list or map.
    #[error("too many {what}: {got} (at most {max})")]
    TooMany {
        /// What is counted.
        what: &'static str,
        /// How many were given.
        got: usize,
        /// The limit.
        max: usize,
    },
    /// Any other rule, stated in full.
    #[error("{0}")]
    Rule(String),
}

/// Checks `[a-z0-9]` + `[a-z0-9._-]*`, 1..=max bytes.
fn plain_name(s: &str, max: usize, extra: &[u8]) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || extra.contains(&b))
}

macro_rules! string_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// The name as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = InvalidInput;

            fn try_from(s: String) -> Result<Self, Self::Error> {
                s.parse()
            }
        }

        impl From<$name> for String {
            fn from(n: $name) -> String {
                n.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

string_newtype!(
    /// An image name (a recipe name such as `python`): 1–64 lowercase letters, digits, `-`
    /// and `_`, starting with a letter or digit. It becomes a directory name.
    ImageName
);

impl FromStr for ImageName {
    type Err = InvalidInput;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if plain_name(s, 64, b"-_") {
            Ok(ImageName(s.to_owned()))
        } else {
            Err(InvalidInput::Name {
                kind: "image name",
                value: s.to_owned(),
                rule: "use 1 to 64 lowercase letters, digits, '-' and '_', starting with a letter or digit",
            })
        }
    }
}

string_newtype!(
    /// A snapshot name: a user snapshot's (1–64 of `[a-z0-9._-]`, starting with a letter or
    /// digit, not `warm-…`) or, where an existing snapshot is named, a warm snapshot's
    /// (`warm-` + the same rules, at most 128 bytes). Use [`SnapshotName::user`] for a name
    /// that is to be created.
    SnapshotName
);

impl FromStr for SnapshotName {
    type Err = InvalidInput;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ok = match s.strip_prefix("warm-") {
            Some(rest) => s.len() <= 128 && plain_name(rest, 128, b"._-"),
            None => plain_name(s, 64, b"._-"),
        };
        if ok {
            Ok(SnapshotName(s.to_owned()))
        } else {
            Err(InvalidInput::Name {
                kind: "snapshot name",
                value: s.to_owned(),
                rule: "use 1 to 64 lowercase letters, digits, '.', '_' and '-', starting with a letter or digit",
            })
        }
    }
}

impl SnapshotName {
    /// Whether this names a warm snapshot (captured by kiln per image).
    pub fn is_warm(&self) -> bool {
        self.0.starts_with("warm-")
    }

    /// A name for a new user snapshot: the `warm-` prefix is reserved.
    pub fn user(s: &str) -> Result<SnapshotName, InvalidInput> {
        let name: SnapshotName = s.parse()?;
        if name.is_warm() {
            return Err(InvalidInput::Name {
                kind: "snapshot name",
                value: s.to_owned(),
                rule: "names starting with \"warm-\" are reserved for warm snapshots",
            });
        }
        Ok(name)
    }
}

string_newtype!(
    /// A sandbox's own name (`--name`), unique among sandboxes: 1–64 letters, digits, `.`,
    /// `_` and `-`, starting with a letter or digit, and not starting with `sb-` (which would
    /// read as an id).
    SandboxName
);

impl FromStr for SandboxName {
    type Err = InvalidInput;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let chars_ok = !s.is_empty()
            && s.len() <= 64
            && s.as_bytes()[0].is_ascii_alphanumeric()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !chars_ok {
            return Err(InvalidInput::Name {
                kind: "sandbox name",
                value: s.to_owned(),
                rule: "use 1 to 64 letters, digits, '.', '_' and '-', starting with a letter or digit",
            });
        }
        if s.starts_with("sb-") {
            return Err(InvalidInput::Name {
                kind: "sandbox name",
                value: s.to_owned(),
                rule: "names starting with \"sb-\" would read as sandbox ids",
            });
        }
        Ok(SandboxName(s.to_owned()))
    }
}

/// Most labels one sandbox may carry.
pub const MAX_LABELS: usize = 64;
/// Longest label value in bytes.
pub const MAX_LABEL_VALUE: usize = 256;

string_newtype!(
    /// A label key: 1–63 lowercase letters, digits, `.`, `_`, `-` and `/`, starting with a
    /// letter or digit.
    LabelKey
);

impl FromStr for LabelKey {
    type Err = InvalidInput;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if plain_name(s, 63, b"._-/") {
            Ok(LabelKey(s.to_owned()))
        } else {
            Err(InvalidInput::Name {
                kind: "label key",
                value: s.to_owned(),
                rule: "use 1 to 63 lowercase letters, digits, '.', '_', '-' and '/', starting with a letter or digit",
            })
        }
    }
}

/// One `KEY=VALUE` label, as given on a command line or in a filter.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Label {
    /// Key.
    pub key: LabelKey,
    /// Value (may be empty; no control characters).
    pub value: String,
}

impl FromStr for Label {
    type Err = InvalidInput;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (k, v) = s.split_once('=').ok_or_else(|| {
            InvalidInput::Rule(format!("invalid label {s:?}: expected KEY=VALUE"))
        })?;
        let key: LabelKey = k.parse()?;
        check_label_value(&key, v)?;
        Ok(Label {
            key,
            value: v.to_owned(),
        })
    }
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.key, self.value)
    }
}

fn check_label_value(key: &LabelKey, v: &str) -> Result<(), InvalidInput> {
    if v.len() > MAX_LABEL_VALUE || v.chars().any(char::is_control) {
        return Err(InvalidInput::Rule(format!(
            "invalid value for label {key}: at most {MAX_LABEL_VALUE} bytes, no control characters"
        )));
    }
    Ok(())
}

/// A sandbox's labels, by key. Validated as a whole on parse (count, keys, values).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    try_from = "BTreeMap<String, String>",
    into = "BTreeMap<String, String>"
)]
pub struct Labels(BTreeMap<LabelKey, String>);

impl Labels {
    /// The labels, by key.
    pub fn iter(&self) -> impl Iterator<Item = (&LabelKey, &str)> {
        self.0.iter().map(|(k, v)| (k, v.as_str()))
    }

    /// The value of `key`.
    pub fn get(&self, key: &LabelKey) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Labels from `KEY=VALUE` items; a key given twice keeps the last value.
    pub fn from_labels(items: impl IntoIterator<Item = Label>) -> Result<Labels, InvalidInput> {
        let map: BTreeMap<LabelKey, String> = items.into_iter().map(|l| (l.key, l.value)).collect();
        if map.len() > MAX_LABELS {
            return Err(InvalidInput::TooMany {
                what: "labels",
                got: map.len(),
                max: MAX_LABELS,
            });
        }
        Ok(Labels(map))
    }
}

impl TryFrom<BTreeMap<String, String>> for Labels {
    type Error = InvalidInput;

    fn try_from(raw: BTreeMap<String, String>) -> Result<Self, Self::Error> {
        if raw.len() > MAX_LABELS {
            return Err(InvalidInput::TooMany {
                what: "labels",
                got: raw.len(),
                max: MAX_LABELS,
            });
        }
        let mut map = BTreeMap::new();
        for (k, v) in raw {
            let key: LabelKey = k.parse()?;
            check_label_value(&key, &v)?;
            map.insert(key, v);
        }
        Ok(Labels(map))
    }
}

impl From<Labels> for BTreeMap<String, String> {
    fn from(l: Labels) -> Self {
        l.0.into_iter().map(|(k, v)| (k.0, v)).collect()
    }
}

/// Parses a duration such as `30s`, `5m`, `2h`, `1d` or `90` (seconds) into seconds; at
/// least one second, at most 365 days.
pub fn parse_duration_secs(s: &str) -> Result<u64, InvalidInput> {
    let bad = || {
        InvalidInput::Rule(format!(
            "invalid duration {s:?}: expected a number with a unit s, m, h or d (e.g. 30s, 5m, 2h)"
        ))
    };
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, 's')) => (&t[..i], 1),
        Some((i, 'm')) => (&t[..i], 60),
        Some((i, 'h')) => (&t[..i], 3600),
        Some((i, 'd')) => (&t[..i], 86_400),
        Some(_) => (t, 1),
        None => return Err(bad()),
    };
    if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: u64 = num.parse().map_err(|_| bad())?;
    let secs = n.checked_mul(mult).ok_or_else(bad)?;
    check_duration("duration", secs)?;
    Ok(secs)
}

/// Longest lifetime or idle timeout, in seconds (365 days).
pub const MAX_DURATION_SECS: u64 = 365 * 86_400;

/// Checks a duration in seconds against 1..=[`MAX_DURATION_SECS`].
pub fn check_duration(field: &'static str, secs: u64) -> Result<(), InvalidInput> {
    if (1..=MAX_DURATION_SECS).contains(&secs) {
        Ok(())
    } else {
        Err(InvalidInput::Range {
            field,
            min: 1,
            max: MAX_DURATION_SECS,
            got: secs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_name_rejects_path_tricks() {
        assert!("python".parse::<ImageName>().is_ok());
        for bad in ["", "..", "a/b", "Py", "-x", &"a".repeat(65)] {
            let e = bad.parse::<ImageName>().unwrap_err();
            assert!(e.to_string().contains("invalid image name"), "{e}");
        }
    }

    #[test]
    fn snapshot_name_user_refuses_warm_prefix() {
        assert!("warm-abc".parse::<SnapshotName>().is_ok());
        let e = SnapshotName::user("warm-abc").unwrap_err();
        assert!(e.to_string().contains("reserved"), "{e}");
        assert!(SnapshotName::user("db.1").is_ok());
        assert!(SnapshotName::user("a\0b").is_err());
    }

    #[test]
    fn sandbox_name_cannot_look_like_an_id() {
        assert!("web-1".parse::<SandboxName>().is_ok());
        assert!("Web.1".parse::<SandboxName>().is_ok());
        assert!("sb-0123".parse::<SandboxName>().is_err());
        assert!("a b".parse::<SandboxName>().is_err());
        assert!("x".repeat(65).parse::<SandboxName>().is_err());
    }

    #[test]
    fn labels_validate_keys_values_and_count() {
        let l: Label = "team=ml".parse().unwrap();
        assert_eq!(l.key.as_str(), "team");
        assert_eq!(l.value, "ml");
        assert!("team".parse::<Label>().is_err());
        assert!("Team=x".parse::<Label>().is_err());
        assert!("t=a\nb".parse::<Label>().is_err());
        let many: BTreeMap<String, String> = (0..=MAX_LABELS)
            .map(|i| (format!("k{i}"), String::new()))
            .collect();
        assert!(matches!(
            Labels::try_from(many),
            Err(InvalidInput::TooMany { .. })
        ));
        let json: Result<Labels, _> = serde_json::from_str(r#"{"ok":"1","BAD":"2"}"#);
        assert!(json.unwrap_err().to_string().contains("label key"));
    }

    #[test]
    fn parse_duration_units() {
        assert_eq!(parse_duration_secs("30s").unwrap(), 30);
        assert_eq!(parse_duration_secs("5m").unwrap(), 300);
        assert_eq!(parse_duration_secs("2h").unwrap(), 7200);
        assert_eq!(parse_duration_secs("1d").unwrap(), 86_400);
        assert_eq!(parse_duration_secs("90").unwrap(), 90);
        for bad in [
            "",
            "s",
            "0s",
            "-5m",
            "5x",
            "1.5h",
            "400d",
            "99999999999999999999h",
        ] {
            assert!(parse_duration_secs(bad).is_err(), "{bad}");
        }
    }
}
