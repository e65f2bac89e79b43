//! Reading and checking a published snapshot.
//!
//! Order (cheapest first, each failure its own [`SnapshotError`] variant): directory →
//! manifest files present → manifest checksum → magic → format version → JSON shape → file
//! entries → fingerprint → each data file's size → (with [`VerifyLevel::Full`] and
//! [`VerifyLevel::FullCached`]) each data file's sha256.
//!
//! Cost of hashing: it reads every byte, dominated by the 256 MiB+ `mem` file. Measured on
//! the 2-core dev machine (CPU with SHA-NI, file in page cache, sha2 0.10; `sha256sum`
//! of a 256 MiB file agrees): release build 180–200 ms per 256 MiB
//! (~1.3 GiB/s); debug build ~5 s (~50 MiB/s, sha2 unoptimized). That is 2–3x a whole
//! restore, so the hot restore path uses [`VerifyLevel::FullCached`]: a file this process
//! already hashed (at publish or at an earlier verify) and whose inode, size, mtime and ctime
//! are unchanged since is not read again (see `seal.rs` for why that proves it unchanged).
//! A fresh daemon hashes each snapshot once; every later restore costs a few `stat` calls.
//! Any failed verify forgets the directory's seals.

use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::error::SnapshotError;
use crate::manifest::{SnapshotFingerprint, SnapshotManifest, parse_checksum_line, sha256_hex};
use crate::seal::{self, FileStamp};
use crate::{DATA_FILES, MANIFEST_FILE, MANIFEST_SHA256_FILE};

/// How much of the data files [`verify`] checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifyLevel {
    /// Sizes and sha256 of every data file (reads everything, always).
    Full,
    /// Like [`VerifyLevel::Full`], but a data file sealed by an earlier hash in this process
    /// and unchanged since (same device, inode, size, mtime and ctime) is not read again.
    /// Catches every write to a file; microseconds when nothing changed.
    FullCached,
    /// Sizes only (catches truncation, not bit flips); microseconds.
    Sizes,
}

/// What [`verify_with_report`] found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// The snapshot's manifest.
    pub manifest: SnapshotManifest,
    /// Data files whose content was hashed by this call (in manifest order); empty at
    /// [`VerifyLevel::Sizes`] and for sealed files at [`VerifyLevel::FullCached`].
    pub hashed: Vec<String>,
}

/// Verifies the snapshot in `dir` against the host's `expected` fingerprint and returns its
/// manifest. Blocking I/O: call it from `spawn_blocking` in async code.
pub fn verify(
    dir: &Path,
    expected: &SnapshotFingerprint,
    level: VerifyLevel,
) -> Result<SnapshotManifest, SnapshotError> {
    verify_with_report(dir, expected, level).map(|r| r.manifest)
}

/// [`verify`], also saying which files were hashed. Every successful hash seals the file
/// (for later [`VerifyLevel::FullCached`] calls); any error forgets the directory's seals.
pub fn verify_with_report(
    dir: &Path,
    expected: &SnapshotFingerprint,
    level: VerifyLevel,
) -> Result<VerifyReport, SnapshotError> {
    let res = verify_inner(dir, expected, level);
    if res.is_err() {
        seal::forget_dir(dir);
    }
    res
}

fn verify_inner(
    dir: &Path,
    expected: &SnapshotFingerprint,
    level: VerifyLevel,
) -> Result<VerifyReport, SnapshotError> {
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(SnapshotError::MissingDir {
                path: dir.to_owned(),
            });
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(SnapshotError::MissingDir {
                path: dir.to_owned(),
            });
        }
        Err(e) => return Err(SnapshotError::io("read", dir, e)),
    }
    let manifest_path = dir.join(MANIFEST_FILE);
    let sum_path = dir.join(MANIFEST_SHA256_FILE);
    let body = read_required(&manifest_path)?;
    let sum = read_required(&sum_path)?;
    let recorded = std::str::from_utf8(&sum)
        .ok()
        .and_then(parse_checksum_line)
        .ok_or_else(|| SnapshotError::ChecksumFileMalformed {
            path: sum_path.clone(),
        })?;
    let computed = sha256_hex(&body);
    if recorded != computed {
        return Err(SnapshotError::ManifestChecksum {
            dir: dir.to_owned(),
            recorded,
            computed,
        });
    }
    let manifest = SnapshotManifest::decode(&manifest_path, &body)?;
    check_entries(&manifest_path, &manifest)?;
    let diffs = manifest.fingerprint.diff(expected);
    if !diffs.is_empty() {
        return Err(SnapshotError::FingerprintMismatch { diffs });
    }
    let mut stamps = Vec::with_capacity(manifest.files.len());
    for entry in &manifest.files {
        let path = dir.join(&entry.name);
        let stamp = FileStamp::of(&path)?;
        if stamp.size != entry.size {
            return Err(SnapshotError::SizeMismatch {
                path,
                expected: entry.size,
                actual: stamp.size,
            });
        }
        stamps.push(stamp);
    }
    let mut hashed = Vec::new();
    if level != VerifyLevel::Sizes {
        for (entry, stamp) in manifest.files.iter().zip(&stamps) {
            let path = dir.join(&entry.name);
            if level == VerifyLevel::FullCached && seal::is_sealed(&path, &entry.sha256, stamp) {
                continue;
            }
            let actual = sha256_file(&path)?;
            if actual != entry.sha256 {
                return Err(SnapshotError::DigestMismatch {
                    path,
                    expected: entry.sha256.clone(),
                    actual,
                });
            }
            seal::record(&path, &entry.sha256, stamp);
            hashed.push(entry.name.clone());
        }
    }
    Ok(VerifyReport { manifest, hashed })
}

/// The manifest lists exactly the data files, once each, with well-formed digests.
fn check_entries(path: &Path, manifest: &SnapshotManifest) -> Result<(), SnapshotError> {
    let invalid = |reason: String| SnapshotError::ManifestInvalid {
        path: path.to_owned(),
        reason,
    };
    for entry in &manifest.files {
        if !DATA_FILES.contains(&entry.name.as_str()) {
            return Err(invalid(format!("unknown file entry {:?}", entry.name)));
        }
        if entry.sha256.len() != 64 || !entry.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid(format!("bad sha256 for {}", entry.name)));
        }
    }
    for name in DATA_FILES {
        let n = manifest.files.iter().filter(|f| f.name == name).count();
        if n != 1 {
            return Err(invalid(format!("{n} entries for {name}, expected 1")));
        }
    }
    Ok(())
}

fn read_required(path: &Path) -> Result<Vec<u8>, SnapshotError> {
    match std::fs::read(path) {
        Ok(b) => Ok(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(SnapshotError::MissingFile {
            path: path.to_owned(),
        }),
        Err(e) => Err(SnapshotError::io("read", path, e)),
    }
}

/// Hex sha256 of a file's content (1 MiB reads).
pub fn sha256_file(path: &Path) -> Result<String, SnapshotError> {
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(SnapshotError::MissingFile {
                path: path.to_owned(),
            });
        }
        Err(e) => return Err(SnapshotError::io("open", path, e)),
    };
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| SnapshotError::io("read", path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}
