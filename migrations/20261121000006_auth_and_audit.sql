-- Authentication, roles, the approval gate and the tamper-evident audit chain.

-- An operator tenant's admins may run fleet-wide operations (agents, agent tokens, queue
-- depths); other tenants' admins manage only their own tenant.
ALTER TABLE tenants
    ADD COLUMN operator            boolean NOT NULL DEFAULT false,
    ADD COLUMN allow_self_approval boolean NOT NULL DEFAULT false,
    ADD COLUMN approval_timeout_ms bigint CHECK (approval_timeout_ms IS NULL OR approval_timeout_ms > 0),
    -- Quotas; NULL means the server's default (settings `quota.*`).
    ADD COLUMN max_concurrent_runs integer CHECK (max_concurrent_runs IS NULL OR max_concurrent_runs > 0),
    ADD COLUMN max_queued_runs     integer CHECK (max_queued_runs IS NULL OR max_queued_runs > 0);

-- Bearer tokens. Only the SHA-256 of a token is stored: tokens are 256 random bits, so a fast
-- hash is enough (nothing to brute-force) and lookup is one index probe.
CREATE TABLE api_tokens (
    id          uuid PRIMARY KEY,
    -- NULL for agent tokens: agents are fleet infrastructure, not tenant-owned.
    tenant_id   uuid REFERENCES tenants (id),
    kind        text NOT NULL CHECK (kind IN ('user', 'agent')),
    roles       text[] NOT NULL,
    agent_id    text,
    name        text NOT NULL,
    token_hash  bytea NOT NULL UNIQUE,
    created_by  text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz,
    CHECK ((kind = 'user' AND tenant_id IS NOT NULL AND agent_id IS NULL)
        OR (kind = 'agent' AND tenant_id IS NULL AND agent_id IS NOT NULL))
);

CREATE INDEX api_tokens_tenant ON api_tokens (tenant_id, created_at);

-- Who submitted a run (for the self-approval rule), who decided on it, and until when it may
-- wait for a decision.
ALTER TABLE runs
    ADD COLUMN submitted_by      uuid,
    ADD COLUMN decided_by        uuid,
    ADD COLUMN approval_deadline timestamptz;

CREATE INDEX runs_approval_deadline ON runs (approval_deadline)
    WHERE state = 'PENDING_APPROVAL' AND approval_deadline IS NOT NULL;

-- The audit chain: one sequence per tenant across run_events and audit_events. Each row's hash
-- is SHA-256 over the previous row's hash and the row's canonical encoding (core/src/audit.rs),
-- so editing, deleting or reordering a row breaks the chain at that row.
CREATE TABLE audit_heads (
    tenant_id  uuid PRIMARY KEY REFERENCES tenants (id),
    seq        bigint NOT NULL DEFAULT 0,
    hash       bytea NOT NULL DEFAULT '\x'::bytea
);

INSERT INTO audit_heads (tenant_id) SELECT id FROM tenants;

ALTER TABLE run_events
    ADD COLUMN actor     text,
    ADD COLUMN chain_seq bigint,
    ADD COLUMN prev_hash bytea,
    ADD COLUMN hash      bytea;

CREATE UNIQUE INDEX run_events_chain ON run_events (tenant_id, chain_seq);

-- Changes that are not run transitions: tokens, secrets, approvals' side notes, tenant policy.
CREATE TABLE audit_events (
    tenant_id  uuid NOT NULL REFERENCES tenants (id),
    chain_seq  bigint NOT NULL,
    kind       text NOT NULL,
    actor      text NOT NULL,
    subject    text NOT NULL,
    detail     text NOT NULL,
    at         timestamptz NOT NULL,
    prev_hash  bytea NOT NULL,
    hash       bytea NOT NULL,
    PRIMARY KEY (tenant_id, chain_seq)
);
