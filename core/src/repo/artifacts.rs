//! Artifact uploads and manifests in Postgres.
//!
//! An upload is a row in `artifact_uploads` from the moment its stream starts (so the garbage
//! collector sees everything that was ever staged), gets its verified manifest when the stream
//! ends, and is committed — its entries copied into `artifacts` — only by
//! [`commit_upload`], which runs inside the transaction that ends the attempt
//! ([`super::attempts::end_attempt_with_artifacts`]). A run therefore has either the complete
//! manifest of the attempt that ended it, or none.
//!
//! Inline artifacts (carried in the completion report) skip the stream: their row is written
//! with its manifest in one statement ([`begin_inline_upload`]), before their blobs are
//! stored, by the one request that alone knows the upload's id and commits it only once the
//! store holds every blob. The collector treats it as any other uncommitted upload.
//!
//! A small inline upload keeps its bytes in `artifact_blobs`, written by that same statement
//! (no file, no fsync: see the migration `20261207000016_artifact_blobs.sql`); its rows go
//! with the upload's (ON DELETE CASCADE), and readers get the bytes with the manifest entry
//! ([`ArtifactRecord::content`]) instead of from the store.

use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, PgPool, Row};
use uuid::Uuid;

use crate::error::{CoreError, Refusal};
use crate::ids::{RunId, TenantId};

/// One verified file or symlink of an upload, as staged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagedEntry {
    pub path: String,
    /// Index of the content in the upload's staging space; `None` for a symlink.
    pub blob: Option<i32>,
    pub size: i64,
    pub sha256: String,
    pub mode: i32,
    pub is_symlink: bool,
    pub link_target: Option<String>,
}

/// A committed manifest entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArtifactRecord {
    pub upload_id: Uuid,
    pub attempt: i32,
    pub entry: StagedEntry,
    /// The bytes, when Postgres holds them (a small inline upload) and the read asked for
    /// them; `None`: the store holds them (or it is a symlink, or the read was a listing).
    pub content: Option<Vec<u8>>,
}

/// Who staged an upload: the lease it was made under.
#[derive(Debug, Clone)]
pub struct NewUpload {
    pub id: Uuid,
    pub tenant_id: TenantId,
    pub run_id: RunId,
    pub attempt: i32,
    pub lease_epoch: i64,
    pub agent_id: String,
}

pub async fn begin_upload(pool: &PgPool, u: &NewUpload) -> Result<(), CoreError> {
    sqlx::query(
        "INSERT INTO artifact_uploads (id, tenant_id, run_id, attempt, lease_epoch, agent_id) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(u.id)
    .bind(u.tenant_id.0)
    .bind(u.run_id.0)
    .bind(u.attempt)
    .bind(u.lease_epoch)
    .bind(&u.agent_id)
    .execute(pool)
    .await?;
    Ok(())
}

/// The manifest column and the file count of `entries`.
pub(crate) fn manifest_of(entries: &[StagedEntry]) -> Result<(serde_json::Value, i32), CoreError> {
    let manifest = serde_json::to_value(entries)
        .map_err(|e| CoreError::Corrupt(format!("artifact manifest: {e}")))?;
    Ok((manifest, i32::try_from(entries.len()).unwrap_or(i32::MAX)))
}

/// The bytes of an upload that Postgres keeps (`artifact_blobs`): blob index and content,
/// side by side as the statements bind them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeptBytes {
    pub indexes: Vec<i32>,
    pub contents: Vec<Vec<u8>>,
}

