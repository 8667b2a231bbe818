-- Retries, cancellation, queue timeouts and dead letters.

ALTER TABLE runs
    -- The current attempt is not dispatched before this (retry backoff).
    ADD COLUMN not_before          timestamptz,
    -- A QUEUED run still waiting at this time ends TIMED_OUT (the spec's queue timeout).
    ADD COLUMN queue_deadline      timestamptz,
    -- A client asked to cancel an ASSIGNED/RUNNING run; the agent confirms with CANCELLED.
    ADD COLUMN cancel_requested_at timestamptz,
    ADD COLUMN cancel_reason       text;

-- The reaper's scans: expired leases, and queued runs past their deadline.
CREATE INDEX runs_lease_expiry ON runs (lease_expires_at) WHERE state IN ('ASSIGNED', 'RUNNING');
CREATE INDEX runs_queue_deadline ON runs (queue_deadline) WHERE state = 'QUEUED';

-- Everything that landed in drover.dead, archived by the dispatchers that consume it.
CREATE TABLE dead_letters (
    id            bigserial PRIMARY KEY,
    tenant_id     uuid REFERENCES tenants (id),         -- NULL when no known run is named
    run_id        uuid,
    kind          text NOT NULL CHECK (kind IN (
                      'run_exhausted', 'unparseable', 'unknown_run', 'delivery_limit', 'rejected')),
    reason        text NOT NULL,
    source_queue  text NOT NULL,
    payload       bytea NOT NULL,                       -- at most 4 KiB of the body
    fingerprint   text NOT NULL UNIQUE,                 -- a redelivered dead letter is archived once
    at            timestamptz NOT NULL DEFAULT now(),
    redriven_at   timestamptz
);

CREATE INDEX dead_letters_tenant ON dead_letters (tenant_id, id DESC);
CREATE INDEX dead_letters_run ON dead_letters (run_id);

-- An operator asked the agent to drain (it learns so from its queue or next heartbeat).
ALTER TABLE agents ADD COLUMN drain_requested boolean NOT NULL DEFAULT false;
