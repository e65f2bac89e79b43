//! kiln's persistent state in SQLite: the only crate that speaks SQL.
//!
//! Owns the schema (numbered migrations applied through `PRAGMA user_version`) and typed
//! accessors for the rows the engine keeps. It must not hold business logic: the engine decides
//! what a state change means, the store only records it atomically.
//!
//! Invariants:
//! - the database is opened in WAL mode with a busy timeout and foreign keys on, so a second
//!   reader (another daemon starting while one exits) waits instead of failing;
//! - migrations run in one transaction each; a database newer than this binary is refused
//!   rather than misread;
//! - the API is blocking (rusqlite): async callers wrap calls in `spawn_blocking` or keep them
//!   short; one [`Store`] holds one connection behind a mutex;
//! - state changes are recorded even on a full file system: beside the database lies a
//!   reserve file ([`RESERVE_BYTES`] of real blocks); a state or error update that fails with
//!   SQLite's "disk full" frees the reserve and is retried once, and
//!   [`Store::replenish_reserve`] puts it back once there is room again. (A sandbox that QEMU
//!   paused because the disk is full must be *recorded* as paused.)

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Mutex;
use std::time::Duration;

use kiln_api_types::{
    SandboxId, SandboxInfo, SandboxSpec, SandboxState, SandboxStatus, StartSource,
};
use rusqlite::{Connection, OptionalExtension, params};

mod jobs;
mod leases;
mod pools;
pub use jobs::{JobFilter, StoredJob};
pub use leases::{LeaseSubnet, NetLease};
pub use pools::StoredPool;

/// Makes the database and its WAL files readable by their owner only (best effort: a file
/// system without modes keeps them as they are).
fn owner_only(db: &Path) {
    use std::os::unix::fs::PermissionsExt;
    for suffix in ["", "-wal", "-shm"] {
        let mut p = db.as_os_str().to_owned();
        p.push(suffix);
        let _ = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600));
    }
}

/// Schema migrations; index + 1 is the `user_version` each one brings the database to.
const MIGRATIONS: &[&str] = &[
    // 1: sandboxes.
    "CREATE TABLE sandboxes (
        id            TEXT PRIMARY KEY NOT NULL,
        image         TEXT NOT NULL,
        image_id      TEXT NOT NULL,
        state         TEXT NOT NULL,
        cpus          INTEGER NOT NULL,
        memory_mib    INTEGER NOT NULL,
        accel         TEXT NOT NULL,
        created_unix  INTEGER NOT NULL,
        boot_ms       INTEGER,
        error         TEXT
    ) STRICT;",
    // 2: how a sandbox started (cold boot or snapshot restore).
    "ALTER TABLE sandboxes ADD COLUMN source TEXT NOT NULL DEFAULT 'cold';",
    // 3: the snapshot a sandbox was restored from (it depends on it while it exists), and its
    // published ports (`host:guest` pairs separated by commas).
    "ALTER TABLE sandboxes ADD COLUMN snapshot TEXT;
     ALTER TABLE sandboxes ADD COLUMN publish TEXT NOT NULL DEFAULT '';",
    // 4: the sandbox's whole spec (secret values removed) as JSON replaces the published
    // ports column; a unique optional name; the lifetime's deadline; `booting` is `creating`.
    "ALTER TABLE sandboxes ADD COLUMN spec TEXT NOT NULL DEFAULT '{}';
     ALTER TABLE sandboxes DROP COLUMN publish;
     ALTER TABLE sandboxes ADD COLUMN name TEXT;
     CREATE UNIQUE INDEX sandboxes_name ON sandboxes (name) WHERE name IS NOT NULL;
     ALTER TABLE sandboxes ADD COLUMN expires_unix INTEGER;
     UPDATE sandboxes SET state = 'creating' WHERE state = 'booting';",
    // 5: network address leases (bridge pool, user-mode pool): one address per sandbox per
    // pool, an address held by at most one sandbox.
    "CREATE TABLE net_leases (
        ip            TEXT PRIMARY KEY NOT NULL,
        pool          TEXT NOT NULL,
        sandbox_id    TEXT NOT NULL,
        mac           TEXT NOT NULL,
        created_unix  INTEGER NOT NULL
    ) STRICT;
     CREATE UNIQUE INDEX net_leases_sandbox ON net_leases (pool, sandbox_id);",
    // 6: warm pool sizes set through the API, one per image and machine size.
    "CREATE TABLE pools (
        image               TEXT NOT NULL,
        cpus                INTEGER NOT NULL,
        memory_mib          INTEGER NOT NULL,
        size                INTEGER NOT NULL,
        warmup              TEXT,
        warmup_timeout_secs INTEGER,
        PRIMARY KEY (image, cpus, memory_mib)
    ) STRICT;",
    // 7: jobs: the request (to run a queued job after a restart), the job's record and its
    // summary for lists, as JSON the engine writes.
    "CREATE TABLE jobs (
        id          TEXT PRIMARY KEY NOT NULL,
        seq         INTEGER NOT NULL,
        created_ms  INTEGER NOT NULL,
        status      TEXT NOT NULL,
        language    TEXT NOT NULL,
        request     TEXT NOT NULL,
        info        TEXT NOT NULL,
        summary     TEXT NOT NULL
    ) STRICT;
     CREATE UNIQUE INDEX jobs_seq ON jobs (seq);
     CREATE INDEX jobs_status ON jobs (status, seq);",
];

