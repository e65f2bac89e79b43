//! Jobs (`jobs`): one row per job, from its submission until it is pruned. The row keeps the
//! request (so that a job still queued when the daemon stopped runs after the restart), the
//! job's record and a summary for lists, as JSON the engine writes, plus the columns lists
//! filter and order by.
//!
//! Must not: interpret the JSON or decide what a status means (that is `kiln-core`'s `jobs`
//! room); the store only records it atomically. Invariants (schema): one row per id; `seq`
//! orders rows by submission and is unique.

use rusqlite::{OptionalExtension, params};

use crate::{Store, StoreError, query};

/// One stored job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredJob {
    /// `job-` and 12 hex digits.
    pub id: String,
    /// When it was submitted, milliseconds since the Unix epoch.
    pub created_ms: u64,
    /// Its status (`queued`, `running`, ... as the API spells it).
    pub status: String,
    /// Its language's id.
    pub language: String,
    /// The request, JSON.
    pub request: String,
    /// The job's record, JSON.
    pub info: String,
    /// Its summary for lists, JSON.
    pub summary: String,
}

/// Which jobs `job_summaries` returns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobFilter {
    /// Only jobs of this status.
    pub status: Option<String>,
    /// Only jobs of this language.
    pub language: Option<String>,
    /// At most this many, newest first.
    pub limit: u32,
}

impl Store {
    /// Records a new job (after every job recorded before it).
    pub fn job_insert(&self, j: &StoredJob) -> Result<(), StoreError> {
        self.write_reserved("record a job", |c| {
            c.execute(
                "INSERT INTO jobs (id, seq, created_ms, status, language, request, info, summary)
                 VALUES (?1, (SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs), ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    j.id,
                    j.created_ms as i64,
                    j.status,
                    j.language,
                    j.request,
                    j.info,
                    j.summary
                ],
            )
        })
        .map(drop)
    }

    /// Records a job's new status and record; false if there is no such job.
    pub fn job_update(
        &self,
        id: &str,
        status: &str,
        info: &str,
        summary: &str,
    ) -> Result<bool, StoreError> {
        self.write_reserved("update a job", |c| {
            c.execute(
                "UPDATE jobs SET status = ?2, info = ?3, summary = ?4 WHERE id = ?1",
                params![id, status, info, summary],
            )
        })
        .map(|n| n > 0)
    }

    /// One job's record (JSON), if there is such a job.
    pub fn job_info(&self, id: &str) -> Result<Option<String>, StoreError> {
        self.conn()
            .query_row("SELECT info FROM jobs WHERE id = ?1", params![id], |r| {
                r.get(0)
            })
            .optional()
            .map_err(query("read a job"))
    }

