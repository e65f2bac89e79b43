//! Just enough ELF64 parsing for two questions, with bounds checks on every read:
//!
//! - is the agent a static x86-64 executable (no `PT_INTERP` program header), so the kernel
//!   can run it as `/init` of an initramfs that has no dynamic loader?
//! - what does a kernel module's `.modinfo` section say (its `depends=` list)?
//!
//! Owns no I/O beyond reading one file; never executes anything.

use std::path::Path;

use crate::error::{ImageError, IoContext};

const PT_INTERP: u32 = 3;
const EM_X86_64: u16 = 62;
const ET_EXEC: u16 = 2;
const ET_DYN: u16 = 3;

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

/// Checks the ELF identification: 64-bit little-endian ELF.
fn check_ident(b: &[u8]) -> Result<(), String> {
    if b.len() < 64 || &b[..4] != b"\x7fELF" {
        return Err("not an ELF file".into());
    }
    if b[4] != 2 {
        return Err("not a 64-bit ELF file".into());
    }
    if b[5] != 1 {
        return Err("not a little-endian ELF file".into());
    }
    Ok(())
}

/// Why `bytes` cannot serve as a static x86-64 `/init`, or `None` if it can.
pub(crate) fn static_exec_problem(b: &[u8]) -> Option<String> {
    if let Err(e) = check_ident(b) {
        return Some(e);
    }
    let (Some(e_type), Some(machine)) = (u16_at(b, 0x10), u16_at(b, 0x12)) else {
        return Some("truncated ELF header".into());
    };
    if e_type != ET_EXEC && e_type != ET_DYN {
        return Some(format!("ELF type {e_type} is not an executable"));
    }
    if machine != EM_X86_64 {
        return Some(format!("ELF machine {machine} is not x86-64"));
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) =
        (u64_at(b, 0x20), u16_at(b, 0x36), u16_at(b, 0x38))
    else {
        return Some("truncated ELF header".into());
    };
    if phnum == 0 || phentsize < 56 {
        return Some("no usable program headers".into());
    }
    for i in 0..u64::from(phnum) {
        let Some(off) = phoff
            .checked_add(i * u64::from(phentsize))
            .and_then(|o| usize::try_from(o).ok())
        else {
            return Some("program header table out of range".into());
        };
        if b.get(off..off + usize::from(phentsize)).is_none() {
            return Some("program header table out of range".into());
        }
        match u32_at(b, off) {
            Some(PT_INTERP) => {
                return Some(
                    "it is dynamically linked (has a PT_INTERP program header); build it \
                     static, e.g. RUSTFLAGS='-C target-feature=+crt-static' \
                     --target x86_64-unknown-linux-gnu"
                        .into(),
                );
            }
            Some(_) => {}
            None => return Some("program header table out of range".into()),
        }
    }
    None
}

/// Checks that `path` is a static x86-64 ELF executable (static-pie included).
/// Fails with [`ImageError::BadAgent`] unless `path` is a static x86-64 executable (no
/// `PT_INTERP`), i.e. something the kernel can run as `/init` of an initramfs.
pub fn check_static_exec(path: &Path) -> Result<(), ImageError> {
    let bytes = std::fs::read(path).ctx("read agent binary", path)?;
    match static_exec_problem(&bytes) {
        None => Ok(()),
        Some(reason) => Err(ImageError::BadAgent {
            path: path.to_owned(),
            reason,
        }),
    }
}

/// Returns the raw contents of the section called `name`, if present.
fn section<'a>(b: &'a [u8], name: &[u8]) -> Result<Option<&'a [u8]>, String> {
    check_ident(b)?;
    let trunc = || "section header table out of range".to_string();
    let shoff = u64_at(b, 0x28).ok_or_else(trunc)?;
    let shentsize = u64::from(u16_at(b, 0x3a).ok_or_else(trunc)?);
    let shnum = u64::from(u16_at(b, 0x3c).ok_or_else(trunc)?);
    let shstrndx = u64::from(u16_at(b, 0x3e).ok_or_else(trunc)?);
    // Returns (name offset, file offset, size) of section header `i`.
    let header = |i: u64| -> Result<(u32, usize, usize), String> {
        let base = shoff
            .checked_add(i.checked_mul(shentsize).ok_or_else(trunc)?)
            .and_then(|o| usize::try_from(o).ok())
            .ok_or_else(trunc)?;
        let name = u32_at(b, base).ok_or_else(trunc)?;
        let off = u64_at(b, base + 0x18).ok_or_else(trunc)?;
        let size = u64_at(b, base + 0x20).ok_or_else(trunc)?;
        let off = usize::try_from(off).map_err(|_| trunc())?;
        let size = usize::try_from(size).map_err(|_| trunc())?;
        Ok((name, off, size))
    };
    let slice = |off: usize, size: usize| -> Result<&'a [u8], String> {
        off.checked_add(size)
            .and_then(|end| b.get(off..end))
            .ok_or_else(|| "section contents out of range".to_string())
    };
    if shnum == 0 || shstrndx >= shnum {
        return Ok(None);
    }
    let (_, stroff, strsize) = header(shstrndx)?;
    let strtab = slice(stroff, strsize)?;
    for i in 0..shnum {
        let (name_off, off, size) = header(i)?;
        let Some(rest) = strtab.get(name_off as usize..) else {
            continue;
        };
        let end = rest.iter().position(|&c| c == 0).unwrap_or(rest.len());
        if &rest[..end] == name {
            return slice(off, size).map(Some);
        }
    }
    Ok(None)
}