/// Maps a query's error to [`StoreError::Query`] naming `what` was being done.
pub(crate) fn query(what: &'static str) -> impl Fn(rusqlite::Error) -> StoreError {
    move |source| StoreError::Query { what, source }
}

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database file could not be opened or configured.
    #[error("failed to open the state database {path}")]
    Open {
        /// Database path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: rusqlite::Error,
    },
    /// The database was written by a newer kiln.
    #[error("the state database has schema version {found}, newer than this kiln knows ({known})")]
    TooNew {
        /// Version in the file.
        found: i64,
        /// Newest version this binary knows.
        known: i64,
    },
    /// A migration failed.
    #[error("failed to migrate the state database to version {version}")]
    Migrate {
        /// Target version.
        version: usize,
        /// Cause.
        #[source]
        source: rusqlite::Error,
    },
    /// A query failed.
    #[error("state database query failed: {what}")]
    Query {
        /// What was being done.
        what: &'static str,
        /// Cause.
        #[source]
        source: rusqlite::Error,
    },
    /// A row holds a value this binary cannot read.
    #[error("corrupt row in the state database: {0}")]
    Corrupt(String),
    /// Another sandbox already has this name.
    #[error("a sandbox named {0:?} exists already")]
    NameTaken(String),
    /// Every address of a lease pool is taken.
    #[error("address pool {pool:?} ({subnet}) is exhausted: all {capacity} addresses are leased")]
    PoolExhausted {
        /// The pool.
        pool: String,
        /// Its subnet, `a.b.c.d/len`.
        subnet: String,
        /// How many addresses it has for sandboxes.
        capacity: u64,
    },
    /// A lease subnet that has no room for sandboxes (prefix longer than /30).
    #[error("subnet {0} has no addresses for sandboxes (it needs a prefix of /30 or shorter)")]
    SubnetTooSmall(String),
}

/// Store rows are the API's [`SandboxInfo`]: its spec (secret values removed) as JSON, its
/// status as columns. Nothing copies one into the other field by field.
pub type SandboxRow = SandboxInfo;

/// The one connection, behind a mutex.
pub struct Store {
    conn: Mutex<Connection>,
    /// The reserve file, for a database on disk.
    reserve: Option<PathBuf>,
}

/// Size of the reserve file kept beside the database.
pub const RESERVE_BYTES: u64 = 4 << 20;