    /// Summaries (JSON) of the jobs `filter` selects, newest first.
    pub fn job_summaries(&self, filter: &JobFilter) -> Result<Vec<String>, StoreError> {
        let q = query("list jobs");
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT summary FROM jobs
                 WHERE (?1 IS NULL OR status = ?1) AND (?2 IS NULL OR language = ?2)
                 ORDER BY seq DESC LIMIT ?3",
            )
            .map_err(&q)?;
        let rows = stmt
            .query_map(params![filter.status, filter.language, filter.limit], |r| {
                r.get::<_, String>(0)
            })
            .map_err(&q)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(q)
    }

    /// Jobs still `queued` or `running`, oldest first (for the engine's start).
    pub fn jobs_unfinished(&self) -> Result<Vec<StoredJob>, StoreError> {
        let q = query("list unfinished jobs");
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT id, created_ms, status, language, request, info, summary FROM jobs
                 WHERE status IN ('queued', 'running') ORDER BY seq",
            )
            .map_err(&q)?;
        let rows = stmt
            .query_map([], |r| {
                Ok(StoredJob {
                    id: r.get(0)?,
                    created_ms: r.get::<_, i64>(1)? as u64,
                    status: r.get(2)?,
                    language: r.get(3)?,
                    request: r.get(4)?,
                    info: r.get(5)?,
                    summary: r.get(6)?,
                })
            })
            .map_err(&q)?;
        rows.collect::<Result<Vec<_>, _>>().map_err(q)
    }

    /// Removes ended jobs (any status but `queued` and `running`) submitted before
    /// `older_than_ms`, and all but the newest `keep` ended jobs; returns how many went.
    pub fn jobs_prune(&self, older_than_ms: u64, keep: u32) -> Result<usize, StoreError> {
        self.write_reserved("prune jobs", |c| {
            c.execute(
                "DELETE FROM jobs WHERE status NOT IN ('queued', 'running') AND (
                   created_ms < ?1 OR seq NOT IN (
                     SELECT seq FROM jobs WHERE status NOT IN ('queued', 'running')
                     ORDER BY seq DESC LIMIT ?2))",
                params![older_than_ms as i64, keep],
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(id: &str, created_ms: u64, status: &str, language: &str) -> StoredJob {
        StoredJob {
            id: id.into(),
            created_ms,
            status: status.into(),
            language: language.into(),
            request: "{}".into(),
            info: format!("{{\"id\":\"{id}\"}}"),
            summary: format!("{{\"id\":\"{id}\",\"status\":\"{status}\"}}"),
        }
    }

    #[test]
    fn jobs_list_newest_first_with_filters() {
        let s = Store::open_in_memory().unwrap();
        s.job_insert(&job("job-a", 1, "succeeded", "python"))
            .unwrap();
        s.job_insert(&job("job-b", 2, "queued", "c")).unwrap();
        s.job_insert(&job("job-c", 3, "failed", "python")).unwrap();
        let all = s
            .job_summaries(&JobFilter {
                limit: 10,
                ..JobFilter::default()
            })
            .unwrap();
        assert!(
            all[0].contains("job-c") && all[2].contains("job-a"),
            "{all:?}"
        );
        let py = s
            .job_summaries(&JobFilter {
                language: Some("python".into()),
                limit: 10,
                ..JobFilter::default()
            })
            .unwrap();
        assert_eq!(py.len(), 2);
        let queued = s
            .job_summaries(&JobFilter {
                status: Some("queued".into()),
                limit: 10,
                ..JobFilter::default()
            })
            .unwrap();
        assert_eq!(queued.len(), 1);
        let one = s
            .job_summaries(&JobFilter {
                limit: 1,
                ..JobFilter::default()
            })
            .unwrap();
        assert_eq!(one.len(), 1);
        assert!(s.job_insert(&job("job-a", 4, "queued", "c")).is_err());
    }

    #[test]
    fn update_and_unfinished_in_submission_order() {
        let s = Store::open_in_memory().unwrap();
        s.job_insert(&job("job-b", 5, "queued", "c")).unwrap();
        s.job_insert(&job("job-a", 5, "running", "c")).unwrap();
        s.job_insert(&job("job-c", 6, "queued", "c")).unwrap();
        assert!(
            s.job_update("job-c", "succeeded", "{\"x\":1}", "{}")
                .unwrap()
        );
        assert!(!s.job_update("job-z", "succeeded", "{}", "{}").unwrap());
        let ids: Vec<String> = s
            .jobs_unfinished()
            .unwrap()
            .into_iter()
            .map(|j| j.id)
            .collect();
        assert_eq!(ids, ["job-b", "job-a"]);
        assert_eq!(s.job_info("job-c").unwrap().as_deref(), Some("{\"x\":1}"));
        assert_eq!(s.job_info("job-z").unwrap(), None);
    }

    #[test]
    fn prune_keeps_unfinished_jobs_and_the_newest_ended() {
        let s = Store::open_in_memory().unwrap();
        s.job_insert(&job("job-old-queued", 1, "queued", "c"))
            .unwrap();
        s.job_insert(&job("job-old-done", 1, "succeeded", "c"))
            .unwrap();
        for i in 0..5 {
            s.job_insert(&job(&format!("job-{i}"), 100 + i, "failed", "c"))
                .unwrap();
        }
        // Age: the old ended job goes, the old queued one stays.
        assert_eq!(s.jobs_prune(50, 100).unwrap(), 1);
        // Count: of the five ended ones, the newest two stay.
        assert_eq!(s.jobs_prune(0, 2).unwrap(), 3);
        let left = s
            .job_summaries(&JobFilter {
                limit: 10,
                ..JobFilter::default()
            })
            .unwrap();
        assert_eq!(left.len(), 3, "{left:?}");
        assert!(left.iter().any(|j| j.contains("job-old-queued")));
        assert!(left[0].contains("job-4") && left[1].contains("job-3"));
    }
}
