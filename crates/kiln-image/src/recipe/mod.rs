//! Recipes: what goes into an image (its base, Debian packages, files, build steps), how a
//! sandbox of it runs commands (environment, working directory, user, default command) and
//! how the host drives it (commands after boot, a readiness probe, a hook after secrets
//! arrive, a self-test).
//!
//! A recipe is a TOML file ([`file`]); the built-in ones are the files in the repository's
//! `images/` directory, compiled in ([`builtin`]) and parsed by the same code as a user's.
//! A [`Recipe`] is pure data: building it is `build`'s job. Its name is also the name of its
//! image directory, so it is validated like one.

mod builtin;
pub mod file;

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::ImageError;

pub use builtin::{builtin, builtin_names, lookup};

/// A command the host runs in the guest through the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestCommand {
    /// Program and arguments.
    pub argv: Vec<String>,
    /// How long one run may take before it is killed and counted as failed.
    pub timeout_ms: u64,
}

/// How the host tells that a freshly booted guest is ready to be snapshotted or used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ProbeCheck {
    /// A guest command that exits 0 once the service is ready.
    Command(GuestCommand),
    /// A TCP port on the guest's loopback that accepts a connection once the service is ready.
    TcpPort {
        /// Guest port.
        port: u16,
    },
}

/// A readiness probe: `check` is retried every `interval_ms` until it passes or `deadline_ms`
/// have passed since the first attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadinessProbe {
    /// What is checked.
    pub check: ProbeCheck,
    /// Pause between failed attempts.
    pub interval_ms: u64,
    /// Give up after this long.
    pub deadline_ms: u64,
}

/// A guest command run after every start that delivers secrets (restore or cold boot), once
/// the secrets are in `/run/secrets`; e.g. to set a database password. Its failure fails the
/// start. `kiln secret rotate` reruns it.
pub type RestoreHook = GuestCommand;

/// Which of Debian's kernel flavours an image boots.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KernelFlavour {
    /// `linux-image-cloud-amd64`: virtio and ext4 built in, no DRM, no USB, no sound. Small
    /// and quick to boot: every image but desktops.
    #[default]
    Cloud,
    /// `linux-image-amd64`: Debian's generic kernel, with DRM (the `bochs` driver of QEMU's
    /// standard VGA) and input drivers as modules; ext4 is a module too, so the initramfs
    /// loads it before mounting the root.
    Generic,
}

impl KernelFlavour {
    /// Whether this is the default flavour (left out of manifests and fingerprints, which
    /// predate the field).
    pub fn is_cloud(&self) -> bool {
        matches!(self, KernelFlavour::Cloud)
    }

    /// The Debian metapackage naming the flavour's current kernel.
    pub fn metapackage(self) -> &'static str {
        match self {
            KernelFlavour::Cloud => "linux-image-cloud-amd64",
            KernelFlavour::Generic => "linux-image-amd64",
        }
    }

    /// The name a recipe gives it.
    pub fn as_str(self) -> &'static str {
        match self {
            KernelFlavour::Cloud => "cloud",
            KernelFlavour::Generic => "generic",
        }
    }

    /// The flavour of a kernel release (`uname -r`): `...-amd64` without `-cloud` is the
    /// generic one; anything else counts as cloud, the flavour of every image built before
    /// flavours existed.
    pub fn of_release(release: &str) -> KernelFlavour {
        if release.ends_with("-amd64") && !release.ends_with("-cloud-amd64") {
            KernelFlavour::Generic
        } else {
            KernelFlavour::Cloud
        }
    }
}

/// A desktop image's graphical session: sandboxes of the image get a screen (QEMU's
/// standard VGA), an absolute pointer and a keyboard, and are driven through the desktop
/// API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesktopSpec {
    /// The unprivileged user the session runs as (text QEMU cannot type is typed as it).
    pub user: String,
    /// The X display of the session, e.g. `:0`.
    pub display: String,
    /// Screen width of sandboxes that ask for none (pixels).
    pub width: u32,
    /// Screen height of sandboxes that ask for none (pixels).
    pub height: u32,
}

