-- Fair dispatch (dispatcher/src/parked.rs): a run a dispatcher could not place when its
-- message arrived (no free agent, or its tenant at its concurrency quota) is *parked* here
-- and its message acked, so the FIFO queue drains past one tenant's backlog; the dispatchers'
-- parked-run schedulers then assign parked runs in fair order. Any state change clears both.
ALTER TABLE runs
    ADD COLUMN parked_at    timestamptz,
    -- The concurrency limit a dispatcher found the run's tenant at when it parked or skipped
    -- it (the tenant's own, or the dispatcher default); for GetRun's TENANT_OVER_QUOTA.
    ADD COLUMN parked_quota integer;

-- The schedulers' pick: per pool, the tenants with parked runs (a loose index scan), then a
-- tenant's best parked run (highest priority, then oldest).
CREATE INDEX runs_parked ON runs (pool, tenant_id, priority DESC, created_at)
    WHERE state = 'QUEUED' AND parked_at IS NOT NULL;

-- Active runs per tenant and pool: the quota count and the fairness order.
CREATE INDEX runs_active_by_tenant ON runs (tenant_id, pool) WHERE state IN ('ASSIGNED', 'RUNNING');
