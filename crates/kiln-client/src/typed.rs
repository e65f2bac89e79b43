//! One method per API operation, named like its operation id (`sandbox_create` for
//! `POST /v1/sandboxes`). Each is a thin wrapper over [`Client::call`] and friends with the
//! route constant of [`kiln_api_types::routes`]; no other logic belongs here.

use kiln_api_types::routes;
use kiln_api_types::{
    CloudeJob, JobCreated, JobEvent, JobId, JobInfo, JobList, JobRequest, LanguageList,
};
use kiln_api_types::{DesktopViewRequest, DesktopViewResponse};
use kiln_api_types::{
    DiskUsage, DoctorReport, Event, ExecId, ExecInfo, ExecKillRequest, ExecList, ExecRequest,
    FileInfo, FileList, FileMkdirRequest, FileRenameRequest, Health, ImageBuildEvent,
    ImageBuildRecipeRequest, ImageBuildRequest, ImageImportRequest, ImageList, NetworkUpdate,
    PingResponse, PruneReport, PruneRequest, SandboxId, SandboxInfo, SandboxList, SandboxSpec,
    SandboxStartRequest, SecretsUpdateRequest, SnapshotCreateRequest, SnapshotInfo, SnapshotList,
    TtlRequest,
};

use crate::{Client, Result, WsStream};

/// No request body.
const NONE: Option<&()> = None;

impl Client {
    /// `GET /v1/health`.
    pub async fn health(&self) -> Result<Health> {
        self.call(routes::HEALTH_GET, &[], NONE).await
    }

    /// `GET /v1/openapi.json`.
    pub async fn openapi(&self) -> Result<serde_json::Value> {
        self.call(routes::OPENAPI_GET, &[], NONE).await
    }

    /// `GET /v1/doctor`.
    pub async fn doctor(&self) -> Result<DoctorReport> {
        self.call(routes::DOCTOR_GET, &[], NONE).await
    }

    /// `GET /v1/sandboxes`, with filters (`("label", "K=V")`, `("status", "running")`,
    /// `("name", "web")`).
    pub async fn sandbox_list(&self, filters: &[(&str, &str)]) -> Result<SandboxList> {
        self.call_with_query(routes::SANDBOX_LIST, &[], filters, NONE)
            .await
    }

    /// `POST /v1/sandboxes`.
    pub async fn sandbox_create(&self, spec: &SandboxSpec) -> Result<SandboxInfo> {
        self.call(routes::SANDBOX_CREATE, &[], Some(spec)).await
    }

    /// `GET /v1/sandboxes/{id}`.
    pub async fn sandbox_get(&self, id: &SandboxId) -> Result<SandboxInfo> {
        self.sandbox_find(id.as_str()).await
    }

    /// `GET /v1/sandboxes/{id}` with an id, a name or an unambiguous id prefix.
    pub async fn sandbox_find(&self, key: &str) -> Result<SandboxInfo> {
        self.call(routes::SANDBOX_GET, &[key], NONE).await
    }

    /// `POST /v1/sandboxes/{id}/pause`.
    pub async fn sandbox_pause(&self, id: &SandboxId) -> Result<SandboxInfo> {
        self.call(routes::SANDBOX_PAUSE, &[id.as_str()], NONE).await
    }

    /// `POST /v1/sandboxes/{id}/resume`.
    pub async fn sandbox_resume(&self, id: &SandboxId) -> Result<SandboxInfo> {
        self.call(routes::SANDBOX_RESUME, &[id.as_str()], NONE)
            .await
    }

    /// `POST /v1/sandboxes/{id}/stop`.
    pub async fn sandbox_stop(&self, id: &SandboxId) -> Result<SandboxInfo> {
        self.call(routes::SANDBOX_STOP, &[id.as_str()], NONE).await
    }

    /// `POST /v1/sandboxes/{id}/start`.
    pub async fn sandbox_start(
        &self,
        id: &SandboxId,
        req: &SandboxStartRequest,
    ) -> Result<SandboxInfo> {
        self.call(routes::SANDBOX_START, &[id.as_str()], Some(req))
            .await
    }

    /// `POST /v1/sandboxes/{id}/ttl`.
    pub async fn sandbox_ttl_set(&self, id: &SandboxId, req: &TtlRequest) -> Result<SandboxInfo> {
        self.call(routes::SANDBOX_TTL_SET, &[id.as_str()], Some(req))
            .await
    }