/// Smallest and largest screen a desktop sandbox may have (pixels, width × height).
pub const SCREEN_MIN: (u32, u32) = (640, 480);
/// See [`SCREEN_MIN`]: 2560 × 1600 fits the VGA's largest video memory kiln gives it.
pub const SCREEN_MAX: (u32, u32) = (2560, 1600);

/// Parses a screen size `WIDTHxHEIGHT` (e.g. `1280x800`) within [`SCREEN_MIN`] and
/// [`SCREEN_MAX`]; widths must be multiples of 8 (the VGA's scanline granularity).
pub fn parse_screen(s: &str) -> Result<(u32, u32), String> {
    let (w, h) = s
        .split_once(['x', 'X'])
        .ok_or_else(|| format!("{s:?}: expected WIDTHxHEIGHT, e.g. 1280x800"))?;
    let num = |v: &str| {
        v.trim()
            .parse::<u32>()
            .map_err(|_| format!("{s:?}: expected WIDTHxHEIGHT, e.g. 1280x800"))
    };
    let (w, h) = (num(w)?, num(h)?);
    if !(SCREEN_MIN.0..=SCREEN_MAX.0).contains(&w) || !(SCREEN_MIN.1..=SCREEN_MAX.1).contains(&h) {
        return Err(format!(
            "{s:?}: a screen is {}x{} to {}x{} pixels",
            SCREEN_MIN.0, SCREEN_MIN.1, SCREEN_MAX.0, SCREEN_MAX.1
        ));
    }
    if !w.is_multiple_of(8) {
        return Err(format!("{s:?}: the width must be a multiple of 8"));
    }
    Ok((w, h))
}

/// What an image's root file system starts from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Base {
    /// A fresh Debian tree (mmdebstrap's `essential` variant of `Recipe::suite` plus
    /// `Recipe::packages`).
    #[default]
    Debian,
    /// Another kiln image's root file system (built, imported, or built-in); the recipe's
    /// files and steps are applied on a copy of it.
    Image {
        /// The image extended.
        name: String,
    },
    /// Imported from a container image or disk image (`kiln image import`); not rebuilt.
    Import {
        /// The source as given, e.g. `oci-archive:/path/app.tar`.
        source: String,
        /// Content digest of the source (`sha256:…` of the OCI manifest, or of the disk
        /// image file): part of the fingerprint. Empty in manifests written before it existed.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        digest: String,
    },
}

impl Base {
    /// Whether this is [`Base::Debian`] (left out of manifests, which predate the field).
    pub fn is_debian(&self) -> bool {
        matches!(self, Base::Debian)
    }
}

/// Where a copied file's bytes come from while building (not kept in the manifest, which
/// records the bytes' sha256).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileSource {
    /// A file on the host (a recipe's `src`, resolved against the recipe's directory).
    Path(PathBuf),
    /// Bytes given in the recipe itself (`content`).
    Inline(Vec<u8>),
}

/// A file copied into the image at build time (`[[files]]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecipeFile {
    /// Absolute destination path in the guest.
    pub dst: String,
    /// Permission bits (e.g. 0o644).
    pub mode: u32,
    /// `user[:group]` (names or ids, resolved in the guest); root when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Hex sha256 of the content: part of the fingerprint, so a changed file rebuilds.
    pub sha256: String,
    /// The content's origin while building.
    #[serde(skip)]
    pub source: Option<FileSource>,
}

