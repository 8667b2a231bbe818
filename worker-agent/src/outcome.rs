//! What the agent tells the API about how an attempt ended: outcome, exit code, whether the
//! host (not the process) was to blame, and a reason whose machine-readable prefix (before
//! ':') clients can match on. The wording is chosen here, once, and never carries backend
//! (Docker) text.
//!
//! `infrastructure_error` is set only when the host failed the attempt (image unavailable,
//! container could not be created or started, the agent lost track of it): the API retries
//! those whenever attempts remain. A process that exits non-zero, runs out of memory or time
//! is the run's own doing.

use std::time::Duration;

use drover_proto::v1 as pb;

use crate::executor::Termination;
use crate::supervise::{Ending, Finished};

/// The reported verdict on one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub outcome: pb::Outcome,
    /// Set when the process ran and its exit code is known.
    pub exit_code: Option<i32>,
    pub reason: String,
    pub infrastructure_error: bool,
}

impl Verdict {
    /// A failure of the run itself before or instead of running the process (e.g. a spec
    /// this agent cannot use).
    pub fn failed(reason: impl Into<String>) -> Self {
        Self {
            outcome: pb::Outcome::Failed,
            exit_code: None,
            reason: reason.into(),
            infrastructure_error: false,
        }
    }

    /// A failure caused by the host; retried by the API whenever attempts remain.
    pub fn infrastructure(reason: impl Into<String>) -> Self {
        Self {
            infrastructure_error: true,
            ..Self::failed(reason)
        }
    }

    pub fn image_unavailable(image: &str) -> Self {
        Self::infrastructure(format!(
            "image_unavailable: image {image} is not present on this host"
        ))
    }

    /// The pull policy `always` asked for a pull that failed.
    pub fn image_pull_failed(image: &str) -> Self {
        Self::infrastructure(format!(
            "image_unavailable: image {image} could not be pulled"
        ))
    }

    /// The spec names an executor this agent does not run. Not an infrastructure error:
    /// dispatch does not route by executor, so a retry would likely land on an agent of the
    /// same kind; the client targets agents that allow it (pool, labels) instead.
    pub fn executor_unavailable(requested: &str, allowed: &str) -> Self {
        Self::failed(format!(
            "executor_unavailable: executor {requested} is not allowed on this agent (allowed: {allowed})"
        ))
    }

    /// The attempt's workspace could not be prepared on this host.
    pub fn workspace_failed() -> Self {
        Self::infrastructure("workspace_error: the workspace could not be prepared on this host")
    }

    /// The workspace could not be seeded from `inputs_from_run`; `detail` is the agent's
    /// own text (paths and API refusals, never file contents).
    pub fn inputs_unavailable(detail: &str, infrastructure: bool) -> Self {
        let reason = format!("inputs_unavailable: {detail}");
        if infrastructure {
            Self::infrastructure(reason)
        } else {
            Self::failed(reason)
        }
    }

    pub fn start_failed() -> Self {
        Self::infrastructure("start_failed: the container could not be started on this host")
    }

    pub fn lost_track() -> Self {
        Self::infrastructure("executor_error: the agent lost track of the container")
    }

    /// A cancel that arrived before the process was started: it never ran.
    pub fn cancelled_before_start() -> Self {
        Self {
            outcome: pb::Outcome::Cancelled,
            exit_code: None,
            reason: "cancelled before start".to_owned(),
            infrastructure_error: false,
        }
    }

    /// The agent is draining and gives a lease back it never started.
    pub fn handed_back_before_start() -> Self {
        Self {
            outcome: pb::Outcome::HandedBack,
            exit_code: None,
            reason: "handed_back: the agent is draining; not started".to_owned(),
            infrastructure_error: false,
        }
    }

