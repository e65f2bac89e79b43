//! The disk side of imports: a `qcow2:` or `raw:` disk image (e.g. a cloud image) -> its
//! root file system as `rootfs.ext4`. `qemu-img info` vets the file, a qcow2 is converted to
//! raw in the build directory, `sfdisk --json` lists the partitions and `blkid -p` probes
//! each; the root is chosen ([`choose_partition`]) and its byte range copied sparsely.
//!
//! Invariants: the user's file is only read (qemu-img with the format named, never probed;
//! sfdisk, blkid and dd open it read-only); a qcow2 with a backing or external data file is
//! refused (it would read other host files); a partition must lie inside the disk; only
//! ext2/3/4 is accepted, and the error names everything that was found instead.

use std::path::Path;
use std::process::{Command, Stdio};

use serde::Deserialize;

use super::{ImportOrigin, ImportSource, bad, human};
use crate::error::{ImageError, IoContext};
use crate::{BuildEvent, cmd};

/// GPT partition type of a Linux x86-64 root file system (Discoverable Partitions Spec).
const GPT_ROOT_X86_64: &str = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709";
/// File systems the guest kernel mounts as its root (ext4 is built into the cloud kernel and
/// serves ext2 and ext3 too).
const BOOTABLE_FS: [&str; 3] = ["ext4", "ext3", "ext2"];

/// `qemu-img info` of a disk source: its virtual size; refuses a qcow2 that reads other
/// files (a backing file or an external data file would let an image read any host file).
pub(super) fn disk_info(src: &ImportSource, given: &str) -> Result<u64, ImageError> {
    let format = match src {
        ImportSource::Qcow2(_) => "qcow2",
        _ => "raw",
    };
    let mut c = Command::new("qemu-img");
    c.args(["info", "--output=json", "-f", format])
        .arg(src.path());
    let out = cmd::run_capture(&mut c).map_err(|e| {
        bad(
            given,
            format!("not a {format} image: {}", crate::error_chain(&e)),
        )
    })?;
    let info: serde_json::Value = serde_json::from_slice(&out)
        .map_err(|e| bad(given, format!("qemu-img info answered no JSON: {e}")))?;
    for key in ["backing-filename", "full-backing-filename"] {
        if let Some(b) = info.get(key) {
            return Err(bad(
                given,
                format!(
                    "the image has a backing file ({b}): import a flattened copy (qemu-img convert)"
                ),
            ));
        }
    }
    if info.pointer("/format-specific/data/data-file").is_some() {
        return Err(bad(given, "the image has an external data file"));
    }
    info.get("virtual-size")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| bad(given, "qemu-img info gave no virtual size"))
}

/// One partition of `sfdisk --json`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Partition {
    /// Device node (for a file: the file name and the partition number).
    pub node: String,
    /// First sector.
    pub start: u64,
    /// Sectors.
    pub size: u64,
    /// GPT type GUID or MBR type (hex).
    #[serde(rename = "type")]
    pub kind: String,
    /// GPT partition name.
    #[serde(default)]
    pub name: Option<String>,
}

/// `sfdisk --json`'s table.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct PartitionTable {
    /// `gpt` or `dos`.
    pub label: String,
    /// Bytes per sector (512 when sfdisk does not say).
    #[serde(default = "default_sector")]
    pub sectorsize: u64,
    /// The partitions.
    #[serde(default)]
    pub partitions: Vec<Partition>,
}

fn default_sector() -> u64 {
    512
}

/// Parses `sfdisk --json` output.
pub fn parse_sfdisk(json: &[u8]) -> Result<PartitionTable, serde_json::Error> {
    #[derive(Deserialize)]
    struct Top {
        partitiontable: PartitionTable,
    }
    serde_json::from_slice::<Top>(json).map(|t| t.partitiontable)
}

impl Partition {
    /// The partition number (the digits ending `node`).
    pub fn number(&self) -> &str {
        let digits = self
            .node
            .bytes()
            .rev()
            .take_while(u8::is_ascii_digit)
            .count();
        &self.node[self.node.len() - digits..]
    }

    /// Its type in words, for messages.
    pub fn describe_kind(&self) -> String {
        match self.kind.to_ascii_uppercase().as_str() {
            GPT_ROOT_X86_64 => "Linux root (x86-64)".to_owned(),
            "0FC63DAF-8483-4772-8E79-3D69D8477DE4" | "83" => "Linux filesystem".to_owned(),
            "21686148-6449-6E6F-744E-656564454649" => "BIOS boot".to_owned(),
            "C12A7328-F81F-11D2-BA4B-00A0C93EC93B" | "EF" => "EFI system".to_owned(),
            "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F" | "82" => "Linux swap".to_owned(),
            other => format!("type {other}"),
        }
    }
}

