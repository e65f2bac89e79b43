//! Redaction of review timelines: the secrets a recording must never contain.
//!
//! Owns the rule, not the secrets: the engine hands a [`Redactor`] the names and values of the
//! sandbox's secrets, and the recorder runs every event through it before writing.
//!
//! Invariants: every string of a value (object keys included) comes out with each secret
//! value of at least [`MIN_SECRET_BYTES`] replaced by `[secret:NAME]`; longer values are
//! matched first and in one pass, so a secret whose value is part of another's is not found
//! inside it and markers are never searched again; a secret that is not UTF-8 leaves no part
//! of itself behind (a split character becomes U+FFFD). A `type_text` action that names a
//! secret loses its `text` whatever the redactor knows. `Debug` shows names, never values.

use serde_json::{Map, Value};

/// Secret values shorter than this are not redacted: they would match everywhere.
pub const MIN_SECRET_BYTES: usize = 4;

/// The secrets a recording must never contain (see the module's invariants).
#[derive(Clone, Default)]
pub struct Redactor {
    /// Name, value; longest value first.
    secrets: Vec<(String, Vec<u8>)>,
}

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.secrets.iter().map(|(n, _)| n.as_str()).collect();
        f.debug_struct("Redactor").field("secrets", &names).finish()
    }
}

impl Redactor {
    /// A redactor of `secrets` (name, value).
    pub fn new(secrets: Vec<(String, Vec<u8>)>) -> Redactor {
        let mut secrets: Vec<(String, Vec<u8>)> = secrets
            .into_iter()
            .filter(|(_, v)| v.len() >= MIN_SECRET_BYTES)
            .collect();
        secrets.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then_with(|| a.0.cmp(&b.0)));
        Redactor { secrets }
    }

    /// A redactor that knows no secrets (the `type_text` rule still applies).
    pub fn none() -> Redactor {
        Redactor::default()
    }

    /// `s` with every secret replaced; `None` when it holds none.
    pub fn redact_str(&self, s: &str) -> Option<String> {
        let bytes = s.as_bytes();
        let mut out: Vec<u8> = Vec::new();
        let (mut i, mut copied) = (0, 0);
        while i < bytes.len() {
            let hit = self.secrets.iter().find(|(_, v)| bytes[i..].starts_with(v));
            match hit {
                Some((name, value)) => {
                    out.extend_from_slice(&bytes[copied..i]);
                    out.extend_from_slice(format!("[secret:{name}]").as_bytes());
                    i += value.len();
                    copied = i;
                }
                None => i += 1,
            }
        }
        if copied == 0 {
            return None;
        }
        out.extend_from_slice(&bytes[copied..]);
        // A secret that is not UTF-8 may end inside a character: what is left of that
        // character becomes U+FFFD, never the secret.
        Some(String::from_utf8_lossy(&out).into_owned())
    }

    /// Redacts every string of `v`, recursively, and drops the text of `type_text` actions
    /// that name a secret.
    pub fn redact_value(&self, v: &mut Value) {
        match v {
            Value::String(s) => {
                if let Some(r) = self.redact_str(s) {
                    *s = r;
                }
            }
            Value::Array(items) => items.iter_mut().for_each(|i| self.redact_value(i)),
            Value::Object(map) => {
                if is_secret_typing(map) {
                    map.remove("text");
                }
                let old = std::mem::take(map);
                for (k, mut item) in old {
                    self.redact_value(&mut item);
                    map.insert(self.redact_str(&k).unwrap_or(k), item);
                }
            }
            Value::Null | Value::Bool(_) | Value::Number(_) => {}
        }
    }
}

/// An action that types a secret: `type_text` (in `kind`, `type` or `action`) with a string
/// `secret` (its name). Its text is not recorded at all, whatever the redactor knows.
fn is_secret_typing(map: &Map<String, Value>) -> bool {
    let typing = ["kind", "type", "action"]
        .iter()
        .any(|k| map.get(*k).and_then(Value::as_str) == Some("type_text"));
    typing && map.get("secret").is_some_and(Value::is_string)
}

#[cfg(test)]
mod tests;
