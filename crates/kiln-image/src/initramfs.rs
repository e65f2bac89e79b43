//! The initramfs of the boot contract (see docs/architecture.md, "Boot contract"):
//!
//! ```text
//! /init                      the static kiln agent (PID 1), 0755
//! /lib/modules/<name>.ko     plain ELF modules, flat, 0644
//! /lib/modules/load-order    one file name per line, dependencies first
//! /dev/console               character device 5:1, 0600 (the kernel opens it for PID 1)
//! /dev /proc /sys /newroot   empty directories (mount points)
//! ```
//!
//! Owns only the assembly; the cpio encoding is in `cpio`, module resolution in `modules`.
//! Invariant: identical agent bytes and modules give byte-identical archives.

use std::path::Path;

use crate::cpio::{Archive, EntryKind};
use crate::elf;
use crate::error::{ImageError, IoContext};
use crate::modules::InitramfsModule;

/// Builds the archive for `agent` bytes (already checked static) and load-ordered modules.
pub fn assemble(agent: Vec<u8>, modules: Vec<InitramfsModule>) -> Archive {
    let mut a = Archive::new();
    for dir in ["dev", "proc", "sys", "newroot", "lib/modules"] {
        a.insert(dir, EntryKind::Dir, 0o755);
    }
    a.insert(
        "dev/console",
        EntryKind::CharDev { major: 5, minor: 1 },
        0o600,
    );
    a.insert("init", EntryKind::File(agent), 0o755);
    let mut order = String::new();
    for m in modules {
        order.push_str(&m.file_name);
        order.push('\n');
        a.insert(
            &format!("lib/modules/{}", m.file_name),
            EntryKind::File(m.bytes),
            0o644,
        );
    }
    a.insert(
        "lib/modules/load-order",
        EntryKind::File(order.into_bytes()),
        0o644,
    );
    a
}

/// Checks `agent_path` is a static x86-64 executable and writes the initramfs to `out`.
pub fn write(
    agent_path: &Path,
    modules: Vec<InitramfsModule>,
    out: &Path,
) -> Result<u64, ImageError> {
    elf::check_static_exec(agent_path)?;
    let agent = std::fs::read(agent_path).ctx("read agent binary", agent_path)?;
    let archive = assemble(agent, modules);
    let mut file = std::io::BufWriter::new(std::fs::File::create(out).ctx("create", out)?);
    let n = archive.write_to(&mut file).ctx("write", out)?;
    let file = file
        .into_inner()
        .map_err(|e| ImageError::io("write", out, e.into_error()))?;
    file.sync_all().ctx("sync", out)?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpio::tests::parse;

    #[test]
    fn assemble_matches_boot_contract() {
        let modules = vec![
            InitramfsModule {
                file_name: "virtio.ko".into(),
                bytes: b"A".to_vec(),
            },
            InitramfsModule {
                file_name: "virtio_blk.ko".into(),
                bytes: b"BB".to_vec(),
            },
        ];
        let bytes = assemble(b"AGENT".to_vec(), modules).to_bytes();
        let parsed = parse(&bytes);
        let find = |n: &str| {
            parsed
                .iter()
                .find(|p| p.name == n)
                .unwrap_or_else(|| panic!("{n} missing"))
        };
        assert_eq!(find("init").mode, 0o100_755);
        assert_eq!(find("init").data, b"AGENT");
        assert_eq!(find("dev/console").rdev, (5, 1));
        assert_eq!(find("dev/console").mode & 0o170_000, 0o020_000);
        for d in ["dev", "proc", "sys", "newroot", "lib", "lib/modules"] {
            assert_eq!(find(d).mode & 0o170_000, 0o040_000, "{d} not a dir");
        }
        assert_eq!(
            find("lib/modules/load-order").data,
            b"virtio.ko\nvirtio_blk.ko\n"
        );
        assert_eq!(find("lib/modules/virtio_blk.ko").data, b"BB");
    }

    #[test]
    fn write_dynamic_agent_is_rejected_and_nothing_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("initramfs.cpio");
        let err = write(Path::new("/bin/true"), Vec::new(), &out).expect_err("dynamic");
        assert!(matches!(err, ImageError::BadAgent { .. }), "{err:?}");
        assert!(!out.exists());
    }
}
