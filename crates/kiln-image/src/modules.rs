//! Kernel modules for the initramfs: dependency closure, load order, decompression.
//!
//! Owns: reading and (when the kernel package lacks one, as Debian's do: depmod runs at
//! install time) generating `modules.dep` from each module's `.modinfo` `depends=` list; the
//! closure of the modules the guest needs before it can mount its root; and turning those into
//! plain ELF `.ko` bytes (decompressing `.ko.xz` / `.ko.zst` with the host's `xz` / `zstd`).
//!
//! Invariants: module names compare with `-` and `_` equivalent (as the kernel does); the load
//! order lists every dependency before its dependents and each module once; the order is a
//! pure function of `modules.dep` and the requested list.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cmd;
use crate::elf;
use crate::error::{ImageError, IoContext};

/// Modules the guest loads (in this order, each after its dependencies) before it mounts its
/// root: PCI transport, block device for the root disk, console for the agent channel, RNG so
/// the guest does not starve for entropy, MMIO transport for the `microvm` machine type, and
/// the network device (with `net_failover` and `failover`, its dependencies in Debian's cloud
/// kernel). `virtio_net` is loaded at every boot, NIC or not: the driver only binds when a
/// `virtio-net` device exists, and the interface stays down until the host sends
/// `configure_network` (feature `net-v1`), so a warm snapshot never carries a configured NIC.
pub const GUEST_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_blk",
    "virtio_console",
    "virtio_rng",
    "virtio_mmio",
    "virtio_net",
];

/// The root file system's driver and the checksum driver it asks for by name (ext4's
/// metadata checksums): built into the cloud kernel (so they add nothing to its initramfs),
/// modules of the generic one, which must load them before it can mount the root.
pub const ROOT_FS_MODULES: &[&str] = &["crc32c_generic", "ext4"];

/// The parsed `modules.dep` of one kernel: module name -> (relative path, dependency names).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ModuleDeps {
    modules: BTreeMap<String, (String, Vec<String>)>,
}

/// The canonical form of a module name: file stem, `-` replaced by `_`.
pub fn module_name(path_or_name: &str) -> String {
    let file = path_or_name.rsplit('/').next().unwrap_or(path_or_name);
    let stem = file
        .strip_suffix(".ko.xz")
        .or_else(|| file.strip_suffix(".ko.zst"))
        .or_else(|| file.strip_suffix(".ko.gz"))
        .or_else(|| file.strip_suffix(".ko"))
        .unwrap_or(file);
    stem.replace('-', "_")
}

impl ModuleDeps {
    /// Parses `modules.dep` text (`kernel/a/b.ko: kernel/c.ko kernel/d.ko` per line).
    pub fn parse(text: &str) -> Self {
        let mut modules = BTreeMap::new();
        for line in text.lines() {
            let Some((path, deps)) = line.split_once(':') else {
                continue;
            };
            let path = path.trim();
            if path.is_empty() {
                continue;
            }
            let deps = deps.split_whitespace().map(module_name).collect();
            modules.insert(module_name(path), (path.to_owned(), deps));
        }
        Self { modules }
    }

    /// Renders in `modules.dep` format (dependencies by path, as depmod writes them).
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (path, deps) in self.modules.values() {
            out.push_str(path);
            out.push(':');
            for dep in deps {
                if let Some((dep_path, _)) = self.modules.get(dep) {
                    out.push(' ');
                    out.push_str(dep_path);
                }
            }
            out.push('\n');
        }
        out
    }

    /// The closure of `wanted` in load order (dependencies first), as relative paths.
    ///
    /// Modules in `builtin` (canonical names) are skipped; a name that is neither loadable nor
    /// built in is an error.
    pub fn closure(
        &self,
        wanted: &[&str],
        builtin: &HashSet<String>,
        release: &str,
    ) -> Result<Vec<String>, ImageError> {
        let mut order = Vec::new();
        let mut done = HashSet::new();
        for name in wanted {
            let name = module_name(name);
            if !self.modules.contains_key(&name) && !builtin.contains(&name) {
                return Err(ImageError::ModuleNotFound {
                    module: name,
                    release: release.to_owned(),
                });
            }
            self.visit(&name, builtin, &mut done, &mut order);
        }
        Ok(order)
    }

    /// Depth-first post-order visit; `done` also breaks (invalid) dependency cycles.
    fn visit(
        &self,
        name: &str,
        builtin: &HashSet<String>,
        done: &mut HashSet<String>,
        order: &mut Vec<String>,
    ) {
        if !done.insert(name.to_owned()) || builtin.contains(name) {
            return;
        }
        let Some((path, deps)) = self.modules.get(name) else {
            return;
        };
        for dep in deps {
            self.visit(dep, builtin, done, order);
        }
        order.push(path.clone());
    }
}

