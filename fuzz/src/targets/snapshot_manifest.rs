//! Fuzz target `snapshot_manifest`: arbitrary bytes as a snapshot's `manifest.json` (and
//! `manifest.sha256`), read by [`kiln_snapshot::verify`], the only way a manifest is decoded.
//!
//! Checks, for every input:
//! - `verify` never panics (whatever the manifest claims: sizes, names, nesting);
//! - with a correct checksum line, the error is never about the checksum, and a body that is a
//!   JSON object whose `magic` is not [`kiln_snapshot::MAGIC`] is refused as
//!   [`SnapshotError::WrongMagic`] (the header check runs before the full parse);
//! - a manifest is never accepted: the directory holds no data files, so at best the error is
//!   about the first data file (a decoder that skipped checks would say `Ok`).
//!
//! Input layout: byte 0, bit 0 clear: the rest is `manifest.json` and `manifest.sha256` is its
//! correct checksum line; bit 0 set: the rest is split at its first NUL byte into
//! `manifest.json` and `manifest.sha256` (the checksum line parser is fuzzed too). The files
//! are written to a temporary directory per process.

use std::path::PathBuf;
use std::sync::OnceLock;

use kiln_snapshot::{
    MANIFEST_FILE, MANIFEST_SHA256_FILE, SnapshotError, SnapshotFingerprint, VerifyLevel,
};
use sha2::{Digest, Sha256};

fn dir() -> &'static PathBuf {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &DIR.get_or_init(|| {
        let tmp = tempfile::tempdir().expect("a temporary directory");
        let path = tmp.path().join("snap");
        std::fs::create_dir(&path).expect("the snapshot directory");
        (tmp, path)
    })
    .1
}

/// The host fingerprint the manifest is compared with (the seed corpus's values).
fn host() -> SnapshotFingerprint {
    SnapshotFingerprint {
        qemu_version: "QEMU emulator version 7.2.22".into(),
        machine: "q35,smm=off".into(),
        device_fingerprint: "0".repeat(64),
        cpu_model: "max".into(),
        accel: "tcg".into(),
        cpus: 1,
        memory_mib: 256,
        kernel_digest: "6.1.0".into(),
        initramfs_digest: "1".repeat(64),
        image_digest: "1".repeat(64),
        disk_digest: "2".repeat(64),
        format_version: kiln_snapshot::FORMAT_VERSION,
    }
}

/// Checks one input (see the module docs); panics on a finding.
pub fn run(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let checksum_ok = mode & 1 == 0;
    let (body, sum) = if checksum_ok {
        let line = format!("{}  {MANIFEST_FILE}\n", hex::encode(Sha256::digest(rest)));
        (rest, line.into_bytes())
    } else {
        match rest.iter().position(|&b| b == 0) {
            Some(at) => (&rest[..at], rest[at + 1..].to_vec()),
            None => (rest, Vec::new()),
        }
    };
    let dir = dir();
    std::fs::write(dir.join(MANIFEST_FILE), body).expect("write manifest.json");
    std::fs::write(dir.join(MANIFEST_SHA256_FILE), &sum).expect("write manifest.sha256");
    let result = kiln_snapshot::verify(dir, &host(), VerifyLevel::Sizes);
    let err = match result {
        Ok(m) => panic!("a manifest without data files was accepted: {m:?}"),
        Err(e) => e,
    };
    if checksum_ok {
        assert!(
            !matches!(
                err,
                SnapshotError::ChecksumFileMalformed { .. }
                    | SnapshotError::ManifestChecksum { .. }
            ),
            "a correct checksum line was refused: {err:?}"
        );
        /// Only the header, as a reader that knows nothing else of the format sees it.
        #[derive(serde::Deserialize)]
        struct Head {
            magic: Option<serde_json::Value>,
        }
        if let Ok(head) = serde_json::from_slice::<Head>(body)
            && head.magic.as_ref().and_then(|m| m.as_str()) != Some(kiln_snapshot::MAGIC)
        {
            assert!(
                matches!(err, SnapshotError::WrongMagic { .. }),
                "a manifest with another magic must be refused as such, got {err:?}"
            );
        }
    }
}