    /// `POST /v1/sandboxes/{id}/network`: a new network policy.
    pub async fn sandbox_network_set(
        &self,
        id: &SandboxId,
        req: &NetworkUpdate,
    ) -> Result<SandboxInfo> {
        self.call(routes::SANDBOX_NETWORK_SET, &[id.as_str()], Some(req))
            .await
    }

    /// `POST /v1/sandboxes/{id}/execs`: a detached command.
    pub async fn exec_detach(&self, id: &SandboxId, req: &ExecRequest) -> Result<ExecInfo> {
        self.call(routes::EXEC_DETACH, &[id.as_str()], Some(req))
            .await
    }

    /// `GET /v1/sandboxes/{id}/execs`.
    pub async fn exec_list(&self, id: &SandboxId) -> Result<ExecList> {
        self.call(routes::EXEC_LIST, &[id.as_str()], NONE).await
    }

    /// `GET /v1/execs/{exec_id}`.
    pub async fn exec_get(&self, id: &ExecId) -> Result<ExecInfo> {
        self.call(routes::EXEC_GET, &[id.as_str()], NONE).await
    }

    /// `POST /v1/execs/{exec_id}/kill`.
    pub async fn exec_kill(&self, id: &ExecId, req: &ExecKillRequest) -> Result<ExecInfo> {
        self.call(routes::EXEC_KILL, &[id.as_str()], Some(req))
            .await
    }

    /// `GET /v1/execs/{exec_id}/attach`: the attach WebSocket.
    pub async fn exec_attach(&self, id: &ExecId) -> Result<WsStream> {
        self.websocket(routes::EXEC_ATTACH, &[id.as_str()]).await
    }

