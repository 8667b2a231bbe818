//! The secret part of a run's process environment: the tenant secrets the API delivered with
//! the assignment (`GetAssignmentResponse.secret_env`) and the host pass-through variables
//! the spec names (`host_env`), copied from the agent's own environment.
//!
//! Values go to the process environment and to the log redactor ([`crate::redact`]) only.
//! Everything else — the run's log, the agent's own log, reasons — gets the presence line
//! (`NAME=present` / `NAME=absent`). A spec secret the API did not deliver fails the attempt
//! (`secret_missing: NAME`, final, not retried: it needs an operator to put the secret); a
//! host variable missing on this host is left unset and reported `absent`.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use drover_core::spec::RunSpec;

/// Where an entry of the environment came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A tenant secret (spec `secrets`).
    Secret,
    /// The agent's own environment (spec `host_env`).
    Host,
}

/// The secret environment of one job. `Debug` and `Display` show names and presence only.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct SecretEnv {
    values: BTreeMap<String, String>,
    /// Every name the spec asked for, in spec order (secrets, then host_env), and whether a
    /// value was found for it.
    presence: Vec<(String, Origin, bool)>,
}

impl fmt::Debug for SecretEnv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretEnv({self})")
    }
}

/// `secrets: A=present; host_env: B=present, C=absent` (empty when the spec names none).
impl fmt::Display for SecretEnv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first_group = true;
        for (origin, label) in [(Origin::Secret, "secrets"), (Origin::Host, "host_env")] {
            let entries: Vec<String> = self
                .presence
                .iter()
                .filter(|(_, o, _)| *o == origin)
                .map(|(n, _, present)| {
                    format!("{n}={}", if *present { "present" } else { "absent" })
                })
                .collect();
            if entries.is_empty() {
                continue;
            }
            if !first_group {
                f.write_str("; ")?;
            }
            first_group = false;
            write!(f, "{label}: {}", entries.join(", "))?;
        }
        Ok(())
    }
}

/// Spec secrets the API did not deliver (deleted since submit, or undecryptable).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("secret_missing: {} not available to this run", names.join(", "))]
pub struct MissingSecrets {
    pub names: Vec<String>,
}

impl SecretEnv {
    /// Builds the environment of `spec` from what the API `delivered` and the host's
    /// variables (`host_var`, normally [`host_var`]). Deliveries the spec did not ask for are
    /// ignored.
    pub fn build(
        spec: &RunSpec,
        mut delivered: HashMap<String, String>,
        host_var: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, MissingSecrets> {
        let mut env = SecretEnv::default();
        let mut missing = Vec::new();
        for name in &spec.secrets {
            match delivered.remove(name) {
                Some(v) => {
                    env.values.insert(name.clone(), v);
                    env.presence.push((name.clone(), Origin::Secret, true));
                }
                None => missing.push(name.clone()),
            }
        }
        if !missing.is_empty() {
            return Err(MissingSecrets { names: missing });
        }
        for name in &spec.host_env {
            let value = host_var(name);
            let present = value.is_some();
            if let Some(v) = value {
                env.values.insert(name.clone(), v);
            }
            env.presence.push((name.clone(), Origin::Host, present));
        }
        Ok(env)
    }

    /// `NAME=value` pairs for the process environment.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.values.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// The values, for the redactor.
    pub fn values(&self) -> impl Iterator<Item = &str> {
        self.values.values().map(String::as_str)
    }

    /// True when the spec names no secret and no host variable.
    pub fn is_empty(&self) -> bool {
        self.presence.is_empty()
    }

    /// Name → `"present"` / `"absent"` for the names of one origin, for `request.json`.
    pub fn presence_of(&self, origin: Origin) -> BTreeMap<String, String> {
        self.presence
            .iter()
            .filter(|(_, o, _)| *o == origin)
            .map(|(n, _, present)| {
                let word = if *present { "present" } else { "absent" };
                (n.clone(), word.to_owned())
            })
            .collect()
    }

    /// Host variables the spec names that this host does not have.
    pub fn absent(&self) -> impl Iterator<Item = &str> {
        self.presence
            .iter()
            .filter(|(_, _, present)| !present)
            .map(|(n, _, _)| n.as_str())
    }
}

/// A variable of the agent's environment; one that is not valid UTF-8 counts as absent.
pub fn host_var(name: &str) -> Option<String> {
    std::env::var_os(name).and_then(|v| v.into_string().ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_core::spec::RawSpec;

    fn spec(secrets: &[&str], host: &[&str]) -> RunSpec {
        RawSpec {
            image: "img".into(),
            command: vec!["true".into()],
            secrets: secrets.iter().map(|s| s.to_string()).collect(),
            host_env: host.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
        .validate()
        .unwrap()
    }

    fn delivered(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn merges_secrets_and_host_values_and_reports_presence_only() {
        let host = |n: &str| (n == "GPU_TOKEN").then(|| "host-value-123".to_owned());
        let env = SecretEnv::build(
            &spec(&["API_KEY"], &["GPU_TOKEN", "NOT_HERE"]),
            delivered(&[("API_KEY", "sk-live-abcdefgh"), ("EXTRA", "ignored-value")]),
            host,
        )
        .unwrap();
        let pairs: Vec<(&str, &str)> = env.iter().collect();
        assert_eq!(
            pairs,
            vec![
                ("API_KEY", "sk-live-abcdefgh"),
                ("GPU_TOKEN", "host-value-123")
            ]
        );
        assert_eq!(
            env.to_string(),
            "secrets: API_KEY=present; host_env: GPU_TOKEN=present, NOT_HERE=absent"
        );
        let dbg = format!("{env:?}");
        assert!(
            !dbg.contains("sk-live") && !dbg.contains("host-value"),
            "{dbg}"
        );
        assert_eq!(env.absent().collect::<Vec<_>>(), vec!["NOT_HERE"]);
    }

    #[test]
    fn an_undelivered_secret_is_missing() {
        let err = SecretEnv::build(
            &spec(&["A_KEY", "B_KEY"], &[]),
            delivered(&[("A_KEY", "x")]),
            |_| None,
        )
        .unwrap_err();
        assert_eq!(err.names, vec!["B_KEY"]);
        assert!(err.to_string().starts_with("secret_missing: B_KEY"));
    }

    #[test]
    fn nothing_asked_nothing_said() {
        let env = SecretEnv::build(&spec(&[], &[]), HashMap::new(), |_| None).unwrap();
        assert!(env.is_empty());
        assert_eq!(env.to_string(), "");
    }
}
