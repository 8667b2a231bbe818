//! What the agent tells the API about how an attempt ended: outcome, exit code and a reason
//! whose machine-readable prefix (before ':') clients can match on. The wording is chosen
//! here, once, and never carries backend (Docker) text.

use drover_proto::v1 as pb;

use crate::supervise::{Ending, Finished};

/// The reported verdict on one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub outcome: pb::Outcome,
    /// Set only when the process ran and exited by itself.
    pub exit_code: Option<i32>,
    pub reason: String,
}

impl Verdict {
    /// A failure before or instead of running the process.
    pub fn failed(reason: impl Into<String>) -> Self {
        Self {
            outcome: pb::Outcome::Failed,
            exit_code: None,
            reason: reason.into(),
        }
    }

    pub fn image_unavailable(image: &str) -> Self {
        Self::failed(format!(
            "image_unavailable: image {image} is not present on this host"
        ))
    }

    /// The verdict on a supervised execution; `None` when it was stopped (lease revoked or
    /// agent stopping), which is not reported: the lease is no longer ours to report on.
    pub fn of(finished: &Finished) -> Option<Self> {
        match finished.ending {
            Ending::Stopped => None,
            // TIMED_OUT is a state of its own later; until then a timeout is a failure.
            Ending::TimedOut { limit } => Some(Self::failed(format!(
                "timeout: exceeded {} s",
                limit.as_secs()
            ))),
            Ending::Exited => Some(match finished.exit {
                Some(status) => match status.code {
                    Some(0) => Self {
                        outcome: pb::Outcome::Succeeded,
                        exit_code: Some(0),
                        reason: "exited with code 0".to_owned(),
                    },
                    Some(code) if status.oom_killed => Self {
                        outcome: pb::Outcome::Failed,
                        exit_code: Some(code),
                        reason: format!(
                            "oom_killed: exceeded its memory limit (exited with code {code})"
                        ),
                    },
                    Some(code) => Self {
                        outcome: pb::Outcome::Failed,
                        exit_code: Some(code),
                        reason: format!("exited with code {code}"),
                    },
                    None => Self::failed("executor_error: the exit code could not be read"),
                },
                None => Self::failed("executor_error: the exit code could not be read"),
            }),
        }
    }

    /// The completion report, without the agent id (the API client fills it in).
    pub fn into_request(
        self,
        run_id: String,
        lease_epoch: u64,
        output: Vec<u8>,
        output_truncated: bool,
    ) -> pb::ReportCompletionRequest {
        pb::ReportCompletionRequest {
            agent_id: String::new(),
            run_id,
            lease_epoch,
            outcome: self.outcome.into(),
            exit_code: self.exit_code,
            output,
            output_truncated,
            reason: self.reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::executor::ExitStatus;

    fn finished(ending: Ending, code: Option<i32>, oom: bool) -> Finished {
        Finished {
            ending,
            exit: Some(ExitStatus {
                code,
                oom_killed: oom,
            }),
            output: b"out".to_vec(),
            output_truncated: false,
        }
    }

    #[test]
    fn exit_codes_decide_the_outcome() {
        let ok = Verdict::of(&finished(Ending::Exited, Some(0), false)).unwrap();
        assert_eq!(ok.outcome, pb::Outcome::Succeeded);
        assert_eq!(ok.exit_code, Some(0));
        let bad = Verdict::of(&finished(Ending::Exited, Some(3), false)).unwrap();
        assert_eq!(bad.outcome, pb::Outcome::Failed);
        assert_eq!(bad.exit_code, Some(3));
        assert_eq!(bad.reason, "exited with code 3");
        let oom = Verdict::of(&finished(Ending::Exited, Some(137), true)).unwrap();
        assert!(oom.reason.starts_with("oom_killed:"), "{}", oom.reason);
        let unknown = Verdict::of(&finished(Ending::Exited, None, false)).unwrap();
        assert_eq!(unknown.outcome, pb::Outcome::Failed);
        assert_eq!(unknown.exit_code, None);
    }

    #[test]
    fn timeouts_fail_without_an_exit_code() {
        let limit = Duration::from_secs(5);
        let v = Verdict::of(&finished(Ending::TimedOut { limit }, Some(137), false)).unwrap();
        assert_eq!(v.outcome, pb::Outcome::Failed);
        assert_eq!(v.exit_code, None);
        assert_eq!(v.reason, "timeout: exceeded 5 s");
    }

    #[test]
    fn stopped_runs_are_not_reported() {
        assert!(Verdict::of(&finished(Ending::Stopped, Some(137), false)).is_none());
    }

    #[test]
    fn image_unavailable_has_its_prefix() {
        let v = Verdict::image_unavailable("nope:1");
        assert_eq!(
            v.reason,
            "image_unavailable: image nope:1 is not present on this host"
        );
        let req = v.into_request("r".into(), 4, Vec::new(), false);
        assert_eq!(req.outcome, i32::from(pb::Outcome::Failed));
        assert_eq!(req.exit_code, None);
        assert_eq!(req.lease_epoch, 4);
    }
}
