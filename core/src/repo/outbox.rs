//! The transactional outbox: rows written with the state change that caused them, published
//! by the relay, marked afterwards. A crash between publish and mark republishes the row;
//! consumers treat duplicates as normal.

use sqlx::{PgConnection, PgPool, Row};

use crate::error::CoreError;
use crate::ids::TenantId;

#[derive(Debug, Clone)]
pub struct OutboxRow {
    pub id: i64,
    pub exchange: String,
    pub routing_key: String,
    pub payload: Vec<u8>,
    /// The W3C trace context of the span that wrote the row.
    pub traceparent: Option<String>,
}

/// Adds a message to publish once the caller's transaction commits, and wakes the relays.
/// The message continues the trace of the caller's current span.
pub async fn enqueue(
    conn: &mut PgConnection,
    tenant: TenantId,
    exchange: &str,
    routing_key: &str,
    payload: &[u8],
) -> Result<(), CoreError> {
    enqueue_after(conn, tenant, exchange, routing_key, payload, 0).await
}

/// As [`enqueue`], not published before `delay_ms` from now.
pub async fn enqueue_after(
    conn: &mut PgConnection,
    tenant: TenantId,
    exchange: &str,
    routing_key: &str,
    payload: &[u8],
    delay_ms: i64,
) -> Result<(), CoreError> {
    let traceparent = crate::telemetry::current_traceparent();
    let message = Message {
        exchange,
        routing_key,
        payload,
        traceparent: traceparent.as_deref(),
    };
    enqueue_message(conn, tenant, message, delay_ms).await
}

/// One message for [`enqueue_message`].
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    pub exchange: &'a str,
    pub routing_key: &'a str,
    pub payload: &'a [u8],
    /// The trace the message continues.
    pub traceparent: Option<&'a str>,
}

/// As [`enqueue_after`], in the trace the message names.
pub async fn enqueue_message(
    conn: &mut PgConnection,
    tenant: TenantId,
    message: Message<'_>,
    delay_ms: i64,
) -> Result<(), CoreError> {
    // One round trip: the insert, and the NOTIFY that wakes the relays (delivered at commit,
    // folded when repeated).
    sqlx::query(
        "WITH row AS (INSERT INTO outbox (tenant_id, exchange, routing_key, payload, \
         available_at, traceparent) \
         VALUES ($1, $2, $3, $4, now() + $5::bigint * interval '1 millisecond', $6) RETURNING id) \
         SELECT pg_notify($7, '') FROM row",
    )
    .bind(tenant.0)
    .bind(message.exchange)
    .bind(message.routing_key)
    .bind(message.payload)
    .bind(delay_ms.max(0))
    .bind(message.traceparent)
    .bind(super::OUTBOX_CHANNEL)
    .execute(conn)
    .await?;
    Ok(())
}

/// Inserts a message leased to the caller's own relay for `lease_ms`, without waking any
/// relay: the caller hands the returned row to its relay ([`Handoff::hand`]) once its
/// transaction commits. If it never does (the process died, the relay was backed up), the row
/// is published by any relay after the lease, as a claimed row would be.
pub async fn enqueue_leased(
    conn: &mut PgConnection,
    tenant: TenantId,
    message: Message<'_>,
    lease_ms: i64,
) -> Result<OutboxRow, CoreError> {
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO outbox (tenant_id, exchange, routing_key, payload, available_at, \
         traceparent) \
         VALUES ($1, $2, $3, $4, now() + $5::bigint * interval '1 millisecond', $6) RETURNING id",
    )
    .bind(tenant.0)
    .bind(message.exchange)
    .bind(message.routing_key)
    .bind(message.payload)
    .bind(lease_ms.max(1))
    .bind(message.traceparent)
    .fetch_one(conn)
    .await?;
    Ok(OutboxRow {
        id,
        exchange: message.exchange.to_owned(),
        routing_key: message.routing_key.to_owned(),
        payload: message.payload.to_vec(),
        traceparent: message.traceparent.map(str::to_owned),
    })
}

/// A process's way to its own relay for rows written with [`enqueue_leased`]. Cloned into
/// whatever writes them; [`Handoff::hand`] never waits.
#[derive(Debug, Clone)]
pub struct Handoff {
    tx: tokio::sync::mpsc::Sender<OutboxRow>,
    lease_ms: i64,
}

impl Handoff {
    /// A handle and the relay's end of it.
    pub fn channel(
        lease_ms: i64,
        capacity: usize,
    ) -> (Self, tokio::sync::mpsc::Receiver<OutboxRow>) {
        let (tx, rx) = tokio::sync::mpsc::channel(capacity.max(1));
        (Self { tx, lease_ms }, rx)
    }