/// Canonical names listed in a `modules.builtin` file (missing file: none).
pub fn read_builtin(modules_dir: &Path) -> Result<HashSet<String>, ImageError> {
    let path = modules_dir.join("modules.builtin");
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| module_name(l.trim()))
            .collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(HashSet::new()),
        Err(e) => Err(ImageError::io("read", path, e)),
    }
}

/// Reads a module file as plain ELF bytes, decompressing `.ko.xz` / `.ko.zst` / `.ko.gz`.
pub fn read_plain(path: &Path) -> Result<Vec<u8>, ImageError> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".ko.xz") {
        Some("xz")
    } else if name.ends_with(".ko.zst") {
        Some("zstd")
    } else if name.ends_with(".ko.gz") {
        Some("gzip")
    } else {
        None
    };
    match tool {
        None => std::fs::read(path).ctx("read kernel module", path),
        Some(tool) => {
            let mut out = Vec::new();
            let mut c = Command::new(tool);
            c.args(["-d", "-c", "--"]).arg(path);
            cmd::run_to_writer(&mut c, &mut out)?;
            Ok(out)
        }
    }
}

/// Generates `modules.dep` for an extracted kernel whose package did not ship one, from the
/// `.modinfo` `depends=` entry of every module under `modules_dir/kernel`.
pub fn generate_modules_dep(modules_dir: &Path) -> Result<ModuleDeps, ImageError> {
    let mut files = Vec::new();
    collect_ko(&modules_dir.join("kernel"), &mut files)?;
    files.sort();
    let mut modules = BTreeMap::new();
    for file in files {
        let rel = file
            .strip_prefix(modules_dir)
            .unwrap_or(&file)
            .to_string_lossy()
            .into_owned();
        let bytes = read_plain(&file)?;
        let deps = elf::module_depends(&bytes).map_err(|reason| ImageError::BadModule {
            path: file.clone(),
            reason,
        })?;
        let deps = deps.iter().map(|d| module_name(d)).collect();
        modules.insert(module_name(&rel), (rel, deps));
    }
    Ok(ModuleDeps { modules })
}

/// Recursively collects module files (`*.ko`, `*.ko.xz`, `*.ko.zst`, `*.ko.gz`) below `dir`.
fn collect_ko(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), ImageError> {
    for entry in std::fs::read_dir(dir).ctx("read directory", dir)? {
        let entry = entry.ctx("read directory", dir)?;
        let path = entry.path();
        let ft = entry.file_type().ctx("stat", &path)?;
        if ft.is_dir() {
            collect_ko(&path, out)?;
        } else if ft.is_file() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
                .iter()
                .any(|s| name.ends_with(s))
            {
                out.push(path);
            }
        }
    }
    Ok(())
}

/// Loads `modules.dep` of the kernel at `modules_dir`.
pub fn load_deps(modules_dir: &Path) -> Result<ModuleDeps, ImageError> {
    let path = modules_dir.join("modules.dep");
    let text = std::fs::read_to_string(&path).ctx("read", &path)?;
    Ok(ModuleDeps::parse(&text))
}

/// One module ready for the initramfs: flat file name (`virtio_blk.ko`) and plain ELF bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitramfsModule {
    /// File name under `/lib/modules/` in the initramfs.
    pub file_name: String,
    /// Uncompressed module contents.
    pub bytes: Vec<u8>,
}

