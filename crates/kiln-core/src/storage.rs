//! Storage accounting and reclaiming: `kiln df` and `kiln prune`.
//!
//! Owns: the survey of `$KILN_HOME` (every inode below it, in [`UsageKind`] categories, each
//! item with a verdict: kept, held by a live user, or reclaimable, and why), and the prune
//! that removes the reclaimable items and reports truthfully what happened to each.
//! [`survey`] and [`prune`] are functions of the home and of the facts the engine hands them
//! (sandbox rows, built images, whether a build holds the caches); the engine
//! (`Engine::storage_df`, `Engine::storage_prune`) gathers those facts, takes the liveness
//! locks and runs them off the async runtime.
//!
//! Must not: remove anything a live process uses. The markers it honours are the ones the
//! rest of kiln already keeps, so prune and the startup janitor agree:
//! - a sandbox row naming a snapshot in `status.snapshot` (and a `creating` row of the
//!   snapshot's image: a warm restore records its snapshot only once it runs), and the
//!   engine's per-snapshot capture lock, taken again right before each removal;
//! - the `.tmp-<label>-<pid>` build directories of images, kernels and snapshots, whose owner
//!   is alive (`kiln_snapshot::process_running`; this daemon's own are always alive);
//! - the build caches' lock (`kiln_image::try_lock_caches`): while any build holds it, no
//!   cached kernel or package is removed;
//! - a review recording (`recordings/<id>/`) is its sandbox's while the row exists, and after
//!   that is kept while `meta.json`'s `pinned_until` (set by a failed action) is ahead; export
//!   bundles (`exports/`) are the user's and never removed, only counted;
//! - runtime directories (`run/`) are never removed here: a QEMU may use one before its row
//!   exists, and only the startup janitor, which runs before anything starts, can prove one
//!   dead.
//!
//! Accounting rules (docs/architecture.md, "Storage"): sizes are those `du` reports
//! (`st_size` for apparent bytes, `st_blocks * 512` on disk), symlinks are not followed
//! (except `images` itself, which may link to a shared directory), and each inode is counted
//! once per report, by the first category in [`UsageKind`] order and the first item that
//! reaches it: an image's `vmlinuz`, a hard link of the kernel cache's file, counts under
//! images, and the cached kernel then shows only its modules. Everything below the home that
//! no item claims (the directories' own entries, lock files) is the last `other` item, so the
//! totals equal `du -s $KILN_HOME $KILN_HOME/images/`. An item's bytes are measured before
//! anything is removed; prune reports them only for items it removed.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use kiln_api_types::{
    DiskUsage, PruneItem, PruneReport, SandboxInfo, SandboxState, UsageCategory, UsageItem,
    UsageKind,
};
use kiln_image::ImageManifest;

use crate::desktop::{retention, timestamp};
use crate::paths::Home;

/// Suffix of a console archive (`logs/<id>.console.log`, and its `.1`).
const CONSOLE_SUFFIX: &str = ".console.log";

/// What the engine knows that the file system does not.
pub(crate) struct Facts<'a> {
    /// Every sandbox row.
    pub rows: &'a [SandboxInfo],
    /// Every built image.
    pub images: &'a [ImageManifest],
    /// A build holds the caches' lock: no cached kernel or package may go.
    pub build_running: bool,
    /// This process (its own `.tmp-*` directories are in progress).
    pub me: u32,
}

/// Apparent and on-disk bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Size {
    /// Sum of `st_size`.
    pub apparent: u64,
    /// Sum of `st_blocks * 512`.
    pub disk: u64,
}

impl std::ops::AddAssign for Size {
    fn add_assign(&mut self, o: Size) {
        self.apparent += o.apparent;
        self.disk += o.disk;
    }
}

/// What prune does with an item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Not prune's to remove (an image, a user snapshot, a live sandbox's files, ...).
    Keep(String),
    /// Of a kind prune removes, but a live user holds it.
    Held(String),
    /// Nothing uses it.
    Reclaim(String),
}

impl Verdict {
    fn why(&self) -> &str {
        match self {
            Verdict::Keep(w) | Verdict::Held(w) | Verdict::Reclaim(w) => w,
        }
    }
}

