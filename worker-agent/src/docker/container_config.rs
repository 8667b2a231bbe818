//! Pure translation of a [`Job`] into Docker's create request: deterministic name, labels and
//! the hardened host config. Kept free of I/O so it is unit-tested without a daemon.

use std::collections::HashMap;

use bollard::models::{ContainerCreateBody, HostConfig, HostConfigLogConfig, Mount, MountType};

use crate::executor::Job;

pub const LABEL_RUN: &str = "drover.run";
pub const LABEL_ATTEMPT: &str = "drover.attempt";
pub const LABEL_EPOCH: &str = "drover.epoch";
pub const LABEL_TENANT: &str = "drover.tenant";
pub const LABEL_AGENT: &str = "drover.agent";

/// Where the attempt's workspace is mounted, and the working directory.
pub const WORKSPACE_MOUNT: &str = "/workspace";
/// `nobody:nogroup`: containers never run as root.
pub const DEFAULT_USER: (u32, u32) = (65534, 65534);
/// The writable `/tmp` every container gets (the root filesystem is read-only by default).
const TMP_OPTIONS: &str = "rw,noexec,nosuid,size=64m,mode=1777";

/// `drover-<run_id>-<attempt>-<epoch>`: the same command always names the same container, so a
/// redelivery finds the container instead of creating a second one.
pub fn container_name(job: &Job) -> String {
    job.name()
}

/// Labels that let the agent (and operators) find drover's containers and tell which lease
/// they belong to, e.g. when reconciling after a restart.
pub fn container_labels(job: &Job) -> HashMap<String, String> {
    HashMap::from([
        (LABEL_RUN.to_owned(), job.run_id.to_string()),
        (LABEL_ATTEMPT.to_owned(), job.attempt.to_string()),
        (LABEL_EPOCH.to_owned(), job.lease_epoch.to_string()),
        (LABEL_TENANT.to_owned(), job.tenant_id.clone()),
        (LABEL_AGENT.to_owned(), job.agent_id.to_string()),
    ])
}

