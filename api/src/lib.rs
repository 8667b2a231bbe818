//! drover-api: the gRPC server clients, agents and operators talk to (RunService,
//! AgentService, AdminService, `grpc.health.v1`, server reflection), plus the outbox relay
//! that publishes what it commits.
//!
//! It owns request validation, the mapping of errors to gRPC codes ([`error`]) and the
//! WatchRun fan-out ([`watch`]). It must not consume run queues or run containers, and it
//! never returns driver or internal text to clients.

pub mod admin_service;
pub mod admin_tokens;
pub mod agent_service;
pub mod artifacts;
pub mod auth;
pub mod error;
pub mod limits;
pub mod live;
pub mod log_stream;
pub mod quota;
pub mod rate_limit;
pub mod run_service;
pub mod settings;
pub mod state;
pub mod token_cache;
pub mod watch;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use drover_core::artifacts::LocalStore;
use drover_core::events::EventBus;
use drover_core::observe::{self, Health};
use drover_core::outbox_relay::OutboxRelay;
use drover_core::secrets_crypto::SecretKeys;
use drover_core::{CoreError, audit, db};
use drover_proto::v1 as pb;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::server::TcpIncoming;

pub use settings::Settings;

/// The accepted connections, with `TCP_NODELAY` set. tonic sets it only on listeners it binds
/// itself; on ours Nagle's algorithm held each stream message written after the response
/// headers until the client's delayed ACK, 40 ms later (every WatchRun's first event).
fn incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}
use state::AppState;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Core(#[from] CoreError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("redis url is invalid: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("grpc server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("invalid secrets configuration: {0}")]
    Secrets(#[from] drover_core::secrets_crypto::KeyConfigError),
    #[error("reflection set-up failed: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("artifact store: {0}")]
    Artifacts(#[from] drover_core::artifacts::StoreError),
    #[error(transparent)]
    Observe(#[from] observe::ObserveError),
}

/// A built API: database migrated and listener bound, not yet serving.
pub struct Application {
    state: AppState,
    listener: TcpListener,
    addr: SocketAddr,
    metrics: Option<observe::Endpoint>,
    relay: OutboxRelay,
}

impl Application {
    /// Connects to Postgres, applies migrations and binds the listener (port 0 allowed).
    pub async fn build(settings: Settings) -> Result<Self, StartError> {
        let secret_keys = SecretKeys::from_settings(&settings.secrets)?.map(Arc::new);
        match &secret_keys {
            Some(k) => tracing::info!(active_key_id = k.active_id(), "tenant secrets enabled"),
            None => tracing::warn!(
                "no secrets key configured (DROVER_SECRETS__KEYS): the secret RPCs are disabled"
            ),
        }
        let pool = db::connect(&settings.database).await?;
        db::migrate(&pool).await?;
        let bus = Arc::new(EventBus::new(&settings.redis.url, &settings.redis.prefix)?);
        let store = LocalStore::open(&settings.artifacts.root_dir())?;
        let listener = TcpListener::bind(&settings.listen_addr)
            .await
            .map_err(|source| StartError::Bind {
                addr: settings.listen_addr.clone(),
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| StartError::Bind {
            addr: settings.listen_addr.clone(),
            source,
        })?;
        let metrics = observe::bind(&settings.metrics).await?;
        let limiter = Arc::new(rate_limit::RateLimiter::new(
            settings.rate_limit.clone(),
            bus.client().clone(),
            &settings.redis.prefix,
        ));
        let live = live::LiveHub::new(bus.client().clone());
        let relay = OutboxRelay::new(
            pool.clone(),
            settings.amqp.url.clone(),
            settings.amqp.delivery_limit,
            settings.relay.clone(),
            "drover-api",
        );
        Ok(Self {
            state: AppState {
                outbox: relay.handoff(),
                live,
                pool,
                bus,
                secret_keys,
                artifacts: Arc::new(store),
                limiter,
                tokens: Arc::new(token_cache::TokenCache::new(Duration::from_millis(
                    settings.token_cache_ms,
                ))),
                settings: Arc::new(settings),
            },
            listener,
            addr,
            metrics,
            relay,
        })
    }

    /// Where `/metrics`, `/healthz` and `/readyz` are served, when configured.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().map(|m| m.addr)
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until `cancel` fires, then stops intake, lets in-flight calls finish and stops
    /// the relay.
    pub async fn run_until_stopped(mut self, cancel: CancellationToken) -> Result<(), StartError> {
        let tasks = TaskTracker::new();
        let health = Health::new(&["postgres", "migrations"]);
        if let Some(endpoint) = self.metrics.take() {
            endpoint.spawn(health.clone(), cancel.child_token())?;
        }
        let settings = &self.state.settings;
        tasks.spawn(self.relay.run(cancel.child_token()));
        tasks.spawn(
            audit::Sealer {
                pool: self.state.pool.clone(),
                settings: settings.audit.clone(),
            }
            .run(cancel.child_token()),
        );
        tasks.spawn(
            self.state
                .tokens
                .clone()
                .listen(self.state.pool.clone(), cancel.child_token()),
        );
        tasks.spawn(artifacts::collect_garbage(
            self.state.clone(),
            cancel.child_token(),
        ));

        let (reporter, health_service) = tonic_health::server::health_reporter();
        set_grpc_health(&reporter, true).await;
        // Postgres checked every 2 s: gRPC health and /readyz follow it.
        let (ready_tx, mut ready_rx) = tokio::sync::watch::channel(true);
        tasks.spawn(observe::watch_postgres(
            self.state.pool.clone(),
            health,
            cancel.child_token(),
            move |ready| {
                let _ = ready_tx.send(ready);
            },
        ));
        let health_stop = cancel.child_token();
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = health_stop.cancelled() => return,
                    changed = ready_rx.changed() => {
                        if changed.is_err() {
                            return;
                        }
                    }
                }
                let ready = *ready_rx.borrow_and_update();
                tracing::info!(serving = ready, "grpc health follows postgres");
                set_grpc_health(&reporter, ready).await;
            }
        });
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;

        tracing::info!(addr = %self.addr, "drover-api serving");
        let shutdown = cancel.clone();
        tonic::transport::Server::builder()
            // One span per call, continuing the caller's `traceparent`.
            .trace_fn(drover_core::telemetry::grpc_server_span)
            .layer(tower::util::MapResponseLayer::new(limits::remap))
            .add_service(health_service)
            .add_service(reflection)
            .add_service(
                pb::run_service_server::RunServiceServer::new(run_service::RunApi::new(
                    self.state.clone(),
                ))
                .max_decoding_message_size(limits::RUN_SERVICE_MAX_MESSAGE_BYTES),
            )
            .add_service(
                pb::agent_service_server::AgentServiceServer::new(agent_service::AgentApi::new(
                    self.state.clone(),
                ))
                .max_decoding_message_size(limits::AGENT_SERVICE_MAX_MESSAGE_BYTES),
            )
            .add_service(
                pb::admin_service_server::AdminServiceServer::new(admin_service::AdminApi::new(
                    self.state.clone(),
                ))
                .max_decoding_message_size(limits::ADMIN_SERVICE_MAX_MESSAGE_BYTES),
            )
            .serve_with_incoming_shutdown(incoming(self.listener), async move {
                shutdown.cancelled().await;
            })
            .await?;

        tasks.close();
        if tokio::time::timeout(Duration::from_secs(10), tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("background tasks did not stop within 10 s");
        }
        self.state.pool.close().await;
        tracing::info!("drover-api stopped");
        Ok(())
    }
}

/// SERVING or NOT_SERVING for the whole server ("") and each service.
async fn set_grpc_health(reporter: &tonic_health::server::HealthReporter, serving: bool) {
    use tonic_health::ServingStatus;
    let status = if serving {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    reporter.set_service_status("", status).await;
    reporter
        .set_service_status(
            <pb::run_service_server::RunServiceServer<run_service::RunApi> as tonic::server::NamedService>::NAME,
            status,
        )
        .await;
    reporter
        .set_service_status(
            <pb::agent_service_server::AgentServiceServer<agent_service::AgentApi> as tonic::server::NamedService>::NAME,
            status,
        )
        .await;
    reporter
        .set_service_status(
            <pb::admin_service_server::AdminServiceServer<admin_service::AdminApi> as tonic::server::NamedService>::NAME,
            status,
        )
        .await;
}

#[cfg(test)]
mod incoming_tests {
    use futures::StreamExt;

    #[tokio::test]
    async fn accepted_connections_disable_nagle() {
        let listener = super::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut incoming = super::incoming(listener);
        let _client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let accepted = incoming
            .next()
            .await
            .expect("a connection")
            .expect("accepted");
        assert!(accepted.nodelay().expect("readable option"));
    }
}
