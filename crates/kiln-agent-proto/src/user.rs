//! The user an exec runs as (feature [`FEATURE_USER_V1`]).
//!
//! Owns: [`ExecUser`], the optional `user` of an [`crate::ExecRequest`], checked when parsed
//! so a malformed value fails the whole message, and its split into a user part and an
//! optional group part ([`UserRef`]).
//!
//! Must not: look names up. The agent resolves names against the guest's own `/etc/passwd`
//! and `/etc/group`; nothing here reads a file.
//!
//! Accepted forms, as Docker's and OCI's `User`:
//!
//! ```text
//!  name        uid         name:group      uid:gid      name:gid      uid:group
//!  └ user part ┘           └ user ┘ └ group part ┘
//!  a part of ASCII digits only is numeric (a uid or gid in 0..=4294967294),
//!  anything else is a name
//! ```
//!
//! Invariants: an [`ExecUser`] is 1..=[`MAX_USER_BYTES`] bytes, has at most one `:`, no empty
//! part and no control character (so no NUL and no newline: a name can neither truncate a C
//! string nor span two lines of `/etc/passwd`); a numeric part fits a `u32` and is not
//! `4294967295`, which `setuid(2)` and `setgid(2)` read as "no change".

use std::fmt;

use serde::{Deserialize, Serialize};

/// Feature string in [`crate::AgentInfo::features`] of an agent that honours
/// [`crate::ExecRequest::user`]. An agent without it ignores the field (unknown fields are
/// skipped) and would run the command as root, so a host must check for it first.
pub const FEATURE_USER_V1: &str = "user-v1";

/// Longest `user` value, in bytes.
pub const MAX_USER_BYTES: usize = 256;

/// Why a `user` value was refused. The message never echoes the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid user: {reason} (use NAME, UID, NAME:GROUP or UID:GID)")]
pub struct UserError {
    /// What is wrong.
    pub reason: &'static str,
}

/// One part of an [`ExecUser`]: a numeric id or a name to look up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UserRef<'a> {
    /// A uid or gid given as a number.
    Id(u32),
    /// A user or group name.
    Name(&'a str),
}

impl fmt::Display for UserRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UserRef::Id(id) => write!(f, "{id}"),
            UserRef::Name(name) => f.write_str(name),
        }
    }
}

/// A validated `user` of an exec: `USER` or `USER:GROUP`, each a name or a number.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ExecUser(String);

/// Checks one part of a spec; `empty` says which part an empty one is.
fn check_part(part: &str, empty: &'static str) -> Result<(), UserError> {
    if part.is_empty() {
        return Err(UserError { reason: empty });
    }
    let numeric = part.bytes().all(|b| b.is_ascii_digit());
    if numeric && !part.parse::<u32>().is_ok_and(|id| id != u32::MAX) {
        return Err(UserError {
            reason: "a numeric id must be in 0..=4294967294",
        });
    }
    Ok(())
}

fn parse_part(part: &str) -> UserRef<'_> {
    if part.bytes().all(|b| b.is_ascii_digit())
        && let Ok(id) = part.parse::<u32>()
    {
        return UserRef::Id(id);
    }
    UserRef::Name(part)
}

impl ExecUser {
    /// Validates `spec`.
    pub fn new(spec: impl Into<String>) -> Result<ExecUser, UserError> {
        let spec = spec.into();
        if spec.is_empty() {
            return Err(UserError {
                reason: "it is empty",
            });
        }
        if spec.len() > MAX_USER_BYTES {
            return Err(UserError {
                reason: "it is longer than 256 bytes",
            });
        }
        if spec.chars().any(char::is_control) {
            return Err(UserError {
                reason: "it contains a control character",
            });
        }
        let mut parts = spec.splitn(2, ':');
        let user = parts.next().unwrap_or_default();
        check_part(user, "the user part is empty")?;
        if let Some(group) = parts.next() {
            if group.contains(':') {
                return Err(UserError {
                    reason: "it has more than one ':'",
                });
            }
            check_part(group, "the group part is empty")?;
        }
        Ok(ExecUser(spec))
    }

    /// The value as given (`name`, `uid:gid`, ...).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The user part.
    pub fn user(&self) -> UserRef<'_> {
        parse_part(self.0.split(':').next().unwrap_or_default())
    }

    /// The group part, if one was given.
    pub fn group(&self) -> Option<UserRef<'_>> {
        self.0.split_once(':').map(|(_, g)| parse_part(g))
    }
}

impl TryFrom<String> for ExecUser {
    type Error = UserError;
    fn try_from(s: String) -> Result<ExecUser, UserError> {
        ExecUser::new(s)
    }
}

impl From<ExecUser> for String {
    fn from(u: ExecUser) -> String {
        u.0
    }
}

impl fmt::Display for ExecUser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_user_accepts_every_docker_form() {
        let cases: [(&str, UserRef<'_>, Option<UserRef<'_>>); 7] = [
            ("nobody", UserRef::Name("nobody"), None),
            ("65534", UserRef::Id(65534), None),
            (
                "nobody:nogroup",
                UserRef::Name("nobody"),
                Some(UserRef::Name("nogroup")),
            ),
            ("1234:1234", UserRef::Id(1234), Some(UserRef::Id(1234))),
            ("app:0", UserRef::Name("app"), Some(UserRef::Id(0))),
            ("0:wheel", UserRef::Id(0), Some(UserRef::Name("wheel"))),
            ("4294967294", UserRef::Id(4_294_967_294), None),
        ];
        for (spec, user, group) in cases {
            let u = ExecUser::new(spec).expect(spec);
            assert_eq!(u.user(), user, "{spec}");
            assert_eq!(u.group(), group, "{spec}");
            assert_eq!(u.as_str(), spec);
        }
    }

    #[test]
    fn exec_user_refuses_malformed_values() {
        let long = "a".repeat(MAX_USER_BYTES + 1);
        for bad in [
            "",
            ":",
            ":0",
            "root:",
            "a:b:c",
            "a\0b",
            "a\nb",
            "root\n:0",
            "4294967295",
            "0:4294967295",
            "99999999999",
            long.as_str(),
        ] {
            assert!(ExecUser::new(bad).is_err(), "{bad:?}");
        }
        assert!(ExecUser::new("a".repeat(MAX_USER_BYTES)).is_ok());
    }

    #[test]
    fn exec_user_error_never_echoes_the_value() {
        let e = ExecUser::new("zq\nzq:x:y").expect_err("control character");
        assert!(!e.to_string().contains("zq"), "{e}");
    }

    #[test]
    fn exec_user_json_is_a_plain_validated_string() {
        let u = ExecUser::new("nobody:nogroup").expect("valid");
        assert_eq!(
            serde_json::to_string(&u).expect("serialises"),
            r#""nobody:nogroup""#
        );
        let back: ExecUser = serde_json::from_str(r#""nobody:nogroup""#).expect("parses");
        assert_eq!(back, u);
        for bad in [r#""a:b:c""#, r#""""#, r#""x\u0000""#, "12"] {
            assert!(serde_json::from_str::<ExecUser>(bad).is_err(), "{bad}");
        }
    }
}
