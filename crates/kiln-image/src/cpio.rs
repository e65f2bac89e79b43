//! A reproducible writer for the `newc` cpio format (the Linux initramfs format).
//!
//! Each entry is a 110-byte ASCII header, the NUL-terminated name, padding to a multiple of 4,
//! the data, padding to a multiple of 4; the archive ends with an entry named `TRAILER!!!`:
//!
//! ```text
//! +--------+-----+------+-----+-----+-------+-------+----------+-----+-----+------+------+----------+-------+
//! | 070701 | ino | mode | uid | gid | nlink | mtime | filesize | maj | min | rmaj | rmin | namesize | check |
//! +--------+-----+------+-----+-----+-------+-------+----------+-----+-----+------+------+----------+-------+
//!   6 bytes  then 13 fields of 8 uppercase hex digits each (110 bytes in all)
//! | name\0 | pad to 4 | data | pad to 4 |
//! ```
//!
//! Invariants (what makes two builds of the same inputs byte-identical): entries are written in
//! sorted path order with every parent directory before its children (missing parents are
//! added as 0755 directories); mtime, uid, gid, device numbers and check are 0; inode numbers
//! count up from 1 in output order; names carry no leading `/`.

use std::collections::BTreeMap;
use std::io::{self, Write};

/// What an archive entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    /// A directory.
    Dir,
    /// A regular file with these contents.
    File(Vec<u8>),
    /// A character device node.
    CharDev {
        /// Device major number.
        major: u32,
        /// Device minor number.
        minor: u32,
    },
}

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFCHR: u32 = 0o020_000;

/// One archive entry: kind and permission bits (`0o7777` range).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Type and contents.
    pub kind: EntryKind,
    /// Permission bits, e.g. `0o755`.
    pub perm: u32,
}

/// Collects entries by path and writes them as a reproducible newc archive.
#[derive(Debug, Default, Clone)]
pub struct Archive {
    entries: BTreeMap<String, Entry>,
}

/// Normalizes an archive path: no leading `/`, no empty or `.` components.
fn normalize(path: &str) -> String {
    path.split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect::<Vec<_>>()
        .join("/")
}

impl Archive {
    /// An empty archive.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) the entry at `path`. Parents are added on write if missing.
    pub fn insert(&mut self, path: &str, kind: EntryKind, perm: u32) {
        let path = normalize(path);
        if !path.is_empty() {
            self.entries.insert(
                path,
                Entry {
                    kind,
                    perm: perm & 0o7777,
                },
            );
        }
    }

    /// The entry at `path`, if any.
    pub fn get(&self, path: &str) -> Option<&Entry> {
        self.entries.get(&normalize(path))
    }

    /// The full entry list in output order: sorted by path components, so that every directory
    /// comes right before its contents, with implicit parent directories filled in.
    fn resolved(&self) -> Vec<(String, Entry)> {
        let mut all: BTreeMap<Vec<String>, Entry> = BTreeMap::new();
        for (path, entry) in &self.entries {
            let comps: Vec<String> = path.split('/').map(str::to_owned).collect();
            for i in 1..comps.len() {
                all.entry(comps[..i].to_vec()).or_insert(Entry {
                    kind: EntryKind::Dir,
                    perm: 0o755,
                });
            }
            all.insert(comps, entry.clone());
        }
        // Sorting component vectors (not strings) keeps "a/b" before "a-b" and thus parents
        // immediately followed by their children.
        all.into_iter().map(|(c, e)| (c.join("/"), e)).collect()
    }

    /// Writes the archive (entries, then the trailer) to `w`; returns the bytes written.
    pub fn write_to(&self, w: &mut dyn Write) -> io::Result<u64> {
        let mut written = 0u64;
        let mut ino = 0u32;
        for (path, entry) in self.resolved() {
            ino += 1;
            let (mode, nlink, data, rdev): (u32, u32, &[u8], (u32, u32)) = match &entry.kind {
                EntryKind::Dir => (S_IFDIR | entry.perm, 2, &[], (0, 0)),
                EntryKind::File(data) => (S_IFREG | entry.perm, 1, data, (0, 0)),
                EntryKind::CharDev { major, minor } => {
                    (S_IFCHR | entry.perm, 1, &[], (*major, *minor))
                }
            };
            written += write_entry(w, ino, mode, nlink, &path, data, rdev)?;
        }
        written += write_entry(w, 0, 0, 1, "TRAILER!!!", &[], (0, 0))?;
        Ok(written)
    }

