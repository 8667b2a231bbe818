//! [`Executor`] on the local Docker daemon, through bollard.
//!
//! The daemon may speak an older API than bollard's default (Engine 20.10 speaks 1.41), so the
//! client negotiates the version at connect. Images are pulled as the spec's pull policy says
//! (`if-not-present` by default, `always`, `never`); an image that cannot be had (not present
//! and not pullable, or a pull that fails) fails the attempt with `image_unavailable`, an
//! infrastructure error another host may not have.
//!
//! The container runs as the configured non-root `uid:gid` (setting `run_as_user`), in the
//! attempt's workspace bind-mounted at `/workspace` (handed to that user first), on a
//! read-only root filesystem unless the spec asks for a writable one, with a small tmpfs at
//! `/tmp`.
//!
//! Cancellation is SIGTERM (or the image's `STOPSIGNAL`), a grace period, then SIGKILL, done
//! by hand rather than with `docker stop`: the stop request only answers once the container
//! is gone, and bollard's per-request timeout (120 s) is shorter than the longest grace a spec
//! may ask for (300 s).

mod container_config;
mod found;
mod log_follow;
mod log_frame;

use std::time::Duration;

use bollard::Docker;
use bollard::errors::Error as DockerError;
use bollard::models::{ContainerInspectResponse, ContainerStateStatusEnum};
use bollard::query_parameters::{
    CreateContainerOptions, CreateImageOptions, KillContainerOptions, ListContainersOptions,
    RemoveContainerOptions, WaitContainerOptions,
};
use drover_core::ids::AgentId;
use drover_core::spec::PullPolicy;
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use tracing::Instrument;

pub use container_config::{
    DEFAULT_USER, LABEL_AGENT, LABEL_ATTEMPT, LABEL_EPOCH, LABEL_RUN, LABEL_TENANT, container_body,
    container_labels, container_name,
};
pub use found::found_from_inspect;
use found::running_for;

use crate::executor::{
    ExecError, ExecHandle, Executor, ExitStatus, FoundExecution, Job, OutputStream, Started,
    Termination,
};

/// While terminating, how often to look whether the process has exited.
const EXIT_POLL: Duration = Duration::from_millis(100);

/// bollard's default local socket (not exported by bollard).
const DEFAULT_SOCKET: &str = "unix:///var/run/docker.sock";

/// How long connecting may take before the daemon counts as not answering.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest an image pull may take before the image counts as unavailable.
const PULL_TIMEOUT: Duration = Duration::from_secs(300);

/// Runs each job as one hardened container named after its lease.
#[derive(Clone)]
pub struct DockerExecutor {
    docker: Docker,
    endpoint: String,
    /// `uid:gid` containers run as.
    user: (u32, u32),
}

/// Why the daemon could not be reached, naming where the agent looked.
#[derive(Debug, Clone, thiserror::Error)]
#[error("docker daemon not answering at {endpoint}: {reason}")]
pub struct DockerUnavailable {
    pub endpoint: String,
    pub reason: String,
}

impl DockerExecutor {
    /// Connects to the local daemon (`DOCKER_HOST` if it is a `unix://` address, else
    /// `/var/run/docker.sock`), negotiates the API version and pings it.
    pub async fn connect() -> Result<Self, DockerUnavailable> {
        let endpoint = local_endpoint();
        let unavailable = |reason: String| DockerUnavailable {
            endpoint: endpoint.clone(),
            reason,
        };
        let docker =
            Docker::connect_with_local_defaults().map_err(|e| unavailable(e.to_string()))?;
        let docker = tokio::time::timeout(CONNECT_TIMEOUT, docker.negotiate_version())
            .await
            .map_err(|_| unavailable("no answer to a version request".to_owned()))?
            .map_err(|e| unavailable(e.to_string()))?;
        tokio::time::timeout(CONNECT_TIMEOUT, docker.ping())
            .await
            .map_err(|_| unavailable("no answer to a ping".to_owned()))?
            .map_err(|e| unavailable(e.to_string()))?;
        let version = docker.client_version();
        tracing::info!(%endpoint, api_version = %version, "connected to the docker daemon");
        Ok(Self {
            docker,
            endpoint,
            user: DEFAULT_USER,
        })
    }

    /// Runs containers as `uid:gid` (default 65534:65534).
    pub fn run_as(self, uid: u32, gid: u32) -> Self {
        Self {
            user: (uid, gid),
            ..self
        }
    }

