//! gRPC client set-up: endpoint and optional bearer token (flags or `DROVER_ENDPOINT` /
//! `DROVER_TOKEN`), and the one place where a failed call becomes a line for people.

use anyhow::Context;
pub use drover_core::bearer::Bearer as Auth;
use drover_proto::v1::admin_service_client::AdminServiceClient;
use drover_proto::v1::run_service_client::RunServiceClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Status};

pub type Client = RunServiceClient<InterceptedService<Channel, Auth>>;
pub type AdminClient = AdminServiceClient<InterceptedService<Channel, Auth>>;

/// A connected channel plus the credentials every call carries.
#[derive(Clone)]
pub struct Connection {
    channel: Channel,
    auth: Auth,
}

impl Connection {
    pub fn runs(&self) -> Client {
        RunServiceClient::with_interceptor(self.channel.clone(), self.auth.clone())
    }

    pub fn admin(&self) -> AdminClient {
        AdminServiceClient::with_interceptor(self.channel.clone(), self.auth.clone())
    }
}

/// Where `drover dev` leaves its token and the CLI looks when neither `--token` nor
/// `DROVER_TOKEN` is given: `$XDG_CONFIG_HOME/drover/token`, else `~/.config/drover/token`.
pub fn token_file() -> Option<std::path::PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".config"))
        })?;
    Some(base.join("drover").join("token"))
}

/// The token to use: the flag or variable, else the token file's first line.
pub fn resolve_token(given: Option<String>) -> Option<String> {
    given.filter(|t| !t.trim().is_empty()).or_else(|| {
        let text = std::fs::read_to_string(token_file()?).ok()?;
        let line = text.lines().next()?.trim().to_owned();
        (!line.is_empty()).then_some(line)
    })
}

pub async fn connect(endpoint: &str, token: Option<&str>) -> anyhow::Result<Connection> {
    let channel = Channel::from_shared(endpoint.to_owned())
        .with_context(|| format!("invalid endpoint {endpoint}"))?
        .connect()
        .await
        .with_context(|| format!("cannot reach drover at {endpoint}"))?;
    let auth = match token {
        Some(t) => Auth::new(t)?,
        None => Auth::none(),
    };
    Ok(Connection { channel, auth })
}

/// What a call was about, so NOT_FOUND can say "no such run" or "no such agent".
#[derive(Debug, Clone, Copy)]
pub enum Subject {
    Run,
    Agent,
    Other,
}

/// What a gRPC code means, in words.
pub fn meaning(code: Code, subject: Subject) -> &'static str {
    match code {
        Code::Ok => "ok",
        Code::NotFound => match subject {
            Subject::Run => "no such run",
            Subject::Agent => "no such agent",
            Subject::Other => "not found",
        },
        Code::InvalidArgument => "invalid request",
        Code::FailedPrecondition => "not possible in its current state",
        Code::AlreadyExists => "already exists",
        Code::Unauthenticated => {
            "not authenticated (set --token or DROVER_TOKEN, or run `drover admin bootstrap`)"
        }
        Code::PermissionDenied => "permission denied",
        Code::ResourceExhausted => "rate limit or quota reached; retry later",
        Code::Unavailable => "drover is unavailable; retry later",
        Code::DeadlineExceeded => "timed out",
        Code::Unimplemented => "not supported by this server",
        Code::Aborted => "conflicting change; retry",
        Code::Cancelled => "call cancelled",
        Code::OutOfRange => "out of range",
        Code::Internal | Code::Unknown | Code::DataLoss => "server error",
    }
}

/// A failed call as one line: the code's meaning, then the server's words when they add
/// something.
pub fn describe(status: &Status, subject: Subject) -> String {
    let meaning = meaning(status.code(), subject);
    let message = status
        .message()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    if message.is_empty() || (status.code() == Code::NotFound && message.ends_with("not found")) {
        meaning.to_owned()
    } else {
        format!("{meaning}: {message}")
    }
}

/// `describe` as an error, prefixed with what was being done ("cannot cancel run X").
pub fn failed(action: impl std::fmt::Display, subject: Subject, status: &Status) -> anyhow::Error {
    anyhow::anyhow!("{action}: {}", describe(status, subject))
}

/// GetRun, with errors worded for people.
pub async fn fetch_run(client: &mut Client, run_id: &str) -> anyhow::Result<drover_proto::v1::Run> {
    client
        .get_run(drover_proto::v1::GetRunRequest {
            run_id: run_id.to_owned(),
        })
        .await
        .map_err(|s| failed(format!("cannot get run {run_id}"), Subject::Run, &s))?
        .into_inner()
        .run
        .context("server returned no run")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_found_names_the_subject_once() {
        let s = Status::not_found("run not found");
        assert_eq!(describe(&s, Subject::Run), "no such run");
        let s = Status::not_found("agent not found");
        assert_eq!(describe(&s, Subject::Agent), "no such agent");
    }

    #[test]
    fn other_codes_keep_the_server_words_on_one_line() {
        let s = Status::failed_precondition("run already ended\nCANCELLED; nothing to cancel");
        assert_eq!(
            describe(&s, Subject::Run),
            "not possible in its current state: run already ended CANCELLED; nothing to cancel"
        );
        let s = Status::invalid_argument("invalid run_id: not a uuid");
        assert_eq!(
            describe(&s, Subject::Run),
            "invalid request: invalid run_id: not a uuid"
        );
    }
}
