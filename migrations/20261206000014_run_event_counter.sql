-- Each run counts its own events, so a transition can append its event in the same statement
-- as its UPDATE: the UPDATE takes the next number from the row it has locked (re-read at the
-- latest version if it waited for the lock), where a separate MAX(seq) + 1 needed a
-- statement of its own after the lock. One round trip fewer per transition and per submit.
ALTER TABLE runs ADD COLUMN last_seq integer NOT NULL DEFAULT 0;

UPDATE runs r SET last_seq = e.last
FROM (SELECT run_id, max(seq) AS last FROM run_events GROUP BY run_id) e
WHERE e.run_id = r.id;