/// Picks the root file system among `parts` (each with the file system type blkid found, if
/// any): the partition with the Linux root x86-64 GPT type, else the largest ext2/3/4 one.
/// The error names every partition and what was in it.
pub fn choose_partition(
    parts: &[(Partition, Option<String>)],
    sector: u64,
) -> Result<usize, String> {
    if let Some(i) = parts
        .iter()
        .position(|(p, _)| p.kind.eq_ignore_ascii_case(GPT_ROOT_X86_64))
    {
        return match &parts[i].1 {
            Some(fs) if BOOTABLE_FS.contains(&fs.as_str()) => Ok(i),
            found => Err(format!(
                "the Linux root partition {} holds {}: only ext2/3/4 root file systems can be booted",
                parts[i].0.number(),
                found.as_deref().unwrap_or("no file system blkid knows")
            )),
        };
    }
    parts
        .iter()
        .enumerate()
        .filter(|(_, (_, fs))| fs.as_deref().is_some_and(|f| BOOTABLE_FS.contains(&f)))
        .max_by_key(|(_, (p, _))| p.size)
        .map(|(i, _)| i)
        .ok_or_else(|| {
            let found: Vec<String> = parts
                .iter()
                .map(|(p, fs)| {
                    format!(
                        "{} ({}, {}, {})",
                        p.number(),
                        p.describe_kind(),
                        human(p.size * sector),
                        fs.as_deref().unwrap_or("no file system")
                    )
                })
                .collect();
            format!(
                "no ext2/3/4 root file system found (partitions: {})",
                if found.is_empty() {
                    "none".to_owned()
                } else {
                    found.join("; ")
                }
            )
        })
}

/// Where a disk's root file system is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct RootLocation {
    /// Byte offset in the raw disk.
    pub offset: u64,
    /// Length in bytes.
    pub size: u64,
    /// Its type (`ext4`, ...).
    pub filesystem: String,
    /// The partition, in words; `None` for a bare file system.
    pub partition: Option<String>,
    /// The partition table's kind (`gpt`, `dos`), or `none`.
    pub label: String,
}

/// Finds the root file system of the raw disk `raw` (only read): the partition
/// [`choose_partition`] picks, or the whole file when it has no partition table and is one
/// ext2/3/4 file system. A partition reaching past the end of the file is refused.
pub(super) fn find_root(raw: &Path, given: &str) -> Result<RootLocation, ImageError> {
    let len = std::fs::metadata(raw).ctx("stat", raw)?.len();
    let mut c = Command::new("sfdisk");
    c.arg("--json").arg(raw);
    // No partition table (sfdisk fails): maybe a bare file system.
    let table = cmd::run_capture(&mut c)
        .ok()
        .and_then(|out| parse_sfdisk(&out).ok());
    match table {
        Some(table) if !table.partitions.is_empty() => {
            let sector = table.sectorsize.max(512);
            let mut parts = Vec::new();
            for p in table.partitions {
                let (offset, size) = p
                    .start
                    .checked_mul(sector)
                    .zip(p.size.checked_mul(sector))
                    .filter(|(o, s)| o.checked_add(*s).is_some_and(|end| end <= len))
                    .ok_or_else(|| {
                        bad(
                            given,
                            format!(
                                "partition {} (sectors {}+{}) reaches past the end of the disk ({len} bytes)",
                                p.number(),
                                p.start,
                                p.size
                            ),
                        )
                    })?;
                let fs = probe_fs(raw, offset, Some(size))?;
                parts.push((p, fs));
            }
            let i = choose_partition(&parts, sector).map_err(|why| bad(given, why))?;
            let (p, fs) = &parts[i];
            Ok(RootLocation {
                offset: p.start * sector,
                size: p.size * sector,
                filesystem: fs.clone().unwrap_or_default(),
                partition: Some(format!(
                    "{} ({}, {})",
                    p.number(),
                    p.describe_kind(),
                    human(p.size * sector)
                )),
                label: table.label,
            })
        }
        _ => match probe_fs(raw, 0, None)? {
            Some(fs) if BOOTABLE_FS.contains(&fs.as_str()) => Ok(RootLocation {
                offset: 0,
                size: len,
                filesystem: fs,
                partition: None,
                label: "none".to_owned(),
            }),
            found => Err(bad(
                given,
                format!(
                    "no partition table and no ext2/3/4 file system (found {})",
                    found.as_deref().unwrap_or("nothing blkid knows")
                ),
            )),
        },
    }
}