    /// The verdict on a supervised execution; `None` when it was stopped (lease revoked or a
    /// report refused as stale), which is not reported: the lease is no longer ours.
    pub fn of(finished: &Finished) -> Option<Self> {
        let code = finished.exit.and_then(|s| s.code);
        match finished.ending {
            Ending::Stopped => None,
            Ending::TimedOut { limit } => Some(Self {
                outcome: pb::Outcome::TimedOut,
                exit_code: code,
                reason: format!("timeout: exceeded {} s", limit.as_secs()),
                infrastructure_error: false,
            }),
            Ending::Cancelled { grace, termination } => Some(Self {
                outcome: pb::Outcome::Cancelled,
                exit_code: code,
                reason: cancelled_reason(grace, termination, code),
                infrastructure_error: false,
            }),
            Ending::HandedBack => Some(Self {
                outcome: pb::Outcome::HandedBack,
                exit_code: code,
                reason: "handed_back: the agent drained and stopped the run".to_owned(),
                infrastructure_error: false,
            }),
            Ending::Exited => Some(match finished.exit {
                Some(status) => match status.code {
                    Some(0) => Self {
                        outcome: pb::Outcome::Succeeded,
                        exit_code: Some(0),
                        reason: "exited with code 0".to_owned(),
                        infrastructure_error: false,
                    },
                    Some(code) if status.oom_killed => Self {
                        exit_code: Some(code),
                        ..Self::failed(format!(
                            "oom_killed: exceeded its memory limit (exited with code {code})"
                        ))
                    },
                    Some(code) => Self {
                        exit_code: Some(code),
                        ..Self::failed(format!("exited with code {code}"))
                    },
                    None => Self::infrastructure("executor_error: the exit code could not be read"),
                },
                None => Self::infrastructure("executor_error: the exit code could not be read"),
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
            infrastructure_error: self.infrastructure_error,
            artifact_upload_id: String::new(),
            started_executor: String::new(),
            inline_artifacts: Vec::new(),
        }
    }
}

fn cancelled_reason(grace: Duration, termination: Termination, code: Option<i32>) -> String {
    let exited = match code {
        Some(c) => format!(", exited with code {c}"),
        None => String::new(),
    };
    match termination {
        Termination::Exited => format!("cancelled: stopped on request{exited}"),
        Termination::Killed => format!(
            "cancelled: killed after ignoring SIGTERM for {} s{exited}",
            grace.as_secs()
        ),
    }
}

#[cfg(test)]
mod tests {
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
        assert!(
            !bad.infrastructure_error,
            "a non-zero exit is the run's own"
        );
        let oom = Verdict::of(&finished(Ending::Exited, Some(137), true)).unwrap();
        assert!(oom.reason.starts_with("oom_killed:"), "{}", oom.reason);
        assert!(!oom.infrastructure_error);
        let unknown = Verdict::of(&finished(Ending::Exited, None, false)).unwrap();
        assert_eq!(unknown.outcome, pb::Outcome::Failed);
        assert_eq!(unknown.exit_code, None);
        assert!(unknown.infrastructure_error);
    }

    #[test]
    fn timeouts_are_timed_out_with_the_exit_code() {
        let limit = Duration::from_secs(5);
        let v = Verdict::of(&finished(Ending::TimedOut { limit }, Some(137), false)).unwrap();
        assert_eq!(v.outcome, pb::Outcome::TimedOut);
        assert_eq!(v.exit_code, Some(137));
        assert_eq!(v.reason, "timeout: exceeded 5 s");
        assert!(!v.infrastructure_error);
    }

    #[test]
    fn cancels_say_how_the_process_went() {
        let grace = Duration::from_secs(2);
        let polite = Verdict::of(&finished(
            Ending::Cancelled {
                grace,
                termination: Termination::Exited,
            },
            Some(143),
            false,
        ))
        .unwrap();
        assert_eq!(polite.outcome, pb::Outcome::Cancelled);
        assert_eq!(polite.exit_code, Some(143));
        assert_eq!(
            polite.reason,
            "cancelled: stopped on request, exited with code 143"
        );
        let stubborn = Verdict::of(&finished(
            Ending::Cancelled {
                grace,
                termination: Termination::Killed,
            },
            Some(137),
            false,
        ))
        .unwrap();
        assert_eq!(
            stubborn.reason,
            "cancelled: killed after ignoring SIGTERM for 2 s, exited with code 137"
        );
        let before = Verdict::cancelled_before_start();
        assert_eq!(before.outcome, pb::Outcome::Cancelled);
        assert_eq!(before.reason, "cancelled before start");
        assert_eq!(before.exit_code, None);
    }

    #[test]
    fn hand_backs_and_stops() {
        let v = Verdict::of(&finished(Ending::HandedBack, Some(137), false)).unwrap();
        assert_eq!(v.outcome, pb::Outcome::HandedBack);
        assert!(v.reason.starts_with("handed_back:"));
        assert_eq!(
            Verdict::handed_back_before_start().outcome,
            pb::Outcome::HandedBack
        );
        assert!(Verdict::of(&finished(Ending::Stopped, Some(137), false)).is_none());
    }

    #[test]
    fn host_failures_are_infrastructure_errors() {
        let v = Verdict::image_unavailable("nope:1");
        assert_eq!(
            v.reason,
            "image_unavailable: image nope:1 is not present on this host"
        );
        assert!(v.infrastructure_error);
        assert!(Verdict::start_failed().infrastructure_error);
        assert!(Verdict::image_pull_failed("x").infrastructure_error);
        assert!(Verdict::workspace_failed().infrastructure_error);
        let unavailable = Verdict::executor_unavailable("docker", "mock");
        assert!(!unavailable.infrastructure_error);
        assert!(unavailable.reason.starts_with("executor_unavailable: "));
        assert!(Verdict::lost_track().infrastructure_error);
        assert!(!Verdict::failed("invalid_spec: x").infrastructure_error);
        let req = v.into_request("r".into(), 4, Vec::new(), false);
        assert_eq!(req.outcome, i32::from(pb::Outcome::Failed));
        assert_eq!(req.exit_code, None);
        assert_eq!(req.lease_epoch, 4);
        assert!(req.infrastructure_error);
    }
}
