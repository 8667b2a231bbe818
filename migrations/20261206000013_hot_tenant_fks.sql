-- The per-run tables no longer check their tenant_id against tenants. Each such check took a
-- KEY SHARE lock on the tenant's one row: about a dozen per run, all on the same row, so
-- every concurrent transaction of a tenant shared a multixact lock on it. The tenant_id in
-- these rows is always copied from the run they belong to (runs keeps its own foreign key to
-- tenants, and run_events, run_logs, artifact_uploads and artifacts keep theirs to runs), and
-- tenants are never deleted, so the checks guarded nothing the run's own did not.
ALTER TABLE run_events DROP CONSTRAINT run_events_tenant_id_fkey;
ALTER TABLE outbox DROP CONSTRAINT outbox_tenant_id_fkey;
ALTER TABLE run_logs DROP CONSTRAINT run_logs_tenant_id_fkey;
ALTER TABLE artifact_uploads DROP CONSTRAINT artifact_uploads_tenant_id_fkey;
ALTER TABLE artifacts DROP CONSTRAINT artifacts_tenant_id_fkey;
