//! gRPC client set-up: endpoint and optional bearer token (flags or `DROVER_ENDPOINT` /
//! `DROVER_TOKEN`).

use anyhow::Context;
use drover_proto::v1::run_service_client::RunServiceClient;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Status};

#[derive(Clone)]
pub struct Auth(Option<MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

pub type Client = RunServiceClient<InterceptedService<Channel, Auth>>;

pub async fn connect(endpoint: &str, token: Option<&str>) -> anyhow::Result<Client> {
    let channel = Channel::from_shared(endpoint.to_owned())
        .with_context(|| format!("invalid endpoint {endpoint}"))?
        .connect()
        .await
        .with_context(|| format!("cannot reach drover at {endpoint}"))?;
    let auth = match token {
        Some(t) => Some(
            format!("Bearer {t}")
                .parse()
                .context("token contains characters not allowed in a header")?,
        ),
        None => None,
    };
    Ok(RunServiceClient::with_interceptor(channel, Auth(auth)))
}

/// A gRPC error as a person should read it.
pub fn describe(status: &Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

/// GetRun, with errors worded for people.
pub async fn fetch_run(client: &mut Client, run_id: &str) -> anyhow::Result<drover_proto::v1::Run> {
    client
        .get_run(drover_proto::v1::GetRunRequest {
            run_id: run_id.to_owned(),
        })
        .await
        .map_err(|s| anyhow::anyhow!(describe(&s)))?
        .into_inner()
        .run
        .context("server returned no run")
}