impl Store {
    /// Opens (creating if needed) and migrates the database at `path`.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let open_err = |source| StoreError::Open {
            path: path.to_owned(),
            source,
        };
        let conn = Connection::open(path).map_err(open_err)?;
        conn.busy_timeout(Duration::from_secs(5))
            .map_err(open_err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(open_err)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(open_err)?;
        // Only its owner reads it: it keeps sandbox specs and job requests (their `env`).
        // SQLite gives the WAL and shared-memory files the database's mode.
        owner_only(path);
        let mut store = Self::migrate(conn)?;
        let mut reserve = path.as_os_str().to_owned();
        reserve.push(".reserve");
        store.reserve = Some(PathBuf::from(reserve));
        store.replenish_reserve();
        Ok(store)
    }

    /// Makes sure the reserve file exists with real blocks (best effort: on a full file
    /// system it stays missing until the next call).
    pub fn replenish_reserve(&self) {
        use std::io::Write;
        let Some(path) = &self.reserve else {
            return;
        };
        if std::fs::metadata(path).is_ok_and(|m| m.len() == RESERVE_BYTES) {
            return;
        }
        let tmp = path.with_extension("reserve.tmp");
        let written = std::fs::File::create(&tmp).and_then(|mut f| {
            // Zeros written, not a sparse length: the point is blocks that are really held.
            let chunk = vec![0u8; 1 << 20];
            for _ in 0..RESERVE_BYTES / chunk.len() as u64 {
                f.write_all(&chunk)?;
            }
            f.sync_all()
        });
        match written.and_then(|()| std::fs::rename(&tmp, path)) {
            Ok(()) => {}
            Err(_) => {
                let _ = std::fs::remove_file(&tmp);
            }
        }
    }

    /// Runs a small write; if SQLite finds the disk full, frees the reserve and retries once.
    fn write_reserved<T>(
        &self,
        what: &'static str,
        f: impl Fn(&Connection) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        let conn = self.conn();
        match f(&conn) {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DiskFull && self.reserve.is_some() =>
            {
                if let Some(path) = &self.reserve {
                    let _ = std::fs::remove_file(path);
                }
                f(&conn).map_err(|source| StoreError::Query { what, source })
            }
            r => r.map_err(|source| StoreError::Query { what, source }),
        }
    }

    /// A private in-memory database (tests).
    pub fn open_in_memory() -> Result<Store, StoreError> {
        let conn = Connection::open_in_memory().map_err(|source| StoreError::Open {
            path: PathBuf::from(":memory:"),
            source,
        })?;
        Self::migrate(conn)
    }

    fn migrate(mut conn: Connection) -> Result<Store, StoreError> {
        let q = |source| StoreError::Query {
            what: "read schema version",
            source,
        };
        let current: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(q)?;
        let known = MIGRATIONS.len() as i64;
        if current > known {
            return Err(StoreError::TooNew {
                found: current,
                known,
            });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
            let version = i + 1;
            let m = |source| StoreError::Migrate { version, source };
            let tx = conn.transaction().map_err(m)?;
            tx.execute_batch(sql).map_err(m)?;
            tx.pragma_update(None, "user_version", version as i64)
                .map_err(m)?;
            tx.commit().map_err(m)?;
        }
        Ok(Store {
            conn: Mutex::new(conn),
            reserve: None,
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite half-written (statements are
        // atomic), so a poisoned lock is still safe to use.
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a new sandbox. Secret values in its spec are never written. A name another
    /// sandbox holds is refused with [`StoreError::NameTaken`].
    pub fn sandbox_insert(&self, row: &SandboxRow) -> Result<(), StoreError> {
        let spec = serde_json::to_string(&row.spec.redacted())
            .map_err(|e| StoreError::Corrupt(format!("unserializable spec: {e}")))?;
        let st = &row.status;
        let name = row.spec.name.as_ref().map(|n| n.as_str());
        self.conn()
            .execute(
                "INSERT INTO sandboxes (id, image, image_id, state, cpus, memory_mib, accel, created_unix, boot_ms, error, source, snapshot, spec, name, expires_unix)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
                params![
                    row.id.as_str(),
                    st.image.as_str(),
                    st.image_id,
                    st.state.as_str(),
                    st.cpus,
                    st.memory_mib,
                    st.accel,
                    st.created_unix as i64,
                    st.boot_ms.map(|v| v as i64),
                    st.error,
                    st.source.as_str(),
                    st.snapshot,
                    spec,
                    name,
                    st.expires_unix.map(|v| v as i64),
                ],
            )
            .map_err(|source| match source {
                rusqlite::Error::SqliteFailure(e, _)
                    if e.code == rusqlite::ErrorCode::ConstraintViolation && name.is_some() =>
                {
                    StoreError::NameTaken(name.unwrap_or_default().to_owned())
                }
                source => StoreError::Query { what: "insert sandbox", source },
            })?;
        Ok(())
    }

    /// Sets a sandbox's state, and its boot time and error where given (`None` keeps them).
    /// Returns whether the row exists.
    pub fn sandbox_set_state(
        &self,
        id: &SandboxId,
        state: SandboxState,
        boot_ms: Option<u64>,
        error: Option<&str>,
    ) -> Result<bool, StoreError> {
        let n = self.write_reserved("update sandbox state", |conn| {
            conn.execute(
                "UPDATE sandboxes SET state = ?2, boot_ms = COALESCE(?3, boot_ms), error = COALESCE(?4, error)
                 WHERE id = ?1",
                params![id.as_str(), state.as_str(), boot_ms.map(|v| v as i64), error],
            )
        })?;
        Ok(n == 1)
    }

    /// Sets (or, with `None`, clears) a sandbox's error. Returns whether the row exists.
    pub fn sandbox_set_error(
        &self,
        id: &SandboxId,
        error: Option<&str>,
    ) -> Result<bool, StoreError> {
        let n = self.write_reserved("update sandbox error", |conn| {
            conn.execute(
                "UPDATE sandboxes SET error = ?2 WHERE id = ?1",
                params![id.as_str(), error],
            )
        })?;
        Ok(n == 1)
    }

    /// Moves a sandbox from state `from` to `to` atomically; `false` (nothing changed) when
    /// it is not in `from` (another request got there first) or does not exist.
    pub fn sandbox_transition(
        &self,
        id: &SandboxId,
        from: SandboxState,
        to: SandboxState,
    ) -> Result<bool, StoreError> {
        let n = self
            .conn()
            .execute(
                "UPDATE sandboxes SET state = ?3, error = NULL WHERE id = ?1 AND state = ?2",
                params![id.as_str(), from.as_str(), to.as_str()],
            )
            .map_err(|source| StoreError::Query {
                what: "transition sandbox state",
                source,
            })?;
        Ok(n == 1)
    }

    /// Records a sandbox's new network policy in its spec (`kiln network set`).
    pub fn sandbox_set_network(
        &self,
        id: &SandboxId,
        network: &kiln_api_types::NetworkSpec,
    ) -> Result<(), StoreError> {
        let q = |source| StoreError::Query {
            what: "update sandbox network",
            source,
        };
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(q)?;
        let spec: Option<String> = tx
            .query_row(
                "SELECT spec FROM sandboxes WHERE id = ?1",
                params![id.as_str()],
                |r| r.get(0),
            )
            .optional()
            .map_err(q)?;
        let Some(spec) = spec else {
            return Ok(());
        };
        let mut spec: SandboxSpec = serde_json::from_str(&spec)
            .map_err(|e| StoreError::Corrupt(format!("spec of sandbox {id}: {e}")))?;
        spec.network = network.clone();
        let body = serde_json::to_string(&spec).expect("a spec serializes");
        tx.execute(
            "UPDATE sandboxes SET spec = ?2 WHERE id = ?1",
            params![id.as_str(), body],
        )
        .map_err(q)?;
        tx.commit().map_err(q)
    }

    /// Records how a sandbox's VM started and from which snapshot.
    pub fn sandbox_set_source(
        &self,
        id: &SandboxId,
        source: StartSource,
        snapshot: Option<&str>,
    ) -> Result<(), StoreError> {
        self.conn()
            .execute(
                "UPDATE sandboxes SET source = ?2, snapshot = ?3 WHERE id = ?1",
                params![id.as_str(), source.as_str(), snapshot],
            )
            .map_err(|source| StoreError::Query {
                what: "update sandbox source",
                source,
            })?;
        Ok(())
    }

    /// Sets (or clears) the end of a sandbox's lifetime.
    pub fn sandbox_set_expiry(
        &self,
        id: &SandboxId,
        expires_unix: Option<u64>,
    ) -> Result<bool, StoreError> {
        let n = self
            .conn()
            .execute(
                "UPDATE sandboxes SET expires_unix = ?2 WHERE id = ?1",
                params![id.as_str(), expires_unix.map(|v| v as i64)],
            )
            .map_err(|source| StoreError::Query {
                what: "update sandbox expiry",
                source,
            })?;
        Ok(n == 1)
    }

    /// Removes a sandbox's row. Returns whether it existed.
    pub fn sandbox_delete(&self, id: &SandboxId) -> Result<bool, StoreError> {
        let n = self
            .conn()
            .execute("DELETE FROM sandboxes WHERE id = ?1", params![id.as_str()])
            .map_err(|source| StoreError::Query {
                what: "delete sandbox",
                source,
            })?;
        Ok(n == 1)
    }

    /// One sandbox.
    pub fn sandbox_get(&self, id: &SandboxId) -> Result<Option<SandboxRow>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(&format!("{SELECT} WHERE id = ?1"))
            .map_err(|source| StoreError::Query {
                what: "get sandbox",
                source,
            })?;
        let raw = stmt
            .query_row(params![id.as_str()], RawRow::read)
            .optional()
            .map_err(|source| StoreError::Query {
                what: "get sandbox",
                source,
            })?;
        raw.map(RawRow::into_row).transpose()
    }

    /// All sandboxes, oldest first.
    pub fn sandbox_list(&self) -> Result<Vec<SandboxRow>, StoreError> {
        let conn = self.conn();
        let q = |source| StoreError::Query {
            what: "list sandboxes",
            source,
        };
        let mut stmt = conn
            .prepare_cached(&format!("{SELECT} ORDER BY created_unix, id"))
            .map_err(q)?;
        let raws = stmt
            .query_map([], RawRow::read)
            .map_err(q)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(q)?;
        raws.into_iter().map(RawRow::into_row).collect()
    }
}

const SELECT: &str = "SELECT id, image, image_id, state, cpus, memory_mib, accel, created_unix, boot_ms, error, source, snapshot, spec, expires_unix FROM sandboxes";

/// A row as SQLite returns it, before its values are checked.
struct RawRow {
    id: String,
    image: String,
    image_id: String,
    state: String,
    cpus: i64,
    memory_mib: i64,
    accel: String,
    created_unix: i64,
    boot_ms: Option<i64>,
    error: Option<String>,
    source: String,
    snapshot: Option<String>,
    spec: String,
    expires_unix: Option<i64>,
}

impl RawRow {
    fn read(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawRow> {
        Ok(RawRow {
            id: r.get(0)?,
            image: r.get(1)?,
            image_id: r.get(2)?,
            state: r.get(3)?,
            cpus: r.get(4)?,
            memory_mib: r.get(5)?,
            accel: r.get(6)?,
            created_unix: r.get(7)?,
            boot_ms: r.get(8)?,
            error: r.get(9)?,
            source: r.get(10)?,
            snapshot: r.get(11)?,
            spec: r.get(12)?,
            expires_unix: r.get(13)?,
        })
    }

    fn into_row(self) -> Result<SandboxRow, StoreError> {
        let corrupt = |e: &dyn std::fmt::Display| StoreError::Corrupt(e.to_string());
        let id = SandboxId::from_str(&self.id).map_err(|e| corrupt(&e))?;
        let num = |v: i64, what: &str| {
            u32::try_from(v).map_err(|_| {
                StoreError::Corrupt(format!("{what} {v} of sandbox {id} out of range"))
            })
        };
        let spec: SandboxSpec = serde_json::from_str(&self.spec)
            .map_err(|e| StoreError::Corrupt(format!("spec of sandbox {id}: {e}")))?;
        Ok(SandboxRow {
            status: SandboxStatus {
                state: SandboxState::from_str(&self.state).map_err(|e| corrupt(&e))?,
                image: self.image.parse().map_err(|e| corrupt(&e))?,
                image_id: self.image_id,
                cpus: num(self.cpus, "cpus")?,
                memory_mib: num(self.memory_mib, "memory_mib")?,
                accel: self.accel,
                created_unix: self.created_unix.max(0) as u64,
                boot_ms: self.boot_ms.map(|v| v.max(0) as u64),
                error: self.error,
                warnings: Vec::new(),
                network: None,
                source: StartSource::from_str(&self.source).map_err(|e| corrupt(&e))?,
                snapshot: self.snapshot,
                expires_unix: self.expires_unix.map(|v| v.max(0) as u64),
            },
            id,
            spec,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(created: u64) -> SandboxRow {
        SandboxRow {
            id: SandboxId::random(),
            spec: SandboxSpec::default(),
            status: SandboxStatus {
                network: None,
                state: SandboxState::Creating,
                image: "python".parse().unwrap(),
                image_id: "abc".into(),
                cpus: 1,
                memory_mib: 256,
                accel: "tcg".into(),
                created_unix: created,
                boot_ms: None,
                error: None,
                warnings: Vec::new(),
                source: StartSource::Cold,
                snapshot: None,
                expires_unix: None,
            },
        }
    }

    #[test]
    fn sandbox_insert_then_get_returns_same_row() {
        let store = Store::open_in_memory().unwrap();
        let r = row(5);
        store.sandbox_insert(&r).unwrap();
        assert_eq!(store.sandbox_get(&r.id).unwrap(), Some(r));
    }

    #[test]
    fn sandbox_set_state_records_boot_and_keeps_error() {
        let store = Store::open_in_memory().unwrap();
        let r = row(5);
        store.sandbox_insert(&r).unwrap();
        assert!(
            store
                .sandbox_set_state(&r.id, SandboxState::Running, Some(1234), None)
                .unwrap()
        );
        assert!(
            store
                .sandbox_set_state(&r.id, SandboxState::Failed, None, Some("qemu died"))
                .unwrap()
        );
        let got = store.sandbox_get(&r.id).unwrap().unwrap();
        assert_eq!(got.status.state, SandboxState::Failed);
        assert_eq!(got.status.boot_ms, Some(1234));
        assert_eq!(got.status.error.as_deref(), Some("qemu died"));
        assert!(
            !store
                .sandbox_set_state(&SandboxId::random(), SandboxState::Running, None, None)
                .unwrap()
        );
    }

    #[test]
    fn sandbox_list_is_ordered_and_delete_removes() {
        let store = Store::open_in_memory().unwrap();
        let (a, b) = (row(20), row(10));
        store.sandbox_insert(&a).unwrap();
        store.sandbox_insert(&b).unwrap();
        let ids: Vec<_> = store
            .sandbox_list()
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(ids, vec![b.id.clone(), a.id.clone()]);
        assert!(store.sandbox_delete(&a.id).unwrap());
        assert!(!store.sandbox_delete(&a.id).unwrap());
        assert_eq!(store.sandbox_list().unwrap().len(), 1);
    }

    #[test]
    fn open_file_twice_keeps_rows_and_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kiln.db");
        let r = row(1);
        Store::open(&path).unwrap().sandbox_insert(&r).unwrap();
        let again = Store::open(&path).unwrap();
        assert_eq!(again.sandbox_get(&r.id).unwrap(), Some(r));
    }

    #[test]
    fn open_makes_the_database_and_its_wal_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kiln.db");
        // A database an older kiln left readable by everyone.
        std::fs::write(&path, b"").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let store = Store::open(&path).unwrap();
        store.sandbox_insert(&row(1)).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        let wal = dir.path().join("kiln.db-wal");
        assert!(wal.exists(), "WAL mode writes a -wal file");
        assert_eq!(mode(&wal), 0o600);
    }

    #[test]
    fn open_v1_database_migrates_rows_to_cold_source() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kiln.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(MIGRATIONS[0]).unwrap();
            conn.pragma_update(None, "user_version", 1).unwrap();
            conn.execute(
                "INSERT INTO sandboxes (id, image, image_id, state, cpus, memory_mib, accel, created_unix)
                 VALUES ('sb-0123456789ab', 'base', 'x', 'running', 1, 256, 'tcg', 1)",
                [],
            )
            .unwrap();
        }
        let store = Store::open(&path).unwrap();
        let row = store
            .sandbox_get(&"sb-0123456789ab".parse().unwrap())
            .unwrap()
            .unwrap();
        assert_eq!(row.status.source, StartSource::Cold);
        assert_eq!(row.status.state, SandboxState::Running);
        assert_eq!(row.spec, SandboxSpec::default());
    }

    #[test]
    fn open_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kiln.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.pragma_update(None, "user_version", 99).unwrap();
        }
        match Store::open(&path) {
            Err(StoreError::TooNew { found: 99, .. }) => {}
            other => panic!("expected TooNew, got {:?}", other.map(|_| ())),
        }
    }

    #[test]
    fn reserve_file_is_kept_beside_the_database_and_put_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("kiln.db")).unwrap();
        let reserve = dir.path().join("kiln.db.reserve");
        assert_eq!(std::fs::metadata(&reserve).unwrap().len(), RESERVE_BYTES);
        // Its blocks are real, not a sparse length.
        use std::os::unix::fs::MetadataExt;
        assert!(std::fs::metadata(&reserve).unwrap().blocks() * 512 >= RESERVE_BYTES);
        std::fs::remove_file(&reserve).unwrap();
        store.replenish_reserve();
        assert_eq!(std::fs::metadata(&reserve).unwrap().len(), RESERVE_BYTES);
    }

    #[test]
    fn corrupt_state_is_reported_not_panicked() {
        let store = Store::open_in_memory().unwrap();
        let r = row(1);
        store.sandbox_insert(&r).unwrap();
        store
            .conn()
            .execute("UPDATE sandboxes SET state = 'exploded'", [])
            .unwrap();
        assert!(matches!(
            store.sandbox_get(&r.id),
            Err(StoreError::Corrupt(_))
        ));
    }

    #[test]
    fn sandbox_insert_duplicate_name_is_name_taken() {
        let store = Store::open_in_memory().unwrap();
        let mut a = row(1);
        a.spec.name = Some("web".parse().unwrap());
        let mut b = row(2);
        b.spec.name = Some("web".parse().unwrap());
        store.sandbox_insert(&a).unwrap();
        match store.sandbox_insert(&b) {
            Err(StoreError::NameTaken(n)) => assert_eq!(n, "web"),
            other => panic!("expected NameTaken, got {other:?}"),
        }
        // Unnamed sandboxes never collide.
        store.sandbox_insert(&row(3)).unwrap();
        store.sandbox_insert(&row(4)).unwrap();
        assert!(store.sandbox_delete(&a.id).unwrap());
        store.sandbox_insert(&b).unwrap();
    }

    #[test]
    fn sandbox_insert_never_writes_secret_values() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kiln.db");
        let mut r = row(1);
        r.spec
            .secrets
            .0
            .insert("TOKEN".into(), "s3cr3t-value".into());
        r.spec.labels = kiln_api_types::Labels::from_labels(["team=ml".parse().unwrap()]).unwrap();
        let store = Store::open(&path).unwrap();
        store.sandbox_insert(&r).unwrap();
        let got = store.sandbox_get(&r.id).unwrap().unwrap();
        assert_eq!(
            got.spec.secrets.0.get("TOKEN").map(String::as_str),
            Some("")
        );
        assert_eq!(got.spec.labels, r.spec.labels);
        drop(store);
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            let bytes = std::fs::read(entry.unwrap().path()).unwrap();
            assert!(!bytes.windows(12).any(|w| w == b"s3cr3t-value"));
        }
    }

    #[test]
    fn sandbox_transition_happens_once() {
        let store = Store::open_in_memory().unwrap();
        let mut r = row(1);
        r.status.state = SandboxState::Stopped;
        store.sandbox_insert(&r).unwrap();
        assert!(
            store
                .sandbox_transition(&r.id, SandboxState::Stopped, SandboxState::Creating)
                .unwrap()
        );
        assert!(
            !store
                .sandbox_transition(&r.id, SandboxState::Stopped, SandboxState::Creating)
                .unwrap()
        );
        assert_eq!(
            store.sandbox_get(&r.id).unwrap().unwrap().status.state,
            SandboxState::Creating
        );
    }

    #[test]
    fn sandbox_set_expiry_round_trips() {
        let store = Store::open_in_memory().unwrap();
        let r = row(1);
        store.sandbox_insert(&r).unwrap();
        assert!(store.sandbox_set_expiry(&r.id, Some(99)).unwrap());
        assert_eq!(
            store
                .sandbox_get(&r.id)
                .unwrap()
                .unwrap()
                .status
                .expires_unix,
            Some(99)
        );
        assert!(store.sandbox_set_expiry(&r.id, None).unwrap());
        assert_eq!(
            store
                .sandbox_get(&r.id)
                .unwrap()
                .unwrap()
                .status
                .expires_unix,
            None
        );
    }

    #[test]
    fn open_v3_database_maps_booting_to_creating() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kiln.db");
        {
            let conn = Connection::open(&path).unwrap();
            for m in &MIGRATIONS[..3] {
                conn.execute_batch(m).unwrap();
            }
            conn.pragma_update(None, "user_version", 3).unwrap();
            conn.execute(
                "INSERT INTO sandboxes (id, image, image_id, state, cpus, memory_mib, accel, created_unix, publish)
                 VALUES ('sb-0123456789ab', 'base', 'x', 'booting', 1, 256, 'tcg', 1, '8080:80')",
                [],
            )
            .unwrap();
        }
        let store = Store::open(&path).unwrap();
        let row = store
            .sandbox_get(&"sb-0123456789ab".parse().unwrap())
            .unwrap()
            .unwrap();
        assert_eq!(row.status.state, SandboxState::Creating);
    }
}
