//! Images in the API: build requests (a built-in or recorded recipe, a recipe file), import
//! requests, what the API says about an image (`ImageInfo`, with the origin of an import), and
//! the events of a build or import stream (`ImageBuildEvent`, one NDJSON line each).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::ApiError;

/// `POST /v1/images/{name}/build` body.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ImageBuildRequest {
    /// Rebuild even if the inputs are unchanged.
    #[serde(default)]
    pub force: bool,
    /// Keep the existing image's kernel version instead of resolving the newest with
    /// apt-cache: a quick staleness check (what `kiln run` does before it starts a sandbox).
    #[serde(default)]
    pub keep_kernel: bool,
}

/// `POST /v1/images/build` body: build an image from a recipe file on the daemon's host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ImageBuildRecipeRequest {
    /// Absolute path of the recipe file (TOML); `[[files]]` sources are read relative to
    /// its directory, by the daemon.
    pub recipe_path: String,
    /// Image name, instead of the file's `name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Rebuild even if the inputs are unchanged.
    #[serde(default)]
    pub force: bool,
    /// See [`ImageBuildRequest::keep_kernel`].
    #[serde(default)]
    pub keep_kernel: bool,
}

/// `POST /v1/imports` body: import a container image or a disk image on the daemon's host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ImageImportRequest {
    /// `oci-archive:PATH`, `docker-archive:PATH`, `oci:DIR[:TAG]`, `qcow2:PATH` or
    /// `raw:PATH`, with an absolute path on the daemon's host.
    pub source: String,
    /// Image name; for container images the default is the file (or directory) name
    /// without its extension; disk images need one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// Where an imported image came from and what was found in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ImageOrigin {
    /// The source as given to the import.
    pub source: String,
    /// `sha256:…` of the OCI image manifest, or of the disk image file.
    pub digest: String,
    /// `PRETTY_NAME` of the image's `/etc/os-release`, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os_release: Option<String>,
    /// The root file system's type as found (OCI images are packed as `ext4`).
    pub filesystem: String,
    /// The partition it came from (disk images with a partition table).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<String>,
    /// Size of the root file system as found, in bytes.
    pub size_bytes: u64,
}

/// What the API says about one built image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ImageInfo {
    /// Content id (short fingerprint of all inputs).
    pub id: String,
    /// Image name.
    pub name: String,
    /// Recipe it was built from.
    pub recipe: String,
    /// Bytes allocated on disk by kernel, initramfs and root filesystem.
    pub size_bytes: u64,
    /// Creation time, seconds since the Unix epoch.
    pub created_unix: u64,
    /// Debian kernel package version.
    pub kernel_version: String,
    /// Size of each file: (name, apparent bytes, allocated bytes).
    pub files: Vec<ImageFileSize>,
    /// What its root file system started from: `debian:SUITE`, the image it extends, or the
    /// import source.
    #[serde(default)]
    pub from: String,
    /// The recipe file it was built from, when not a built-in recipe or an import.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipe_path: Option<String>,
    /// Prepended to the default command (OCI `Entrypoint`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub entrypoint: Vec<String>,
    /// The default command (OCI `Cmd`): `kiln run --image NAME` with no command runs
    /// `entrypoint` + `cmd`; a command given replaces `cmd`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cmd: Vec<String>,
    /// vCPUs of its sandboxes when the request names none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    /// Memory (MiB) of its sandboxes when the request names none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u32>,
    /// For an imported image: where it came from and what was found in it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<ImageOrigin>,
}

/// Size of one file of an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ImageFileSize {
    /// File name inside the image directory.
    pub name: String,
    /// Apparent size in bytes.
    pub apparent_bytes: u64,
    /// Allocated size in bytes (sparse files allocate less).
    pub allocated_bytes: u64,
}

/// `GET /v1/images`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ImageList {
    /// All built images.
    pub images: Vec<ImageInfo>,
}

/// One line of the newline-delimited JSON stream of `POST /v1/images/{name}/build`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ImageBuildEvent {
    /// A build stage started.
    Stage {
        /// 1-based index.
        index: u32,
        /// Number of stages.
        total: u32,
        /// What the stage does.
        name: String,
    },
    /// The current stage ended successfully.
    StageDone {
        /// 1-based index.
        index: u32,
        /// What the stage did.
        name: String,
        /// How long it took (ms).
        elapsed_ms: u64,
    },
    /// A line of tool or build-step output.
    Log {
        /// The line.
        line: String,
    },
    /// A step in the build guest began (file copies and `run` steps, counted together).
    Step {
        /// 1-based index.
        index: u32,
        /// Number of steps.
        total: u32,
        /// What it does, e.g. ``run `make install` ``.
        what: String,
    },
    /// The step ended (a non-zero `exit_code` fails the build right after).
    StepDone {
        /// 1-based index.
        index: u32,
        /// Its exit code.
        exit_code: i32,
        /// How long it took (ms).
        elapsed_ms: u64,
    },
    /// The root file system was compacted (free blocks punched into holes).
    Compacted {
        /// Apparent size of the root file system.
        apparent_bytes: u64,
        /// Bytes on disk before.
        before_bytes: u64,
        /// Bytes on disk after.
        after_bytes: u64,
    },
    /// Progress within a stage.
    Progress {
        /// Units done.
        done: u64,
        /// Units in all.
        total: u64,
    },
    /// The build finished (`up_to_date` when nothing had to be built).
    Done {
        /// Whether the inputs were unchanged and nothing was built.
        up_to_date: bool,
        /// The image.
        image: Box<ImageInfo>,
    },
    /// The build failed; the previous image, if any, is untouched.
    Error(ApiError),
}
