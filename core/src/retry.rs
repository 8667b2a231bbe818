//! When a failed attempt is tried again, and after how long. The same decision serves the
//! API (an agent reports a failure) and the dispatcher's reaper (a lease expired), so both
//! paths retry alike.
//!
//! Defaults: a lost agent or an infrastructure error (image unavailable, container could not
//! start, the agent lost track of it) is retried while attempts remain; a non-zero exit is
//! final unless the spec lists its code (or asks for every code). A retryable failure with no
//! attempts left ends DEAD_LETTERED (an operator can redrive it); a final one ends FAILED.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::spec::ValidationError;

pub const DEFAULT_INITIAL_BACKOFF_MS: u64 = 1_000;
pub const DEFAULT_MULTIPLIER: f64 = 2.0;
pub const DEFAULT_MAX_BACKOFF_MS: u64 = 300_000;
const MAX_INITIAL_BACKOFF_MS: u64 = 3_600_000;
const MAX_MAX_BACKOFF_MS: u64 = 86_400_000;
const MAX_RETRY_EXIT_CODES: usize = 64;

/// A validated retry policy, stored inside the run spec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetryPolicy {
    pub initial_backoff_ms: u64,
    pub multiplier: f64,
    pub max_backoff_ms: u64,
    pub jitter: f64,
    #[serde(default)]
    pub retry_exit_codes: Vec<i32>,
    #[serde(default)]
    pub retry_any_exit_code: bool,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            initial_backoff_ms: DEFAULT_INITIAL_BACKOFF_MS,
            multiplier: DEFAULT_MULTIPLIER,
            max_backoff_ms: DEFAULT_MAX_BACKOFF_MS,
            jitter: 0.0,
            retry_exit_codes: Vec::new(),
            retry_any_exit_code: false,
        }
    }
}

/// The unvalidated policy as clients send it (zero meaning "default").
#[derive(Debug, Clone, Default)]
pub struct RawRetryPolicy {
    pub initial_backoff_ms: u64,
    pub multiplier: f64,
    pub max_backoff_ms: u64,
    pub jitter: f64,
    pub retry_exit_codes: Vec<i32>,
    pub retry_any_exit_code: bool,
}

fn invalid(field: &'static str, message: &str) -> ValidationError {
    ValidationError {
        field,
        message: message.to_owned(),
    }
}

impl RawRetryPolicy {
    pub fn validate(self) -> Result<RetryPolicy, ValidationError> {
        let initial = match self.initial_backoff_ms {
            0 => DEFAULT_INITIAL_BACKOFF_MS,
            v => v,
        };
        if initial > MAX_INITIAL_BACKOFF_MS {
            return Err(invalid(
                "spec.retry.initial_backoff_ms",
                "must be at most 3600000 (1 h)",
            ));
        }
        let multiplier = if self.multiplier == 0.0 {
            DEFAULT_MULTIPLIER
        } else {
            self.multiplier
        };
        if !multiplier.is_finite() || !(1.0..=10.0).contains(&multiplier) {
            return Err(invalid(
                "spec.retry.multiplier",
                "must be between 1.0 and 10.0",
            ));
        }
        let max = match self.max_backoff_ms {
            0 => DEFAULT_MAX_BACKOFF_MS.max(initial),
            v => v,
        };
        if max > MAX_MAX_BACKOFF_MS || max < initial {
            return Err(invalid(
                "spec.retry.max_backoff_ms",
                "must be at least initial_backoff_ms and at most 86400000 (1 day)",
            ));
        }
        if !self.jitter.is_finite() || !(0.0..=1.0).contains(&self.jitter) {
            return Err(invalid("spec.retry.jitter", "must be between 0.0 and 1.0"));
        }
        if self.retry_exit_codes.len() > MAX_RETRY_EXIT_CODES {
            return Err(invalid("spec.retry.retry_exit_codes", "at most 64 entries"));
        }
        if self.retry_exit_codes.contains(&0) {
            return Err(invalid(
                "spec.retry.retry_exit_codes",
                "0 is success and cannot be retried",
            ));
        }
        let mut codes = self.retry_exit_codes;
        codes.sort_unstable();
        codes.dedup();
        Ok(RetryPolicy {
            initial_backoff_ms: initial,
            multiplier,
            max_backoff_ms: max,
            jitter: self.jitter,
            retry_exit_codes: codes,
            retry_any_exit_code: self.retry_any_exit_code,
        })
    }
}

impl RetryPolicy {
    /// The delay before attempt `failed_attempt + 1`, before jitter.
    pub fn base_delay(&self, failed_attempt: i32) -> Duration {
        let n = failed_attempt.max(1) - 1;
        let ms = (self.initial_backoff_ms as f64) * self.multiplier.powi(n);
        Duration::from_millis(ms.min(self.max_backoff_ms as f64) as u64)
    }