/// What an image is built from and how its sandboxes run. Every field but the name has a
/// default, so manifests written before a field existed still read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recipe {
    /// Recipe name; also the image name and directory (`images/<name>/`).
    pub name: String,
    /// Debian suite of a [`Base::Debian`] root, e.g. `bookworm` (for other bases: the
    /// parent's suite, or empty for imports).
    #[serde(default)]
    pub suite: String,
    /// What the root file system starts from.
    #[serde(default, skip_serializing_if = "Base::is_debian")]
    pub from: Base,
    /// Packages installed on top of mmdebstrap's `essential` variant (Essential: yes packages:
    /// coreutils, bash, dash, util-linux, findutils, grep, sed, tar, gzip, ...).
    #[serde(default)]
    pub packages: Vec<String>,
    /// Files copied into the image (in a build guest, after the packages), in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<RecipeFile>,
    /// Build steps: guest commands run in order in a build guest after the files are in
    /// place; each must exit 0. Their effect on the disk is the image.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub run: Vec<GuestCommand>,
    /// Environment of every command run in a sandbox of the image (a request's own `env`
    /// wins).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Working directory of commands that name none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// User (`name`, `uid`, `name:group`, `uid:gid`) of commands that name none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Prepended to every default command, like an OCI `Entrypoint`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entrypoint: Vec<String>,
    /// The default command (`kiln run --image NAME` with no command), like an OCI `Cmd`; a
    /// command given replaces it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cmd: Vec<String>,
    /// Guest commands run in order after a cold boot (also in the capture VM, so their effect
    /// is part of the warm snapshot); each must exit 0. Services started here must detach
    /// (their own session), as the agent kills an exec's process group when it ends.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub on_boot: Vec<GuestCommand>,
    /// Checked after `on_boot`: a sandbox (or warm snapshot) is ready only once it passes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readiness_probe: Option<ReadinessProbe>,
    /// Run after secrets are delivered (see [`RestoreHook`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_restore: Option<RestoreHook>,
    /// Run by the self-test after every build (once the guest is ready); must exit 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test: Option<GuestCommand>,
    /// vCPUs of sandboxes that ask for no size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    /// Guest memory (MiB) of sandboxes that ask for no size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u32>,
    /// Apparent size of the root file system (MiB); at least what the content needs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_mib: Option<u32>,
    /// The kernel flavour the image boots.
    #[serde(default, skip_serializing_if = "KernelFlavour::is_cloud")]
    pub kernel: KernelFlavour,
    /// Kernel modules the initramfs loads (with their dependencies) besides kiln's own,
    /// e.g. a display driver; each must exist in the kernel (or be built into it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub modules: Vec<String>,
    /// A graphical session: sandboxes get a screen, pointer and keyboard.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desktop: Option<DesktopSpec>,
}

impl Recipe {
    /// A recipe with only a name and a Debian suite (everything else empty).
    pub fn debian(name: &str, suite: &str) -> Recipe {
        Recipe {
            name: name.to_owned(),
            suite: suite.to_owned(),
            from: Base::Debian,
            packages: Vec::new(),
            files: Vec::new(),
            run: Vec::new(),
            env: BTreeMap::new(),
            workdir: None,
            user: None,
            entrypoint: Vec::new(),
            cmd: Vec::new(),
            on_boot: Vec::new(),
            readiness_probe: None,
            on_restore: None,
            test: None,
            cpus: None,
            memory_mib: None,
            disk_mib: None,
            kernel: KernelFlavour::Cloud,
            modules: Vec::new(),
            desktop: None,
        }
    }

    /// Whether building needs a build guest (files to copy, steps to run, or a working
    /// directory to create, as Docker's `WORKDIR` does).
    pub fn has_guest_steps(&self) -> bool {
        !self.files.is_empty() || !self.run.is_empty() || self.workdir.is_some()
    }

    /// The default command of a sandbox of this image with `args` given by the user:
    /// `entrypoint` + (`args`, or `cmd` when none are given). Empty when there is none.
    pub fn default_argv(&self, args: &[String]) -> Vec<String> {
        let tail = if args.is_empty() { &self.cmd } else { args };
        self.entrypoint.iter().chain(tail).cloned().collect()
    }

