//! `drover submit --image IMG [--env K=V]... [--input LOCAL[=REMOTE]]... [--executor E]
//! [retry, timeout and cancel flags] [--wait | --follow] -- CMD ARGS...`

use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Args;
use drover_proto::v1 as pb;

use crate::client::{self, Client};
use crate::commands::{logs, watch};
use crate::render;

#[derive(Args, Debug)]
pub struct SubmitArgs {
    /// Container image, e.g. drover/busybox:latest.
    #[arg(long)]
    pub image: String,
    /// Environment variable for the run (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Worker pool.
    #[arg(long, default_value = "")]
    pub pool: String,
    /// Execution time limit in seconds (0 = server default).
    #[arg(long, default_value_t = 0)]
    pub timeout: u32,
    /// Total attempts allowed, including the first (0 = 1).
    #[arg(long, default_value_t = 0)]
    pub max_attempts: u32,
    /// Retry a failed attempt that exited with this code (repeatable; while attempts remain).
    #[arg(
        long = "retry-exit-code",
        value_name = "CODE",
        allow_negative_numbers = true
    )]
    pub retry_exit_codes: Vec<i32>,
    /// Retry a failed attempt whatever its non-zero exit code (while attempts remain).
    #[arg(long)]
    pub retry_any_exit: bool,
    /// Delay before the second attempt, in milliseconds (0 = server default, 1000).
    #[arg(long, value_name = "MS", default_value_t = 0)]
    pub backoff_initial_ms: u64,
    /// Growth of the delay per attempt (0 = server default, 2.0).
    #[arg(long, value_name = "FACTOR", default_value_t = 0.0)]
    pub backoff_multiplier: f64,
    /// Upper bound of any retry delay, in milliseconds (0 = server default, 300000).
    #[arg(long, value_name = "MS", default_value_t = 0)]
    pub backoff_max_ms: u64,
    /// Random spread of each delay as a fraction, 0.0..1.0 (0.1 = +/-10%).
    #[arg(long, value_name = "FRACTION", default_value_t = 0.0)]
    pub backoff_jitter: f64,
    /// Longest the run may wait queued, in seconds, before it ends TIMED_OUT (0 = no limit).
    #[arg(long, value_name = "SECS", default_value_t = 0)]
    pub queue_timeout: u32,
    /// On cancel, seconds between SIGTERM and SIGKILL (0 = server default, 10).
    #[arg(long, value_name = "SECS", default_value_t = 0)]
    pub cancel_grace: u32,
    /// Network access: none (default) or bridge.
    #[arg(long, default_value = "")]
    pub network: String,
    /// Executor that must run it: docker, process or mock (default: the agent's own).
    #[arg(long, default_value = "")]
    pub executor: String,
    /// A local file put into the run's workspace, at REMOTE (a relative path; default: the
    /// file's name). Repeatable; the server checks paths and sizes.
    #[arg(long = "input", value_name = "LOCAL[=REMOTE]")]
    pub inputs: Vec<String>,
    /// Docker image pull policy: if-not-present (default), always or never.
    #[arg(long, default_value = "")]
    pub image_pull_policy: String,
    /// Docker: a writable root filesystem (default read-only).
    #[arg(long)]
    pub writable_rootfs: bool,
    /// Submitting twice with one key returns the first run.
    #[arg(long, default_value = "")]
    pub idempotency_key: String,
    /// Block until the run is terminal; print its output; exit non-zero unless it succeeded.
    #[arg(long)]
    pub wait: bool,
    /// Like --wait, but stream the run's stdout and stderr live instead of printing the
    /// output at the end.
    #[arg(long, conflicts_with = "json")]
    pub follow: bool,
    /// Print the run as JSON instead of its id.
    #[arg(long)]
    pub json: bool,
    /// The argv to run, after `--`.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

fn parse_env(pairs: &[String]) -> anyhow::Result<std::collections::HashMap<String, String>> {
    let mut env = std::collections::HashMap::new();
    for p in pairs {
        let Some((k, v)) = p.split_once('=') else {
            bail!("--env {p:?} must be KEY=VALUE");
        };
        env.insert(k.to_owned(), v.to_owned());
    }
    Ok(env)
}

/// Reads `LOCAL[=REMOTE]` files, keeping their permission bits.
fn read_inputs(specs: &[String]) -> anyhow::Result<Vec<pb::InputFile>> {
    use std::os::unix::fs::PermissionsExt;
    specs
        .iter()
        .map(|s| {
            let (local, remote) = match s.split_once('=') {
                Some((l, r)) => (l, r.to_owned()),
                None => {
                    let name = std::path::Path::new(s)
                        .file_name()
                        .with_context(|| format!("--input {s:?} names no file"))?;
                    (s.as_str(), name.to_string_lossy().into_owned())
                }
            };
            let content =
                std::fs::read(local).with_context(|| format!("--input: reading {local}"))?;
            let mode = std::fs::metadata(local)
                .with_context(|| format!("--input: reading {local}"))?
                .permissions()
                .mode()
                & 0o777;
            Ok(pb::InputFile {
                path: remote,
                content,
                mode,
            })
        })
        .collect()
}

pub async fn run(client: &mut Client, args: SubmitArgs) -> anyhow::Result<ExitCode> {
    let spec = pb::RunSpec {
        executor: args.executor,
        inputs: read_inputs(&args.inputs)?,
        image_pull_policy: args.image_pull_policy,
        writable_rootfs: args.writable_rootfs,
        image: args.image,
        command: args.command,
        env: parse_env(&args.env)?,
        pool: args.pool,
        timeout_seconds: args.timeout,
        max_attempts: args.max_attempts,
        network: args.network,
        retry: Some(pb::RetryPolicy {
            initial_backoff_ms: args.backoff_initial_ms,
            multiplier: args.backoff_multiplier,
            max_backoff_ms: args.backoff_max_ms,
            jitter: args.backoff_jitter,
            retry_exit_codes: args.retry_exit_codes,
            retry_any_exit_code: args.retry_any_exit,
        }),
        queue_timeout_seconds: args.queue_timeout,
        cancel_grace_seconds: args.cancel_grace,
        ..Default::default()
    };
    let resp = client
        .submit_run(pb::SubmitRunRequest {
            spec: Some(spec),
            idempotency_key: args.idempotency_key,
        })
        .await
        .map_err(|s| client::failed("cannot submit the run", client::Subject::Other, &s))?
        .into_inner();
    let run = resp.run.context("server returned no run")?;
    if args.follow {
        eprintln!("submitted {}", run.id);
        logs::print(client, &run.id, true, 0).await?;
        let done = client::fetch_run(client, &run.id).await?;
        eprintln!("{}", render::outcome_line(&done));
        return Ok(watch::exit_code_for(&done));
    }
    if !args.wait {
        if args.json {
            println!("{}", render::run_json(&run));
        } else {
            println!("{}", run.id);
        }
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!("submitted {}", run.id);
    let done = watch::follow(client, &run.id, true).await?;
    if args.json {
        println!("{}", render::run_json(&done));
    } else {
        print!("{}", String::from_utf8_lossy(&done.output));
        eprintln!("{}", render::outcome_line(&done));
    }
    Ok(watch::exit_code_for(&done))
}
