//! Tenant secrets in Postgres, sealed by [`crate::secrets_crypto`]. Only names, key ids and
//! times ever come back out of this module in clear, except through [`reveal`], which the API
//! calls for the agent holding a run's current lease.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Row};

use crate::error::CoreError;
use crate::ids::TenantId;
use crate::secrets_crypto::{Sealed, SecretKeys, SecretsCryptoError};

/// A secret as listed: everything but the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretInfo {
    pub name: String,
    pub key_id: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error(transparent)]
    Core(#[from] CoreError),
    #[error(transparent)]
    Crypto(#[from] SecretsCryptoError),
}

impl From<sqlx::Error> for SecretsError {
    fn from(e: sqlx::Error) -> Self {
        SecretsError::Core(CoreError::Database(e))
    }
}

fn info(row: &sqlx::postgres::PgRow) -> Result<SecretInfo, sqlx::Error> {
    Ok(SecretInfo {
        name: row.try_get("name")?,
        key_id: row.try_get("key_id")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

/// Seals `value` with the active key and stores it under `(tenant, name)`, replacing any
/// earlier value. Returns the stored row and whether it was created (not replaced).
pub async fn put(
    pool: &PgPool,
    keys: &SecretKeys,
    tenant: TenantId,
    name: &str,
    value: &str,
    actor: &str,
) -> Result<(SecretInfo, bool), SecretsError> {
    let sealed = keys.seal(tenant, name, value.as_bytes())?;
    let mut tx = pool.begin().await.map_err(CoreError::from)?;
    let row = sqlx::query(
        "INSERT INTO secrets (tenant_id, name, key_id, nonce, ciphertext)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (tenant_id, name) DO UPDATE
            SET key_id = EXCLUDED.key_id, nonce = EXCLUDED.nonce,
                ciphertext = EXCLUDED.ciphertext, updated_at = now()
         RETURNING name, key_id, created_at, updated_at, (xmax = 0) AS created",
    )
    .bind(tenant.0)
    .bind(name)
    .bind(&sealed.key_id)
    .bind(&sealed.nonce)
    .bind(&sealed.ciphertext)
    .fetch_one(&mut *tx)
    .await
    .map_err(CoreError::from)?;
    let created: bool = row.try_get("created").map_err(CoreError::from)?;
    let stored = info(&row)?;
    // The audit records that a value changed and under which key, never the value.
    crate::audit::record(
        &mut tx,
        tenant,
        "secret.put",
        actor,
        name,
        &format!("key_id={} created={created}", stored.key_id),
    )
    .await?;
    tx.commit().await.map_err(CoreError::from)?;
    Ok((stored, created))
}

/// Deletes a secret; false if there was none of that name.
pub async fn delete(
    pool: &PgPool,
    tenant: TenantId,
    name: &str,
    actor: &str,
) -> Result<bool, CoreError> {
    let mut tx = pool.begin().await?;
    let done = sqlx::query("DELETE FROM secrets WHERE tenant_id = $1 AND name = $2")
        .bind(tenant.0)
        .bind(name)
        .execute(&mut *tx)
        .await?;
    if done.rows_affected() == 0 {
        tx.rollback().await?;
        return Ok(false);
    }
    crate::audit::record(&mut tx, tenant, "secret.delete", actor, name, "").await?;
    tx.commit().await?;
    Ok(true)
}

/// The tenant's secrets by name, without values.
pub async fn list(pool: &PgPool, tenant: TenantId) -> Result<Vec<SecretInfo>, CoreError> {
    let rows = sqlx::query(
        "SELECT name, key_id, created_at, updated_at FROM secrets
         WHERE tenant_id = $1 ORDER BY name",
    )
    .bind(tenant.0)
    .fetch_all(pool)
    .await?;
    Ok(rows.iter().map(info).collect::<Result<_, _>>()?)
}

/// Which of `names` the tenant has no secret for (in the order given).
pub async fn missing(
    pool: &PgPool,
    tenant: TenantId,
    names: &[String],
) -> Result<Vec<String>, CoreError> {
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let present: Vec<String> =
        sqlx::query_scalar("SELECT name FROM secrets WHERE tenant_id = $1 AND name = ANY($2)")
            .bind(tenant.0)
            .bind(names)
            .fetch_all(pool)
            .await?;
    Ok(names
        .iter()
        .filter(|n| !present.contains(n))
        .cloned()
        .collect())
}

/// What [`reveal`] could open: values by name, and the names it could not deliver with why
/// (no such secret, or it does not decrypt with the configured keys).
#[derive(Default)]
pub struct Revealed {
    pub values: BTreeMap<String, String>,
    pub unavailable: Vec<(String, String)>,
}

impl std::fmt::Debug for Revealed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Revealed")
            .field("names", &self.values.keys().collect::<Vec<_>>())
            .field("unavailable", &self.unavailable)
            .finish()
    }
}

/// Decrypts the named secrets of `tenant`. A name that is missing or does not open is listed
/// in [`Revealed::unavailable`] rather than failing the whole call, so the run's attempt can
/// fail with a clear reason instead of the assignment erroring forever.
pub async fn reveal(
    pool: &PgPool,
    keys: Option<&SecretKeys>,
    tenant: TenantId,
    names: &[String],
) -> Result<Revealed, CoreError> {
    let mut out = Revealed::default();
    if names.is_empty() {
        return Ok(out);
    }
    let rows = sqlx::query(
        "SELECT name, key_id, nonce, ciphertext FROM secrets
         WHERE tenant_id = $1 AND name = ANY($2)",
    )
    .bind(tenant.0)
    .bind(names)
    .fetch_all(pool)
    .await?;
    let mut sealed = BTreeMap::new();
    for row in &rows {
        let name: String = row.try_get("name")?;
        sealed.insert(
            name,
            Sealed {
                key_id: row.try_get("key_id")?,
                nonce: row.try_get("nonce")?,
                ciphertext: row.try_get("ciphertext")?,
            },
        );
    }
    for name in names {
        let Some(s) = sealed.get(name) else {
            out.unavailable
                .push((name.clone(), "no such secret".to_owned()));
            continue;
        };
        let Some(keys) = keys else {
            out.unavailable.push((
                name.clone(),
                "the API has no secrets key configured".to_owned(),
            ));
            continue;
        };
        match keys.open(tenant, name, s) {
            Ok(v) => {
                out.values.insert(name.clone(), v);
            }
            Err(e) => out.unavailable.push((name.clone(), e.to_string())),
        }
    }
    Ok(out)
}
