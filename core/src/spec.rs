//! The run spec as drover stores it, and validation of what clients send. Every limit here is
//! the one the proto comments promise; an error names the offending field so clients can fix it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::inputs::{InputFile, MockBehavior, validate_files, validate_mock};
use crate::retry::{RawRetryPolicy, RetryPolicy};

pub const MAX_IMAGE_BYTES: usize = 512;
pub const MAX_ARG_BYTES: usize = 16 * 1024;
pub const MAX_COMMAND_BYTES: usize = 64 * 1024;
pub const MAX_ENV_ENTRIES: usize = 128;
pub const MAX_ENV_NAME_BYTES: usize = 256;
pub const MAX_ENV_BYTES: usize = 64 * 1024;
pub const DEFAULT_TIMEOUT_SECS: u32 = 3600;
pub const MAX_TIMEOUT_SECS: u32 = 86_400;
pub const MAX_ATTEMPTS: u32 = 20;
pub const MAX_LABELS: usize = 32;
pub const MAX_LABEL_BYTES: usize = 256;
pub const MAX_METADATA_ENTRIES: usize = 64;
pub const MAX_METADATA_BYTES: usize = 16 * 1024;
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 255;
pub const DEFAULT_POOL: &str = "default";
pub const DEFAULT_CPUS: f64 = 1.0;
pub const DEFAULT_MEMORY_BYTES: u64 = 512 * 1024 * 1024;
pub const DEFAULT_PIDS: u32 = 256;
pub const MAX_QUEUE_TIMEOUT_SECS: u32 = 7 * 86_400;
pub const DEFAULT_CANCEL_GRACE_SECS: u32 = 10;
pub const MAX_CANCEL_GRACE_SECS: u32 = 300;
/// Most names in `secrets`, and in `host_env`, each.
pub const MAX_SECRET_NAMES: usize = 32;
/// Shortest secret value: PutSecret refuses shorter ones, and the agent does not mask shorter
/// host pass-through values (or lines of a multi-line value), so redaction never blanks
/// innocent short text such as `true` or `1234` throughout a log.
pub const MIN_SECRET_VALUE_BYTES: usize = 8;
/// Longest secret value (a PEM private key fits several times).
pub const MAX_SECRET_VALUE_BYTES: usize = 16 * 1024;
pub const MAX_OUTPUT_GLOBS: usize = 64;

fn default_cancel_grace() -> u32 {
    DEFAULT_CANCEL_GRACE_SECS
}

/// A validated run spec with defaults filled in. Maps are ordered so the JSON form, and with it
/// [`RunSpec::canonical_hash`], is canonical.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSpec {
    pub image: String,
    pub command: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub resources: Resources,
    pub timeout_secs: u32,
    pub pool: String,
    #[serde(default)]
    pub priority: i32,
    pub max_attempts: u32,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub network: Network,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    #[serde(default)]
    pub retry: RetryPolicy,
    /// 0 = no limit.
    #[serde(default)]
    pub queue_timeout_secs: u32,
    #[serde(default = "default_cancel_grace")]
    pub cancel_grace_secs: u32,
    /// Tenant secret names exposed as env vars of the same name; sorted, unique. Skipped in
    /// the JSON form when empty so specs stored before secrets existed hash the same.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<String>,
    /// Env var names the agent copies from its own environment; sorted, unique.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub host_env: Vec<String>,
    /// Seed the workspace with this earlier run's committed artifacts (same tenant). Omitted
    /// from the JSON when unset, so specs stored before it hash the same.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inputs_from_run: Option<uuid::Uuid>,
    /// Globs selecting the workspace files uploaded as artifacts; empty = everything.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outputs: Vec<String>,
    // The fields below are left out of the JSON when at their default, so specs stored before
    // they existed keep their canonical hash (idempotent submits still match).
    /// The executor that must run it; `None` = the agent's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub executor: Option<ExecutorName>,
    /// The mock executor's simulated run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mock: Option<MockBehavior>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub writable_rootfs: bool,
    #[serde(default, skip_serializing_if = "PullPolicy::is_default")]
    pub image_pull_policy: PullPolicy,
    /// Inline files written into the workspace before start.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<InputFile>,
    /// Start in PENDING_APPROVAL.
    #[serde(default, skip_serializing_if = "is_false")]
    pub requires_approval: bool,
    /// With `requires_approval`: 0 = wait for a decision forever.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub approval_timeout_secs: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// The executors a spec may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExecutorName {
    Docker,
    Process,
    Mock,
}

