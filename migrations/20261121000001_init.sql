-- drover's initial schema. Every tenant-owned row carries tenant_id from the start.

CREATE TABLE tenants (
    id          uuid PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- The single tenant used until authentication introduces real ones (ids::DEFAULT_TENANT).
INSERT INTO tenants (id, name) VALUES ('00000000-0000-0000-0000-000000000001', 'default');

CREATE TABLE runs (
    id                uuid PRIMARY KEY,                 -- UUIDv7
    tenant_id         uuid NOT NULL REFERENCES tenants (id),
    state             text NOT NULL CHECK (state IN (
                          'PENDING_APPROVAL', 'QUEUED', 'ASSIGNED', 'RUNNING', 'SUCCEEDED',
                          'FAILED', 'CANCELLED', 'TIMED_OUT', 'REJECTED', 'DEAD_LETTERED')),
    spec              jsonb NOT NULL,
    spec_hash         text NOT NULL,                    -- sha256 of the canonical spec
    idempotency_key   text,
    pool              text NOT NULL,
    priority          integer NOT NULL DEFAULT 0,
    attempt           integer NOT NULL DEFAULT 1,
    max_attempts      integer NOT NULL DEFAULT 1,
    lease_epoch       bigint NOT NULL DEFAULT 0,        -- fencing token, bumped per assignment
    agent_id          text,
    lease_expires_at  timestamptz,
    exit_code         integer,
    output            bytea NOT NULL DEFAULT ''::bytea, -- tail of combined output, <= 64 KiB
    output_truncated  boolean NOT NULL DEFAULT false,
    reason            text,
    executor          text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    started_at        timestamptz,
    finished_at       timestamptz,
    UNIQUE (tenant_id, idempotency_key)
);

CREATE INDEX runs_tenant_state_id ON runs (tenant_id, state, id DESC);
CREATE INDEX runs_tenant_id ON runs (tenant_id, id DESC);
CREATE INDEX runs_active_by_agent ON runs (agent_id) WHERE state IN ('ASSIGNED', 'RUNNING');

CREATE TABLE run_events (
    run_id      uuid NOT NULL REFERENCES runs (id),
    seq         integer NOT NULL,                       -- 1-based, gap-free per run
    tenant_id   uuid NOT NULL REFERENCES tenants (id),
    from_state  text,                                   -- NULL for the first event
    to_state    text NOT NULL,
    attempt     integer NOT NULL,
    lease_epoch bigint NOT NULL,
    agent_id    text,
    reason      text,
    at          timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (run_id, seq)
);

CREATE INDEX run_events_tenant ON run_events (tenant_id, at);

-- Messages to publish to RabbitMQ, written in the same transaction as the state change that
-- caused them; the outbox relay publishes with confirms and marks them.
CREATE TABLE outbox (
    id            bigserial PRIMARY KEY,
    tenant_id     uuid NOT NULL REFERENCES tenants (id),
    exchange      text NOT NULL,
    routing_key   text NOT NULL,
    payload       bytea NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    available_at  timestamptz NOT NULL DEFAULT now(),   -- not published before (retry backoff)
    published_at  timestamptz,
    publish_attempts integer NOT NULL DEFAULT 0,
    last_error    text
);

CREATE INDEX outbox_pending ON outbox (available_at, id) WHERE published_at IS NULL;

-- Worker agents are fleet infrastructure, not tenant-owned.
CREATE TABLE agents (
    id                 text PRIMARY KEY,
    hostname           text NOT NULL,
    pool               text NOT NULL,
    labels             jsonb NOT NULL DEFAULT '{}'::jsonb,
    capacity           integer NOT NULL CHECK (capacity > 0),
    executor           text NOT NULL,
    version            text NOT NULL,
    registered_at      timestamptz NOT NULL DEFAULT now(),
    last_heartbeat_at  timestamptz NOT NULL DEFAULT now(),
    draining           boolean NOT NULL DEFAULT false
);

CREATE INDEX agents_pool ON agents (pool, last_heartbeat_at);

-- Output chunks as agents push them, in arrival order per run attempt.
CREATE TABLE run_logs (
    id          bigserial PRIMARY KEY,
    run_id      uuid NOT NULL REFERENCES runs (id),
    tenant_id   uuid NOT NULL REFERENCES tenants (id),
    attempt     integer NOT NULL,
    stream      smallint NOT NULL,                      -- 1 stdout, 2 stderr
    data        bytea NOT NULL,
    at          timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX run_logs_run ON run_logs (run_id, id);
