//! Reading and checking a published snapshot.
//!
//! Order (cheapest first, each failure its own [`SnapshotError`] variant): directory →
//! manifest files present → manifest checksum → magic → format version → JSON shape → file
//! entries → fingerprint → each data file's size → (with [`VerifyLevel::Full`]) each data
//! file's sha256.
//!
//! Cost of [`VerifyLevel::Full`]: it reads every byte, dominated by the 256 MiB+ `mem` file.
//! Measured on the 2-core dev machine (CPU with SHA-NI, file in page cache, sha2 0.10;
//! `sha256_throughput_256mib` ignored test): release build 180–200 ms per 256 MiB
//! (~1.3 GiB/s); debug build ~5 s (~50 MiB/s, sha2 unoptimized). That is 2–3x a whole
//! restore, so the hot restore path should use [`VerifyLevel::Sizes`] (microseconds) and
//! leave [`VerifyLevel::Full`] to publish time, a janitor or an explicit `snapshot verify`.

use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::error::SnapshotError;
use crate::manifest::{SnapshotFingerprint, SnapshotManifest, parse_checksum_line, sha256_hex};
use crate::{DATA_FILES, MANIFEST_FILE, MANIFEST_SHA256_FILE};

/// How much of the data files [`verify`] checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifyLevel {
    /// Sizes and sha256 of every data file (reads everything).
    Full,
    /// Sizes only (catches truncation, not bit flips); milliseconds.
    Sizes,
}

/// Verifies the snapshot in `dir` against the host's `expected` fingerprint and returns its
/// manifest. Blocking I/O: call it from `spawn_blocking` in async code.
pub fn verify(
    dir: &Path,
    expected: &SnapshotFingerprint,
    level: VerifyLevel,
) -> Result<SnapshotManifest, SnapshotError> {
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
    for entry in &manifest.files {
        let path = dir.join(&entry.name);
        let actual = match std::fs::metadata(&path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(SnapshotError::MissingFile { path });
            }
            Err(e) => return Err(SnapshotError::io("read", path, e)),
        };
        if actual != entry.size {
            return Err(SnapshotError::SizeMismatch {
                path,
                expected: entry.size,
                actual,
            });
        }
    }
    if level == VerifyLevel::Full {
        for entry in &manifest.files {
            let path = dir.join(&entry.name);
            let actual = sha256_file(&path)?;
            if actual != entry.sha256 {
                return Err(SnapshotError::DigestMismatch {
                    path,
                    expected: entry.sha256.clone(),
                    actual,
                });
            }
        }
    }
    Ok(manifest)
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