impl ExecutorName {
    pub const ALL: [ExecutorName; 3] = [Self::Docker, Self::Process, Self::Mock];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Docker => "docker",
            Self::Process => "process",
            Self::Mock => "mock",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|e| e.as_str() == s)
    }
}

/// When the Docker executor pulls the image.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PullPolicy {
    /// Pull only when the image is not on the host.
    #[default]
    IfNotPresent,
    /// Pull before every start.
    Always,
    /// Never pull: a missing image fails the attempt.
    Never,
}

impl PullPolicy {
    fn is_default(&self) -> bool {
        *self == PullPolicy::IfNotPresent
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::IfNotPresent => "if-not-present",
            Self::Always => "always",
            Self::Never => "never",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Resources {
    pub cpus: f64,
    pub memory_bytes: u64,
    pub pids: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Network {
    None,
    Bridge,
}

impl Network {
    pub fn as_str(self) -> &'static str {
        match self {
            Network::None => "none",
            Network::Bridge => "bridge",
        }
    }
}

/// Which field was wrong and why. The message is safe to return to clients.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: {message}")]
pub struct ValidationError {
    pub field: &'static str,
    pub message: String,
}

fn invalid(field: &'static str, message: impl Into<String>) -> ValidationError {
    ValidationError {
        field,
        message: message.into(),
    }
}

/// The unvalidated shape clients send (mirrors the proto, with zero meaning "default").
#[derive(Debug, Clone, Default)]
pub struct RawSpec {
    pub image: String,
    pub command: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cpus: f64,
    pub memory_bytes: u64,
    pub pids: u32,
    pub timeout_secs: u32,
    pub pool: String,
    pub priority: i32,
    pub max_attempts: u32,
    pub labels: Vec<(String, String)>,
    pub network: String,
    pub metadata: Vec<(String, String)>,
    pub retry: RawRetryPolicy,
    pub queue_timeout_secs: u32,
    pub cancel_grace_secs: u32,
    pub secrets: Vec<String>,
    pub host_env: Vec<String>,
    pub inputs_from_run: String,
    pub outputs: Vec<String>,
    /// "" = the agent's own.
    pub executor: String,
    pub mock: Option<MockBehavior>,
    pub writable_rootfs: bool,
    /// "" = if-not-present.
    pub image_pull_policy: String,
    pub inputs: Vec<InputFile>,
    pub requires_approval: bool,
    pub approval_timeout_secs: u32,
}

impl RawSpec {
    pub fn validate(self) -> Result<RunSpec, ValidationError> {
        let image = self.image.trim().to_owned();
        if image.is_empty() {
            return Err(invalid("spec.image", "must not be empty"));
        }
        if image.len() > MAX_IMAGE_BYTES {
            return Err(invalid(
                "spec.image",
                format!("must be at most {MAX_IMAGE_BYTES} bytes"),
            ));
        }
        if image.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(invalid("spec.image", "must not contain whitespace"));
        }

        if self.command.is_empty() {
            return Err(invalid(
                "spec.command",
                "must be a non-empty argv array (e.g. [\"sh\", \"-c\", \"...\"])",
            ));
        }
        if self.command[0].is_empty() {
            return Err(invalid(
                "spec.command",
                "the program (argv[0]) must not be empty",
            ));
        }
        if self.command.iter().any(|a| a.len() > MAX_ARG_BYTES) {
            return Err(invalid(
                "spec.command",
                format!("each argument must be at most {MAX_ARG_BYTES} bytes"),
            ));
        }
        if self.command.iter().any(|a| a.contains('\0')) {
            return Err(invalid("spec.command", "arguments must not contain NUL"));
        }
        let total: usize = self.command.iter().map(String::len).sum();
        if total > MAX_COMMAND_BYTES {
            return Err(invalid(
                "spec.command",
                format!("must be at most {MAX_COMMAND_BYTES} bytes in all, got {total}"),
            ));
        }

        let env = validate_env(self.env)?;
        let secrets = validate_env_names("spec.secrets", self.secrets, &env)?;
        let host_env = validate_env_names("spec.host_env", self.host_env, &env)?;
        if let Some(both) = secrets.iter().find(|n| host_env.contains(n)) {
            return Err(invalid(
                "spec.host_env",
                format!("{both} is also in spec.secrets; a name can come from one place only"),
            ));
        }

        let cpus = if self.cpus == 0.0 {
            DEFAULT_CPUS
        } else {
            self.cpus
        };
        if !cpus.is_finite() || !(0.01..=64.0).contains(&cpus) {
            return Err(invalid(
                "spec.resources.cpus",
                "must be between 0.01 and 64",
            ));
        }
        let memory_bytes = if self.memory_bytes == 0 {
            DEFAULT_MEMORY_BYTES
        } else {
            self.memory_bytes
        };
        if !(4 * 1024 * 1024..=256 * 1024 * 1024 * 1024).contains(&memory_bytes) {
            return Err(invalid(
                "spec.resources.memory_bytes",
                "must be between 4 MiB and 256 GiB",
            ));
        }
        let pids = if self.pids == 0 {
            DEFAULT_PIDS
        } else {
            self.pids
        };
        if pids > 32_768 {
            return Err(invalid("spec.resources.pids", "must be at most 32768"));
        }

        let timeout_secs = if self.timeout_secs == 0 {
            DEFAULT_TIMEOUT_SECS
        } else {
            self.timeout_secs
        };
        if timeout_secs > MAX_TIMEOUT_SECS {
            return Err(invalid(
                "spec.timeout_seconds",
                format!("must be at most {MAX_TIMEOUT_SECS}"),
            ));
        }

        let pool = if self.pool.is_empty() {
            DEFAULT_POOL.to_owned()
        } else {
            self.pool
        };
        validate_pool(&pool)?;

        if !(-1000..=1000).contains(&self.priority) {
            return Err(invalid("spec.priority", "must be between -1000 and 1000"));
        }
        let max_attempts = self.max_attempts.max(1);
        if max_attempts > MAX_ATTEMPTS {
            return Err(invalid(
                "spec.max_attempts",
                format!("must be at most {MAX_ATTEMPTS}"),
            ));
        }

        let labels = bounded_map(
            "spec.labels",
            self.labels,
            MAX_LABELS,
            MAX_LABEL_BYTES * 2 * MAX_LABELS,
        )?;
        if labels
            .iter()
            .any(|(k, v)| k.is_empty() || k.len() > MAX_LABEL_BYTES || v.len() > MAX_LABEL_BYTES)
        {
            return Err(invalid(
                "spec.labels",
                format!(
                    "keys must be non-empty and keys and values at most {MAX_LABEL_BYTES} bytes"
                ),
            ));
        }
        let metadata = bounded_map(
            "spec.metadata",
            self.metadata,
            MAX_METADATA_ENTRIES,
            MAX_METADATA_BYTES,
        )?;

        let network = match self.network.as_str() {
            "" | "none" => Network::None,
            "bridge" => Network::Bridge,
            other => {
                return Err(invalid(
                    "spec.network",
                    format!("must be \"none\" or \"bridge\", got {other:?}"),
                ));
            }
        };

        let retry = self.retry.validate()?;
        if self.queue_timeout_secs > MAX_QUEUE_TIMEOUT_SECS {
            return Err(invalid(
                "spec.queue_timeout_seconds",
                format!("must be at most {MAX_QUEUE_TIMEOUT_SECS} (7 days)"),
            ));
        }
        let cancel_grace_secs = match self.cancel_grace_secs {
            0 => DEFAULT_CANCEL_GRACE_SECS,
            v => v,
        };
        if cancel_grace_secs > MAX_CANCEL_GRACE_SECS {
            return Err(invalid(
                "spec.cancel_grace_seconds",
                format!("must be at most {MAX_CANCEL_GRACE_SECS}"),
            ));
        }

        let inputs_from_run = match self.inputs_from_run.trim() {
            "" => None,
            s => Some(
                uuid::Uuid::parse_str(s)
                    .map_err(|_| invalid("spec.inputs_from_run", "must be a run id (UUID)"))?,
            ),
        };
        let outputs = validate_outputs(self.outputs)?;
        let executor = match self.executor.as_str() {
            "" => None,
            other => Some(ExecutorName::parse(other).ok_or_else(|| {
                invalid(
                    "spec.executor",
                    format!("must be \"docker\", \"process\", \"mock\" or empty, got {other:?}"),
                )
            })?),
        };
        let mock = match self.mock {
            Some(m) if !m.is_empty() => Some(validate_mock(m)?),
            _ => None,
        };
        let image_pull_policy = match self.image_pull_policy.as_str() {
            "" | "if-not-present" => PullPolicy::IfNotPresent,
            "always" => PullPolicy::Always,
            "never" => PullPolicy::Never,
            other => {
                return Err(invalid(
                    "spec.image_pull_policy",
                    format!("must be \"if-not-present\", \"always\" or \"never\", got {other:?}"),
                ));
            }
        };
        let inputs = validate_files("spec.inputs", self.inputs)?;
        if self.approval_timeout_secs > MAX_QUEUE_TIMEOUT_SECS {
            return Err(invalid(
                "spec.approval_timeout_seconds",
                format!("must be at most {MAX_QUEUE_TIMEOUT_SECS} (7 days)"),
            ));
        }
        if self.approval_timeout_secs > 0 && !self.requires_approval {
            return Err(invalid(
                "spec.approval_timeout_seconds",
                "only applies with requires_approval",
            ));
        }

        Ok(RunSpec {
            image,
            command: self.command,
            env,
            resources: Resources {
                cpus,
                memory_bytes,
                pids,
            },
            timeout_secs,
            pool,
            priority: self.priority,
            max_attempts,
            labels,
            network,
            metadata,
            retry,
            queue_timeout_secs: self.queue_timeout_secs,
            cancel_grace_secs,
            secrets,
            host_env,
            inputs_from_run,
            outputs,
            executor,
            mock,
            writable_rootfs: self.writable_rootfs,
            image_pull_policy,
            inputs,
            requires_approval: self.requires_approval,
            approval_timeout_secs: self.approval_timeout_secs,
        })
    }
}

/// An environment variable name: `[A-Za-z_][A-Za-z0-9_]*`, at most 256 bytes.
pub fn is_env_name(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= MAX_ENV_NAME_BYTES
        && k.bytes()
            .enumerate()
            .all(|(i, b)| b == b'_' || b.is_ascii_alphabetic() || (i > 0 && b.is_ascii_digit()))
}

/// `secrets` / `host_env`: env var names, at most [`MAX_SECRET_NAMES`], no duplicates, none
/// also set in `env` (which value would win would be a guess). Returned sorted, so the
/// canonical hash does not depend on the order given.
fn validate_env_names(
    field: &'static str,
    names: Vec<String>,
    env: &BTreeMap<String, String>,
) -> Result<Vec<String>, ValidationError> {
    if names.len() > MAX_SECRET_NAMES {
        return Err(invalid(
            field,
            format!("at most {MAX_SECRET_NAMES} names, got {}", names.len()),
        ));
    }
    let mut out = names;
    out.sort();
    for (i, name) in out.iter().enumerate() {
        if !is_env_name(name) {
            return Err(invalid(
                field,
                format!(
                    "name {name:?} must match [A-Za-z_][A-Za-z0-9_]* and be at most {MAX_ENV_NAME_BYTES} bytes"
                ),
            ));
        }
        if i > 0 && out[i - 1] == *name {
            return Err(invalid(field, format!("{name} is listed twice")));
        }
        if env.contains_key(name) {
            return Err(invalid(
                field,
                format!("{name} is also a key of spec.env; a name can come from one place only"),
            ));
        }
    }
    Ok(out)
}

fn validate_env(env: Vec<(String, String)>) -> Result<BTreeMap<String, String>, ValidationError> {
    if env.len() > MAX_ENV_ENTRIES {
        return Err(invalid(
            "spec.env",
            format!("at most {MAX_ENV_ENTRIES} entries, got {}", env.len()),
        ));
    }
    let mut total = 0usize;
    let mut out = BTreeMap::new();
    for (k, v) in env {
        if !is_env_name(&k) {
            return Err(invalid(
                "spec.env",
                format!(
                    "name {k:?} must match [A-Za-z_][A-Za-z0-9_]* and be at most {MAX_ENV_NAME_BYTES} bytes"
                ),
            ));
        }
        if v.contains('\0') {
            return Err(invalid(
                "spec.env",
                format!("value of {k} must not contain NUL"),
            ));
        }
        total += k.len() + v.len();
        out.insert(k, v);
    }
    if total > MAX_ENV_BYTES {
        return Err(invalid(
            "spec.env",
            format!("must be at most {MAX_ENV_BYTES} bytes in all, got {total}"),
        ));
    }
    Ok(out)
}

/// `outputs` globs: bounded in number, each a safe relative glob
/// ([`crate::artifact_paths::validate_glob`]); duplicates are dropped, order kept.
fn validate_outputs(globs: Vec<String>) -> Result<Vec<String>, ValidationError> {
    if globs.len() > MAX_OUTPUT_GLOBS {
        return Err(invalid(
            "spec.outputs",
            format!("at most {MAX_OUTPUT_GLOBS} globs"),
        ));
    }
    let mut out: Vec<String> = Vec::with_capacity(globs.len());
    for (i, g) in globs.into_iter().enumerate() {
        crate::artifact_paths::validate_glob(&g)
            .map_err(|e| invalid("spec.outputs", format!("glob {i} {e}")))?;
        if !out.contains(&g) {
            out.push(g);
        }
    }
    Ok(out)
}

/// Pool names become queue names (`drover.runs.<pool>`), so they are kept to a safe alphabet.
pub fn validate_pool(pool: &str) -> Result<(), ValidationError> {
    let ok = !pool.is_empty()
        && pool.len() <= 63
        && pool
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "spec.pool",
            "must be 1..63 characters of [a-z0-9_-]",
        ))
    }
}

