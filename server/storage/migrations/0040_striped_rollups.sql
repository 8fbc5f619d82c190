-- No hot rows on the write path (issue 9). Every writer adds to rollup rows of its own:
-- `stripe` is the PostgreSQL backend pid of the connection that wrote the row (never 0,
-- and unique among the connections open at one time), so two concurrent transactions
-- never update the same rollup row, whatever process or host they come from. Reads sum
-- over stripes. Stripe 0 holds folded rows: a background task moves the stripes of past
-- hours into stripe 0 (server.storage.folding), so that the number of rows a summary
-- reads stays near one per hour, usage type and dimension set.
ALTER TABLE usage_rollups ADD COLUMN stripe integer NOT NULL DEFAULT 0;
ALTER TABLE usage_rollups DROP CONSTRAINT usage_rollups_pkey;
ALTER TABLE usage_rollups ADD PRIMARY KEY (tenant_id, hour, service, usage_type, dimensions, stripe);
-- The rows left to fold; small (current and recent hours), so cheap to maintain.
CREATE INDEX usage_rollups_unfolded ON usage_rollups (hour) WHERE stripe <> 0;

-- What a cancellation needs (issue 10), kept with the idempotency key so that cancelling
-- an event never reads the raw events (which retention may have dropped). cancel_time is
-- set once, by UsageService.CancelEvent; the key stays, so the event is still a duplicate.
ALTER TABLE usage_event_keys
    ADD COLUMN service     text,
    ADD COLUMN usage_type  text,
    ADD COLUMN quantity    numeric,
    ADD COLUMN event_time  timestamptz,
    ADD COLUMN dimensions  jsonb,
    ADD COLUMN cancel_time timestamptz;

UPDATE usage_event_keys AS k
SET service = e.service, usage_type = e.usage_type, quantity = e.quantity,
    event_time = e.event_time, dimensions = e.dimensions
FROM usage_events AS e
WHERE e.tenant_id = k.tenant_id AND e.event_id = k.event_id;
