//! Warm pool sizes set through the API (`pools`): per image and machine size, how many
//! sandboxes to keep ready and the warm-up command. The config file's pools are not stored
//! (the daemon reads them at every start); a stored pool wins over a configured one.
//!
//! Must not: know how pooled sandboxes are made or counted (that is `kiln-core`).
//! Invariants (enforced by the schema): one row per image and machine size.

use rusqlite::params;

use crate::{Store, StoreError, query};

/// One stored pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredPool {
    /// The image's name.
    pub image: String,
    /// vCPUs of its sandboxes.
    pub cpus: u32,
    /// Memory of its sandboxes (MiB).
    pub memory_mib: u32,
    /// Sandboxes to keep ready (0: none, but the row remembers that the API said so).
    pub size: u32,
    /// The warm-up command, if any.
    pub warmup: Option<Vec<String>>,
    /// Longest the warm-up may run (seconds), if set.
    pub warmup_timeout_secs: Option<u64>,
}

impl Store {
    /// Records (or replaces) the pool of `p.image` at its machine size.
    pub fn pool_set(&self, p: &StoredPool) -> Result<(), StoreError> {
        let warmup = match &p.warmup {
            Some(w) => Some(
                serde_json::to_string(w)
                    .map_err(|e| StoreError::Corrupt(format!("warm-up command: {e}")))?,
            ),
            None => None,
        };
        self.conn()
            .execute(
                "INSERT INTO pools (image, cpus, memory_mib, size, warmup, warmup_timeout_secs)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (image, cpus, memory_mib) DO UPDATE SET
                   size = excluded.size, warmup = excluded.warmup,
                   warmup_timeout_secs = excluded.warmup_timeout_secs",
                params![
                    p.image,
                    p.cpus,
                    p.memory_mib,
                    p.size,
                    warmup,
                    p.warmup_timeout_secs.map(|t| t as i64)
                ],
            )
            .map(drop)
            .map_err(query("record a pool"))
    }

    /// Every stored pool, by image and machine size.
    pub fn pools(&self) -> Result<Vec<StoredPool>, StoreError> {
        let q = query("list pools");
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT image, cpus, memory_mib, size, warmup, warmup_timeout_secs FROM pools
                 ORDER BY image, cpus, memory_mib",
            )
            .map_err(&q)?;
        let raw = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, u32>(1)?,
                    r.get::<_, u32>(2)?,
                    r.get::<_, u32>(3)?,
                    r.get::<_, Option<String>>(4)?,
                    r.get::<_, Option<i64>>(5)?,
                ))
            })
            .map_err(&q)?
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(&q)?;
        raw.into_iter()
            .map(|(image, cpus, memory_mib, size, warmup, timeout)| {
                let warmup = match warmup {
                    Some(w) => Some(serde_json::from_str::<Vec<String>>(&w).map_err(|e| {
                        StoreError::Corrupt(format!("warm-up command of pool {image}: {e}"))
                    })?),
                    None => None,
                };
                Ok(StoredPool {
                    image,
                    cpus,
                    memory_mib,
                    size,
                    warmup,
                    warmup_timeout_secs: timeout.and_then(|t| u64::try_from(t).ok()),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_set_replaces_one_row_per_image_and_size() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("kiln.db")).unwrap();
        assert!(store.pools().unwrap().is_empty());
        let mut p = StoredPool {
            image: "python".into(),
            cpus: 1,
            memory_mib: 256,
            size: 2,
            warmup: Some(vec!["python3".into(), "-c".into(), "pass".into()]),
            warmup_timeout_secs: Some(30),
        };
        store.pool_set(&p).unwrap();
        p.size = 3;
        p.warmup = None;
        store.pool_set(&p).unwrap();
        let other = StoredPool {
            memory_mib: 512,
            size: 1,
            ..p.clone()
        };
        store.pool_set(&other).unwrap();
        assert_eq!(store.pools().unwrap(), vec![p, other]);
    }
}