    /// Takes over what `parent` defines and this recipe does not (Docker's inheritance):
    /// environment (merged, ours win), working directory, user, entrypoint and command (a
    /// recipe that sets `entrypoint` drops the parent's `cmd`, as Docker does), guest
    /// hooks, self-test, machine size and disk size, desktop; the parent's suite, kernel flavour
    /// and modules.
    pub fn inherit(&mut self, parent: &Recipe) {
        let mut env = parent.env.clone();
        env.append(&mut self.env);
        self.env = env;
        if self.suite.is_empty() {
            self.suite = parent.suite.clone();
        }
        self.workdir = self.workdir.take().or_else(|| parent.workdir.clone());
        self.user = self.user.take().or_else(|| parent.user.clone());
        if self.entrypoint.is_empty() {
            self.entrypoint = parent.entrypoint.clone();
            if self.cmd.is_empty() {
                self.cmd = parent.cmd.clone();
            }
        }
        if self.on_boot.is_empty() {
            self.on_boot = parent.on_boot.clone();
        }
        self.readiness_probe = self
            .readiness_probe
            .take()
            .or_else(|| parent.readiness_probe.clone());
        self.on_restore = self.on_restore.take().or_else(|| parent.on_restore.clone());
        self.test = self.test.take().or_else(|| parent.test.clone());
        self.cpus = self.cpus.or(parent.cpus);
        self.memory_mib = self.memory_mib.or(parent.memory_mib);
        self.disk_mib = self.disk_mib.or(parent.disk_mib);
        // An extension boots its parent's kernel, so it keeps its flavour and modules (and
        // adds its own), and a desktop stays one.
        self.kernel = parent.kernel;
        let mut modules = parent.modules.clone();
        modules.extend(
            self.modules
                .drain(..)
                .filter(|m| !parent.modules.contains(m)),
        );
        self.modules = modules;
        self.desktop = self.desktop.take().or_else(|| parent.desktop.clone());
    }
}

/// The Debian suite of the built-in recipes (the host machines run Debian 12).
pub const DEFAULT_SUITE: &str = "bookworm";

/// Checks that `name` can serve as an image directory name: 1–64 characters of `[a-z0-9._-]`,
/// starting with a letter or digit.
pub fn validate_name(name: &str) -> Result<(), ImageError> {
    let invalid = |reason| ImageError::InvalidName {
        name: name.to_owned(),
        reason,
    };
    if name.is_empty() || name.len() > 64 {
        return Err(invalid("must be 1 to 64 characters long"));
    }
    if !name
        .bytes()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"._-".contains(&c))
    {
        return Err(invalid(
            "only lowercase letters, digits, '.', '_' and '-' are allowed",
        ));
    }
    if !name.as_bytes()[0].is_ascii_alphanumeric() {
        return Err(invalid("must start with a letter or digit"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_name_rejects_paths_and_dots() {
        for bad in ["", "../x", "a/b", ".tmp-x", "-x", "Base", &"a".repeat(65)] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
        validate_name("py3.11-slim_x").expect("valid");
    }

    #[test]
    fn default_argv_entrypoint_then_args_or_cmd() {
        let mut r = Recipe::debian("x", "bookworm");
        assert!(r.default_argv(&[]).is_empty());
        r.entrypoint = vec!["/bin/app".into(), "--serve".into()];
        r.cmd = vec!["--port".into(), "80".into()];
        assert_eq!(r.default_argv(&[]), ["/bin/app", "--serve", "--port", "80"]);
        assert_eq!(
            r.default_argv(&["-v".to_owned()]),
            ["/bin/app", "--serve", "-v"]
        );
    }

    #[test]
    fn inherit_merges_env_and_keeps_own_settings() {
        let mut parent = Recipe::debian("p", "bookworm");
        parent.env = [("A", "1"), ("B", "2")]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .into();
        parent.workdir = Some("/srv".into());
        parent.user = Some("app".into());
        parent.entrypoint = vec!["/bin/sh".into()];
        parent.cmd = vec!["-c".into(), "echo hi".into()];
        parent.memory_mib = Some(512);
        let mut child = Recipe::debian("c", "");
        child.env = [("B", "3")]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .into();
        child.user = Some("root".into());
        child.inherit(&parent);
        assert_eq!(child.env["A"], "1");
        assert_eq!(child.env["B"], "3");
        assert_eq!(child.workdir.as_deref(), Some("/srv"));
        assert_eq!(child.user.as_deref(), Some("root"));
        assert_eq!(child.default_argv(&[]), ["/bin/sh", "-c", "echo hi"]);
        assert_eq!(child.memory_mib, Some(512));
        assert_eq!(child.suite, "bookworm");

        // A child with its own entrypoint drops the parent's command (Docker's rule).
        let mut own = Recipe::debian("c", "");
        own.entrypoint = vec!["/bin/app".into()];
        own.inherit(&parent);
        assert_eq!(own.default_argv(&[]), ["/bin/app"]);
    }
}
