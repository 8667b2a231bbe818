//! Postgres pool and migrations. Migrations are embedded so every binary can apply them at
//! start-up (idempotent, serialised by sqlx's advisory lock).

use std::time::Duration;

use secrecy::ExposeSecret;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

use crate::config::DatabaseSettings;
use crate::error::CoreError;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

pub async fn connect(settings: &DatabaseSettings) -> Result<PgPool, CoreError> {
    let pool = PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .acquire_timeout(Duration::from_millis(settings.acquire_timeout_ms))
        .connect(settings.url.expose_secret())
        .await?;
    Ok(pool)
}

pub async fn migrate(pool: &PgPool) -> Result<(), CoreError> {
    MIGRATOR.run(pool).await?;
    Ok(())
}