/// Writes the row of an inline upload, manifest included, if `agent` holds `run_id` under
/// `epoch` (ASSIGNED or RUNNING); `false` when it does not. Tenant and attempt come from the
/// run row, so the caller needs no read of its own. `in_database` is written to
/// `artifact_blobs` by the same statement: the upload's bytes when they are small enough to
/// keep in Postgres, empty when the store is to hold them.
#[allow(clippy::too_many_arguments)]
pub async fn begin_inline_upload(
    pool: &PgPool,
    id: Uuid,
    run_id: RunId,
    epoch: i64,
    agent: &str,
    entries: &[StagedEntry],
    bytes: i64,
    in_database: &KeptBytes,
) -> Result<bool, CoreError> {
    let (manifest, files) = manifest_of(entries)?;
    let written: i64 = sqlx::query_scalar(
        "WITH up AS (INSERT INTO artifact_uploads (id, tenant_id, run_id, attempt, lease_epoch, \
         agent_id, manifest, files, bytes, completed_at) \
         SELECT $1, r.tenant_id, r.id, r.attempt, r.lease_epoch, r.agent_id, $5, $6, $7, now() \
         FROM runs r WHERE r.id = $2 AND r.lease_epoch = $3 AND r.agent_id = $4 \
         AND r.state IN ('ASSIGNED', 'RUNNING') RETURNING id), \
         blobs AS (INSERT INTO artifact_blobs (upload_id, blob, content) \
         SELECT up.id, b.blob, b.content FROM up, \
         unnest($8::integer[], $9::bytea[]) AS b(blob, content)) \
         SELECT count(*) FROM up",
    )
    .bind(id)
    .bind(run_id.0)
    .bind(epoch)
    .bind(agent)
    .bind(manifest)
    .bind(files)
    .bind(bytes)
    .bind(&in_database.indexes)
    .bind(&in_database.contents)
    .fetch_one(pool)
    .await?;
    Ok(written == 1)
}