    /// `GET /v1/sandboxes/{id}/logs`: `on_chunk` sees the console text as it arrives (until
    /// it answers `false`); with `follow` the stream lasts as long as the sandbox's VM.
    pub async fn sandbox_logs<E>(
        &self,
        id: &SandboxId,
        follow: bool,
        on_chunk: impl FnMut(&[u8]) -> Result<bool, E>,
    ) -> Result<()>
    where
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let query: &[(&str, &str)] = if follow { &[("follow", "true")] } else { &[] };
        self.stream_bytes(routes::SANDBOX_LOGS, &[id.as_str()], query, on_chunk)
            .await
    }

    /// `PUT /v1/sandboxes/{id}/files`: writes `reader`'s bytes to `path` (a tar archive
    /// unpacked into the directory `path` with `tar`).
    pub async fn file_write(
        &self,
        id: &SandboxId,
        path: &str,
        mode: Option<u32>,
        tar: bool,
        reader: impl tokio::io::AsyncRead + Send + Unpin + 'static,
    ) -> Result<FileInfo> {
        let mode = mode.map(|m| format!("{m:o}"));
        let mut query = vec![("path", path)];
        if let Some(m) = &mode {
            query.push(("mode", m));
        }
        if tar {
            query.push(("tar", "true"));
        }
        let content_type = if tar {
            "application/x-tar"
        } else {
            "application/octet-stream"
        };
        self.upload(
            routes::FILE_WRITE,
            &[id.as_str()],
            &query,
            content_type,
            reader,
        )
        .await
    }

    /// `GET /v1/sandboxes/{id}/files`: the bytes of `path` (a tar archive of the directory
    /// with `tar`).
    pub async fn file_read(
        &self,
        id: &SandboxId,
        path: &str,
        tar: bool,
    ) -> Result<crate::ByteStream> {
        let mut query = vec![("path", path)];
        if tar {
            query.push(("tar", "true"));
        }
        self.download(routes::FILE_READ, &[id.as_str()], &query)
            .await
    }

    /// `GET /v1/sandboxes/{id}/files/stat`.
    pub async fn file_stat(&self, id: &SandboxId, path: &str) -> Result<FileInfo> {
        self.call_with_query(routes::FILE_STAT, &[id.as_str()], &[("path", path)], NONE)
            .await
    }

    /// `GET /v1/sandboxes/{id}/files/list`: one page.
    pub async fn file_list(
        &self,
        id: &SandboxId,
        path: &str,
        after: Option<&str>,
    ) -> Result<FileList> {
        let mut query = vec![("path", path)];
        if let Some(a) = after {
            query.push(("after", a));
        }
        self.call_with_query(routes::FILE_LIST, &[id.as_str()], &query, NONE)
            .await
    }

    /// `POST /v1/sandboxes/{id}/files/mkdir`.
    pub async fn file_mkdir(&self, id: &SandboxId, req: &FileMkdirRequest) -> Result<FileInfo> {
        self.call(routes::FILE_MKDIR, &[id.as_str()], Some(req))
            .await
    }

    /// `DELETE /v1/sandboxes/{id}/files`.
    pub async fn file_remove(&self, id: &SandboxId, path: &str, recursive: bool) -> Result<()> {
        let mut query = vec![("path", path)];
        if recursive {
            query.push(("recursive", "true"));
        }
        let path = routes::FILE_REMOVE
            .path_with(&[id.as_str()])
            .map_err(crate::ClientError::Route)?;
        self.call_no_content_path(routes::FILE_REMOVE, path, &query)
            .await
    }

    /// `POST /v1/sandboxes/{id}/files/rename`.
    pub async fn file_rename(&self, id: &SandboxId, req: &FileRenameRequest) -> Result<FileInfo> {
        self.call(routes::FILE_RENAME, &[id.as_str()], Some(req))
            .await
    }

    /// `GET /v1/events`: `on_subscribed` is called once the daemon has subscribed this client
    /// (no later event is missed), `on_event` sees each event until it answers `false` or the
    /// daemon ends the stream; `on_lagged` is told how many events this client missed when it
    /// fell behind.
    pub async fn event_stream<E>(
        &self,
        on_subscribed: impl FnMut(),
        on_event: impl FnMut(Event) -> Result<bool, E>,
        on_lagged: impl FnMut(u64),
    ) -> Result<()>
    where
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        self.server_events(
            routes::EVENT_STREAM,
            &[],
            on_subscribed,
            on_event,
            on_lagged,
        )
        .await
    }

    /// A server-sent event stream of `T`s: `: subscribed` comments go to `on_subscribed`,
    /// `event: lagged` entries (how many events this reader missed) to `on_lagged`, each
    /// `data:` line to `on_event` until it answers `false` or the stream ends.
    async fn server_events<T, E>(
        &self,
        route: routes::Route,
        params: &[&str],
        mut on_subscribed: impl FnMut(),
        mut on_event: impl FnMut(T) -> Result<bool, E>,
        mut on_lagged: impl FnMut(u64),
    ) -> Result<()>
    where
        T: serde::de::DeserializeOwned,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let mut lagged = false;
        self.stream_text_lines(
            route,
            params,
            |line| -> std::result::Result<bool, Box<dyn std::error::Error + Send + Sync>> {
                if line == "event: lagged" {
                    lagged = true;
                    return Ok(true);
                }
                if line == ": subscribed" {
                    on_subscribed();
                    return Ok(true);
                }
                let Some(data) = line.strip_prefix("data: ") else {
                    return Ok(true);
                };
                if std::mem::take(&mut lagged) {
                    let missed = serde_json::from_str::<serde_json::Value>(data)
                        .ok()
                        .and_then(|v| v["missed"].as_u64())
                        .unwrap_or(0);
                    on_lagged(missed);
                    return Ok(true);
                }
                match serde_json::from_str::<T>(data) {
                    Ok(ev) => on_event(ev).map_err(Into::into),
                    Err(e) => Err(Box::new(e).into()),
                }
            },
        )
        .await
    }

    /// `DELETE /v1/sandboxes/{id}`.
    pub async fn sandbox_delete(&self, id: &SandboxId) -> Result<()> {
        self.call_no_content(routes::SANDBOX_DELETE, &[id.as_str()], NONE)
            .await
    }

    /// `POST /v1/sandboxes/{id}/ping`.
    pub async fn sandbox_ping(&self, id: &SandboxId) -> Result<PingResponse> {
        self.call(routes::SANDBOX_PING, &[id.as_str()], NONE).await
    }

    /// `POST /v1/sandboxes/{id}/secrets`.
    pub async fn sandbox_secrets_update(
        &self,
        id: &SandboxId,
        req: &SecretsUpdateRequest,
    ) -> Result<()> {
        self.call_no_content(routes::SANDBOX_SECRETS_UPDATE, &[id.as_str()], Some(req))
            .await
    }

    /// `POST /v1/sandboxes/{id}/desktop/view`: a browser link to a desktop sandbox's screen.
    pub async fn desktop_view(
        &self,
        id: &SandboxId,
        req: &DesktopViewRequest,
    ) -> Result<DesktopViewResponse> {
        self.call(routes::DESKTOP_VIEW, &[id.as_str()], Some(req))
            .await
    }

    /// `GET /v1/sandboxes/{id}/exec`: the exec WebSocket (send an `ExecRequest` first).
    pub async fn sandbox_exec(&self, id: &SandboxId) -> Result<WsStream> {
        self.websocket(routes::SANDBOX_EXEC, &[id.as_str()]).await
    }

    /// `GET /v1/run`: the run WebSocket (send a `RunRequest` first).
    pub async fn sandbox_run(&self) -> Result<WsStream> {
        self.websocket(routes::SANDBOX_RUN, &[]).await
    }

    /// `POST /v1/sandboxes/{id}/snapshot`.
    pub async fn snapshot_create(
        &self,
        id: &SandboxId,
        req: &SnapshotCreateRequest,
    ) -> Result<SnapshotInfo> {
        self.call(routes::SNAPSHOT_CREATE, &[id.as_str()], Some(req))
            .await
    }

    /// `GET /v1/snapshots`.
    pub async fn snapshot_list(&self) -> Result<SnapshotList> {
        self.call(routes::SNAPSHOT_LIST, &[], NONE).await
    }

    /// `DELETE /v1/snapshots/{name}`.
    pub async fn snapshot_delete(&self, name: &str) -> Result<()> {
        self.call_no_content(routes::SNAPSHOT_DELETE, &[name], NONE)
            .await
    }

    /// `POST /v1/jobs`: the job's id (it runs in the background).
    pub async fn job_create(&self, req: &JobRequest) -> Result<JobCreated> {
        self.call(routes::JOB_CREATE, &[], Some(req)).await
    }

    /// `GET /v1/jobs`, with filters (`("status", "running")`, `("language", "python")`,
    /// `("limit", "20")`).
    pub async fn job_list(&self, filters: &[(&str, &str)]) -> Result<JobList> {
        self.call_with_query(routes::JOB_LIST, &[], filters, NONE)
            .await
    }

    /// `GET /v1/jobs/{job_id}`; with `wait_secs`, the daemon answers once the job has ended
    /// or that many seconds have passed, whichever is first.
    pub async fn job_get(&self, id: &JobId, wait_secs: Option<u64>) -> Result<JobInfo> {
        let wait = wait_secs.map(|w| w.to_string());
        let query: Vec<(&str, &str)> = wait.iter().map(|w| ("wait", w.as_str())).collect();
        self.call_with_query(routes::JOB_GET, &[id.as_str()], &query, NONE)
            .await
    }

    /// `DELETE /v1/jobs/{job_id}`: cancels the job; returns it as it ended.
    pub async fn job_cancel(&self, id: &JobId) -> Result<JobInfo> {
        self.call(routes::JOB_CANCEL, &[id.as_str()], NONE).await
    }

    /// `GET /v1/jobs/{job_id}/events`: `on_event` sees each event (output replayed first)
    /// until it answers `false` or the stream ends after `end`. A reader that fell behind
    /// missed some output (the `end` record has all of it); `on_lagged` is told how many
    /// events it missed.
    pub async fn job_events<E>(
        &self,
        id: &JobId,
        on_event: impl FnMut(JobEvent) -> Result<bool, E>,
        on_lagged: impl FnMut(u64),
    ) -> Result<()>
    where
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        self.server_events(
            routes::JOB_EVENTS,
            &[id.as_str()],
            || {},
            on_event,
            on_lagged,
        )
        .await
    }

    /// `GET /v1/languages`: the languages of jobs, with their versions.
    pub async fn language_list(&self) -> Result<LanguageList> {
        self.call(routes::LANGUAGE_LIST, &[], NONE).await
    }

    /// `POST /run`: cloude's spelling of [`Client::job_create`].
    pub async fn cloude_run(&self, req: &JobRequest) -> Result<JobCreated> {
        self.call(routes::CLOUDE_RUN, &[], Some(req)).await
    }

    /// `GET /status/{id}`: a job in cloude's shape.
    pub async fn cloude_status(&self, id: &JobId) -> Result<CloudeJob> {
        self.call(routes::CLOUDE_STATUS, &[id.as_str()], NONE).await
    }

    /// `GET /v1/pools`.
    pub async fn pool_list(&self) -> Result<kiln_api_types::PoolList> {
        self.call(routes::POOL_LIST, &[], NONE).await
    }

    /// `PUT /v1/pools/{image}`.
    pub async fn pool_set(
        &self,
        image: &str,
        req: &kiln_api_types::PoolSetRequest,
    ) -> Result<kiln_api_types::PoolInfo> {
        self.call(routes::POOL_SET, &[image], Some(req)).await
    }

    /// `GET /v1/sandboxes/{id}/desktop/screenshot`: the PNG, scaled to `width` if given.
    pub async fn desktop_screenshot(&self, id: &SandboxId, width: Option<u32>) -> Result<Vec<u8>> {
        use tokio::io::AsyncReadExt;
        let width = width.map(|w| w.to_string());
        let query: Vec<(&str, &str)> = width.iter().map(|w| ("width", w.as_str())).collect();
        let mut stream = self
            .download(routes::DESKTOP_SCREENSHOT, &[id.as_str()], &query)
            .await?;
        let mut png = Vec::new();
        stream
            .read_to_end(&mut png)
            .await
            .map_err(crate::ClientError::Read)?;
        Ok(png)
    }

    /// `POST /v1/sandboxes/{id}/desktop/actions`.
    pub async fn desktop_act(
        &self,
        id: &SandboxId,
        action: &kiln_api_types::DesktopAction,
        q: &kiln_api_types::ActionQuery,
    ) -> Result<kiln_api_types::ActionReceipt> {
        let width = q.width.map(|w| w.to_string());
        let settle = q.settle_ms.map(|m| m.to_string());
        let mut query: Vec<(&str, &str)> = Vec::new();
        if q.screenshot {
            query.push(("screenshot", "true"));
        }
        if let Some(w) = &width {
            query.push(("width", w));
        }
        if let Some(m) = &settle {
            query.push(("settle_ms", m));
        }
        self.call_with_query(routes::DESKTOP_ACT, &[id.as_str()], &query, Some(action))
            .await
    }

    /// `POST /v1/sandboxes/{id}/review/export`.
    pub async fn review_export(
        &self,
        id: &SandboxId,
        req: &kiln_api_types::ReviewExportRequest,
    ) -> Result<kiln_api_types::ReviewExport> {
        self.call(routes::REVIEW_EXPORT, &[id.as_str()], Some(req))
            .await
    }

    /// `GET /v1/images`.
    pub async fn image_list(&self) -> Result<ImageList> {
        self.call(routes::IMAGE_LIST, &[], NONE).await
    }

    /// `POST /v1/images/{name}/build`; `on_event` sees each event, the last one `done` or
    /// `error`.
    pub async fn image_build<E>(
        &self,
        name: &str,
        req: &ImageBuildRequest,
        on_event: impl FnMut(ImageBuildEvent) -> Result<(), E>,
    ) -> Result<()>
    where
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        self.stream_lines(routes::IMAGE_BUILD, &[name], req, on_event)
            .await
    }

    /// `POST /v1/builds`: builds a recipe file; events as [`Client::image_build`].
    pub async fn image_build_recipe<E>(
        &self,
        req: &ImageBuildRecipeRequest,
        on_event: impl FnMut(ImageBuildEvent) -> Result<(), E>,
    ) -> Result<()>
    where
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        self.stream_lines(routes::IMAGE_BUILD_RECIPE, &[], req, on_event)
            .await
    }

    /// `POST /v1/imports`: imports a container image or a disk image; events as
    /// [`Client::image_build`].
    pub async fn image_import<E>(
        &self,
        req: &ImageImportRequest,
        on_event: impl FnMut(ImageBuildEvent) -> Result<(), E>,
    ) -> Result<()>
    where
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        self.stream_lines(routes::IMAGE_IMPORT, &[], req, on_event)
            .await
    }

    /// `DELETE /v1/images/{name}`.
    pub async fn image_delete(&self, name: &str) -> Result<()> {
        self.call_no_content(routes::IMAGE_DELETE, &[name], NONE)
            .await
    }

    /// `GET /v1/system/df`.
    pub async fn system_df(&self) -> Result<DiskUsage> {
        self.call(routes::SYSTEM_DF, &[], NONE).await
    }

    /// `POST /v1/system/prune`.
    pub async fn system_prune(&self, dry_run: bool) -> Result<PruneReport> {
        self.call(routes::SYSTEM_PRUNE, &[], Some(&PruneRequest { dry_run }))
            .await
    }
}
