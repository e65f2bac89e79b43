//! Resolving an exec's `user` (feature `user-v1`) against the guest's own account files.
//!
//! Owns: parsing `/etc/passwd` and `/etc/group` (read with a size cap) and [`resolve`], which
//! turns a validated [`ExecUser`] into the uid, gid, supplementary groups, home directory and
//! name a child is started with. The child side (`setgroups`, `setgid`, `setuid`, in that
//! order) is `sys::set_user`.
//!
//! Must not: use NSS or libc's `getpwnam` (the agent is a static binary and the image's NSS
//! modules are not ours to load); trust the files (a line that does not parse is skipped, a
//! file above [`MAX_ACCOUNT_FILE_BYTES`] is refused rather than read).
//!
//! Rules, as Docker's (`moby/sys/user`'s `GetExecUser`):
//!
//! ```text
//!  user part   name  → the passwd entry of that name (none: error)
//!              uid   → the passwd entry of that uid if any, else uid alone
//!  group part  none  → gid of the passwd entry, else 0; supplementary groups = every
//!                      /etc/group entry listing the entry's name as a member
//!              name  → the group entry of that name (none: error); no supplementary groups
//!              gid   → that gid (an entry is not needed); no supplementary groups
//!  home        the passwd entry's directory, else "/"
//! ```
//!
//! A missing `/etc/passwd` or `/etc/group` is an image without accounts: numeric forms work,
//! a name fails with `unknown user NAME: no /etc/passwd` (or the group's equivalent).

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use kiln_agent_proto::{ExecUser, UserRef};

/// Largest `/etc/passwd` or `/etc/group` the agent reads (PID 1 must not be made to allocate
/// whatever an image holds; real files are a few KiB).
pub(crate) const MAX_ACCOUNT_FILE_BYTES: u64 = 4 << 20;

/// Most supplementary groups a child gets (Linux's `NGROUPS_MAX`).
const MAX_GROUPS: usize = 65536;

/// Why a user could not be resolved; answered to the host as `bad_user`.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UserError {
    /// A name that has no entry, or whose file is missing.
    #[error("unknown {kind} {name}: {why}")]
    Unknown {
        /// `user` or `group`.
        kind: &'static str,
        /// The name asked for.
        name: String,
        /// `no /etc/passwd` or `not in /etc/passwd`.
        why: String,
    },
    /// An account file that exists but cannot be read.
    #[error("cannot read {path}: {reason}")]
    Read {
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// An account file above the cap.
    #[error("{path} is larger than {max} bytes")]
    TooLarge {
        /// The file.
        path: String,
        /// The cap.
        max: u64,
    },
    /// More supplementary groups than the kernel accepts.
    #[error("user {name} is a member of more than {MAX_GROUPS} groups")]
    TooManyGroups {
        /// The user.
        name: String,
    },
}

/// Who a child runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ResolvedUser {
    /// Real and effective user id.
    pub(crate) uid: u32,
    /// Real and effective group id.
    pub(crate) gid: u32,
    /// Supplementary groups (possibly empty: the agent's own are always dropped).
    pub(crate) groups: Vec<u32>,
    /// The passwd entry's name, when there is one (for `USER` and `LOGNAME`).
    pub(crate) name: Option<String>,
    /// `HOME`: the passwd entry's directory, else `/`.
    pub(crate) home: String,
}

/// One line of `/etc/passwd`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PasswdEntry<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
    home: &'a str,
}

/// One line of `/etc/group`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct GroupEntry<'a> {
    name: &'a str,
    gid: u32,
    members: &'a str,
}

/// Lines that are neither blank nor comments.
fn records(text: &str) -> impl Iterator<Item = Vec<&str>> {
    text.lines()
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| l.split(':').collect())
}

/// `name:password:uid:gid:gecos:home:shell`; lines with fewer than 4 fields, an empty name or
/// ids that are not plain numbers (NIS `+`/`-` lines, garbage) are skipped.
fn passwd_entries(text: &str) -> impl Iterator<Item = PasswdEntry<'_>> {
    records(text).filter_map(|f| {
        let name = *f.first()?;
        if name.is_empty() || f.len() < 4 {
            return None;
        }
        Some(PasswdEntry {
            name,
            uid: parse_id(f[2])?,
            gid: parse_id(f[3])?,
            home: f.get(5).copied().unwrap_or(""),
        })
    })
}

/// `name:password:gid:member,member`; malformed lines are skipped as for passwd.
fn group_entries(text: &str) -> impl Iterator<Item = GroupEntry<'_>> {
    records(text).filter_map(|f| {
        let name = *f.first()?;
        if name.is_empty() || f.len() < 3 {
            return None;
        }
        Some(GroupEntry {
            name,
            gid: parse_id(f[2])?,
            members: f.get(3).copied().unwrap_or(""),
        })
    })
}

fn parse_id(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok().filter(|&id| id != u32::MAX)
}