/// Records the verified manifest, if the lease the upload was made under is still current
/// (the run may have been reaped or cancelled while bytes were arriving). `false` when it is
/// not, or when the collector already discarded the upload.
pub async fn complete_upload(
    pool: &PgPool,
    id: Uuid,
    entries: &[StagedEntry],
    bytes: i64,
) -> Result<bool, CoreError> {
    let (manifest, files) = manifest_of(entries)?;
    let done = sqlx::query(
        "UPDATE artifact_uploads u SET manifest = $2, files = $3, bytes = $4, \
         completed_at = now() \
         FROM runs r \
         WHERE u.id = $1 AND r.id = u.run_id AND u.completed_at IS NULL \
         AND r.lease_epoch = u.lease_epoch AND r.agent_id = u.agent_id \
         AND r.state IN ('ASSIGNED', 'RUNNING')",
    )
    .bind(id)
    .bind(manifest)
    .bind(files)
    .bind(bytes)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Forgets an upload that was never committed (a failed stream); its files are the caller's
/// to delete. A committed upload is left alone.
pub async fn discard_upload(pool: &PgPool, id: Uuid) -> Result<bool, CoreError> {
    let done = sqlx::query("DELETE FROM artifact_uploads WHERE id = $1 AND committed_at IS NULL")
        .bind(id)
        .execute(pool)
        .await?;
    Ok(done.rows_affected() == 1)
}

/// Checks that `upload` was completed by `agent` for `run_id` under `epoch`, and if
/// `terminal`, commits its manifest. Called with the run row locked, in the transaction that
/// ends the attempt; a refusal rolls the whole end back.
pub async fn commit_upload(
    conn: &mut PgConnection,
    run_id: RunId,
    upload: Uuid,
    agent: Option<&str>,
    epoch: i64,
    terminal: bool,
) -> Result<(), CoreError> {
    if terminal && commit_first_upload(conn, run_id, upload, agent, epoch).await? {
        return Ok(());
    }
    let row = sqlx::query(
        "SELECT run_id, lease_epoch, agent_id, completed_at IS NOT NULL AS completed, \
         committed_at IS NOT NULL AS committed, \
         EXISTS (SELECT 1 FROM artifact_uploads o WHERE o.run_id = $2 \
                 AND o.committed_at IS NOT NULL) AS replaces \
         FROM artifact_uploads WHERE id = $1 FOR UPDATE",
    )
    .bind(upload)
    .bind(run_id.0)
    .fetch_optional(&mut *conn)
    .await?;
    let refuse = |why: String| Err(CoreError::Refused(Refusal::Upload(why)));
    let Some(row) = row else {
        return refuse(format!("artifact upload {upload} is not known"));
    };
    let (r, e, a): (Uuid, i64, String) = (
        row.try_get("run_id")?,
        row.try_get("lease_epoch")?,
        row.try_get("agent_id")?,
    );
    if r != run_id.0 || agent.is_some_and(|agent| agent != a) {
        return refuse(format!(
            "artifact upload {upload} does not belong to this run and agent"
        ));
    }
    if e != epoch {
        return refuse(format!(
            "artifact upload {upload} was made under lease epoch {e}, not {epoch}"
        ));
    }
    if !row.try_get::<bool, _>("completed")? {
        return refuse(format!("artifact upload {upload} did not complete"));
    }
    if row.try_get::<bool, _>("committed")? || !terminal {
        return Ok(());
    }
    // A redriven run ends again: the attempt that ends it now replaces the manifest of the
    // one that ended it before, whose upload becomes garbage for the collector. Two
    // statements: the clearing, then the new manifest (a delete and an insert of the same
    // keys in one statement would race each other). The run row is locked, so nothing
    // commits another upload of it between the check above and here.
    if row.try_get::<bool, _>("replaces")? {
        sqlx::query(
            "WITH gone AS (DELETE FROM artifacts WHERE run_id = $1) \
             UPDATE artifact_uploads SET committed_at = NULL \
             WHERE run_id = $1 AND committed_at IS NOT NULL",
        )
        .bind(run_id.0)
        .execute(&mut *conn)
        .await?;
    }
    sqlx::query(
        "WITH manifest AS (INSERT INTO artifacts (run_id, path, tenant_id, attempt, upload_id, \
         blob, size, sha256, mode, is_symlink, link_target) \
         SELECT u.run_id, e.path, u.tenant_id, u.attempt, u.id, e.blob, e.size, e.sha256, \
         e.mode, e.is_symlink, e.link_target \
         FROM artifact_uploads u, jsonb_to_recordset(u.manifest) AS e(path text, blob integer, \
         size bigint, sha256 text, mode integer, is_symlink boolean, link_target text) \
         WHERE u.id = $1) \
         UPDATE artifact_uploads SET committed_at = now() WHERE id = $1",
    )
    .bind(upload)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// The common case of [`commit_upload`] in one statement: a completed upload of this run,
/// agent and epoch, not committed yet, ending a run that has no committed manifest (not a
/// redriven run's second end). `false`: nothing written, and the checked path decides (and
/// explains a refusal). Saves a round trip on every run's end.
async fn commit_first_upload(
    conn: &mut PgConnection,
    run_id: RunId,
    upload: Uuid,
    agent: Option<&str>,
    epoch: i64,
) -> Result<bool, CoreError> {
    let done = sqlx::query(
        "WITH u AS (SELECT u.* FROM artifact_uploads u WHERE u.id = $1 AND u.run_id = $2 \
           AND u.lease_epoch = $3 AND ($4::text IS NULL OR u.agent_id = $4) \
           AND u.completed_at IS NOT NULL AND u.committed_at IS NULL \
           AND NOT EXISTS (SELECT 1 FROM artifact_uploads o WHERE o.run_id = $2 \
                           AND o.committed_at IS NOT NULL) \
           FOR UPDATE), \
         manifest AS (INSERT INTO artifacts (run_id, path, tenant_id, attempt, upload_id, \
           blob, size, sha256, mode, is_symlink, link_target) \
           SELECT u.run_id, e.path, u.tenant_id, u.attempt, u.id, e.blob, e.size, e.sha256, \
           e.mode, e.is_symlink, e.link_target \
           FROM u, jsonb_to_recordset(u.manifest) AS e(path text, blob integer, size bigint, \
           sha256 text, mode integer, is_symlink boolean, link_target text)) \
         UPDATE artifact_uploads a SET committed_at = now() FROM u WHERE a.id = u.id",
    )
    .bind(upload)
    .bind(run_id.0)
    .bind(epoch)
    .bind(agent)
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Whether a read of the manifest brings the bytes Postgres holds ([`ArtifactRecord::content`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Content {
    /// The entries only (a listing).
    Without,
    /// The entries and, for a small upload's files, their bytes (a download).
    With,
}

impl Content {
    /// The select list and joins of a manifest read: `artifacts a`, and its bytes if asked.
    fn select_list(self) -> &'static str {
        match self {
            Content::Without => {
                "a.upload_id, a.attempt, a.path, a.blob, a.size, a.sha256, a.mode, a.is_symlink, \
                 a.link_target, NULL::bytea AS content FROM artifacts a"
            }
            Content::With => {
                "a.upload_id, a.attempt, a.path, a.blob, a.size, a.sha256, a.mode, a.is_symlink, \
                 a.link_target, b.content FROM artifacts a LEFT JOIN artifact_blobs b \
                 ON b.upload_id = a.upload_id AND b.blob = a.blob"
            }
        }
    }
}

fn from_row(row: &sqlx::postgres::PgRow) -> Result<ArtifactRecord, CoreError> {
    Ok(ArtifactRecord {
        upload_id: row.try_get("upload_id")?,
        attempt: row.try_get("attempt")?,
        entry: StagedEntry {
            path: row.try_get("path")?,
            blob: row.try_get("blob")?,
            size: row.try_get("size")?,
            sha256: row.try_get("sha256")?,
            mode: row.try_get("mode")?,
            is_symlink: row.try_get("is_symlink")?,
            link_target: row.try_get("link_target")?,
        },
        content: row.try_get("content")?,
    })
}

/// The committed manifest of a run, sorted by path (byte order).
pub async fn list(
    pool: &PgPool,
    tenant: TenantId,
    run: RunId,
    content: Content,
) -> Result<Vec<ArtifactRecord>, CoreError> {
    let rows = sqlx::query(&format!(
        "SELECT {} WHERE a.run_id = $1 AND a.tenant_id = $2 ORDER BY a.path COLLATE \"C\"",
        content.select_list()
    ))
    .bind(run.0)
    .bind(tenant.0)
    .fetch_all(pool)
    .await?;
    rows.iter().map(from_row).collect()
}

/// One committed entry, with its bytes if Postgres holds them.
pub async fn get(
    pool: &PgPool,
    tenant: TenantId,
    run: RunId,
    path: &str,
) -> Result<Option<ArtifactRecord>, CoreError> {
    let row = sqlx::query(&format!(
        "SELECT {} WHERE a.run_id = $1 AND a.tenant_id = $2 AND a.path = $3",
        Content::With.select_list()
    ))
    .bind(run.0)
    .bind(tenant.0)
    .bind(path)
    .fetch_optional(pool)
    .await?;
    row.as_ref().map(from_row).transpose()
}

/// Locks (and returns) up to `limit` uploads that can never be committed: their run has
/// ended, their lease is gone, or they are older than `ttl_secs` (each stays true once
/// true). Rows another transaction holds — an upload being committed right now — are
/// skipped. The caller deletes their files, then [`delete_uploads`], in this transaction; a
/// completion report waiting for the lock then finds no upload and is refused.
pub async fn lock_stale_uploads(
    conn: &mut PgConnection,
    ttl_secs: u64,
    limit: i64,
) -> Result<Vec<Uuid>, CoreError> {
    let rows = sqlx::query(
        "SELECT u.id FROM artifact_uploads u JOIN runs r ON r.id = u.run_id \
         WHERE u.committed_at IS NULL \
         AND (r.state NOT IN ('ASSIGNED', 'RUNNING') OR r.lease_epoch <> u.lease_epoch \
              OR u.created_at < now() - make_interval(secs => $1)) \
         ORDER BY u.created_at LIMIT $2 FOR UPDATE OF u SKIP LOCKED",
    )
    .bind(ttl_secs as f64)
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter()
        .map(|r| r.try_get("id").map_err(CoreError::from))
        .collect()
}

pub async fn delete_uploads(conn: &mut PgConnection, ids: &[Uuid]) -> Result<(), CoreError> {
    sqlx::query("DELETE FROM artifact_uploads WHERE id = ANY($1) AND committed_at IS NULL")
        .bind(ids)
        .execute(&mut *conn)
        .await?;
    Ok(())
}