/// The module names listed in the `depends=` entry of a module's `.modinfo` section.
pub(crate) fn module_depends(b: &[u8]) -> Result<Vec<String>, String> {
    let Some(modinfo) = section(b, b".modinfo")? else {
        return Err("no .modinfo section".into());
    };
    for entry in modinfo.split(|&c| c == 0) {
        if let Some(list) = entry.strip_prefix(b"depends=") {
            let list = String::from_utf8_lossy(list);
            return Ok(list
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect());
        }
    }
    Ok(Vec::new())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds a minimal ELF64 x86-64 executable image with the given program header types.
    pub(crate) fn fake_exec(ph_types: &[u32]) -> Vec<u8> {
        let mut b = vec![0u8; 64];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2; // ELFCLASS64
        b[5] = 1; // little endian
        b[6] = 1; // EV_CURRENT
        b[0x10..0x12].copy_from_slice(&ET_DYN.to_le_bytes());
        b[0x12..0x14].copy_from_slice(&EM_X86_64.to_le_bytes());
        b[0x20..0x28].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        b[0x36..0x38].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        let phnum = u16::try_from(ph_types.len()).expect("few headers");
        b[0x38..0x3a].copy_from_slice(&phnum.to_le_bytes());
        for t in ph_types {
            let mut ph = vec![0u8; 56];
            ph[..4].copy_from_slice(&t.to_le_bytes());
            b.extend_from_slice(&ph);
        }
        b
    }

    /// Builds a minimal ELF64 relocatable object with a `.modinfo` section holding `modinfo`.
    pub(crate) fn fake_module(modinfo: &[u8]) -> Vec<u8> {
        let shstrtab = b"\0.modinfo\0.shstrtab\0";
        let mut b = vec![0u8; 64];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[6] = 1;
        b[0x10..0x12].copy_from_slice(&1u16.to_le_bytes()); // ET_REL
        b[0x12..0x14].copy_from_slice(&EM_X86_64.to_le_bytes());
        let modinfo_off = b.len() as u64;
        b.extend_from_slice(modinfo);
        let strtab_off = b.len() as u64;
        b.extend_from_slice(shstrtab);
        let shoff = b.len() as u64;
        let mut sh = |name: u32, off: u64, size: u64| {
            let mut h = vec![0u8; 64];
            h[..4].copy_from_slice(&name.to_le_bytes());
            h[0x18..0x20].copy_from_slice(&off.to_le_bytes());
            h[0x20..0x28].copy_from_slice(&size.to_le_bytes());
            b.extend_from_slice(&h);
        };
        sh(0, 0, 0); // SHN_UNDEF
        sh(1, modinfo_off, modinfo.len() as u64);
        sh(10, strtab_off, shstrtab.len() as u64);
        b[0x28..0x30].copy_from_slice(&shoff.to_le_bytes());
        b[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        b[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        b[0x3e..0x40].copy_from_slice(&2u16.to_le_bytes());
        b
    }

    #[test]
    fn static_exec_problem_static_pie_is_accepted() {
        assert_eq!(static_exec_problem(&fake_exec(&[1, 1, 6])), None);
    }

    #[test]
    fn static_exec_problem_interp_is_rejected() {
        let problem = static_exec_problem(&fake_exec(&[6, PT_INTERP, 1])).expect("dynamic");
        assert!(problem.contains("PT_INTERP"), "{problem}");
    }

    #[test]
    fn static_exec_problem_non_elf_is_rejected() {
        let problem = static_exec_problem(b"#!/bin/sh\necho hi\n").expect("script");
        assert!(problem.contains("not an ELF"), "{problem}");
    }

    #[test]
    fn static_exec_problem_truncated_phdrs_are_rejected() {
        let mut b = fake_exec(&[1]);
        b.truncate(70);
        assert!(static_exec_problem(&b).is_some());
    }

    #[test]
    fn check_static_exec_bin_true_is_rejected_as_dynamic() {
        // Debian's /bin/true is a dynamically linked PIE.
        let err = check_static_exec(Path::new("/bin/true")).expect_err("/bin/true is dynamic");
        assert!(err.to_string().contains("dynamically linked"), "{err}");
    }

    #[test]
    fn module_depends_reads_list() {
        let m = fake_module(b"license=GPL\0depends=virtio,virtio_ring\0name=virtio_blk\0");
        assert_eq!(
            module_depends(&m).expect("parses"),
            vec!["virtio".to_string(), "virtio_ring".to_string()]
        );
    }

    #[test]
    fn module_depends_empty_list_is_empty() {
        let m = fake_module(b"depends=\0name=virtio\0");
        assert!(module_depends(&m).expect("parses").is_empty());
    }

    #[test]
    fn module_depends_without_modinfo_is_error() {
        assert!(module_depends(&fake_exec(&[1])).is_err());
    }
}