/// Reads an account file: `None` if it does not exist, an error above the cap. Bytes that are
/// not UTF-8 are replaced (such a line can match no name given as a JSON string anyway).
fn read_account_file(path: &Path) -> Result<Option<String>, UserError> {
    let shown = || path.display().to_string();
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(UserError::Read {
                path: shown(),
                reason: crate::exec::os_message(&e),
            });
        }
    };
    let mut bytes = Vec::new();
    file.take(MAX_ACCOUNT_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| UserError::Read {
            path: shown(),
            reason: crate::exec::os_message(&e),
        })?;
    if bytes.len() as u64 > MAX_ACCOUNT_FILE_BYTES {
        return Err(UserError::TooLarge {
            path: shown(),
            max: MAX_ACCOUNT_FILE_BYTES,
        });
    }
    Ok(Some(String::from_utf8_lossy(&bytes).into_owned()))
}

/// Resolves `spec` against `etc/passwd` and `etc/group` (`etc` is `/etc` in a guest).
pub(crate) fn resolve(spec: &ExecUser, etc: &Path) -> Result<ResolvedUser, UserError> {
    let passwd_path = etc.join("passwd");
    let group_path = etc.join("group");
    let passwd = read_account_file(&passwd_path)?;
    let unknown = |kind: &'static str, name: &str, path: &Path, file_exists: bool| {
        let why = if file_exists {
            format!("not in {}", path.display())
        } else {
            format!("no {}", path.display())
        };
        UserError::Unknown {
            kind,
            name: name.to_owned(),
            why,
        }
    };

    let (entry, uid) = match spec.user() {
        UserRef::Name(name) => {
            let found = passwd
                .as_deref()
                .and_then(|text| passwd_entries(text).find(|e| e.name == name));
            match found {
                Some(e) => {
                    let uid = e.uid;
                    (Some(e), uid)
                }
                None => return Err(unknown("user", name, &passwd_path, passwd.is_some())),
            }
        }
        UserRef::Id(uid) => (
            passwd
                .as_deref()
                .and_then(|text| passwd_entries(text).find(|e| e.uid == uid)),
            uid,
        ),
    };

    // The group file is only needed for a group name or a named user's memberships.
    let needs_groups = matches!(spec.group(), Some(UserRef::Name(_)))
        || (spec.group().is_none() && entry.is_some());
    let group = if needs_groups {
        read_account_file(&group_path)?
    } else {
        None
    };

    let (gid, groups) = match spec.group() {
        Some(UserRef::Id(gid)) => (gid, Vec::new()),
        Some(UserRef::Name(name)) => {
            let found = group
                .as_deref()
                .and_then(|text| group_entries(text).find(|g| g.name == name));
            match found {
                Some(g) => (g.gid, Vec::new()),
                None => return Err(unknown("group", name, &group_path, group.is_some())),
            }
        }
        None => {
            let gid = entry.as_ref().map_or(0, |e| e.gid);
            let mut groups = Vec::new();
            if let (Some(e), Some(text)) = (&entry, group.as_deref()) {
                for g in group_entries(text) {
                    if g.members.split(',').any(|m| m.trim() == e.name) && !groups.contains(&g.gid)
                    {
                        if groups.len() == MAX_GROUPS {
                            return Err(UserError::TooManyGroups {
                                name: e.name.to_owned(),
                            });
                        }
                        groups.push(g.gid);
                    }
                }
            }
            (gid, groups)
        }
    };

    let home = match &entry {
        Some(e) if !e.home.is_empty() => e.home.to_owned(),
        _ => "/".to_owned(),
    };
    Ok(ResolvedUser {
        uid,
        gid,
        groups,
        name: entry.map(|e| e.name.to_owned()),
        home,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "\
root:x:0:0:root:/root:/bin/bash
# a comment
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin

+nis::::::
broken line without colons
short:x:12
badid:x:12a:0::/:/bin/sh
huge:x:4294967296:0::/:/bin/sh
app:x:1000:1000:App,,,:/home/app:/bin/sh
nohome:x:1001:1001::
";

    const GROUP: &str = "\
root:x:0:
nogroup:x:65534:
docker:x:999:app,other
wheel:x:10:root, app
garbage
audio:x:29:other
app:x:1000:
dup:x:999:app
";

    fn etc(passwd: Option<&str>, group: Option<&str>) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("temp dir");
        if let Some(p) = passwd {
            std::fs::write(dir.path().join("passwd"), p).expect("write passwd");
        }
        if let Some(g) = group {
            std::fs::write(dir.path().join("group"), g).expect("write group");
        }
        dir
    }

    fn user(spec: &str) -> ExecUser {
        ExecUser::new(spec).expect("valid spec")
    }

    #[test]
    fn passwd_parsing_skips_malformed_lines() {
        let names: Vec<_> = passwd_entries(PASSWD).map(|e| e.name).collect();
        assert_eq!(names, ["root", "nobody", "app", "nohome"]);
        let app = passwd_entries(PASSWD)
            .find(|e| e.name == "app")
            .expect("app");
        assert_eq!((app.uid, app.gid, app.home), (1000, 1000, "/home/app"));
        assert_eq!(
            passwd_entries("a:x:1:2\r\n").next().map(|e| e.home),
            Some("")
        );
    }

    #[test]
    fn group_parsing_skips_malformed_lines() {
        let names: Vec<_> = group_entries(GROUP).map(|g| g.name).collect();
        assert_eq!(
            names,
            ["root", "nogroup", "docker", "wheel", "audio", "app", "dup"]
        );
    }

    #[test]
    fn resolve_name_uses_passwd_and_member_groups() {
        let dir = etc(Some(PASSWD), Some(GROUP));
        let r = resolve(&user("app"), dir.path()).expect("resolves");
        assert_eq!(
            r,
            ResolvedUser {
                uid: 1000,
                gid: 1000,
                // docker (999, listed twice under that gid) and wheel (" app" trimmed).
                groups: vec![999, 10],
                name: Some("app".into()),
                home: "/home/app".into(),
            }
        );
    }

    #[test]
    fn resolve_numeric_uid_with_entry_is_that_entry() {
        let dir = etc(Some(PASSWD), Some(GROUP));
        let r = resolve(&user("65534"), dir.path()).expect("resolves");
        assert_eq!((r.uid, r.gid), (65534, 65534));
        assert_eq!(r.name.as_deref(), Some("nobody"));
        assert_eq!(r.home, "/nonexistent");
    }

    #[test]
    fn resolve_numeric_uid_without_entry_gets_gid_0_and_root_home() {
        let dir = etc(Some(PASSWD), Some(GROUP));
        let r = resolve(&user("1234"), dir.path()).expect("resolves");
        assert_eq!(
            r,
            ResolvedUser {
                uid: 1234,
                gid: 0,
                groups: vec![],
                name: None,
                home: "/".into(),
            }
        );
    }

    #[test]
    fn resolve_explicit_group_has_no_supplementary_groups() {
        let dir = etc(Some(PASSWD), Some(GROUP));
        let r = resolve(&user("app:audio"), dir.path()).expect("resolves");
        assert_eq!((r.uid, r.gid, r.groups.len()), (1000, 29, 0));
        let r = resolve(&user("app:4242"), dir.path()).expect("resolves");
        assert_eq!((r.uid, r.gid, r.groups.len()), (1000, 4242, 0));
        let r = resolve(&user("1234:wheel"), dir.path()).expect("resolves");
        assert_eq!((r.uid, r.gid, r.name), (1234, 10, None));
    }

    #[test]
    fn resolve_empty_home_is_root_directory() {
        let dir = etc(Some(PASSWD), Some(GROUP));
        let r = resolve(&user("nohome"), dir.path()).expect("resolves");
        assert_eq!(r.home, "/");
    }

    #[test]
    fn resolve_unknown_names_are_clear_errors() {
        let dir = etc(Some(PASSWD), Some(GROUP));
        let err = resolve(&user("ghost"), dir.path()).expect_err("unknown user");
        assert_eq!(
            err.to_string(),
            format!("unknown user ghost: not in {}/passwd", dir.path().display())
        );
        let err = resolve(&user("app:ghosts"), dir.path()).expect_err("unknown group");
        assert_eq!(
            err.to_string(),
            format!(
                "unknown group ghosts: not in {}/group",
                dir.path().display()
            )
        );
        // A malformed line's name is not a user.
        assert!(resolve(&user("badid"), dir.path()).is_err());
    }

    #[test]
    fn resolve_without_account_files_allows_only_numeric_forms() {
        let dir = etc(None, None);
        let err = resolve(&user("nobody"), dir.path()).expect_err("no passwd");
        assert_eq!(
            err.to_string(),
            format!("unknown user nobody: no {}/passwd", dir.path().display())
        );
        let err = resolve(&user("0:wheel"), dir.path()).expect_err("no group");
        assert_eq!(
            err.to_string(),
            format!("unknown group wheel: no {}/group", dir.path().display())
        );
        let r = resolve(&user("1234:1234"), dir.path()).expect("numeric");
        assert_eq!((r.uid, r.gid, r.groups.len()), (1234, 1234, 0));
        let r = resolve(&user("77"), dir.path()).expect("numeric");
        assert_eq!((r.uid, r.gid, r.home.as_str()), (77, 0, "/"));
    }

    #[test]
    fn resolve_named_user_without_group_file_has_no_supplementary_groups() {
        let dir = etc(Some(PASSWD), None);
        let r = resolve(&user("app"), dir.path()).expect("resolves");
        assert_eq!((r.uid, r.gid, r.groups.len()), (1000, 1000, 0));
    }

    #[test]
    fn resolve_refuses_an_oversized_account_file() {
        let dir = etc(None, Some(GROUP));
        let file = File::create(dir.path().join("passwd")).expect("create");
        file.set_len(MAX_ACCOUNT_FILE_BYTES + 1)
            .expect("sparse file");
        let err = resolve(&user("0"), dir.path()).expect_err("too large");
        assert!(matches!(err, UserError::TooLarge { .. }), "{err}");
    }
}
