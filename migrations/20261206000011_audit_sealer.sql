-- The audit chain leaves the commit path. Writers append run and audit events unchained,
-- stamped with their transaction id (`xid`) and a global insertion order (`audit_order`);
-- the sealer (core/src/audit/seal.rs) links them into their tenant's chain later, in
-- (xid, audit_order) order, once every transaction that could still add an earlier row has
-- ended (xid below the oldest running one). Before this, every transition held its tenant's
-- chain head row until it committed, so one tenant's transitions ran one commit at a time.

CREATE SEQUENCE audit_order_seq;

-- Rows written before this migration keep xid NULL: those that were chained stay as they
-- are; those older than the chain itself (chain_seq NULL) stay outside it, as before.
ALTER TABLE run_events
    ADD COLUMN xid         xid8,
    ADD COLUMN audit_order bigint;
ALTER TABLE run_events
    ALTER COLUMN xid SET DEFAULT pg_current_xact_id(),
    ALTER COLUMN audit_order SET DEFAULT nextval('audit_order_seq');

ALTER TABLE audit_events DROP CONSTRAINT audit_events_pkey;
ALTER TABLE audit_events
    ALTER COLUMN chain_seq DROP NOT NULL,
    ALTER COLUMN prev_hash DROP NOT NULL,
    ALTER COLUMN hash DROP NOT NULL,
    ADD COLUMN xid         xid8,
    ADD COLUMN audit_order bigint;
ALTER TABLE audit_events
    ALTER COLUMN xid SET DEFAULT pg_current_xact_id(),
    ALTER COLUMN audit_order SET DEFAULT nextval('audit_order_seq');
CREATE UNIQUE INDEX audit_events_chain ON audit_events (tenant_id, chain_seq);

-- What the sealer scans: only rows still waiting for their link.
CREATE INDEX run_events_unsealed ON run_events (tenant_id, xid, audit_order)
    WHERE chain_seq IS NULL AND xid IS NOT NULL;
CREATE INDEX audit_events_unsealed ON audit_events (tenant_id, xid, audit_order)
    WHERE chain_seq IS NULL AND xid IS NOT NULL;
