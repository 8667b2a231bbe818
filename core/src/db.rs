//! Postgres pool and migrations. Migrations are embedded so every binary can apply them at
//! start-up (idempotent, serialised by sqlx's advisory lock).

use std::time::Duration;

use secrecy::ExposeSecret;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

use crate::config::DatabaseSettings;
use crate::error::CoreError;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// A connection idle longer than this is pinged before it is handed out.
///
/// sqlx pings every connection when it goes back to the pool, and by default again when it is
/// taken out: two round trips per use besides the statement itself, the second one on every
/// request's path (measured: a run made about seven such acquisitions end to end, at ~0.3 ms
/// each on an idle machine). A connection released a moment ago was just answered by that
/// release ping; only one that has sat idle longer (a Postgres restart or a dropped TCP
/// session could have ended it meanwhile) is tested again. One that died sooner than this
/// fails its statement, which every caller already treats as a database error (retried with
/// backoff, or UNAVAILABLE to the client), as it would if Postgres went away mid-statement.
pub const RETEST_IDLE_AFTER: Duration = Duration::from_secs(1);

pub async fn connect(settings: &DatabaseSettings) -> Result<PgPool, CoreError> {
    let pool = PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .acquire_timeout(Duration::from_millis(settings.acquire_timeout_ms))
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for > RETEST_IDLE_AFTER {
                    sqlx::Connection::ping(conn).await?;
                }
                Ok(true)
            })
        })
        .connect(settings.url.expose_secret())
        .await?;
    Ok(pool)
}

pub async fn migrate(pool: &PgPool) -> Result<(), CoreError> {
    MIGRATOR.run(pool).await?;
    Ok(())
}
