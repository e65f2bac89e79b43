//! Jobs: a program in one of kiln's languages, run once in a fresh sandbox of its language's
//! image, with its result kept.
//!
//! ```text
//!  job_submit ──► queue (FIFO, at most KILN_JOB_QUEUE) ──► dispatcher ──► runner (run.rs)
//!                  │ stored `queued`                        one slot of      take a sandbox (pool,
//!                  │                                        KILN_JOB_CONCURRENCY   restore; waits
//!                  ▼                                                          while over capacity)
//!  job_get / job_events / job_list ◄── Live (record + output, events) ◄──  write, compile, run
//!                                      ended: stored, pruned by age and count   sandbox removed
//! ```
//!
//! Owns the queue, the jobs in flight (their record, output and event channel), the
//! dispatcher task, recovery at the engine's start (a job `running` when the daemon stopped is
//! `interrupted` and its sandbox removed; a `queued` one runs) and pruning. A job's sandbox is
//! an ordinary sandbox labelled `kiln.job=<id>`: it is taken from the warm pool when one is
//! configured for the image, admitted against the host's budget like any start (a job waits
//! for room instead of being refused), never reused, and removed when the job ends.
//!
//! Must not: know how one job runs in its sandbox (`run.rs`) or how output is decoded
//! (`output.rs`). Invariants: a job is in the queue iff `queued`; its status only moves
//! forward (`queued` → `running` → an end); every change is stored before it is published; a
//! job ends exactly once (`Live::finish`).

mod output;
mod run;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_api_types::{
    ImageName, JobCompile, JobEvent, JobId, JobInfo, JobList, JobRequest, JobStatus, JobStream,
    JobSummary, LanguageEntry, LanguageList,
};
use tokio::sync::{Notify, Semaphore, broadcast, watch};
use tracing::{info, warn};

use crate::admission::positive_env;
use crate::error::CoreError;
use crate::languages::Language;
use crate::{Engine, unix_now_ms};
use output::Capture;

/// Jobs waiting by default before submissions are refused (`queue_full`).
const DEFAULT_QUEUE: u64 = 256;
/// Ended jobs kept by default, at most.
const DEFAULT_KEEP: u64 = 1000;
/// How long ended jobs are kept by default.
const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
/// `Retry-After` of `queue_full`.
const QUEUE_RETRY_SECS: u64 = 2;
/// Events a slow `events` reader may fall behind by (it then misses output, not the end).
const EVENT_BACKLOG: usize = 1024;
/// How long a daemon stop waits for running jobs to record their interruption.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(20);

/// The jobs' settings, from the daemon's environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Settings {
    /// Jobs running at once (`KILN_JOB_CONCURRENCY`, default twice the host's CPUs, at
    /// least 2: under emulation a job is CPU-bound, and more at once only thrash).
    pub concurrency: usize,
    /// Jobs waiting at most (`KILN_JOB_QUEUE`, default 256).
    pub queue: usize,
    /// Ended jobs kept at most (`KILN_JOB_KEEP`, default 1000).
    pub keep: u32,
    /// How long ended jobs are kept (`KILN_JOB_RETENTION_SECS`, default 7 days).
    pub retention: Duration,
}

impl Settings {
    pub(crate) fn from_env() -> Result<Settings, CoreError> {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
        Ok(Settings {
            concurrency: positive_env("KILN_JOB_CONCURRENCY")?.unwrap_or((2 * cpus).max(2))
                as usize,
            queue: positive_env("KILN_JOB_QUEUE")?.unwrap_or(DEFAULT_QUEUE) as usize,
            keep: positive_env("KILN_JOB_KEEP")?
                .unwrap_or(DEFAULT_KEEP)
                .min(u64::from(u32::MAX)) as u32,
            retention: positive_env("KILN_JOB_RETENTION_SECS")?
                .map_or(DEFAULT_RETENTION, Duration::from_secs),
        })
    }
}

/// Why a job in flight is told to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// `DELETE /v1/jobs/{id}`.
    Cancelled,
    /// The daemon stops.
    Interrupted,
}

