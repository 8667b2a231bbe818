-- Small uploads keep their bytes in Postgres. A run's inline artifacts (the completion
-- report carries them, see api/src/artifacts.rs) totalling at most
-- `artifacts.database_upload_bytes` are written here in the statement that records the
-- upload, instead of as files the store creates and fsyncs one by one: a mock or short run's
-- `.drover/request.json` and `result.json` were two files, a directory and three fsyncs on
-- the API's disk per run, and the filesystem was a third of the control plane's cost on the
-- build machine. The bytes share the upload's fate: committed with it, and deleted with its
-- row (the collector's and a discarded upload's DELETE cascades here).
CREATE TABLE artifact_blobs (
    upload_id  uuid NOT NULL REFERENCES artifact_uploads (id) ON DELETE CASCADE,
    blob       integer NOT NULL,                    -- the manifest entry's blob index
    content    bytea NOT NULL,
    PRIMARY KEY (upload_id, blob)
);