fn bounded_map(
    field: &'static str,
    entries: Vec<(String, String)>,
    max_entries: usize,
    max_bytes: usize,
) -> Result<BTreeMap<String, String>, ValidationError> {
    if entries.len() > max_entries {
        return Err(invalid(field, format!("at most {max_entries} entries")));
    }
    let total: usize = entries.iter().map(|(k, v)| k.len() + v.len()).sum();
    if total > max_bytes {
        return Err(invalid(
            field,
            format!("must be at most {max_bytes} bytes in all"),
        ));
    }
    Ok(entries.into_iter().collect())
}

impl RunSpec {
    /// SHA-256 of the canonical JSON form: equal specs hash equal whatever order the client
    /// sent maps in. Idempotent submits compare these.
    pub fn canonical_hash(&self) -> String {
        // Serialising a struct of ordered maps cannot fail.
        let json = serde_json::to_vec(self).unwrap_or_default();
        hex::encode(Sha256::digest(json))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok_raw() -> RawSpec {
        RawSpec {
            image: "drover/busybox:latest".into(),
            command: vec!["echo".into(), "hello".into()],
            ..Default::default()
        }
    }

    #[test]
    fn new_fields_at_their_defaults_keep_the_stored_json_and_hash() {
        let s = ok_raw().validate().unwrap();
        let json = serde_json::to_string(&s).unwrap();
        for key in [
            "executor",
            "mock",
            "writable_rootfs",
            "image_pull_policy",
            "inputs",
        ] {
            assert!(!json.contains(key), "{key} in {json}");
        }
        let full = RawSpec {
            executor: "mock".into(),
            image_pull_policy: "never".into(),
            writable_rootfs: true,
            inputs: vec![InputFile {
                path: "a.txt".into(),
                content: b"hi".to_vec(),
                mode: 0,
            }],
            ..ok_raw()
        }
        .validate()
        .unwrap();
        assert_eq!(full.executor, Some(ExecutorName::Mock));
        assert_eq!(full.image_pull_policy, PullPolicy::Never);
        let back: RunSpec = serde_json::from_str(&serde_json::to_string(&full).unwrap()).unwrap();
        assert_eq!(back, full);
        assert_ne!(full.canonical_hash(), s.canonical_hash());
    }

    #[test]
    fn defaults_are_filled() {
        let s = ok_raw().validate().unwrap();
        assert_eq!(s.pool, "default");
        assert_eq!(s.max_attempts, 1);
        assert_eq!(s.timeout_secs, DEFAULT_TIMEOUT_SECS);
        assert_eq!(s.network, Network::None);
        assert_eq!(s.resources.pids, DEFAULT_PIDS);
    }

    #[test]
    fn errors_name_the_field() {
        let cases: Vec<(RawSpec, &str)> = vec![
            (
                RawSpec {
                    image: " ".into(),
                    ..ok_raw()
                },
                "spec.image",
            ),
            (
                RawSpec {
                    command: vec![],
                    ..ok_raw()
                },
                "spec.command",
            ),
            (
                RawSpec {
                    command: vec!["".into()],
                    ..ok_raw()
                },
                "spec.command",
            ),
            (
                RawSpec {
                    env: vec![("1BAD".into(), "x".into())],
                    ..ok_raw()
                },
                "spec.env",
            ),
            (
                RawSpec {
                    env: vec![("BIG".into(), "x".repeat(MAX_ENV_BYTES))],
                    ..ok_raw()
                },
                "spec.env",
            ),
            (
                RawSpec {
                    pool: "Bad Pool".into(),
                    ..ok_raw()
                },
                "spec.pool",
            ),
            (
                RawSpec {
                    network: "host".into(),
                    ..ok_raw()
                },
                "spec.network",
            ),
            (
                RawSpec {
                    max_attempts: 21,
                    ..ok_raw()
                },
                "spec.max_attempts",
            ),
            (
                RawSpec {
                    timeout_secs: 86_401,
                    ..ok_raw()
                },
                "spec.timeout_seconds",
            ),
            (
                RawSpec {
                    memory_bytes: 1,
                    ..ok_raw()
                },
                "spec.resources.memory_bytes",
            ),
            (
                RawSpec {
                    cpus: f64::NAN,
                    ..ok_raw()
                },
                "spec.resources.cpus",
            ),
            (
                RawSpec {
                    inputs_from_run: "not-a-uuid".into(),
                    ..ok_raw()
                },
                "spec.inputs_from_run",
            ),
            (
                RawSpec {
                    outputs: vec!["../escape/*".into()],
                    ..ok_raw()
                },
                "spec.outputs",
            ),
            (
                RawSpec {
                    outputs: vec!["%2e%2e%2f*".into()],
                    ..ok_raw()
                },
                "spec.outputs",
            ),
            (
                RawSpec {
                    outputs: vec!["/abs".into()],
                    ..ok_raw()
                },
                "spec.outputs",
            ),
            (
                RawSpec {
                    outputs: vec!["*".into(); MAX_OUTPUT_GLOBS + 1],
                    ..ok_raw()
                },
                "spec.outputs",
            ),
            (
                RawSpec {
                    executor: "podman".into(),
                    ..ok_raw()
                },
                "spec.executor",
            ),
            (
                RawSpec {
                    image_pull_policy: "sometimes".into(),
                    ..ok_raw()
                },
                "spec.image_pull_policy",
            ),
            (
                RawSpec {
                    inputs: vec![InputFile {
                        path: "../etc/passwd".into(),
                        content: Vec::new(),
                        mode: 0,
                    }],
                    ..ok_raw()
                },
                "spec.inputs",
            ),
            (
                RawSpec {
                    mock: Some(MockBehavior {
                        duration_ms: 86_400_001,
                        ..Default::default()
                    }),
                    ..ok_raw()
                },
                "spec.mock",
            ),
        ];
        for (raw, field) in cases {
            let err = raw.validate().unwrap_err();
            assert_eq!(err.field, field, "{err}");
        }
    }

    #[test]
    fn secret_and_host_env_names_are_checked() {
        let with = |secrets: &[&str], host: &[&str]| RawSpec {
            env: vec![("PLAIN".into(), "x".into())],
            secrets: secrets.iter().map(|s| s.to_string()).collect(),
            host_env: host.iter().map(|s| s.to_string()).collect(),
            ..ok_raw()
        };
        let ok = with(&["B_KEY", "A_KEY"], &["GPU_TOKEN"])
            .validate()
            .unwrap();
        assert_eq!(ok.secrets, vec!["A_KEY", "B_KEY"], "sorted");
        assert_eq!(ok.host_env, vec!["GPU_TOKEN"]);
        let many: Vec<String> = (0..=MAX_SECRET_NAMES).map(|i| format!("S{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        let cases = [
            (with(&["1BAD"], &[]), "spec.secrets"),
            (with(&["A-B"], &[]), "spec.secrets"),
            (with(&["A", "A"], &[]), "spec.secrets"),
            (with(&["PLAIN"], &[]), "spec.secrets"),
            (with(&many, &[]), "spec.secrets"),
            (with(&[], &[""]), "spec.host_env"),
            (with(&[], &["PLAIN"]), "spec.host_env"),
            (with(&["SAME"], &["SAME"]), "spec.host_env"),
        ];
        for (raw, field) in cases {
            let err = raw.validate().unwrap_err();
            assert_eq!(err.field, field, "{err}");
        }
    }

    #[test]
    fn specs_without_secrets_hash_as_before() {
        // The new fields are left out of the JSON form when empty, so a spec stored before
        // they existed still dedupes against a resubmission.
        let s = ok_raw().validate().unwrap();
        let json = serde_json::to_string(&s).unwrap();
        assert!(
            !json.contains("secrets") && !json.contains("host_env"),
            "{json}"
        );
        let back: RunSpec = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn artifact_fields_are_kept_and_absent_ones_do_not_change_the_hash() {
        let plain = ok_raw().validate().unwrap();
        let json = serde_json::to_string(&plain).unwrap();
        assert!(
            !json.contains("outputs") && !json.contains("inputs_from_run"),
            "{json}"
        );
        let id = "0192f3a4-5b6c-7d8e-9f00-112233445566";
        let s = RawSpec {
            inputs_from_run: format!(" {id} "),
            outputs: vec!["**/*.py".into(), ".drover/*".into(), "**/*.py".into()],
            ..ok_raw()
        }
        .validate()
        .unwrap();
        assert_eq!(
            s.inputs_from_run.map(|u| u.to_string()).as_deref(),
            Some(id)
        );
        assert_eq!(s.outputs, vec!["**/*.py", ".drover/*"]);
        assert_ne!(s.canonical_hash(), plain.canonical_hash());
    }

    #[test]
    fn hash_ignores_map_order() {
        let a = RawSpec {
            env: vec![("A".into(), "1".into()), ("B".into(), "2".into())],
            ..ok_raw()
        };
        let b = RawSpec {
            env: vec![("B".into(), "2".into()), ("A".into(), "1".into())],
            ..ok_raw()
        };
        let (a, b) = (a.validate().unwrap(), b.validate().unwrap());
        assert_eq!(a.canonical_hash(), b.canonical_hash());
        let c = RawSpec {
            command: vec!["true".into()],
            ..ok_raw()
        }
        .validate()
        .unwrap();
        assert_ne!(a.canonical_hash(), c.canonical_hash());
    }
}