/// The file system type blkid finds at `offset` (`size` bytes) of `path`, if any.
fn probe_fs(path: &Path, offset: u64, size: Option<u64>) -> Result<Option<String>, ImageError> {
    let mut c = Command::new("blkid");
    c.args(["-p", "-o", "export", "-O", &offset.to_string()]);
    if let Some(size) = size {
        c.args(["-S", &size.to_string()]);
    }
    c.arg(path);
    let out = match c.stdin(Stdio::null()).output() {
        Ok(o) => o,
        Err(source) => {
            return Err(ImageError::Spawn {
                command: cmd::display(&c),
                source,
            });
        }
    };
    // blkid exits 2 when it finds nothing.
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("TYPE="))
        .map(str::to_owned))
}

/// Disk sources: the root file system's bytes, copied sparsely from the (converted) disk.
pub(super) fn extract(
    src: &ImportSource,
    given: &str,
    digest: &str,
    tmp: &Path,
    rootfs_path: &Path,
    on_event: &mut dyn FnMut(BuildEvent),
) -> Result<ImportOrigin, ImageError> {
    let mut log = |line: &str| on_event(BuildEvent::Log(line.to_owned()));
    let raw = match src {
        ImportSource::Qcow2(path) => {
            let raw = tmp.join("disk.raw");
            let mut c = Command::new("qemu-img");
            c.args(["convert", "-f", "qcow2", "-O", "raw"])
                .arg(path)
                .arg(&raw);
            cmd::run_streaming(c, &mut log)?;
            raw
        }
        // Only read: sfdisk --json, blkid and dd open it read-only.
        _ => src.path().to_owned(),
    };
    let root = find_root(&raw, given)?;
    if let Some(p) = &root.partition {
        log(&format!(
            "{} partition table; root: partition {p}",
            root.label
        ));
    }
    let RootLocation {
        offset,
        size,
        filesystem,
        partition,
        ..
    } = root;
    let mut dd = Command::new("dd");
    dd.arg(format!("if={}", raw.display()))
        .arg(format!("of={}", rootfs_path.display()))
        .args([
            "bs=1M",
            "iflag=skip_bytes,count_bytes",
            "conv=sparse,excl",
            "status=none",
        ])
        .arg(format!("skip={offset}"))
        .arg(format!("count={size}"));
    cmd::run_streaming(dd, &mut log)?;
    // conv=sparse leaves a trailing hole unwritten: give the file its full length.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(rootfs_path)
        .ctx("open", rootfs_path)?;
    f.set_len(size).ctx("resize", rootfs_path)?;
    f.sync_all().ctx("sync", rootfs_path)?;
    if raw.starts_with(tmp) {
        std::fs::remove_file(&raw).ctx("remove", &raw)?;
    }
    Ok(ImportOrigin {
        source: given.to_owned(),
        digest: digest.to_owned(),
        os_release: None,
        filesystem,
        partition,
        size_bytes: size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GPT: &str = r#"{"partitiontable":{"label":"gpt","id":"X","device":"d.raw","unit":"sectors",
        "firstlba":34,"lastlba":409566,"sectorsize":512,"partitions":[
        {"node":"d.raw1","start":2048,"size":2048,"type":"21686148-6449-6E6F-744E-656564454649","uuid":"A","name":"bios"},
        {"node":"d.raw2","start":4096,"size":8192,"type":"0FC63DAF-8483-4772-8E79-3D69D8477DE4","uuid":"B"},
        {"node":"d.raw14","start":12288,"size":397279,"type":"4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709","uuid":"C","name":"root"}]}}"#;

    #[test]
    fn choose_partition_prefers_gpt_root_type() {
        let t = parse_sfdisk(GPT.as_bytes()).expect("parse");
        assert_eq!(t.label, "gpt");
        assert_eq!(t.partitions[2].number(), "14");
        let with = |fs: [Option<&str>; 3]| -> Vec<(Partition, Option<String>)> {
            t.partitions
                .iter()
                .cloned()
                .zip(fs.map(|f| f.map(str::to_owned)))
                .collect()
        };
        assert_eq!(
            choose_partition(&with([None, Some("ext4"), Some("ext4")]), 512),
            Ok(2)
        );
        // A root partition of another file system is named, not skipped.
        let err =
            choose_partition(&with([None, Some("ext4"), Some("xfs")]), 512).expect_err("xfs root");
        assert!(err.contains("holds xfs"), "{err}");
    }

    #[test]
    fn choose_partition_else_largest_ext_and_names_what_was_found() {
        let dos = r#"{"partitiontable":{"label":"dos","id":"0x1","device":"d.raw","unit":"sectors",
            "partitions":[{"node":"d.raw1","start":2048,"size":4096,"type":"83"},
            {"node":"d.raw2","start":8192,"size":90000,"type":"83"},
            {"node":"d.raw3","start":98192,"size":1000,"type":"82"}]}}"#;
        let t = parse_sfdisk(dos.as_bytes()).expect("parse");
        assert_eq!(t.sectorsize, 512);
        let parts: Vec<_> = t
            .partitions
            .iter()
            .cloned()
            .zip([Some("ext2".to_owned()), Some("ext4".to_owned()), None])
            .collect();
        assert_eq!(choose_partition(&parts, 512), Ok(1));
        let none: Vec<_> = t
            .partitions
            .iter()
            .cloned()
            .zip([Some("btrfs".to_owned()), None, Some("swap".to_owned())])
            .collect();
        let err = choose_partition(&none, 512).expect_err("no ext");
        assert!(err.contains("no ext2/3/4 root file system"), "{err}");
        assert!(
            err.contains("1 (Linux filesystem, 2.0 MiB, btrfs)"),
            "{err}"
        );
        assert!(err.contains("3 (Linux swap"), "{err}");
    }

    fn run(args: &[&str]) {
        let out = Command::new(args[0])
            .args(&args[1..])
            .output()
            .expect("run");
        assert!(out.status.success(), "{args:?}: {out:?}");
    }

    /// Writes the partition table `script` (sfdisk's input) onto `path`.
    fn partition(path: &Path, script: &str) {
        let mut child = Command::new("sfdisk")
            .arg("-q")
            .arg(path)
            .stdin(Stdio::piped())
            .spawn()
            .expect("sfdisk");
        std::io::Write::write_all(child.stdin.as_mut().expect("stdin"), script.as_bytes())
            .expect("write");
        assert!(child.wait().expect("wait").success(), "sfdisk {script}");
    }

    fn sized(path: &Path, bytes: u64) {
        std::fs::File::create(path)
            .and_then(|f| f.set_len(bytes))
            .expect("create");
    }

    #[test]
    fn find_root_in_gpt_disk_and_bare_file_system() {
        let dir = tempfile::tempdir().expect("tempdir");
        let disk = dir.path().join("disk.raw");
        sized(&disk, 32 << 20);
        let d = disk.to_str().expect("utf-8");
        partition(
            &disk,
            &format!(
                "label: gpt\nstart=2048, size=2048, type=21686148-6449-6E6F-744E-656564454649\n\
                 start=4096, size=40960, type={GPT_ROOT_X86_64}\n"
            ),
        );
        // An ext4 of 20 MiB written into partition 2 (byte offset 2 MiB).
        run(&["mkfs.ext4", "-q", "-E", "offset=2097152", d, "20M"]);
        let root = find_root(&disk, "raw:disk").expect("root");
        assert_eq!((root.offset, root.size), (2 << 20, 20 << 20));
        assert_eq!(root.filesystem, "ext4");
        assert_eq!(root.label, "gpt");
        assert!(
            root.partition
                .as_deref()
                .is_some_and(|p| p.starts_with("2 (Linux root (x86-64), 20.0 MiB")),
            "{root:?}"
        );

        let bare = dir.path().join("bare.ext4");
        sized(&bare, 16 << 20);
        run(&["mkfs.ext4", "-q", bare.to_str().expect("utf-8")]);
        let root = find_root(&bare, "raw:bare").expect("bare");
        assert_eq!(
            (root.offset, root.size, root.partition),
            (0, 16 << 20, None)
        );

        let empty = dir.path().join("empty.raw");
        sized(&empty, 1 << 20);
        let err = find_root(&empty, "raw:empty").expect_err("nothing");
        assert!(err.to_string().contains("no ext2/3/4 file system"), "{err}");

        // The partition table promises more than the file holds (an MBR, which has no
        // backup header that would give the truncation away).
        let short = dir.path().join("short.raw");
        sized(&short, 32 << 20);
        partition(&short, "label: dos\nstart=2048, size=40960, type=83\n");
        std::fs::OpenOptions::new()
            .write(true)
            .open(&short)
            .and_then(|f| f.set_len(4 << 20))
            .expect("truncate");
        let err = find_root(&short, "raw:short").expect_err("short disk");
        assert!(
            err.to_string().contains("past the end of the disk"),
            "{err}"
        );
    }
}