/// The create request. `cmd` is the spec's argv as given (never wrapped in a shell); the
/// image's ENTRYPOINT, if it has one, stays in force as Docker defines. Hardening is on by
/// default: no new privileges, every capability dropped, no network unless the spec asks,
/// pids/memory/cpu limits from the (already defaulted) spec, the non-root `user`, a
/// read-only root filesystem unless the spec asks for a writable one; writable are the
/// workspace (bind-mounted at `/workspace`, the working directory) and a small `/tmp`.
pub fn container_body(job: &Job, user: (u32, u32)) -> ContainerCreateBody {
    let spec = &job.spec;
    let mut env: Vec<String> = (spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .chain(job.secret_env.iter())
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    env.push(format!("DROVER_WORKSPACE={WORKSPACE_MOUNT}"));
    let memory = i64::try_from(spec.resources.memory_bytes).unwrap_or(i64::MAX);
    ContainerCreateBody {
        image: Some(spec.image.clone()),
        cmd: Some(spec.command.clone()),
        env: Some(env),
        labels: Some(container_labels(job)),
        user: Some(format!("{}:{}", user.0, user.1)),
        working_dir: Some(WORKSPACE_MOUNT.to_owned()),
        tty: Some(false),
        attach_stdin: Some(false),
        open_stdin: Some(false),
        host_config: Some(HostConfig {
            security_opt: Some(vec!["no-new-privileges".to_owned()]),
            cap_drop: Some(vec!["ALL".to_owned()]),
            network_mode: Some(spec.network.as_str().to_owned()),
            pids_limit: Some(i64::from(spec.resources.pids)),
            memory: Some(memory),
            // Equal to `memory`: no swap on top of the limit.
            memory_swap: Some(memory),
            nano_cpus: Some(nano_cpus(spec.resources.cpus)),
            // Docker is the agent's journal: the container must outlive its exit until the
            // API has accepted the completion report.
            auto_remove: Some(false),
            log_config: Some(log_config()),
            readonly_rootfs: Some(!spec.writable_rootfs),
            mounts: Some(vec![Mount {
                target: Some(WORKSPACE_MOUNT.to_owned()),
                source: Some(job.workspace.to_string_lossy().into_owned()),
                typ: Some(MountType::BIND),
                read_only: Some(false),
                ..Default::default()
            }]),
            tmpfs: Some(HashMap::from([("/tmp".to_owned(), TMP_OPTIONS.to_owned())])),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The agent follows a container's output through Docker's log, and following a json-file
/// log across a rotation loses output (the daemon here rotates at 10 MB by default): a run
/// printing 50 MB kept 4.6 MB. One file per container, rotated only past 1 GB, keeps every
/// byte of any sane run while still bounding the disk a runaway one can fill. The log lives
/// as long as the container, which the agent removes once the API settled the run.
fn log_config() -> HostConfigLogConfig {
    HostConfigLogConfig {
        typ: Some("json-file".to_owned()),
        config: Some(HashMap::from([
            ("max-size".to_owned(), "1g".to_owned()),
            ("max-file".to_owned(), "1".to_owned()),
        ])),
    }
}

/// Cores to Docker's billionths of a CPU. Specs are validated to 0.01..=64 cores.
fn nano_cpus(cpus: f64) -> i64 {
    (cpus * 1e9).round() as i64
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_core::ids::{AgentId, LeaseEpoch, RunId};
    use drover_core::spec::RawSpec;

    fn job() -> Job {
        let spec = RawSpec {
            image: "drover/busybox:latest".into(),
            command: vec!["sh".into(), "-c".into(), "echo $GREETING".into()],
            env: vec![("GREETING".into(), "hi there".into())],
            cpus: 0.5,
            memory_bytes: 64 * 1024 * 1024,
            pids: 50,
            ..Default::default()
        }
        .validate()
        .unwrap();
        Job {
            run_id: RunId::new(),
            attempt: 2,
            lease_epoch: LeaseEpoch(7),
            tenant_id: "00000000-0000-0000-0000-000000000001".into(),
            agent_id: AgentId::parse("host-1").unwrap(),
            spec,
            secret_env: Default::default(),
            workspace: "/var/tmp/ws/drover-x".into(),
        }
    }

    #[test]
    fn name_is_deterministic_per_lease() {
        let j = job();
        assert_eq!(container_name(&j), format!("drover-{}-2-7", j.run_id));
        assert_eq!(container_name(&j), container_name(&j.clone()));
        let next_epoch = Job {
            lease_epoch: LeaseEpoch(8),
            ..j.clone()
        };
        assert_ne!(container_name(&j), container_name(&next_epoch));
    }

    #[test]
    fn labels_identify_the_lease() {
        let j = job();
        let labels = container_labels(&j);
        assert_eq!(labels[LABEL_RUN], j.run_id.to_string());
        assert_eq!(labels[LABEL_ATTEMPT], "2");
        assert_eq!(labels[LABEL_EPOCH], "7");
        assert_eq!(labels[LABEL_TENANT], j.tenant_id);
        assert_eq!(labels[LABEL_AGENT], "host-1");
    }

    #[test]
    fn body_is_argv_env_and_hardened() {
        let body = container_body(&job(), DEFAULT_USER);
        assert_eq!(body.image.as_deref(), Some("drover/busybox:latest"));
        assert_eq!(
            body.cmd.unwrap(),
            vec!["sh".to_owned(), "-c".into(), "echo $GREETING".into()]
        );
        assert_eq!(
            body.env.unwrap(),
            vec![
                "GREETING=hi there".to_owned(),
                "DROVER_WORKSPACE=/workspace".into()
            ]
        );
        assert_eq!(body.user.as_deref(), Some("65534:65534"));
        assert_eq!(body.working_dir.as_deref(), Some("/workspace"));
        let host = body.host_config.unwrap();
        assert_eq!(host.readonly_rootfs, Some(true));
        let mounts = host.mounts.clone().unwrap();
        assert_eq!(mounts.len(), 1);
        assert_eq!(mounts[0].target.as_deref(), Some("/workspace"));
        assert_eq!(mounts[0].source.as_deref(), Some("/var/tmp/ws/drover-x"));
        assert_eq!(mounts[0].typ, Some(MountType::BIND));
        assert_eq!(mounts[0].read_only, Some(false));
        assert!(host.tmpfs.clone().unwrap().contains_key("/tmp"));
        assert_eq!(
            host.security_opt.unwrap(),
            vec!["no-new-privileges".to_owned()]
        );
        assert_eq!(host.cap_drop.unwrap(), vec!["ALL".to_owned()]);
        assert_eq!(host.network_mode.as_deref(), Some("none"));
        assert_eq!(host.pids_limit, Some(50));
        assert_eq!(host.memory, Some(64 * 1024 * 1024));
        assert_eq!(host.memory_swap, host.memory);
        assert_eq!(host.nano_cpus, Some(500_000_000));
        assert_eq!(host.auto_remove, Some(false));
        assert_eq!(host.privileged, None);
    }

    #[test]
    fn bridge_network_only_when_asked() {
        let mut j = job();
        j.spec.network = drover_core::spec::Network::Bridge;
        let host = container_body(&j, DEFAULT_USER).host_config.unwrap();
        assert_eq!(host.network_mode.as_deref(), Some("bridge"));
    }

    #[test]
    fn writable_rootfs_only_when_asked() {
        let mut j = job();
        j.spec.writable_rootfs = true;
        let host = container_body(&j, (1000, 1000)).host_config.unwrap();
        assert_eq!(host.readonly_rootfs, Some(false));
    }
}