    /// The delay with jitter applied; `unit` is a uniform sample from [0, 1).
    pub fn delay(&self, failed_attempt: i32, unit: f64) -> Duration {
        let base = self.base_delay(failed_attempt).as_millis() as f64;
        let spread = base * self.jitter * (2.0 * unit.clamp(0.0, 1.0) - 1.0);
        Duration::from_millis((base + spread).max(0.0) as u64)
    }

    /// Whether a non-zero exit `code` is worth another attempt.
    pub fn retries_exit_code(&self, code: i32) -> bool {
        code != 0 && (self.retry_any_exit_code || self.retry_exit_codes.contains(&code))
    }
}

/// How an attempt failed, as far as retrying cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The process exited with this non-zero code (or none could be read).
    Exit(Option<i32>),
    /// The host failed the attempt: image unavailable, start failed, container lost.
    Infrastructure,
    /// The agent stopped heartbeating and its lease expired.
    LostLease,
}

/// What becomes of a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decision {
    /// Back to QUEUED as the next attempt, dispatchable after `delay`.
    Retry { delay: Duration },
    /// Retryable, but no attempts are left.
    Exhausted,
    /// Not retryable: FAILED.
    Final,
}

/// Decides the fate of attempt `attempt` (1-based) of `max_attempts`.
pub fn decide(
    policy: &RetryPolicy,
    failure: Failure,
    attempt: i32,
    max_attempts: i32,
    unit: f64,
) -> Decision {
    let retryable = match failure {
        Failure::Exit(Some(code)) => policy.retries_exit_code(code),
        Failure::Exit(None) => false,
        Failure::Infrastructure | Failure::LostLease => true,
    };
    if !retryable {
        Decision::Final
    } else if attempt >= max_attempts {
        Decision::Exhausted
    } else {
        Decision::Retry {
            delay: policy.delay(attempt, unit),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RawRetryPolicy {
            initial_backoff_ms: 1000,
            multiplier: 2.0,
            max_backoff_ms: 5000,
            retry_exit_codes: vec![3, 3, 7],
            ..Default::default()
        }
        .validate()
        .unwrap()
    }

    #[test]
    fn delays_grow_and_cap() {
        let p = policy();
        let ms: Vec<u128> = (1..=5).map(|a| p.base_delay(a).as_millis()).collect();
        assert_eq!(ms, vec![1000, 2000, 4000, 5000, 5000]);
        assert_eq!(p.retry_exit_codes, vec![3, 7]);
    }

    #[test]
    fn jitter_stays_within_its_fraction() {
        let p = RetryPolicy {
            jitter: 0.2,
            ..policy()
        };
        assert_eq!(p.delay(1, 0.0).as_millis(), 800);
        assert_eq!(p.delay(1, 0.5).as_millis(), 1000);
        assert!(p.delay(1, 0.999_999).as_millis() <= 1200);
    }

    #[test]
    fn what_is_retried() {
        let p = policy();
        assert_eq!(
            decide(&p, Failure::Exit(Some(3)), 1, 3, 0.5),
            Decision::Retry {
                delay: Duration::from_secs(1)
            }
        );
        assert_eq!(
            decide(&p, Failure::Exit(Some(4)), 1, 3, 0.5),
            Decision::Final
        );
        assert_eq!(decide(&p, Failure::Exit(None), 1, 3, 0.5), Decision::Final);
        assert_eq!(
            decide(&p, Failure::LostLease, 3, 3, 0.5),
            Decision::Exhausted
        );
        assert!(matches!(
            decide(&p, Failure::Infrastructure, 2, 3, 0.5),
            Decision::Retry { .. }
        ));
    }

    #[test]
    fn bad_policies_name_the_field() {
        let bad = |r: RawRetryPolicy| r.validate().unwrap_err().field;
        assert_eq!(
            bad(RawRetryPolicy {
                multiplier: 0.5,
                ..Default::default()
            }),
            "spec.retry.multiplier"
        );
        assert_eq!(
            bad(RawRetryPolicy {
                jitter: 1.5,
                ..Default::default()
            }),
            "spec.retry.jitter"
        );
        assert_eq!(
            bad(RawRetryPolicy {
                initial_backoff_ms: 10_000,
                max_backoff_ms: 5_000,
                ..Default::default()
            }),
            "spec.retry.max_backoff_ms"
        );
        assert_eq!(
            bad(RawRetryPolicy {
                retry_exit_codes: vec![0],
                ..Default::default()
            }),
            "spec.retry.retry_exit_codes"
        );
    }
}