/// Resolves [`GUEST_MODULES`] for the kernel at `modules_dir` into load-ordered plain modules.
pub fn initramfs_modules(
    modules_dir: &Path,
    release: &str,
    extra: &[String],
    on_progress: &mut dyn FnMut(u64, u64),
) -> Result<Vec<InitramfsModule>, ImageError> {
    let deps = load_deps(modules_dir)?;
    let builtin = read_builtin(modules_dir)?;
    let wanted: Vec<&str> = GUEST_MODULES
        .iter()
        .chain(ROOT_FS_MODULES)
        .copied()
        .chain(extra.iter().map(String::as_str))
        .collect();
    let order = deps.closure(&wanted, &builtin, release)?;
    let total = order.len() as u64;
    let mut out = Vec::with_capacity(order.len());
    for (i, rel) in order.iter().enumerate() {
        let bytes = read_plain(&modules_dir.join(rel))?;
        out.push(InitramfsModule {
            file_name: format!("{}.ko", module_name(rel)),
            bytes,
        });
        on_progress(i as u64 + 1, total);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE: &str = "\
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio_pci_legacy_dev.ko kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
kernel/drivers/virtio/virtio_ring.ko: kernel/drivers/virtio/virtio.ko
kernel/drivers/virtio/virtio.ko:
kernel/drivers/char/virtio_console.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/char/hw_random/virtio-rng.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/virtio/virtio_mmio.ko.xz: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/net/core/failover.ko:
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/drivers/net/virtio_net.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko kernel/drivers/net/net_failover.ko
kernel/fs/unrelated.ko:
";

    fn names(paths: &[String]) -> Vec<String> {
        paths.iter().map(|p| module_name(p)).collect()
    }

    #[test]
    fn closure_guest_modules_dependencies_first_each_once() {
        let deps = ModuleDeps::parse(FIXTURE);
        let order = deps
            .closure(GUEST_MODULES, &HashSet::new(), "test")
            .expect("closure");
        assert_eq!(
            names(&order),
            [
                "virtio_pci_modern_dev",
                "virtio_pci_legacy_dev",
                "virtio",
                "virtio_ring",
                "virtio_pci",
                "virtio_blk",
                "virtio_console",
                "virtio_rng",
                "virtio_mmio",
                "failover",
                "net_failover",
                "virtio_net"
            ]
            .map(String::from)
        );
        // Every module appears after all of its dependencies.
        for (i, path) in order.iter().enumerate() {
            let (_, d) = &deps.modules[&module_name(path)];
            for dep in d {
                let j = order
                    .iter()
                    .position(|p| module_name(p) == *dep)
                    .expect("dependency in closure");
                assert!(j < i, "{dep} must load before {path}");
            }
        }
    }

    #[test]
    fn closure_ring_depends_on_virtio_order_respected() {
        // virtio_ring's own line says it needs virtio: virtio must come first even though the
        // virtio_blk line lists virtio_ring first.
        let text = "a.ko: ring.ko core.ko\nring.ko: core.ko\ncore.ko:\n";
        let order = ModuleDeps::parse(text)
            .closure(&["a"], &HashSet::new(), "t")
            .expect("closure");
        assert_eq!(order, ["core.ko", "ring.ko", "a.ko"]);
    }

    #[test]
    fn closure_builtin_module_is_skipped() {
        let deps = ModuleDeps::parse(FIXTURE);
        let builtin: HashSet<String> = ["virtio", "virtio_ring", "virtio_mmio"]
            .map(String::from)
            .into();
        let order = deps
            .closure(&["virtio_blk", "virtio_mmio"], &builtin, "t")
            .expect("closure");
        assert_eq!(names(&order), ["virtio_blk"]);
    }

    #[test]
    fn closure_unknown_module_is_error() {
        let err = ModuleDeps::parse(FIXTURE)
            .closure(&["nope"], &HashSet::new(), "6.1.0-x")
            .expect_err("unknown");
        assert!(err.to_string().contains("nope"), "{err}");
        assert!(err.to_string().contains("6.1.0-x"), "{err}");
    }

    #[test]
    fn closure_cycle_terminates() {
        let order = ModuleDeps::parse("a.ko: b.ko\nb.ko: a.ko\n")
            .closure(&["a"], &HashSet::new(), "t")
            .expect("closure");
        assert_eq!(order.len(), 2);
    }

    #[test]
    fn module_name_hyphen_and_suffixes_normalized() {
        assert_eq!(module_name("kernel/x/virtio-rng.ko.zst"), "virtio_rng");
        assert_eq!(module_name("virtio_blk"), "virtio_blk");
        assert_eq!(module_name("a/b/c.ko"), "c");
    }

    #[test]
    fn modules_dep_render_parse_round_trip() {
        let deps = ModuleDeps::parse(FIXTURE);
        assert_eq!(ModuleDeps::parse(&deps.render()), deps);
    }

    #[test]
    fn generate_modules_dep_reads_modinfo_of_tree() {
        let dir = tempfile::tempdir().expect("tempdir");
        let kdir = dir.path().join("kernel/drivers/virtio");
        std::fs::create_dir_all(&kdir).expect("mkdir");
        let m = crate::elf::tests::fake_module;
        std::fs::write(kdir.join("virtio.ko"), m(b"depends=\0")).expect("write");
        std::fs::write(kdir.join("virtio_ring.ko"), m(b"depends=virtio\0")).expect("write");
        std::fs::write(
            kdir.join("virtio-blk.ko"),
            m(b"depends=virtio_ring,virtio\0"),
        )
        .expect("write");
        let deps = generate_modules_dep(dir.path()).expect("generate");
        let order = deps
            .closure(&["virtio_blk"], &HashSet::new(), "t")
            .expect("closure");
        assert_eq!(
            order,
            [
                "kernel/drivers/virtio/virtio.ko",
                "kernel/drivers/virtio/virtio_ring.ko",
                "kernel/drivers/virtio/virtio-blk.ko"
            ]
        );
        assert!(
            deps.render().contains(
                "kernel/drivers/virtio/virtio_ring.ko: kernel/drivers/virtio/virtio.ko\n"
            )
        );
    }
}
