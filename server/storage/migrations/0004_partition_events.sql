-- Raw events partitioned by calendar month of event_time, so that old raw events can be
-- dropped a month at a time (tally retention) while rollups and invoices stay.
--
-- A unique index on a partitioned table must include the partition key, which would
-- make the idempotency key (tenant_id, event_id) unique only per month. So the key moves
-- to its own table, usage_event_keys, which is the one that says "seen before"; the
-- events table itself needs no index at all and takes appends cheaply.

CREATE TABLE usage_event_keys (
    tenant_id text NOT NULL,
    event_id  text NOT NULL,
    PRIMARY KEY (tenant_id, event_id)
);

ALTER TABLE usage_events RENAME TO usage_events_unpartitioned;

CREATE TABLE usage_events (
    tenant_id   text        NOT NULL,
    event_id    text        NOT NULL,
    service     text        NOT NULL,
    usage_type  text        NOT NULL,
    quantity    numeric     NOT NULL CHECK (quantity >= 0),
    event_time  timestamptz NOT NULL,
    dimensions  jsonb       NOT NULL DEFAULT '{}',
    received_at timestamptz NOT NULL DEFAULT now()
) PARTITION BY RANGE (event_time);

-- Creates (once) the partition holding the given instant's UTC month; returns its name,
-- e.g. usage_events_2026_11. Safe to call concurrently from several processes.
CREATE FUNCTION tally_event_partition(instant timestamptz) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    month_start timestamptz := date_trunc('month', instant, 'UTC');
    name text := 'usage_events_' || to_char(month_start AT TIME ZONE 'UTC', 'YYYY_MM');
BEGIN
    IF to_regclass(name) IS NULL THEN
        -- Concurrent callers serialize on the lock; a loser still sees no table in its
        -- snapshot and fails to create it again, which is fine: it exists now.
        PERFORM pg_advisory_xact_lock(hashtext('tally_event_partition'), hashtext(name));
        BEGIN
            EXECUTE format(
                'CREATE TABLE IF NOT EXISTS %I PARTITION OF usage_events FOR VALUES FROM (%L) TO (%L)',
                name, month_start, month_start + interval '1 month');
        EXCEPTION WHEN duplicate_table OR unique_violation THEN
            NULL;
        END;
    END IF;
    RETURN name;
END
$$;

SELECT tally_event_partition(month)
FROM (SELECT DISTINCT date_trunc('month', event_time, 'UTC') AS month FROM usage_events_unpartitioned) AS months;

INSERT INTO usage_event_keys (tenant_id, event_id)
SELECT tenant_id, event_id FROM usage_events_unpartitioned;

INSERT INTO usage_events (tenant_id, event_id, service, usage_type, quantity, event_time, dimensions, received_at)
SELECT tenant_id, event_id, service, usage_type, quantity, event_time, dimensions, received_at
FROM usage_events_unpartitioned;

DROP TABLE usage_events_unpartitioned;
