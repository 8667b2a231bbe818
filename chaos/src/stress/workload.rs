//! What each drover run does. A workload turns into a [`pb::RunSpec`]; the load driver does
//! not care which.

use drover_proto::v1 as pb;

/// The image and argv of the no-op container, shared with the `docker` baseline so both run
/// exactly the same thing.
pub const NOOP_IMAGE: &str = "drover/busybox:latest";
pub const NOOP_COMMAND: &[&str] = &["true"];

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    /// `drover/busybox:latest` running `true` in Docker: the container path end to end.
    NoopDocker,
    /// Runs on the agent's mock executor (no container): control-plane throughput. Needs
    /// `RunSpec.executor`/`mock` (proto fields 15/16), which this build does not have yet.
    Mock,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error(
        "the mock workload needs the mock executor (RunSpec.executor = \"mock\", proto fields \
         15/16), which this build of drover does not have; use --workload noop-docker"
    )]
    MockUnavailable,
}

impl Workload {
    pub fn name(self) -> &'static str {
        match self {
            Workload::NoopDocker => "noop-docker",
            Workload::Mock => "mock",
        }
    }

    /// The spec every run of this workload is submitted with.
    pub fn spec(self) -> Result<pb::RunSpec, WorkloadError> {
        match self {
            Workload::NoopDocker => Ok(pb::RunSpec {
                image: NOOP_IMAGE.to_owned(),
                command: NOOP_COMMAND.iter().map(|s| (*s).to_owned()).collect(),
                ..Default::default()
            }),
            Workload::Mock => Err(WorkloadError::MockUnavailable),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs() {
        let spec = Workload::NoopDocker.spec().expect("noop spec");
        assert_eq!(spec.image, NOOP_IMAGE);
        assert_eq!(spec.command, vec!["true".to_owned()]);
        assert!(matches!(
            Workload::Mock.spec(),
            Err(WorkloadError::MockUnavailable)
        ));
    }
}
