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
    /// Runs on the agent's mock executor (no container, no process; exits 0 at once):
    /// control-plane throughput. The agents must run or allow the mock executor
    /// (`--spawn-stack` allows it).
    Mock,
}

impl Workload {
    pub fn name(self) -> &'static str {
        match self {
            Workload::NoopDocker => "noop-docker",
            Workload::Mock => "mock",
        }
    }

    /// The spec every run of this workload is submitted with.
    pub fn spec(self) -> pb::RunSpec {
        match self {
            Workload::NoopDocker => pb::RunSpec {
                image: NOOP_IMAGE.to_owned(),
                command: NOOP_COMMAND.iter().map(|s| (*s).to_owned()).collect(),
                ..Default::default()
            },
            Workload::Mock => pb::RunSpec {
                image: NOOP_IMAGE.to_owned(),
                command: NOOP_COMMAND.iter().map(|s| (*s).to_owned()).collect(),
                executor: "mock".to_owned(),
                mock: Some(pb::MockBehavior {
                    exit_code: 0,
                    ..Default::default()
                }),
                ..Default::default()
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs() {
        let spec = Workload::NoopDocker.spec();
        assert_eq!(spec.image, NOOP_IMAGE);
        assert_eq!(spec.command, vec!["true".to_owned()]);
        let mock = Workload::Mock.spec();
        assert_eq!(mock.executor, "mock");
        assert!(mock.mock.is_some());
    }
}