/// The jobs of one engine.
pub(crate) struct Jobs {
    settings: Settings,
    state: Mutex<State>,
    /// Wakes the dispatcher: a job was queued, or the daemon stops.
    wake: Notify,
    /// One permit per running job.
    slots: Arc<Semaphore>,
    /// Runners alive (a daemon stop waits for none).
    runners: watch::Sender<usize>,
    /// Toolchain versions, by image id (asked of a sandbox once per image build).
    versions: Mutex<HashMap<String, String>>,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Arc<Live>>,
    /// Queued and running jobs.
    live: HashMap<JobId, Arc<Live>>,
    closed: bool,
}

impl Jobs {
    pub(crate) fn new(settings: Settings) -> Jobs {
        Jobs {
            settings,
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            slots: Arc::new(Semaphore::new(settings.concurrency)),
            runners: watch::channel(0).0,
            versions: Mutex::new(HashMap::new()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn live(&self, id: &JobId) -> Option<Arc<Live>> {
        self.state().live.get(id).cloned()
    }
}

/// A job in flight: its request, its record and output so far, and who follows it.
pub(crate) struct Live {
    id: JobId,
    req: JobRequest,
    language: Language,
    inner: Mutex<LiveInner>,
    events: broadcast::Sender<JobEvent>,
    /// True once the job ended (and its end is stored).
    done: watch::Sender<bool>,
    /// True once its sandbox is gone too (a runner's last step).
    released: watch::Sender<bool>,
    stop: watch::Sender<Option<Stop>>,
}

struct LiveInner {
    info: JobInfo,
    compile: Capture,
    stdout: Capture,
    stderr: Capture,
}

impl LiveInner {
    fn capture(&mut self, stream: JobStream) -> &mut Capture {
        match stream {
            JobStream::Compile => &mut self.compile,
            JobStream::Stdout => &mut self.stdout,
            JobStream::Stderr => &mut self.stderr,
        }
    }

    /// The record with the output so far.
    fn snapshot(&self) -> JobInfo {
        let mut info = self.info.clone();
        info.stdout = self.stdout.text();
        info.stderr = self.stderr.text();
        info.stdout_truncated = self.stdout.truncated;
        info.stderr_truncated = self.stderr.truncated;
        if let Some(c) = &mut info.compile {
            c.output = self.compile.text();
            c.output_truncated = self.compile.truncated;
        }
        info
    }
}

impl Live {
    fn new(id: JobId, req: JobRequest, language: Language, info: JobInfo) -> Arc<Live> {
        Arc::new(Live {
            id,
            req,
            language,
            inner: Mutex::new(LiveInner {
                info,
                compile: Capture::default(),
                stdout: Capture::default(),
                stderr: Capture::default(),
            }),
            events: broadcast::channel(EVENT_BACKLOG).0,
            done: watch::channel(false).0,
            released: watch::channel(false).0,
            stop: watch::channel(None).0,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LiveInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The record with the output so far.
    fn info(&self) -> JobInfo {
        self.lock().snapshot()
    }

    /// Changes the record (not its status).
    fn update(&self, f: impl FnOnce(&mut JobInfo)) {
        f(&mut self.lock().info);
    }

    /// Moves the job to `running`, stores and publishes it.
    fn set_running(&self, engine: &Engine) {
        let mut inner = self.lock();
        inner.info.status = JobStatus::Running;
        inner.info.queue_position = None;
        inner.info.timing.queued_ms =
            Some(unix_now_ms().saturating_sub(inner.info.created_unix_ms));
        store(engine, &inner.snapshot());
        let _ = self.events.send(JobEvent::Status {
            status: JobStatus::Running,
        });
    }

    /// Stores the record as it is now (the sandbox it got, for recovery after a crash).
    fn persist(&self, engine: &Engine) {
        store(engine, &self.lock().snapshot());
    }

    /// Keeps `data` of `stream` (up to the job's `max_output`) and publishes the text that
    /// became complete; true once the stream is over its limit.
    fn output(&self, stream: JobStream, data: &[u8]) -> bool {
        let mut inner = self.lock();
        let cap = inner.capture(stream);
        let text = cap.push(data, self.req.max_output_bytes());
        let over = cap.truncated;
        if !text.is_empty() {
            let _ = self.events.send(JobEvent::Output { stream, data: text });
        }
        over
    }

    /// Ends the job: `f` sets its end; the record is completed, stored, published as `end`,
    /// and the job leaves the table. Only the first call counts.
    fn finish(&self, engine: &Engine, f: impl FnOnce(&mut JobInfo)) -> JobInfo {
        let mut inner = self.lock();
        if inner.info.status.is_final() {
            return inner.snapshot();
        }
        for stream in [JobStream::Compile, JobStream::Stdout, JobStream::Stderr] {
            let rest = inner.capture(stream).finish();
            if !rest.is_empty() {
                let _ = self.events.send(JobEvent::Output { stream, data: rest });
            }
        }
        f(&mut inner.info);
        debug_assert!(inner.info.status.is_final());
        let now = unix_now_ms();
        inner.info.finished_unix_ms = Some(now);
        inner.info.queue_position = None;
        inner.info.sandbox = None;
        inner.info.timing.total_ms = Some(now.saturating_sub(inner.info.created_unix_ms));
        let info = inner.snapshot();
        store(engine, &info);
        let _ = self.events.send(JobEvent::End {
            job: Box::new(info.clone()),
        });
        drop(inner);
        engine.jobs.state().live.remove(&self.id);
        self.done.send_replace(true);
        info
    }

    /// What happened so far as events, and a receiver of what follows (subscribed under the
    /// same lock that publishes, so nothing is missed or seen twice).
    fn subscribe(&self) -> (Vec<JobEvent>, broadcast::Receiver<JobEvent>) {
        let inner = self.lock();
        let mut replay = vec![JobEvent::Status {
            status: inner.info.status,
        }];
        for (stream, cap) in [
            (JobStream::Compile, &inner.compile),
            (JobStream::Stdout, &inner.stdout),
            (JobStream::Stderr, &inner.stderr),
        ] {
            let data = cap.emitted_text();
            if !data.is_empty() {
                replay.push(JobEvent::Output { stream, data });
            }
        }
        (replay, self.events.subscribe())
    }
}

/// Stores a job's record (a failure is logged: the job goes on, its record in memory is
/// still right).
fn store(engine: &Engine, info: &JobInfo) {
    let json = serde_json::to_string(info).unwrap_or_default();
    let summary = serde_json::to_string(&JobSummary::from(info)).unwrap_or_default();
    if let Err(e) = engine
        .store
        .job_update(info.id.as_str(), info.status.as_str(), &json, &summary)
    {
        warn!(job_id = %info.id, error = %crate::error::error_chain(&e), "could not store a job");
    }
}

/// A job's events: what happened so far, then (while it runs) what follows; the stream ends
/// after `end`.
pub struct JobEvents {
    /// What happened so far (ending with `end` for a job that ended).
    pub replay: Vec<JobEvent>,
    /// What follows, for a job in flight.
    pub follow: Option<broadcast::Receiver<JobEvent>>,
}

/// The image a language's jobs run in.
fn image_of(language: Language) -> Result<ImageName, CoreError> {
    Ok(language.image().parse()?)
}

impl Engine {
    /// Queues a job; it runs as soon as a slot and the host's budget have room, in the order
    /// jobs were submitted. Refused when the request breaks a limit, the language is unknown,
    /// its image is not built, or the queue is full (`queue_full`).
    pub fn job_submit(&self, req: JobRequest) -> Result<JobInfo, CoreError> {
        req.validate()?;
        let language =
            Language::parse(&req.language).map_err(|e| CoreError::BadRequest(e.to_string()))?;
        if req.files.contains_key(language.source_file()) {
            return Err(CoreError::BadRequest(format!(
                "files: {} is the program's own file in {}",
                language.source_file(),
                language
            )));
        }
        let image = image_of(language)?;
        if kiln_image::get(self.home.root(), image.as_str())?.is_none() {
            return Err(CoreError::ImageNotFound {
                name: format!(
                    "{image} (the image of {language} jobs; build it with `kiln image build {image}`)"
                ),
            });
        }
        let mut state = self.jobs.state();
        if state.closed {
            return Err(CoreError::HostSetup("the daemon is stopping".into()));
        }
        if state.queue.len() >= self.jobs.settings.queue {
            return Err(CoreError::QueueFull {
                queued: state.queue.len(),
                max: self.jobs.settings.queue,
                retry_after_secs: QUEUE_RETRY_SECS,
            });
        }
        let id = JobId::random();
        let info = JobInfo {
            queue_position: Some(state.queue.len() as u32),
            ..JobInfo::queued(
                id.clone(),
                language.to_string(),
                unix_now_ms(),
                req.timeout_secs(),
                req.max_output_bytes(),
            )
        };
        self.store.job_insert(&kiln_store::StoredJob {
            id: id.to_string(),
            created_ms: info.created_unix_ms,
            status: info.status.as_str().to_owned(),
            language: info.language.clone(),
            request: serde_json::to_string(&req).unwrap_or_default(),
            info: serde_json::to_string(&info).unwrap_or_default(),
            summary: serde_json::to_string(&JobSummary::from(&info)).unwrap_or_default(),
        })?;
        let live = Live::new(id.clone(), req, language, info.clone());
        state.queue.push_back(Arc::clone(&live));
        state.live.insert(id, live);
        drop(state);
        self.jobs.wake.notify_one();
        Ok(info)
    }

    /// A job: in flight (with its output so far and, if queued, its place) or ended. With
    /// `wait`, answers once the job has ended or `wait` has passed.
    pub async fn job_get(&self, id: &JobId, wait: Option<Duration>) -> Result<JobInfo, CoreError> {
        if let (Some(wait), Some(live)) = (wait, self.jobs.live(id)) {
            let mut done = live.done.subscribe();
            let _ = tokio::time::timeout(wait, done.wait_for(|d| *d)).await;
        }
        self.job_info(id)
    }

    fn job_info(&self, id: &JobId) -> Result<JobInfo, CoreError> {
        let state = self.jobs.state();
        if let Some(live) = state.live.get(id) {
            let mut info = live.info();
            info.queue_position = state
                .queue
                .iter()
                .position(|l| l.id == *id)
                .map(|p| p as u32);
            return Ok(info);
        }
        drop(state);
        let json = self
            .store
            .job_info(id.as_str())?
            .ok_or_else(|| CoreError::JobNotFound(id.to_string()))?;
        serde_json::from_str(&json).map_err(|e| {
            CoreError::Store(kiln_store::StoreError::Corrupt(format!("job {id}: {e}")))
        })
    }

    /// Jobs, newest first: of one status and language if given, at most `limit`.
    pub fn job_list(
        &self,
        status: Option<JobStatus>,
        language: Option<&str>,
        limit: u32,
    ) -> Result<JobList, CoreError> {
        let language = language
            .map(|l| Language::parse(l).map_err(|e| CoreError::BadRequest(e.to_string())))
            .transpose()?;
        let rows = self.store.job_summaries(&kiln_store::JobFilter {
            status: status.map(|s| s.as_str().to_owned()),
            language: language.map(|l| l.to_string()),
            limit,
        })?;
        let jobs = rows
            .iter()
            .filter_map(|r| serde_json::from_str::<JobSummary>(r).ok())
            .collect();
        Ok(JobList { jobs })
    }

    /// Cancels a queued or running job and returns it as it ended, once its sandbox is gone
    /// (waited for up to 30 s); a job that had ended already is returned as it is.
    pub async fn job_cancel(&self, id: &JobId) -> Result<JobInfo, CoreError> {
        let Some(live) = self.jobs.live(id) else {
            return self.job_info(id);
        };
        let queued = {
            let mut state = self.jobs.state();
            let before = state.queue.len();
            state.queue.retain(|l| l.id != *id);
            state.queue.len() != before
        };
        if queued {
            return Ok(live.finish(self, |j| {
                j.status = JobStatus::Cancelled;
                j.error = Some("cancelled while queued".into());
            }));
        }
        live.stop.send_replace(Some(Stop::Cancelled));
        // Answered once the job has ended and its sandbox is gone.
        let mut released = live.released.subscribe();
        let _ = tokio::time::timeout(Duration::from_secs(30), released.wait_for(|d| *d)).await;
        self.job_info(id)
    }

    /// A job's events; see [`JobEvents`].
    pub fn job_events(&self, id: &JobId) -> Result<JobEvents, CoreError> {
        if let Some(live) = self.jobs.live(id) {
            let (replay, follow) = live.subscribe();
            return Ok(JobEvents {
                replay,
                follow: Some(follow),
            });
        }
        let info = self.job_info(id)?;
        let mut replay = vec![JobEvent::Status {
            status: info.status,
        }];
        let outputs = [
            (
                JobStream::Compile,
                info.compile.as_ref().map(|c| c.output.clone()),
            ),
            (JobStream::Stdout, Some(info.stdout.clone())),
            (JobStream::Stderr, Some(info.stderr.clone())),
        ];
        for (stream, data) in outputs {
            if let Some(data) = data.filter(|d| !d.is_empty()) {
                replay.push(JobEvent::Output { stream, data });
            }
        }
        replay.push(JobEvent::End {
            job: Box::new(info),
        });
        Ok(JobEvents {
            replay,
            follow: None,
        })
    }

    /// The languages, whether their images are built, and their toolchains' versions (asked
    /// of a sandbox of each built image the first time, then kept per image build).
    pub async fn language_list(self: &Arc<Self>) -> Result<LanguageList, CoreError> {
        let mut probes = Vec::new();
        let mut entries = Vec::new();
        for &language in Language::all() {
            let info = language.info();
            let manifest = kiln_image::get(self.home.root(), info.image)?;
            let version = manifest.as_ref().and_then(|m| {
                self.jobs
                    .versions
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&m.id.to_string())
                    .cloned()
            });
            if let (Some(m), None) = (&manifest, &version) {
                probes.push((entries.len(), language, m.id.to_string()));
            }
            entries.push(LanguageEntry {
                id: info.id.to_owned(),
                name: info.display_name.to_owned(),
                aliases: info.aliases.iter().map(|a| (*a).to_owned()).collect(),
                image: info.image.to_owned(),
                compiled: info.compile.is_some(),
                source_file: info.source_file.to_owned(),
                warmup: info.warmup.iter().map(|a| (*a).to_owned()).collect(),
                image_built: manifest.is_some(),
                version,
            });
        }
        let asked = futures_util::future::join_all(
            probes
                .iter()
                .map(|(_, language, _)| run::version(self, *language)),
        )
        .await;
        for ((at, language, image_id), answer) in probes.into_iter().zip(asked) {
            match answer {
                Ok(v) => {
                    self.jobs
                        .versions
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(image_id, v.clone());
                    entries[at].version = Some(v);
                }
                Err(e) => {
                    warn!(%language, error = %crate::error::error_chain(&e), "could not ask the toolchain's version")
                }
            }
        }
        Ok(LanguageList { languages: entries })
    }

    /// At the engine's start: jobs that were running are `interrupted` (their sandboxes
    /// removed), queued ones are queued again in their order, old ones pruned, and the
    /// dispatcher starts.
    pub(crate) async fn jobs_start(self: &Arc<Self>) -> Result<(), CoreError> {
        for row in self.store.jobs_unfinished()? {
            let Ok(mut info) = serde_json::from_str::<JobInfo>(&row.info) else {
                warn!(job_id = row.id, "unreadable job record; left as it is");
                continue;
            };
            let queued = row.status == JobStatus::Queued.as_str();
            let request = serde_json::from_str::<JobRequest>(&row.request).ok();
            let language = request
                .as_ref()
                .and_then(|r| Language::parse(&r.language).ok());
            match (queued, request, language) {
                (true, Some(req), Some(language)) => {
                    let mut state = self.jobs.state();
                    let live = Live::new(info.id.clone(), req, language, info);
                    state.queue.push_back(Arc::clone(&live));
                    state.live.insert(live.id.clone(), live);
                }
                _ => {
                    if let Some(sb) = info.sandbox.take()
                        && let Err(e) = self.sandbox_delete(&sb).await
                        && !matches!(e, CoreError::SandboxNotFound(_))
                    {
                        warn!(job_id = %info.id, sandbox_id = %sb, error = %crate::error::error_chain(&e), "could not remove an interrupted job's sandbox");
                    }
                    let now = unix_now_ms();
                    info.status = if queued {
                        JobStatus::Error
                    } else {
                        JobStatus::Interrupted
                    };
                    info.error = Some(if queued {
                        "its stored request could not be read after a daemon restart".into()
                    } else {
                        "the daemon stopped while the job ran".into()
                    });
                    info.finished_unix_ms = Some(now);
                    info.timing.total_ms = Some(now.saturating_sub(info.created_unix_ms));
                    store(self, &info);
                    info!(job_id = %info.id, status = %info.status, "job ended by a daemon restart");
                }
            }
        }
        self.jobs_prune();
        tokio::spawn(dispatch(Arc::clone(self)));
        Ok(())
    }

    fn jobs_prune(&self) {
        let s = self.jobs.settings;
        let before = unix_now_ms().saturating_sub(s.retention.as_millis() as u64);
        match self.store.jobs_prune(before, s.keep) {
            Ok(0) => {}
            Ok(n) => info!(jobs = n, "pruned ended jobs"),
            Err(e) => warn!(error = %crate::error::error_chain(&e), "could not prune jobs"),
        }
    }

    /// At a daemon stop: no job starts any more, running ones end `interrupted` (their
    /// sandboxes removed; waited for up to 20 s), queued ones stay queued for the next start.
    pub(crate) async fn jobs_shutdown(&self) {
        let running: Vec<Arc<Live>> = {
            let mut state = self.jobs.state();
            state.closed = true;
            let queued: Vec<JobId> = state.queue.iter().map(|l| l.id.clone()).collect();
            state
                .live
                .values()
                .filter(|l| !queued.contains(&l.id))
                .cloned()
                .collect()
        };
        self.jobs.slots.close();
        self.jobs.wake.notify_waiters();
        for live in &running {
            live.stop.send_replace(Some(Stop::Interrupted));
        }
        let mut runners = self.jobs.runners.subscribe();
        if tokio::time::timeout(SHUTDOWN_WAIT, runners.wait_for(|n| *n == 0))
            .await
            .is_err()
        {
            warn!("jobs still running after 20 s of the daemon's stop");
        }
    }
}

/// Hands queued jobs, oldest first, to runners as slots free up; ends at the daemon's stop.
async fn dispatch(engine: Arc<Engine>) {
    let jobs = &engine.jobs;
    loop {
        // Waits for a queued job (registered before looking, so no wake-up is lost).
        let notified = jobs.wake.notified();
        let (front, closed) = {
            let state = jobs.state();
            (state.queue.front().cloned(), state.closed)
        };
        if closed {
            return;
        }
        let Some(front) = front else {
            notified.await;
            continue;
        };
        drop(notified);
        let Ok(permit) = Arc::clone(&jobs.slots).acquire_owned().await else {
            return;
        };
        // The job may have been cancelled while this waited for the slot.
        let taken = {
            let mut state = jobs.state();
            if state.closed {
                return;
            }
            match state.queue.front() {
                Some(l) if Arc::ptr_eq(l, &front) => state.queue.pop_front(),
                _ => None,
            }
        };
        let Some(live) = taken else {
            continue;
        };
        live.set_running(&engine);
        jobs.runners.send_modify(|n| *n += 1);
        let engine = Arc::clone(&engine);
        tokio::spawn(async move {
            run::run(&engine, &live).await;
            engine.jobs_prune();
            engine.jobs.runners.send_modify(|n| *n -= 1);
            drop(permit);
        });
    }
}

/// The compile step's record once it ran.
fn compile_record(exit_code: Option<i32>) -> JobCompile {
    JobCompile {
        exit_code,
        output: String::new(),
        output_truncated: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Home;

    fn record(id: &str, status: JobStatus, sandbox: Option<&str>) -> JobInfo {
        JobInfo {
            status,
            sandbox: sandbox.map(|s| s.parse().unwrap()),
            // Now: an old job would be pruned at the start.
            ..JobInfo::queued(id.parse().unwrap(), "python", unix_now_ms(), 30, 1 << 20)
        }
    }

    fn insert(store: &kiln_store::Store, info: &JobInfo, request: &str) {
        store
            .job_insert(&kiln_store::StoredJob {
                id: info.id.to_string(),
                created_ms: info.created_unix_ms,
                status: info.status.as_str().into(),
                language: info.language.clone(),
                request: request.into(),
                info: serde_json::to_string(info).unwrap(),
                summary: serde_json::to_string(&JobSummary::from(info)).unwrap(),
            })
            .unwrap();
    }

    /// What a daemon that died left: a running job (with a sandbox that is gone too), a
    /// queued one, and a queued one whose request cannot be read.
    #[tokio::test]
    async fn a_restart_interrupts_running_jobs_and_runs_queued_ones() {
        let tmp = tempfile::tempdir().unwrap();
        let home = Home::new(tmp.path().to_owned());
        home.ensure().unwrap();
        {
            let store = kiln_store::Store::open(&home.database()).unwrap();
            let req = serde_json::to_string(&JobRequest::new("py", "print(1)")).unwrap();
            insert(
                &store,
                &record(
                    "job-000000000001",
                    JobStatus::Running,
                    Some("sb-0123456789ab"),
                ),
                &req,
            );
            insert(
                &store,
                &record("job-000000000002", JobStatus::Queued, None),
                &req,
            );
            insert(
                &store,
                &record("job-000000000003", JobStatus::Queued, None),
                "{",
            );
        }
        let engine = Engine::start(home).await.unwrap();
        let get = |id: &str| {
            let id: JobId = id.parse().unwrap();
            let engine = Arc::clone(&engine);
            async move { engine.job_get(&id, Some(Duration::from_secs(10))).await }
        };
        let running = get("job-000000000001").await.unwrap();
        assert_eq!(running.status, JobStatus::Interrupted);
        assert!(running.error.unwrap().contains("daemon stopped"));
        assert_eq!(running.sandbox, None);
        let unreadable = get("job-000000000003").await.unwrap();
        assert_eq!(unreadable.status, JobStatus::Error);
        // The queued job ran after the start: its image is not built here, which it says.
        let queued = get("job-000000000002").await.unwrap();
        assert_eq!(queued.status, JobStatus::Error, "{queued:?}");
        assert!(queued.error.unwrap().contains("python"));
        assert!(queued.timing.queued_ms.is_some());
        // Nothing is left in flight, and the list has all three, newest first.
        // (A job from before the retention would have been pruned at the start.)
        assert!(engine.jobs.state().live.is_empty());
        let list = engine.job_list(None, None, 10).unwrap();
        let ids: Vec<String> = list.jobs.iter().map(|j| j.id.to_string()).collect();
        assert_eq!(
            ids,
            ["job-000000000003", "job-000000000002", "job-000000000001"]
        );
    }

    #[tokio::test]
    async fn submissions_are_checked_before_they_are_queued() {
        let tmp = tempfile::tempdir().unwrap();
        let engine = Engine::start(Home::new(tmp.path().to_owned()))
            .await
            .unwrap();
        let err = engine
            .job_submit(JobRequest::new("cobol", "x"))
            .unwrap_err();
        assert!(
            matches!(&err, CoreError::BadRequest(m) if m.contains("python")),
            "{err}"
        );
        let mut own = JobRequest::new("python", "x");
        own.files.insert("main.py".into(), "y".into());
        let err = engine.job_submit(own).unwrap_err();
        assert!(
            matches!(&err, CoreError::BadRequest(m) if m.contains("main.py")),
            "{err}"
        );
        let err = engine
            .job_submit(JobRequest::new("go", "package main"))
            .unwrap_err();
        assert!(
            matches!(&err, CoreError::ImageNotFound { name } if name.contains("kiln image build go")),
            "{err}"
        );
        assert!(engine.job_list(None, None, 10).unwrap().jobs.is_empty());
        let err = engine
            .job_get(&"job-0123456789ab".parse().unwrap(), None)
            .await
            .unwrap_err();
        assert!(matches!(err, CoreError::JobNotFound(_)));
    }
}