    /// The archive as bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // Writing into a Vec cannot fail.
        let _ = self.write_to(&mut out);
        out
    }
}

/// Zero bytes needed to pad `len` to a multiple of 4.
fn pad4(len: usize) -> usize {
    (4 - len % 4) % 4
}

fn write_entry(
    w: &mut dyn Write,
    ino: u32,
    mode: u32,
    nlink: u32,
    name: &str,
    data: &[u8],
    rdev: (u32, u32),
) -> io::Result<u64> {
    let filesize = u32::try_from(data.len()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name}: newc cannot hold files of 4 GiB or more"),
        )
    })?;
    let namesize = name.len() + 1;
    let header = format!(
        "070701{ino:08X}{mode:08X}{uid:08X}{gid:08X}{nlink:08X}{mtime:08X}{filesize:08X}\
         {maj:08X}{min:08X}{rmaj:08X}{rmin:08X}{namesize:08X}{check:08X}",
        uid = 0,
        gid = 0,
        mtime = 0,
        maj = 0,
        min = 0,
        rmaj = rdev.0,
        rmin = rdev.1,
        check = 0,
    );
    w.write_all(header.as_bytes())?;
    w.write_all(name.as_bytes())?;
    let name_pad = 1 + pad4(header.len() + namesize);
    w.write_all(&[0u8; 4][..name_pad])?;
    w.write_all(data)?;
    let data_pad = pad4(data.len());
    w.write_all(&[0u8; 4][..data_pad])?;
    Ok((header.len() + namesize + pad4(header.len() + namesize) + data.len() + data_pad) as u64)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// One parsed entry: name, mode, nlink, rdev and data.
    #[derive(Debug, PartialEq, Eq)]
    pub(crate) struct Parsed {
        pub name: String,
        pub mode: u32,
        pub nlink: u32,
        pub rdev: (u32, u32),
        pub data: Vec<u8>,
    }

    /// A strict newc reader for tests: checks magic, padding and the trailer.
    pub(crate) fn parse(mut b: &[u8]) -> Vec<Parsed> {
        let mut out = Vec::new();
        let total = b.len();
        loop {
            let offset = total - b.len();
            assert_eq!(offset % 4, 0, "entry not 4-aligned");
            assert!(b.len() >= 110, "truncated header");
            assert_eq!(&b[..6], b"070701", "bad magic at {offset}");
            let field = |i: usize| {
                let s = std::str::from_utf8(&b[6 + i * 8..6 + (i + 1) * 8]).expect("ascii");
                u32::from_str_radix(s, 16).expect("hex")
            };
            let (mode, uid, gid, nlink, mtime) = (field(1), field(2), field(3), field(4), field(5));
            let (filesize, rmaj, rmin, namesize) =
                (field(6) as usize, field(9), field(10), field(11) as usize);
            assert_eq!((uid, gid, mtime), (0, 0, 0));
            let name = std::str::from_utf8(&b[110..110 + namesize - 1])
                .expect("utf8 name")
                .to_owned();
            assert_eq!(b[110 + namesize - 1], 0, "name not NUL-terminated");
            let data_start = 110 + namesize + pad4(110 + namesize);
            let data = b[data_start..data_start + filesize].to_vec();
            let next = data_start + filesize + pad4(filesize);
            b = &b[next..];
            if name == "TRAILER!!!" {
                assert!(b.is_empty(), "bytes after trailer");
                return out;
            }
            out.push(Parsed {
                name,
                mode,
                nlink,
                rdev: (rmaj, rmin),
                data,
            });
        }
    }

    /// Joins space-separated hex header fields (for readable golden fixtures).
    fn fields(s: &str) -> Vec<u8> {
        s.split(' ').collect::<String>().into_bytes()
    }

    #[test]
    fn archive_tiny_matches_golden_bytes() {
        let mut a = Archive::new();
        a.insert("/d/f", EntryKind::File(b"hi\n".to_vec()), 0o644);
        let mut expected = Vec::new();
        //                 magic  ino      mode     uid      gid      nlink    mtime    size     maj      min      rmaj     rmin     namesize check
        expected.extend(fields("070701 00000001 000041ED 00000000 00000000 00000002 00000000 00000000 00000000 00000000 00000000 00000000 00000002 00000000"));
        expected.extend(b"d\0"); // 110 + 2 = 112: aligned
        expected.extend(fields("070701 00000002 000081A4 00000000 00000000 00000001 00000000 00000003 00000000 00000000 00000000 00000000 00000004 00000000"));
        expected.extend(b"d/f\0\0\0"); // 110 + 4 = 114: 2 bytes of padding
        expected.extend(b"hi\n\0"); // 3: 1 byte of padding
        expected.extend(fields("070701 00000000 00000000 00000000 00000000 00000001 00000000 00000000 00000000 00000000 00000000 00000000 0000000B 00000000"));
        expected.extend(b"TRAILER!!!\0\0\0\0"); // 110 + 11 = 121: 3 bytes of padding
        assert_eq!(
            String::from_utf8_lossy(&a.to_bytes()),
            String::from_utf8_lossy(&expected)
        );
        assert_eq!(a.to_bytes(), expected);
    }

    #[test]
    fn archive_parents_first_sorted_and_trailer() {
        let mut a = Archive::new();
        a.insert("lib/modules/b.ko", EntryKind::File(vec![1; 5]), 0o644);
        a.insert("init", EntryKind::File(vec![2; 7]), 0o755);
        a.insert("lib/modules/a.ko", EntryKind::File(vec![3; 4]), 0o644);
        a.insert("lib-x", EntryKind::Dir, 0o700);
        a.insert(
            "dev/console",
            EntryKind::CharDev { major: 5, minor: 1 },
            0o600,
        );
        let bytes = a.to_bytes();
        let parsed = parse(&bytes);
        let names: Vec<&str> = parsed.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "dev",
                "dev/console",
                "init",
                "lib",
                "lib/modules",
                "lib/modules/a.ko",
                "lib/modules/b.ko",
                "lib-x"
            ]
        );
        let console = &parsed[1];
        assert_eq!(console.mode, 0o020_600);
        assert_eq!(console.rdev, (5, 1));
        assert_eq!(parsed[2].mode, 0o100_755);
        assert_eq!(parsed[2].data.len(), 7);
        assert_eq!(parsed[0].mode, 0o040_755);
        assert_eq!(parsed[0].nlink, 2);
        assert_eq!(parsed[7].mode, 0o040_700);
        assert_eq!(bytes.len() % 4, 0);
    }

    #[test]
    fn archive_same_entries_any_insert_order_same_bytes() {
        let mut a = Archive::new();
        a.insert("x/1", EntryKind::File(b"1".to_vec()), 0o644);
        a.insert("y", EntryKind::Dir, 0o755);
        let mut b = Archive::new();
        b.insert("y/", EntryKind::Dir, 0o755);
        b.insert("/x/1", EntryKind::File(b"1".to_vec()), 0o644);
        assert_eq!(a.to_bytes(), b.to_bytes());
    }

    #[test]
    fn archive_is_listed_by_cpio_tool() {
        // The reference implementation must agree with our writer. The tool is a precondition
        // (scripts/setup-host installs it): without it the test fails rather than pass unchecked.
        let mut a = Archive::new();
        a.insert("init", EntryKind::File(b"#!x".to_vec()), 0o755);
        a.insert(
            "lib/modules/load-order",
            EntryKind::File(b"a.ko\n".to_vec()),
            0o644,
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a.cpio");
        std::fs::write(&path, a.to_bytes()).expect("write");
        let out = std::process::Command::new("cpio")
            .args(["-t", "--quiet", "-F"])
            .arg(&path)
            .output()
            .expect("the cpio tool runs (scripts/setup-host installs it)");
        assert!(out.status.success(), "{out:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "init\nlib\nlib/modules\nlib/modules/load-order\n"
        );
    }
}
