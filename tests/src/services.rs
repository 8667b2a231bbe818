//! Per-test isolation on the shared services: a fresh database and a fresh vhost.

use std::process::Command;

use sqlx::{Connection, PgConnection};

/// Admin URL of the shared Postgres (override with `DROVER_TEST_PG_URL`).
pub fn pg_admin_url() -> String {
    std::env::var("DROVER_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://drover:drover@127.0.0.1:5432/drover".into())
}

pub fn redis_url() -> String {
    std::env::var("DROVER_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

const MISSING: &str = "run `deploy/local-services.sh` (it installs and starts Postgres, Redis, \
                       RabbitMQ and builds drover/busybox:latest)";

/// Creates an empty database with a unique name; returns its name and URL.
pub async fn create_database(tag: &str) -> (String, String) {
    let admin = pg_admin_url();
    let mut conn = PgConnection::connect(&admin)
        .await
        .unwrap_or_else(|e| panic!("postgres not reachable at {admin}: {e}; {MISSING}"));
    let name = format!("drover_t_{tag}");
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .expect("create test database");
    let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(&admin);
    (name.clone(), format!("{base}/{name}"))
}

/// A fresh database with drover's migrations applied, for repository-level tests: its name
/// (for [`drop_database`]) and a pool of at most `connections`.
pub async fn migrated_database(connections: u32) -> (String, sqlx::PgPool) {
    let tag = uuid::Uuid::now_v7().simple().to_string();
    let (name, url) = create_database(&tag).await;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(connections)
        .connect(&url)
        .await
        .unwrap_or_else(|e| panic!("connect to the fresh database {name}: {e}"));
    drover_core::db::migrate(&pool)
        .await
        .unwrap_or_else(|e| panic!("migrate {name}: {e}"));
    (name, pool)
}

/// The smallest valid run spec: `true` in the test image.
pub fn noop_spec() -> drover_core::spec::RunSpec {
    drover_core::spec::RawSpec {
        image: "drover/busybox:latest".into(),
        command: vec!["true".into()],
        ..Default::default()
    }
    .validate()
    .unwrap_or_else(|e| panic!("the no-op spec is valid: {e}"))
}

pub async fn drop_database(name: &str) {
    if let Ok(mut conn) = PgConnection::connect(&pg_admin_url()).await {
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(&mut conn)
            .await;
    }
}

fn rabbitmqctl(args: &[&str]) -> Result<(), String> {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run rabbitmqctl: {e}; {MISSING}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "rabbitmqctl {args:?} failed: {}{}; {MISSING}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Creates a vhost with full permissions for `guest`; returns the AMQP URL for it.
pub fn create_vhost(vhost: &str) -> String {
    rabbitmqctl(&["-q", "add_vhost", vhost]).unwrap_or_else(|e| panic!("{e}"));
    rabbitmqctl(&[
        "-q",
        "set_permissions",
        "-p",
        vhost,
        "guest",
        ".*",
        ".*",
        ".*",
    ])
    .unwrap_or_else(|e| panic!("{e}"));
    format!("amqp://guest:guest@127.0.0.1:5672/{vhost}")
}

pub fn delete_vhost(vhost: &str) {
    let _ = rabbitmqctl(&["-q", "delete_vhost", vhost]);
}

/// Fails loudly unless the Docker daemon answers and the test image exists.
pub fn require_docker_image(image: &str) {
    let out = Command::new("docker")
        .args(["image", "inspect", "--format", "{{.Id}}", image])
        .output()
        .unwrap_or_else(|e| panic!("cannot run docker: {e}; {MISSING}"));
    assert!(
        out.status.success(),
        "docker image {image} missing or daemon not answering: {}; {MISSING}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Containers carrying the label `drover.run=<run_id>` (running or not). A daemon error fails
/// the test rather than passing for "no container".
pub fn containers_for_run(run_id: &str) -> Vec<String> {
    let out = Command::new("docker")
        .args([
            "ps",
            "-a",
            "-q",
            "--filter",
            &format!("label=drover.run={run_id}"),
        ])
        .output()
        .unwrap_or_else(|e| panic!("cannot run docker: {e}; {MISSING}"));
    assert!(
        out.status.success(),
        "docker ps failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect()
}

/// Publishes one persistent message (with publisher confirms) through `exchange`, as a test
/// injecting a duplicate or a poison message would.
pub async fn publish(amqp_url: &str, exchange: &str, routing_key: &str, body: &[u8]) {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    let conn = lapin::Connection::connect(amqp_url, lapin::ConnectionProperties::default())
        .await
        .expect("connect to rabbitmq");
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let confirm = ch
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            body,
            lapin::BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    assert!(
        matches!(confirm, lapin::Confirmation::Ack(None)),
        "message to {exchange}/{routing_key} was not routed: {confirm:?}"
    );
    let _ = conn.close(200, "done".into()).await;
}

/// Whether `queue` exists in `vhost` (asked of rabbitmqctl, as the vhost was created).
pub fn queue_exists(vhost: &str, queue: &str) -> bool {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["-q", "list_queues", "-p", vhost, "name"])
        .output()
        .expect("rabbitmqctl");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.trim() == queue)
}