    /// Where the daemon was found, for log lines.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    async fn inspect(&self, name: &str) -> Result<Option<ContainerInspectResponse>, ExecError> {
        match self.docker.inspect_container(name, None).await {
            Ok(info) => Ok(Some(info)),
            Err(e) if status_of(&e) == Some(404) => Ok(None),
            Err(e) => Err(ExecError::backend("inspect container", e)),
        }
    }

    async fn image_present(&self, image: &str) -> Result<bool, ExecError> {
        match self.docker.inspect_image(image).await {
            Ok(_) => Ok(true),
            Err(e) if status_of(&e) == Some(404) => Ok(false),
            Err(e) => Err(ExecError::backend("inspect image", e)),
        }
    }

    /// Pulls `image` (tag `latest` when none is given), bounded by [`PULL_TIMEOUT`].
    async fn pull(&self, image: &str) -> Result<(), ExecError> {
        let unavailable = |reason: String| ExecError::ImageUnavailable {
            image: image.to_owned(),
            reason,
        };
        let options = CreateImageOptions {
            from_image: Some(image.to_owned()),
            ..Default::default()
        };
        tracing::info!(%image, "pulling the image");
        let pulling = async {
            let mut progress = self.docker.create_image(Some(options), None, None);
            while let Some(step) = progress.next().await {
                step.map_err(|e| unavailable(format!("pull failed: {e}")))?;
            }
            Ok(())
        };
        tokio::time::timeout(PULL_TIMEOUT, pulling)
            .instrument(tracing::info_span!("docker.pull", image = %image))
            .await
            .map_err(|_| {
                unavailable(format!(
                    "pull took longer than {} s",
                    PULL_TIMEOUT.as_secs()
                ))
            })?
    }

    /// Makes sure the image is here, as the spec's pull policy allows.
    async fn ensure_image(&self, job: &Job) -> Result<(), ExecError> {
        let image = &job.spec.image;
        match job.spec.image_pull_policy {
            PullPolicy::Always => self.pull(image).await,
            PullPolicy::IfNotPresent if !self.image_present(image).await? => self.pull(image).await,
            PullPolicy::Never if !self.image_present(image).await? => {
                Err(ExecError::ImageUnavailable {
                    image: image.clone(),
                    reason: "not present on this host and the pull policy is never".to_owned(),
                })
            }
            _ => Ok(()),
        }
    }

    /// Finds the job's container, creating it when there is none.
    async fn find_or_create(
        &self,
        job: &Job,
        name: &str,
    ) -> Result<(ContainerInspectResponse, bool), ExecError> {
        if let Some(info) = self.inspect(name).await? {
            return Ok((info, true));
        }
        let image = &job.spec.image;
        self.ensure_image(job).await?;
        let (uid, gid) = self.user;
        crate::workspace::give_to(job.workspace.clone(), uid, gid)
            .await
            .map_err(|e| ExecError::Workspace(e.to_string()))?;
        let options = CreateContainerOptions {
            name: Some(name.to_owned()),
            ..Default::default()
        };
        match self
            .docker
            .create_container(Some(options), container_body(job, self.user))
            .instrument(tracing::info_span!("docker.create", container = %name))
            .await
        {
            Ok(_) => {}
            // Another delivery of the same command created it a moment ago: adopt that one.
            Err(e) if status_of(&e) == Some(409) => {}
            // The image was removed between the check and the create.
            Err(e) if status_of(&e) == Some(404) => {
                return Err(ExecError::ImageUnavailable {
                    image: image.clone(),
                    reason: "removed from this host while the container was created".to_owned(),
                });
            }
            Err(e) => return Err(ExecError::backend("create container", e)),
        }
        let info = self.inspect(name).await?.ok_or_else(|| {
            ExecError::backend("inspect container", "container vanished right after create")
        })?;
        Ok((info, false))
    }

    async fn start_job(&self, job: &Job) -> Result<Started, ExecError> {
        let name = container_name(job);
        let (info, existed) = self.find_or_create(job, &name).await?;
        let run_label = info
            .config
            .as_ref()
            .and_then(|c| c.labels.as_ref())
            .and_then(|l| l.get(LABEL_RUN));
        if run_label.map(String::as_str) != Some(job.run_id.to_string().as_str()) {
            return Err(ExecError::backend(
                "adopt container",
                format!("container {name} exists but is not labelled for this run"),
            ));
        }
        let id = info
            .id
            .clone()
            .ok_or_else(|| ExecError::backend("inspect container", "no container id"))?;
        let handle = ExecHandle { id, name };
        let state = info.state.as_ref();
        let status = state.and_then(|s| s.status);
        match status {
            // Never started (fresh, or created by a delivery that died before starting it):
            // starting it now is this execution's one start.
            Some(ContainerStateStatusEnum::CREATED) | None => {
                if existed {
                    tracing::info!(container = %handle.name, "starting a container created earlier but never started");
                }
                self.docker
                    .start_container(&handle.id, None)
                    .instrument(tracing::info_span!("docker.start", container = %handle.name))
                    .await
                    .map_err(|e| ExecError::backend("start container", e))?;
                Ok(Started {
                    handle,
                    running_for: Duration::ZERO,
                    adopted: false,
                })
            }
            // Running or already finished: adopt, never start twice.
            Some(_) => Ok(Started {
                running_for: running_for(state.and_then(|s| s.started_at.as_deref())),
                handle,
                adopted: true,
            }),
        }
    }

    /// SIGTERM (or the image's stop signal), up to `grace` for the exit, then SIGKILL.
    async fn terminate_container(
        &self,
        handle: &ExecHandle,
        grace: Duration,
    ) -> Result<Termination, ExecError> {
        let Some(info) = self.inspect(&handle.id).await? else {
            return Ok(Termination::Exited);
        };
        if !is_running(&info) {
            return Ok(Termination::Exited);
        }
        let signal = info
            .config
            .as_ref()
            .and_then(|c| c.stop_signal.clone())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "SIGTERM".to_owned());
        let options = KillContainerOptions {
            signal: signal.clone(),
        };
        match self.docker.kill_container(&handle.id, Some(options)).await {
            Ok(()) => {}
            Err(e) if matches!(status_of(&e), Some(404 | 409)) => return Ok(Termination::Exited),
            Err(e) => return Err(ExecError::backend("signal container", e)),
        }
        tracing::info!(container = %handle.name, %signal, grace_s = grace.as_secs(), "asked the container to stop");
        let exited = tokio::time::timeout(grace, async {
            loop {
                match self.inspect(&handle.id).await {
                    Ok(Some(info)) if is_running(&info) => {}
                    Ok(_) => return,
                    // A daemon hiccup: keep looking until the grace runs out.
                    Err(e) => tracing::debug!(error = %e, "inspect while terminating failed"),
                }
                tokio::time::sleep(EXIT_POLL).await;
            }
        })
        .await;
        if exited.is_ok() {
            return Ok(Termination::Exited);
        }
        let options = KillContainerOptions {
            signal: "SIGKILL".to_owned(),
        };
        match self.docker.kill_container(&handle.id, Some(options)).await {
            Ok(()) => {
                tracing::info!(container = %handle.name, "grace period over; killed the container");
                Ok(Termination::Killed)
            }
            // It exited right as the grace ran out.
            Err(e) if matches!(status_of(&e), Some(404 | 409)) => Ok(Termination::Exited),
            Err(e) => Err(ExecError::backend("kill container", e)),
        }
    }

    async fn list_for(&self, agent: &AgentId) -> Result<Vec<FoundExecution>, ExecError> {
        let options = ListContainersOptions {
            all: true,
            filters: Some(
                [(
                    "label".to_owned(),
                    vec![LABEL_RUN.to_owned(), format!("{LABEL_AGENT}={agent}")],
                )]
                .into(),
            ),
            ..Default::default()
        };
        let summaries = self
            .docker
            .list_containers(Some(options))
            .await
            .map_err(|e| ExecError::backend("list containers", e))?;
        let mut found = Vec::with_capacity(summaries.len());
        for summary in summaries {
            let Some(id) = summary.id else { continue };
            // Inspect for what the summary lacks: when the process started.
            let Some(info) = self.inspect(&id).await? else {
                continue; // removed meanwhile
            };
            match found_from_inspect(&info) {
                Ok(f) => found.push(f),
                Err(why) => {
                    tracing::warn!(container_id = %id, %why, "container labelled for this agent but unreadable; leaving it to operators");
                }
            }
        }
        Ok(found)
    }

    async fn find_job(&self, job: &Job) -> Result<Option<FoundExecution>, ExecError> {
        let Some(info) = self.inspect(&container_name(job)).await? else {
            return Ok(None);
        };
        let found = found_from_inspect(&info).map_err(|why| {
            ExecError::backend("adopt container", format!("unreadable labels: {why}"))
        })?;
        if found.run_id != job.run_id || found.lease_epoch != job.lease_epoch {
            return Err(ExecError::backend(
                "adopt container",
                format!(
                    "container {} is not labelled for this lease",
                    found.handle.name
                ),
            ));
        }
        Ok(Some(found))
    }

    async fn exit_status(&self, handle: &ExecHandle) -> Result<ExitStatus, ExecError> {
        let info = self.inspect(&handle.id).await?;
        let state = info.and_then(|i| i.state);
        let code = state
            .as_ref()
            .and_then(|s| s.exit_code)
            .and_then(|c| i32::try_from(c).ok());
        let oom_killed = state.and_then(|s| s.oom_killed).unwrap_or(false);
        Ok(ExitStatus { code, oom_killed })
    }
}