/// How a reclaimable item is removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Removal {
    /// A published snapshot: renamed out of sight, then its sealed tree removed.
    Snapshot,
    /// A tree or file that may hold sealed files (`kiln_snapshot::remove_tree`).
    Tree,
    /// An image or cache build directory: refused while anything is mounted below it
    /// (`kiln_image::safe_remove`: a killed mmdebstrap can leave `/dev` bound inside).
    BuildDir,
}

/// One item of the survey.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub kind: UsageKind,
    pub name: String,
    /// Relative to the home.
    pub rel: PathBuf,
    pub size: Size,
    pub incomplete: Option<String>,
    pub verdict: Verdict,
    pub removal: Removal,
}

impl Entry {
    fn prune_item(&self, why: String) -> PruneItem {
        PruneItem {
            kind: self.kind,
            name: self.name.clone(),
            path: self.rel.display().to_string(),
            apparent_bytes: self.size.apparent,
            disk_bytes: self.size.disk,
            why,
        }
    }
}

/// Everything below a home, item by item, in report order.
#[derive(Debug)]
pub(crate) struct Survey {
    pub home: PathBuf,
    pub entries: Vec<Entry>,
}

impl Survey {
    /// The `kiln df` report.
    pub fn usage(&self) -> DiskUsage {
        let mut categories: Vec<UsageCategory> = UsageKind::ALL
            .iter()
            .map(|&kind| UsageCategory {
                kind,
                apparent_bytes: 0,
                disk_bytes: 0,
                reclaimable_apparent_bytes: 0,
                reclaimable_disk_bytes: 0,
                items: Vec::new(),
            })
            .collect();
        for e in &self.entries {
            let Some(cat) = categories.iter_mut().find(|c| c.kind == e.kind) else {
                continue;
            };
            let reclaimable = matches!(e.verdict, Verdict::Reclaim(_));
            cat.apparent_bytes += e.size.apparent;
            cat.disk_bytes += e.size.disk;
            if reclaimable {
                cat.reclaimable_apparent_bytes += e.size.apparent;
                cat.reclaimable_disk_bytes += e.size.disk;
            }
            cat.items.push(UsageItem {
                name: e.name.clone(),
                path: e.rel.display().to_string(),
                apparent_bytes: e.size.apparent,
                disk_bytes: e.size.disk,
                reclaimable,
                why: e.verdict.why().to_owned(),
                incomplete: e.incomplete.clone(),
            });
        }
        let sum = |f: fn(&UsageCategory) -> u64| categories.iter().map(f).sum();
        DiskUsage {
            home: self.home.display().to_string(),
            apparent_bytes: sum(|c| c.apparent_bytes),
            disk_bytes: sum(|c| c.disk_bytes),
            reclaimable_apparent_bytes: sum(|c| c.reclaimable_apparent_bytes),
            reclaimable_disk_bytes: sum(|c| c.reclaimable_disk_bytes),
            categories,
        }
    }
}

/// What became of one removal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Gone.
    Removed,
    /// Checked again right before the removal: held after all (why).
    Held(String),
    /// The removal failed (the error chain); the item may be partly gone.
    Failed(String),
}

/// Removes the reclaimable items of `survey` with `remove` (nothing with `dry_run`) and says
/// what became of each. Only items `remove` reports [`Outcome::Removed`] count as reclaimed,
/// with the sizes measured by the survey (before anything was removed).
pub(crate) fn prune(
    survey: &Survey,
    dry_run: bool,
    remove: &mut dyn FnMut(&Entry) -> Outcome,
) -> PruneReport {
    let mut report = PruneReport {
        dry_run,
        reclaimed: Vec::new(),
        kept: Vec::new(),
        failed: Vec::new(),
        reclaimed_apparent_bytes: 0,
        reclaimed_disk_bytes: 0,
    };
    for e in &survey.entries {
        match &e.verdict {
            Verdict::Keep(_) => {}
            Verdict::Held(why) => report.kept.push(e.prune_item(why.clone())),
            Verdict::Reclaim(why) => {
                let outcome = if dry_run { Outcome::Removed } else { remove(e) };
                match outcome {
                    Outcome::Removed => {
                        report.reclaimed_apparent_bytes += e.size.apparent;
                        report.reclaimed_disk_bytes += e.size.disk;
                        report.reclaimed.push(e.prune_item(why.clone()));
                    }
                    Outcome::Held(held) => report.kept.push(e.prune_item(held)),
                    Outcome::Failed(err) => report.failed.push(e.prune_item(err)),
                }
            }
        }
    }
    report
}

