//! The client side of authentication: a tonic interceptor that puts `authorization: Bearer
//! <token>` on every call. Shared by the agent, the CLI, the chaos harness and the tests.

use secrecy::{ExposeSecret, SecretString};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::{Request, Status};

#[derive(Clone, Default)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl std::fmt::Debug for Bearer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Bearer(<redacted>)"
        } else {
            "Bearer(none)"
        })
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the token contains characters not allowed in a header")]
pub struct InvalidToken;

impl Bearer {
    /// No credentials: calls go out unauthenticated (and the API refuses them).
    pub fn none() -> Self {
        Self(None)
    }

    pub fn new(token: &str) -> Result<Self, InvalidToken> {
        let mut v: MetadataValue<Ascii> = format!("Bearer {}", token.trim())
            .parse()
            .map_err(|_| InvalidToken)?;
        v.set_sensitive(true);
        Ok(Self(Some(v)))
    }

    /// From a configured secret; empty means none.
    pub fn from_secret(token: &SecretString) -> Result<Self, InvalidToken> {
        match token.expose_secret().trim() {
            "" => Ok(Self::none()),
            t => Self::new(t),
        }
    }

    pub fn is_set(&self) -> bool {
        self.0.is_some()
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}