impl Executor for DockerExecutor {
    fn name(&self) -> &'static str {
        "docker"
    }

    fn start<'a>(&'a self, job: &'a Job) -> BoxFuture<'a, Result<Started, ExecError>> {
        self.start_job(job).boxed()
    }

    fn output(&self, handle: &ExecHandle) -> OutputStream {
        log_follow::follow(self.docker.clone(), handle.id.clone())
    }

    fn wait<'a>(&'a self, handle: &'a ExecHandle) -> BoxFuture<'a, Result<ExitStatus, ExecError>> {
        async move {
            let options = WaitContainerOptions {
                condition: "not-running".to_owned(),
            };
            let mut waiting = self.docker.wait_container(&handle.id, Some(options));
            let span = tracing::info_span!("docker.wait", container = %handle.name);
            match waiting.next().instrument(span).await {
                // bollard turns a non-zero exit into this error; the exit is what we waited for.
                Some(Ok(_)) | Some(Err(DockerError::DockerContainerWaitError { .. })) | None => {}
                Some(Err(e)) if status_of(&e) == Some(404) => {
                    return Ok(ExitStatus {
                        code: None,
                        oom_killed: false,
                    });
                }
                Some(Err(e)) => return Err(ExecError::backend("wait for container", e)),
            }
            // The inspected state is the reliable source of the exit code and the OOM flag.
            self.exit_status(handle).await
        }
        .boxed()
    }

    fn kill<'a>(&'a self, handle: &'a ExecHandle) -> BoxFuture<'a, Result<(), ExecError>> {
        async move {
            let options = KillContainerOptions {
                signal: "SIGKILL".to_owned(),
            };
            match self.docker.kill_container(&handle.id, Some(options)).await {
                Ok(()) => Ok(()),
                // 409: not running any more; 404: gone. Either way it is not running.
                Err(e) if matches!(status_of(&e), Some(404 | 409)) => Ok(()),
                Err(e) => Err(ExecError::backend("kill container", e)),
            }
        }
        .boxed()
    }

    fn terminate<'a>(
        &'a self,
        handle: &'a ExecHandle,
        grace: Duration,
    ) -> BoxFuture<'a, Result<Termination, ExecError>> {
        self.terminate_container(handle, grace).boxed()
    }

    fn list<'a>(
        &'a self,
        agent: &'a AgentId,
    ) -> BoxFuture<'a, Result<Vec<FoundExecution>, ExecError>> {
        self.list_for(agent).boxed()
    }

    fn find<'a>(
        &'a self,
        job: &'a Job,
    ) -> BoxFuture<'a, Result<Option<FoundExecution>, ExecError>> {
        self.find_job(job).boxed()
    }

    fn remove<'a>(&'a self, handle: &'a ExecHandle) -> BoxFuture<'a, Result<(), ExecError>> {
        async move {
            let options = RemoveContainerOptions {
                force: true,
                v: true,
                ..Default::default()
            };
            match self
                .docker
                .remove_container(&handle.id, Some(options))
                .await
            {
                Ok(()) => Ok(()),
                // 404: already gone; 409: a removal is already in progress.
                Err(e) if matches!(status_of(&e), Some(404 | 409)) => Ok(()),
                Err(e) => Err(ExecError::backend("remove container", e)),
            }
        }
        .boxed()
    }
}

fn status_of(err: &DockerError) -> Option<u16> {
    match err {
        DockerError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

/// The address bollard's `connect_with_local_defaults` uses, for messages.
fn local_endpoint() -> String {
    std::env::var("DOCKER_HOST")
        .ok()
        .filter(|h| h.starts_with("unix://"))
        .unwrap_or_else(|| DEFAULT_SOCKET.to_owned())
}

fn is_running(info: &ContainerInspectResponse) -> bool {
    info.state.as_ref().and_then(|s| s.running).unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_status_is_extracted() {
        let e = DockerError::DockerResponseServerError {
            status_code: 404,
            message: "No such container".into(),
        };
        assert_eq!(status_of(&e), Some(404));
        let wait = DockerError::DockerContainerWaitError {
            error: String::new(),
            code: 3,
        };
        assert_eq!(status_of(&wait), None);
    }
}