/// Removes `entry` below `home` as its [`Removal`] says.
pub(crate) fn remove_entry(home: &Path, entry: &Entry) -> Result<(), String> {
    let path = home.join(&entry.rel);
    match entry.removal {
        Removal::Snapshot => {
            let gone = crate::out_of_sight(&path).map_err(|e| e.chain())?;
            kiln_snapshot::remove_tree(&gone).map_err(|e| {
                format!(
                    "renamed to {} but not removed: {}",
                    gone.display(),
                    crate::error::error_chain(&e)
                )
            })
        }
        Removal::Tree => {
            kiln_snapshot::remove_tree(&path).map_err(|e| crate::error::error_chain(&e))
        }
        Removal::BuildDir => {
            kiln_image::safe_remove(&path).map_err(|e| crate::error::error_chain(&e))
        }
    }
}

/// Counts inodes once across a whole survey.
#[derive(Default)]
struct Walker {
    seen: HashSet<(u64, u64)>,
}

impl Walker {
    /// Bytes of the inodes at and below `path` not counted before (symlinks not followed;
    /// `path` itself is followed with `follow`). A missing path is zero; the first other
    /// error is returned beside what could be counted.
    fn measure(&mut self, path: &Path, follow: bool) -> (Size, Option<String>) {
        let mut size = Size::default();
        let mut error = None;
        self.walk(path, follow, &mut size, &mut error);
        (size, error)
    }

    fn walk(&mut self, path: &Path, follow: bool, size: &mut Size, error: &mut Option<String>) {
        let meta = if follow {
            std::fs::metadata(path)
        } else {
            std::fs::symlink_metadata(path)
        };
        let meta = match meta {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => {
                error.get_or_insert_with(|| format!("cannot stat {}: {e}", path.display()));
                return;
            }
        };
        // Counted (and, for a directory, walked) once: hard links, and a directory reached
        // again through the followed `images` link.
        if !self.seen.insert((meta.dev(), meta.ino())) {
            return;
        }
        size.apparent += meta.size();
        size.disk += meta.blocks() * 512;
        if !meta.is_dir() {
            return;
        }
        let entries = match std::fs::read_dir(path) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => {
                error.get_or_insert_with(|| format!("cannot read {}: {e}", path.display()));
                return;
            }
        };
        for entry in entries {
            match entry {
                Ok(entry) => self.walk(&entry.path(), false, size, error),
                Err(e) => {
                    error.get_or_insert_with(|| format!("cannot read {}: {e}", path.display()));
                }
            }
        }
    }
}

/// Names in `dir`, sorted (none if it cannot be read).
fn names(dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    out.sort();
    out
}

/// Accumulates entries, measuring each as it is added (so the order attributes shared inodes).
struct Builder<'a> {
    root: &'a Path,
    walker: Walker,
    entries: Vec<Entry>,
}

impl Builder<'_> {
    fn add(
        &mut self,
        kind: UsageKind,
        name: &str,
        rel: PathBuf,
        verdict: Verdict,
        removal: Removal,
    ) {
        let (size, incomplete) = self.walker.measure(&self.root.join(&rel), false);
        self.entries.push(Entry {
            kind,
            name: name.to_owned(),
            rel,
            size,
            incomplete,
            verdict,
            removal,
        });
    }
}

/// Whether the owner of a `.tmp-<label>-<pid>` directory still runs, as kiln's cleanups
/// decide it: `Some(pid)` and whether it is alive; `None` for a name without a pid.
fn tmp_owner(name: &str, me: u32) -> Option<(u32, bool)> {
    let pid = kiln_image::tmp_pid(name).filter(|&p| p > 0)?;
    Some((pid, pid == me || kiln_snapshot::process_running(pid)))
}

/// The verdict on a `.tmp-*` build directory.
fn tmp_verdict(name: &str, me: u32, what: &str) -> Verdict {
    match tmp_owner(name, me) {
        Some((pid, true)) => Verdict::Held(format!("{what} in progress (pid {pid})")),
        Some((pid, false)) => Verdict::Reclaim(format!("left by a {what} that died (pid {pid})")),
        None => Verdict::Keep("not a build directory kiln names".to_owned()),
    }
}