    /// How long a row written for this relay is left to it.
    pub fn lease_ms(&self) -> i64 {
        self.lease_ms
    }

    /// Gives a committed row to the relay. A row it cannot take now (stopped, backed up)
    /// stays leased and is published after its lease.
    pub fn hand(&self, row: OutboxRow) {
        if let Err(e) = self.tx.try_send(row) {
            tracing::debug!(reason = %e, "outbox row left to a drain after its lease");
        }
    }
}

/// What [`claim`] took, and when the relay should look again.
#[derive(Debug)]
pub struct Claim {
    pub rows: Vec<OutboxRow>,
    /// How long until the earliest unpublished row it did not take is due (zero if one is due
    /// now, e.g. held by another relay); `None` when there is none.
    pub next_due: Option<std::time::Duration>,
}

/// Claims due rows for `lease_ms` by pushing their `available_at` that far out (other relays
/// skip them meanwhile) and, in the same statement, finds when the earliest row left behind
/// falls due. One autocommitted statement, not a transaction held open across the publish:
/// a relay that dies mid-publish leaves its rows to any relay once the lease ends (and a row
/// it had published goes out twice, as after a crash between confirm and mark).
pub async fn claim(pool: &PgPool, limit: i64, lease_ms: i64) -> Result<Claim, CoreError> {
    let rows = sqlx::query(
        "WITH claimed AS (UPDATE outbox o \
           SET available_at = now() + $2::bigint * interval '1 millisecond' \
           WHERE o.id IN (SELECT id FROM outbox \
             WHERE published_at IS NULL AND available_at <= now() \
             ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED) \
           RETURNING o.id, o.exchange, o.routing_key, o.payload, o.traceparent) \
         SELECT id, exchange, routing_key, payload, traceparent, NULL::float8 AS next_due_ms \
           FROM claimed \
         UNION ALL \
         SELECT NULL, NULL, NULL, NULL, NULL, \
           GREATEST(0, EXTRACT(EPOCH FROM (min(available_at) - now())) * 1000)::float8 \
           FROM outbox WHERE published_at IS NULL AND id NOT IN (SELECT id FROM claimed)",
    )
    .bind(limit)
    .bind(lease_ms.max(1))
    .fetch_all(pool)
    .await?;
    let mut claim = Claim {
        rows: Vec::with_capacity(rows.len()),
        next_due: None,
    };
    for r in &rows {
        match r.try_get::<Option<i64>, _>("id")? {
            Some(id) => claim.rows.push(OutboxRow {
                id,
                exchange: r.try_get("exchange")?,
                routing_key: r.try_get("routing_key")?,
                payload: r.try_get("payload")?,
                traceparent: r.try_get("traceparent")?,
            }),
            None => {
                let ms: Option<f64> = r.try_get("next_due_ms")?;
                claim.next_due = ms.map(|ms| std::time::Duration::from_millis(ms as u64));
            }
        }
    }
    Ok(claim)
}

/// How long until the earliest unpublished row is due (zero if one is due now); `None` when
/// nothing is pending. The relay sleeps exactly that long, so delayed rows go out on time.
pub async fn next_due_in(pool: &PgPool) -> Result<Option<std::time::Duration>, CoreError> {
    let ms: Option<f64> = sqlx::query_scalar(
        "SELECT GREATEST(0, EXTRACT(EPOCH FROM (min(available_at) - now())) * 1000)::float8 \
         FROM outbox WHERE published_at IS NULL",
    )
    .fetch_one(pool)
    .await?;
    Ok(ms.map(|ms| std::time::Duration::from_millis(ms as u64)))
}

pub async fn mark_published(pool: &PgPool, ids: &[i64]) -> Result<(), CoreError> {
    if ids.is_empty() {
        return Ok(());
    }
    sqlx::query("UPDATE outbox SET published_at = now() WHERE id = ANY($1)")
        .bind(ids)
        .execute(pool)
        .await?;
    Ok(())
}

/// Puts a row back for a later try, with a delay growing with its attempts (capped at 30 s).
pub async fn mark_failed(pool: &PgPool, id: i64, error: &str) -> Result<(), CoreError> {
    sqlx::query(
        "UPDATE outbox SET publish_attempts = publish_attempts + 1, last_error = $2, \
         available_at = now() + least(30000, 100 * power(2, least(publish_attempts, 10))) \
             * interval '1 millisecond' \
         WHERE id = $1",
    )
    .bind(id)
    .bind(error)
    .execute(pool)
    .await?;
    Ok(())
}
