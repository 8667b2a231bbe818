//! [`Executor`] on the local Docker daemon, through bollard.
//!
//! The daemon may speak an older API than bollard's default (Engine 20.10 speaks 1.41), so the
//! client negotiates the version at connect. Images are never pulled: no registry is
//! reachable from worker hosts, and a silent pull would make a run's behaviour depend on the
//! network; a missing image fails the run with `image_unavailable`.

mod container_config;

use std::time::Duration;

use bollard::Docker;
use bollard::container::LogOutput;
use bollard::errors::Error as DockerError;
use bollard::models::{ContainerInspectResponse, ContainerStateStatusEnum};
use bollard::query_parameters::{
    CreateContainerOptions, KillContainerOptions, LogsOptions, RemoveContainerOptions,
    WaitContainerOptions,
};
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};

pub use container_config::{
    LABEL_AGENT, LABEL_ATTEMPT, LABEL_EPOCH, LABEL_RUN, LABEL_TENANT, container_body,
    container_labels, container_name,
};

use crate::executor::{
    ExecError, ExecHandle, Executor, ExitStatus, Job, OutputChunk, OutputSource, OutputStream,
    Started,
};

/// bollard's default local socket (not exported by bollard).
const DEFAULT_SOCKET: &str = "unix:///var/run/docker.sock";

/// How long connecting may take before the daemon counts as not answering.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs each job as one hardened container named after its lease.
#[derive(Clone)]
pub struct DockerExecutor {
    docker: Docker,
    endpoint: String,
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
        Ok(Self { docker, endpoint })
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
        if !self.image_present(image).await? {
            return Err(ExecError::ImageUnavailable {
                image: image.clone(),
            });
        }
        let options = CreateContainerOptions {
            name: Some(name.to_owned()),
            ..Default::default()
        };
        match self
            .docker
            .create_container(Some(options), container_body(job))
            .await
        {
            Ok(_) => {}
            // Another delivery of the same command created it a moment ago: adopt that one.
            Err(e) if status_of(&e) == Some(409) => {}
            // The image was removed between the check and the create.
            Err(e) if status_of(&e) == Some(404) => {
                return Err(ExecError::ImageUnavailable {
                    image: image.clone(),
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
            // Never started (fresh, or created by a delivery that died before starting it).
            Some(ContainerStateStatusEnum::CREATED) | None => {
                self.docker
                    .start_container(&handle.id, None)
                    .await
                    .map_err(|e| ExecError::backend("start container", e))?;
                Ok(Started {
                    handle,
                    running_for: Duration::ZERO,
                    adopted: existed,
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
        let options = LogsOptions {
            follow: true,
            stdout: true,
            stderr: true,
            ..Default::default()
        };
        self.docker
            .logs(&handle.id, Some(options))
            .filter_map(|item| async move {
                match item {
                    Ok(LogOutput::StdOut { message } | LogOutput::Console { message }) => {
                        Some(Ok(OutputChunk {
                            source: OutputSource::Stdout,
                            data: message.to_vec(),
                        }))
                    }
                    Ok(LogOutput::StdErr { message }) => Some(Ok(OutputChunk {
                        source: OutputSource::Stderr,
                        data: message.to_vec(),
                    })),
                    Ok(LogOutput::StdIn { .. }) => None,
                    Err(e) => Some(Err(ExecError::backend("follow container logs", e))),
                }
            })
            .boxed()
    }

    fn wait<'a>(&'a self, handle: &'a ExecHandle) -> BoxFuture<'a, Result<ExitStatus, ExecError>> {
        async move {
            let options = WaitContainerOptions {
                condition: "not-running".to_owned(),
            };
            let mut waiting = self.docker.wait_container(&handle.id, Some(options));
            match waiting.next().await {
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

/// Time since Docker's `StartedAt` (RFC 3339; the zero time `0001-01-01…` when never started).
fn running_for(started_at: Option<&str>) -> Duration {
    started_at
        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        .map(|t| t.with_timezone(&Utc))
        .filter(|t| t.timestamp() > 0)
        .and_then(|t| (Utc::now() - t).to_std().ok())
        .unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_for_reads_docker_timestamps() {
        assert_eq!(running_for(None), Duration::ZERO);
        assert_eq!(running_for(Some("0001-01-01T00:00:00Z")), Duration::ZERO);
        assert_eq!(running_for(Some("garbage")), Duration::ZERO);
        let ten_s_ago = (Utc::now() - chrono::Duration::seconds(10)).to_rfc3339();
        let d = running_for(Some(&ten_s_ago));
        assert!(
            d >= Duration::from_secs(9) && d <= Duration::from_secs(12),
            "{d:?}"
        );
        // A clock skewed into the future counts as just started.
        let future = (Utc::now() + chrono::Duration::seconds(60)).to_rfc3339();
        assert_eq!(running_for(Some(&future)), Duration::ZERO);
    }

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