/// Sandboxes (not failed) restored from snapshot `name`.
fn users_of(rows: &[SandboxInfo], name: &str) -> Vec<String> {
    rows.iter()
        .filter(|r| {
            r.status.snapshot.as_deref() == Some(name) && r.status.state != SandboxState::Failed
        })
        .map(|r| r.id.to_string())
        .collect()
}

/// The image id in a warm snapshot's name (`warm-<id>-<c>c<m>m[-fullram]`).
fn warm_image_id(name: &str) -> Option<&str> {
    name.strip_prefix("warm-")?.split('-').next()
}

/// The root disk digest a snapshot was taken over (`None` if its manifest cannot be read).
fn snapshot_disk_digest(dir: &Path) -> Option<String> {
    let body = std::fs::read(dir.join(kiln_snapshot::MANIFEST_FILE)).ok()?;
    let m: kiln_snapshot::SnapshotManifest = serde_json::from_slice(&body).ok()?;
    Some(m.fingerprint.disk_digest)
}

/// The verdict on warm snapshot `name` in `dir`.
fn warm_verdict(facts: &Facts<'_>, name: &str, dir: &Path) -> Verdict {
    let users = users_of(facts.rows, name);
    let id = warm_image_id(name).unwrap_or_default();
    let stale = match facts.images.iter().find(|i| i.id.0 == id) {
        Some(image) => {
            let current = image.rootfs_sha256.clone().unwrap_or_default();
            match snapshot_disk_digest(dir) {
                Some(digest) if digest != current => Some(format!(
                    "stale: image {} was rebuilt under the same id (its root disk differs)",
                    image.name
                )),
                _ => {
                    let mut why = format!("warm snapshot of image {}", image.name);
                    if !users.is_empty() {
                        why.push_str(&format!("; in use by sandbox {}", users.join(", ")));
                    }
                    return Verdict::Keep(why);
                }
            }
        }
        None => None,
    };
    if !users.is_empty() {
        return Verdict::Held(format!("in use by sandbox {}", users.join(", ")));
    }
    // A warm restore records its snapshot in the row only once the sandbox runs.
    let starting: Vec<String> = facts
        .rows
        .iter()
        .filter(|r| r.status.state == SandboxState::Creating && r.status.image_id == id)
        .map(|r| r.id.to_string())
        .collect();
    if !starting.is_empty() {
        return Verdict::Held(format!(
            "sandbox {} is starting from image {id}",
            starting.join(", ")
        ));
    }
    Verdict::Reclaim(
        stale.unwrap_or_else(|| format!("its image {id} is gone (removed or rebuilt)")),
    )
}

/// The state of the sandbox with id `id`, if it has a row.
fn row_state(rows: &[SandboxInfo], id: &str) -> Option<SandboxState> {
    rows.iter()
        .find(|r| r.id.as_str() == id)
        .map(|r| r.status.state)
}

/// Top-level entries with a category of their own; the rest are `other` items.
const KNOWN_TOP: [&str; 9] = [
    "images",
    "snapshots",
    "run",
    "saved",
    "cache",
    "logs",
    "kilnd.log",
    "recordings",
    "exports",
];

