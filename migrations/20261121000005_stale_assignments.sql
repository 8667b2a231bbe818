-- The reaper's scan for assignments a live agent never started (reaper.assign_timeout_ms).
CREATE INDEX runs_assigned_since ON runs (updated_at) WHERE state = 'ASSIGNED';
