//! Reading an existing container back into a [`FoundExecution`]: which lease it belongs to
//! (its `drover.*` labels), whether it runs, and for how long. Pure, so the parsing of labels
//! an operator (or another tool) may have mangled is unit-tested without a daemon.

use std::time::Duration;

use bollard::models::{ContainerInspectResponse, ContainerStateStatusEnum};
use chrono::{DateTime, Utc};
use drover_core::ids::{LeaseEpoch, RunId};

use super::container_config::{LABEL_ATTEMPT, LABEL_EPOCH, LABEL_RUN};
use crate::executor::{ExecHandle, FoundExecution, FoundStatus};

/// The lease a container was created for, or why its labels cannot say.
pub fn found_from_inspect(info: &ContainerInspectResponse) -> Result<FoundExecution, String> {
    let id = info.id.clone().ok_or("no container id")?;
    let name = info
        .name
        .as_deref()
        .map(|n| n.trim_start_matches('/').to_owned())
        .unwrap_or_else(|| id.clone());
    let labels = info
        .config
        .as_ref()
        .and_then(|c| c.labels.as_ref())
        .ok_or("no labels")?;
    let label = |key: &str| {
        labels
            .get(key)
            .map(String::as_str)
            .ok_or_else(|| format!("no {key} label"))
    };
    let run_id: RunId = label(LABEL_RUN)?
        .parse()
        .map_err(|_| format!("unreadable {LABEL_RUN} label"))?;
    let attempt: u32 = label(LABEL_ATTEMPT)?
        .parse()
        .map_err(|_| format!("unreadable {LABEL_ATTEMPT} label"))?;
    let epoch: i64 = label(LABEL_EPOCH)?
        .parse()
        .map_err(|_| format!("unreadable {LABEL_EPOCH} label"))?;
    let state = info.state.as_ref();
    let status = match state.and_then(|s| s.status) {
        Some(ContainerStateStatusEnum::CREATED) | None => FoundStatus::Created,
        Some(
            ContainerStateStatusEnum::RUNNING
            | ContainerStateStatusEnum::PAUSED
            | ContainerStateStatusEnum::RESTARTING,
        ) => FoundStatus::Running,
        Some(_) => FoundStatus::Exited,
    };
    let running_for = match status {
        FoundStatus::Created => Duration::ZERO,
        _ => running_for(state.and_then(|s| s.started_at.as_deref())),
    };
    Ok(FoundExecution {
        handle: ExecHandle { id, name },
        run_id,
        attempt,
        lease_epoch: LeaseEpoch(epoch),
        status,
        running_for,
    })
}

/// Time since Docker's `StartedAt` (RFC 3339; the zero time `0001-01-01…` when never started).
pub fn running_for(started_at: Option<&str>) -> Duration {
    started_at
        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        .map(|t| t.with_timezone(&Utc))
        .filter(|t| t.timestamp() > 0)
        .and_then(|t| (Utc::now() - t).to_std().ok())
        .unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use bollard::models::{ContainerConfig, ContainerState};

    use super::*;

    fn info(labels: &[(&str, &str)], status: ContainerStateStatusEnum) -> ContainerInspectResponse {
        ContainerInspectResponse {
            id: Some("abc".into()),
            name: Some("/drover-x-1-2".into()),
            config: Some(ContainerConfig {
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect::<HashMap<_, _>>(),
                ),
                ..Default::default()
            }),
            state: Some(ContainerState {
                status: Some(status),
                started_at: Some((Utc::now() - chrono::Duration::seconds(5)).to_rfc3339()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn labels_name_the_lease() {
        let run = RunId::new();
        let run_text = run.to_string();
        let labels = [
            (LABEL_RUN, run_text.as_str()),
            (LABEL_ATTEMPT, "1"),
            (LABEL_EPOCH, "2"),
        ];
        let found = found_from_inspect(&info(&labels, ContainerStateStatusEnum::RUNNING)).unwrap();
        assert_eq!(found.run_id, run);
        assert_eq!((found.attempt, found.lease_epoch), (1, LeaseEpoch(2)));
        assert_eq!(found.handle.name, "drover-x-1-2");
        assert_eq!(found.handle.id, "abc");
        assert_eq!(found.status, FoundStatus::Running);
        assert!(found.running_for >= Duration::from_secs(4));

        let exited = found_from_inspect(&info(&labels, ContainerStateStatusEnum::EXITED)).unwrap();
        assert_eq!(exited.status, FoundStatus::Exited);
        let created =
            found_from_inspect(&info(&labels, ContainerStateStatusEnum::CREATED)).unwrap();
        assert_eq!(created.status, FoundStatus::Created);
        assert_eq!(created.running_for, Duration::ZERO);
    }

    #[test]
    fn unreadable_labels_are_refused() {
        let run = RunId::new().to_string();
        let bad_epoch = [
            (LABEL_RUN, run.as_str()),
            (LABEL_ATTEMPT, "1"),
            (LABEL_EPOCH, "x"),
        ];
        let err = found_from_inspect(&info(&bad_epoch, ContainerStateStatusEnum::RUNNING));
        assert!(err.unwrap_err().contains(LABEL_EPOCH));
        let no_run = [(LABEL_ATTEMPT, "1"), (LABEL_EPOCH, "1")];
        let err = found_from_inspect(&info(&no_run, ContainerStateStatusEnum::RUNNING));
        assert!(err.unwrap_err().contains(LABEL_RUN));
    }

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
}