/// Measures everything below `home` and judges each item. `home/images` is followed if it
/// is a symlink (an e2e home shares another's images); nothing else is.
pub(crate) fn survey(home: &Home, facts: &Facts<'_>) -> Survey {
    use UsageKind as K;
    let root = home.root();
    let mut b = Builder {
        root,
        walker: Walker::default(),
        entries: Vec::new(),
    };
    let images_dir = home.images_dir();
    let snapshots = root.join("snapshots");

    // Images first: they keep the kernel cache's vmlinuz alive (a hard link).
    for name in names(&images_dir) {
        if name.starts_with('.') {
            continue;
        }
        let verdict = match facts.images.iter().find(|i| i.name == name) {
            Some(image) => Verdict::Keep(format!("built image {}", image.id)),
            None => Verdict::Keep(
                "no manifest: not a complete image (`kiln image rm` removes it)".to_owned(),
            ),
        };
        b.add(
            K::Images,
            &name,
            Path::new("images").join(&name),
            verdict,
            Removal::BuildDir,
        );
    }

    for name in names(&snapshots) {
        if name.starts_with('.') || !name.starts_with("warm-") {
            continue;
        }
        let verdict = warm_verdict(facts, &name, &snapshots.join(&name));
        b.add(
            K::WarmSnapshots,
            &name,
            Path::new("snapshots").join(&name),
            verdict,
            Removal::Snapshot,
        );
    }
    for name in names(&snapshots) {
        if name.starts_with('.') || name.starts_with("warm-") {
            continue;
        }
        let users = users_of(facts.rows, &name);
        let mut why = "user snapshot (`kiln snapshot rm` removes it)".to_owned();
        if !users.is_empty() {
            why.push_str(&format!("; in use by sandbox {}", users.join(", ")));
        }
        b.add(
            K::UserSnapshots,
            &name,
            Path::new("snapshots").join(&name),
            Verdict::Keep(why),
            Removal::Snapshot,
        );
    }

    for name in names(&home.run_dir()) {
        let why = if let Some(state) = row_state(facts.rows, &name) {
            format!("sandbox {name} ({})", state.as_str())
        } else if let Some(id) = name.strip_prefix("capture-") {
            format!("warm snapshot capture for sandbox {id}")
        } else if let Some(snap) = name.strip_prefix("convert-") {
            format!("conversion of snapshot {snap}")
        } else {
            "no sandbox of that id: the daemon's startup janitor reclaims it (a QEMU may still use it)".to_owned()
        };
        b.add(
            K::Sandboxes,
            &name,
            Path::new("run").join(&name),
            Verdict::Keep(why),
            Removal::Tree,
        );
    }

    for name in names(&root.join("saved")) {
        let verdict = match row_state(facts.rows, &name) {
            Some(state) => Verdict::Keep(format!("save of sandbox {name} ({})", state.as_str())),
            None => Verdict::Reclaim("save of a removed sandbox".to_owned()),
        };
        b.add(
            K::StoppedSandboxes,
            &name,
            Path::new("saved").join(&name),
            verdict,
            Removal::Tree,
        );
    }

    let cache_held = "an image build is in progress (it holds the caches' lock)";
    let kernels = root.join("cache/kernel");
    for name in names(&kernels) {
        let rel = Path::new("cache/kernel").join(&name);
        if name.starts_with('.') {
            if name.starts_with(kiln_snapshot::TMP_PREFIX) {
                let verdict = tmp_verdict(&name, facts.me, "kernel extraction");
                b.add(K::BuildCaches, &name, rel, verdict, Removal::BuildDir);
            }
            continue;
        }
        let users: Vec<&str> = facts
            .images
            .iter()
            .filter(|i| kiln_image::kernel_cache_key(&i.kernel_version, &i.kernel_release) == name)
            .map(|i| i.name.as_str())
            .collect();
        let verdict = if !users.is_empty() {
            Verdict::Keep(format!("kernel of image {}", users.join(", ")))
        } else if facts.build_running {
            Verdict::Held(cache_held.to_owned())
        } else {
            Verdict::Reclaim(format!("no image uses kernel {name}"))
        };
        b.add(
            K::BuildCaches,
            &format!("kernel {name}"),
            rel,
            verdict,
            Removal::BuildDir,
        );
    }
    for name in names(&root.join("cache/debs")) {
        let rel = Path::new("cache/debs").join(&name);
        let verdict = if name.starts_with(kiln_snapshot::TMP_PREFIX) {
            tmp_verdict(&name, facts.me, "package download")
        } else if name.starts_with('.') {
            continue;
        } else if facts.build_running {
            Verdict::Held(cache_held.to_owned())
        } else {
            Verdict::Reclaim(
                "downloaded kernel package (fetched again if a build needs it)".to_owned(),
            )
        };
        b.add(K::BuildCaches, &name, rel, verdict, Removal::BuildDir);
    }
    // The package download cache shared by image builds: one entry, as builds use it whole.
    if root.join(kiln_image::APT_CACHE_DIR).is_dir() {
        let verdict = if facts.build_running {
            Verdict::Held(cache_held.to_owned())
        } else {
            Verdict::Reclaim(
                "packages downloaded by image builds (fetched again if a build needs them)"
                    .to_owned(),
            )
        };
        b.add(
            K::BuildCaches,
            "apt packages",
            PathBuf::from(kiln_image::APT_CACHE_DIR),
            verdict,
            Removal::BuildDir,
        );
    }
    for name in names(&root.join("cache")) {
        if ["kernel", "debs", "apt", kiln_image::CACHE_LOCK_FILE].contains(&name.as_str()) {
            continue;
        }
        b.add(
            K::BuildCaches,
            &name,
            Path::new("cache").join(&name),
            Verdict::Keep("not one of kiln's caches".to_owned()),
            Removal::Tree,
        );
    }
    for name in names(&images_dir) {
        if name.starts_with(kiln_snapshot::TMP_PREFIX) {
            let verdict = tmp_verdict(&name, facts.me, "image build");
            b.add(
                K::BuildCaches,
                &name,
                Path::new("images").join(&name),
                verdict,
                Removal::BuildDir,
            );
        }
    }
    for name in names(&snapshots) {
        if name.starts_with(kiln_snapshot::TMP_PREFIX) {
            let verdict = tmp_verdict(&name, facts.me, "snapshot build");
            b.add(
                K::BuildCaches,
                &name,
                Path::new("snapshots").join(&name),
                verdict,
                Removal::Tree,
            );
        }
    }

    for name in names(&root.join("logs")) {
        let id = name
            .strip_suffix(CONSOLE_SUFFIX)
            .or_else(|| name.strip_suffix(&format!("{CONSOLE_SUFFIX}.1")))
            .filter(|id| id.parse::<kiln_api_types::SandboxId>().is_ok());
        let verdict = match id {
            Some(id) => match row_state(facts.rows, id) {
                Some(_) => Verdict::Keep(format!("console of sandbox {id}")),
                None => Verdict::Reclaim(format!("console of removed sandbox {id}")),
            },
            None => Verdict::Keep("not a console archive".to_owned()),
        };
        b.add(
            K::Logs,
            &name,
            Path::new("logs").join(&name),
            verdict,
            Removal::Tree,
        );
    }
    if root.join("kilnd.log").exists() {
        b.add(
            K::Logs,
            "kilnd.log",
            PathBuf::from("kilnd.log"),
            Verdict::Keep("the daemon's log".to_owned()),
            Removal::Tree,
        );
    }

    // Review recordings: a sandbox's own while it has a row, then kept while pinned.
    let now = std::time::SystemTime::now();
    for name in names(&home.recordings_dir()) {
        let rel = Path::new("recordings").join(&name);
        let verdict = if name.starts_with(kiln_snapshot::TMP_PREFIX) {
            tmp_verdict(&name, facts.me, "recording removal")
        } else if name.parse::<kiln_api_types::SandboxId>().is_err() {
            Verdict::Keep("not a recording kiln names".to_owned())
        } else if let Some(state) = row_state(facts.rows, &name) {
            Verdict::Keep(format!("recording of sandbox {name} ({})", state.as_str()))
        } else if let Some(until) = retention::pinned_past(&root.join(&rel), now) {
            Verdict::Held(format!(
                "recording of removed sandbox {name}, pinned by a failed action until {}",
                timestamp::rfc3339_ms(until)
            ))
        } else {
            Verdict::Reclaim(format!("recording of removed sandbox {name}"))
        };
        b.add(K::Recordings, &name, rel, verdict, Removal::Tree);
    }
    for name in names(&home.exports_dir()) {
        let rel = Path::new("exports").join(&name);
        let verdict = if name.starts_with(kiln_snapshot::TMP_PREFIX) {
            tmp_verdict(&name, facts.me, "review export")
        } else {
            Verdict::Keep("exported review bundle: yours, kiln never removes it".to_owned())
        };
        b.add(K::Exports, &name, rel, verdict, Removal::Tree);
    }

    for name in names(root) {
        if KNOWN_TOP.contains(&name.as_str()) {
            continue;
        }
        b.add(
            K::Other,
            &name,
            PathBuf::from(&name),
            Verdict::Keep("kiln's own state".to_owned()),
            Removal::Tree,
        );
    }
    // The rest: the directories' own entries, lock files, and anything no rule names.
    let (mut rest, mut incomplete) = b.walker.measure(root, true);
    let (images_rest, images_err) = b.walker.measure(&images_dir, true);
    rest += images_rest;
    incomplete = incomplete.or(images_err);
    b.entries.push(Entry {
        kind: K::Other,
        name: "directories and locks".to_owned(),
        rel: PathBuf::from("."),
        size: rest,
        incomplete,
        verdict: Verdict::Keep("the directories' own entries and lock files".to_owned()),
        removal: Removal::Tree,
    });
    Survey {
        home: root.to_owned(),
        entries: b.entries,
    }
}

#[cfg(test)]
mod tests;
