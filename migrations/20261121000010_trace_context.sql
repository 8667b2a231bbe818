-- Traces (issue 6): the W3C `traceparent` of the span that made each row, so one run is one
-- trace across processes, retries and redrives. NULL when the writer had no trace.

-- The run's root span (the API's SubmitRun span): a reaper's requeue or an operator's
-- redrive continues this trace.
ALTER TABLE runs ADD COLUMN traceparent text;

-- The span that wrote the message; the relay's publish span is its child and travels on in
-- the message's AMQP headers.
ALTER TABLE outbox ADD COLUMN traceparent text;
