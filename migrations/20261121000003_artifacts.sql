-- Artifacts (issue 4, item 5): uploads staged by agents, and the manifest committed with the
-- attempt that ended the run, in the same transaction as its terminal state.

-- One UploadArtifacts stream. The row exists before any byte is staged, so the garbage
-- collector finds every staged upload; `manifest` is set once every file was verified.
CREATE TABLE artifact_uploads (
    id            uuid PRIMARY KEY,                     -- UUIDv7
    tenant_id     uuid NOT NULL REFERENCES tenants (id),
    run_id        uuid NOT NULL REFERENCES runs (id),
    attempt       integer NOT NULL,
    lease_epoch   bigint NOT NULL,
    agent_id      text NOT NULL,
    manifest      jsonb,                                -- NULL until the upload completed
    files         integer NOT NULL DEFAULT 0,
    bytes         bigint NOT NULL DEFAULT 0,
    created_at    timestamptz NOT NULL DEFAULT now(),
    completed_at  timestamptz,
    committed_at  timestamptz                           -- set with the run's terminal state
);

CREATE INDEX artifact_uploads_staged ON artifact_uploads (created_at) WHERE committed_at IS NULL;
-- At most one committed upload per run: the attempt that ended it.
CREATE UNIQUE INDEX artifact_uploads_one_commit ON artifact_uploads (run_id) WHERE committed_at IS NOT NULL;

-- The committed manifest: what ListArtifacts and GetArtifact serve.
CREATE TABLE artifacts (
    run_id       uuid NOT NULL REFERENCES runs (id),
    path         text NOT NULL,
    tenant_id    uuid NOT NULL REFERENCES tenants (id),
    attempt      integer NOT NULL,
    upload_id    uuid NOT NULL REFERENCES artifact_uploads (id),
    blob         integer,                               -- index within the upload; NULL for a symlink
    size         bigint NOT NULL CHECK (size >= 0),
    sha256       text NOT NULL,                         -- lowercase hex; '' for a symlink
    mode         integer NOT NULL,
    is_symlink   boolean NOT NULL,
    link_target  text,
    PRIMARY KEY (run_id, path)
);
