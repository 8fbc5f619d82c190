-- Meters rebuilt from the events recorded before their creation (issue 10). A new MAX,
-- MIN, LATEST, UNIQUE_COUNT or TIME_WEIGHTED meter starts 'backfilling': live batches
-- already feed it, and a background task (server.storage.backfill) reads every recorded
-- event's key row (usage_event_keys keeps what a meter needs of each event, and retention
-- never drops it) in key order, a bounded batch per transaction, and adds what the meter
-- would have stored. The position is committed with each batch, so a restart resumes there.
-- SUM and COUNT meters read the rollups, which hold every event: they are 'active' at once.
ALTER TABLE meters DROP CONSTRAINT meters_state_check;
ALTER TABLE meters ADD CONSTRAINT meters_state_check CHECK (state IN ('backfilling', 'active', 'archived'));
ALTER TABLE meters
    -- The last key read, in usage_event_keys' primary key order; NULL before the first batch.
    ADD COLUMN backfill_tenant_id     text,
    ADD COLUMN backfill_event_id      text,
    -- Key rows read so far (every usage type), and of them the events the meter counts.
    ADD COLUMN backfill_scanned_count bigint NOT NULL DEFAULT 0,
    ADD COLUMN backfill_counted_count bigint NOT NULL DEFAULT 0,
    -- When the last batch found no key left; NULL while backfilling (and for SUM and COUNT).
    ADD COLUMN backfill_end_time      timestamptz;
