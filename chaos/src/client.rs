//! The one place where drover-chaos makes gRPC clients: every RunService and AdminService
//! client of the crate comes from [`connect`], so credentials (a bearer token on every call)
//! are added in one spot.

use std::time::Duration;

pub use drover_core::bearer::Bearer as Auth;
use drover_proto::v1::admin_service_client::AdminServiceClient;
use drover_proto::v1::run_service_client::RunServiceClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

pub type RunClient = RunServiceClient<InterceptedService<Channel, Auth>>;
pub type AdminClient = AdminServiceClient<InterceptedService<Channel, Auth>>;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid endpoint {0}: {1}")]
    Endpoint(String, #[source] tonic::transport::Error),
    #[error("cannot reach drover at {0}: {1}")]
    Connect(String, #[source] tonic::transport::Error),
    #[error("the token contains characters not allowed in a header")]
    Token,
}

/// A channel plus the credentials every call carries; cheap to clone.
#[derive(Clone, Debug)]
pub struct Connection {
    channel: Channel,
    auth: Auth,
}

impl Connection {
    pub fn runs(&self) -> RunClient {
        RunServiceClient::with_interceptor(self.channel.clone(), self.auth.clone())
    }

    pub fn admin(&self) -> AdminClient {
        AdminServiceClient::with_interceptor(self.channel.clone(), self.auth.clone())
    }
}

fn auth(token: Option<&str>) -> Result<Auth, ClientError> {
    match token {
        Some(t) => Auth::new(t).map_err(|_| ClientError::Token),
        None => Ok(Auth::none()),
    }
}

fn endpoint(url: &str) -> Result<Endpoint, ClientError> {
    Ok(Endpoint::from_shared(url.to_owned())
        .map_err(|e| ClientError::Endpoint(url.to_owned(), e))?
        .connect_timeout(Duration::from_secs(3)))
}

/// Connects now: fails if the API does not answer.
pub async fn connect(url: &str, token: Option<&str>) -> Result<Connection, ClientError> {
    let channel = endpoint(url)?
        .connect()
        .await
        .map_err(|e| ClientError::Connect(url.to_owned(), e))?;
    Ok(Connection {
        channel,
        auth: auth(token)?,
    })
}

/// Connects on first use and reconnects whenever the API comes back, for clients that must
/// outlive an API crash. Every call gets `timeout`, so a call to a frozen API fails instead
/// of hanging the client.
pub fn connect_lazy(
    url: &str,
    token: Option<&str>,
    timeout: Duration,
) -> Result<Connection, ClientError> {
    let channel = endpoint(url)?.timeout(timeout).connect_lazy();
    Ok(Connection {
        channel,
        auth: auth(token)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Request;
    use tonic::service::Interceptor;

    #[test]
    fn the_token_becomes_a_bearer_header() {
        let mut a = auth(Some("s3cret")).expect("valid token");
        let req = a.call(Request::new(())).expect("intercepted");
        assert_eq!(
            req.metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok()),
            Some("Bearer s3cret")
        );
        let mut none = auth(None).expect("no token");
        let req = none.call(Request::new(())).expect("intercepted");
        assert!(req.metadata().get("authorization").is_none());
        assert!(matches!(auth(Some("bad\nvalue")), Err(ClientError::Token)));
    }
}
