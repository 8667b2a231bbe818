//! Isolation on the shared local services, as the end-to-end tests do it
//! (`tests/src/services.rs`): a fresh RabbitMQ vhost (deleted on drop) and a fresh Postgres
//! database (dropped by [`drop_database`]).

use std::process::Command;

use sqlx::{Connection, PgConnection};

fn rabbitmqctl(args: &[&str]) -> Result<(), String> {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run rabbitmqctl: {e} (run deploy/local-services.sh)"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "rabbitmqctl {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// A vhost with full permissions for `guest`, deleted when dropped.
#[derive(Debug)]
pub struct Vhost {
    pub name: String,
    /// `amqp://guest:guest@<host>/<name>`.
    pub url: String,
}

impl Vhost {
    /// `host` is `127.0.0.1:5672`-style.
    pub fn create(name: &str, host: &str) -> Result<Self, String> {
        rabbitmqctl(&["-q", "add_vhost", name])?;
        let vhost = Self {
            name: name.to_owned(),
            url: format!("amqp://guest:guest@{host}/{name}"),
        };
        rabbitmqctl(&[
            "-q",
            "set_permissions",
            "-p",
            name,
            "guest",
            ".*",
            ".*",
            ".*",
        ])?;
        Ok(vhost)
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        let _ = rabbitmqctl(&["-q", "delete_vhost", &self.name]);
    }
}

/// Creates database `name` through the admin URL; returns the new database's URL.
pub async fn create_database(admin_url: &str, name: &str) -> Result<String, sqlx::Error> {
    let mut conn = PgConnection::connect(admin_url).await?;
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await?;
    let base = admin_url.rsplit_once('/').map_or(admin_url, |(b, _)| b);
    Ok(format!("{base}/{name}"))
}

pub async fn drop_database(admin_url: &str, name: &str) {
    if let Ok(mut conn) = PgConnection::connect(admin_url).await {
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(&mut conn)
            .await;
    }
}
