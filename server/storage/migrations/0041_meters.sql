-- Meters (issue 10): what a tenant's usage is aggregated into. A meter reads the events of
-- one (service, usage_type), optionally only those whose dimensions include `filter`, and
-- aggregates them. SUM and COUNT meters are computed from usage_rollups (which hold every
-- dimension), so they need no storage of their own. The others store, from their creation
-- on, what their aggregation needs (tables below).
CREATE TABLE meters (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name            text        NOT NULL UNIQUE,  -- the {meter} of "meters/{meter}"
    description     text        NOT NULL DEFAULT '',
    service         text        NOT NULL,
    usage_type      text        NOT NULL,
    filter          jsonb       NOT NULL DEFAULT '{}',
    aggregation     text        NOT NULL CHECK (aggregation IN
                        ('sum', 'count', 'max', 'min', 'latest', 'unique_count', 'time_weighted')),
    -- UNIQUE_COUNT: the dimension whose distinct values are counted; '' counts distinct quantities.
    value_dimension text        NOT NULL DEFAULT '',
    group_by        text[]      NOT NULL DEFAULT '{}',
    state           text        NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'archived')),
    create_time     timestamptz NOT NULL DEFAULT now(),
    archive_time    timestamptz
);

-- Today's seven usage types are seven SUM meters, so nothing changes for today's callers.
INSERT INTO meters (name, description, service, usage_type, aggregation)
SELECT replace(service || '-' || usage_type, '_', '-'),
       'Total ' || usage_type || ' of ' || service || ' (created with the default rate card)',
       service, usage_type, 'sum'
FROM (SELECT DISTINCT service, usage_type FROM rates) AS priced
ORDER BY service, usage_type;

-- Per-event contributions of MAX, MIN and LATEST meters, kept so that a cancellation can
-- recompute the hours it touches from what survives. group_values holds the event's
-- values of the meter's group-by dimensions only; value is its quantity, as text.
CREATE TABLE meter_values (
    tenant_id    text        NOT NULL,
    meter_id     bigint      NOT NULL,
    hour         timestamptz NOT NULL,
    group_values jsonb       NOT NULL,
    event_id     text        NOT NULL,
    event_time   timestamptz NOT NULL,
    value        text        NOT NULL,
    PRIMARY KEY (tenant_id, meter_id, hour, group_values, event_id)
);

-- Hourly MAX, MIN and LATEST, striped per writer as usage_rollups (stripe = backend pid,
-- 0 once folded). They compose: max of maxes, min of mins, the greatest
-- (latest_time, latest_event_id) wins.
CREATE TABLE meter_hourly (
    tenant_id       text        NOT NULL,
    meter_id        bigint      NOT NULL,
    hour            timestamptz NOT NULL,
    group_values    jsonb       NOT NULL,
    stripe          integer     NOT NULL,
    min_value       numeric     NOT NULL,
    max_value       numeric     NOT NULL,
    latest_time     timestamptz NOT NULL,
    latest_event_id text        COLLATE "C" NOT NULL,
    latest_value    numeric     NOT NULL,
    PRIMARY KEY (tenant_id, meter_id, hour, group_values, stripe)
);
CREATE INDEX meter_hourly_unfolded ON meter_hourly (hour) WHERE stripe <> 0;

-- Per-event contributions of UNIQUE_COUNT meters (value: the counted dimension value or
-- quantity), keyed so that a cancellation finds at once whether another event still
-- carries the value in an hour, day or month.
CREATE TABLE meter_unique_values (
    tenant_id    text        NOT NULL,
    meter_id     bigint      NOT NULL,
    group_values jsonb       NOT NULL,
    value        text        NOT NULL,
    hour         timestamptz NOT NULL,
    event_id     text        NOT NULL,
    PRIMARY KEY (tenant_id, meter_id, group_values, value, hour, event_id)
);

-- UNIQUE_COUNT: the distinct values seen per hour ('h'), UTC day ('d') and UTC month
-- ('m'), inserted with ON CONFLICT DO NOTHING (no row is ever updated, so no writer waits
-- for another). A range is counted as the distinct union over whole months, whole days
-- and edge hours. Storage: up to three rows per distinct value per hour it appears in.
CREATE TABLE meter_distinct (
    tenant_id    text        NOT NULL,
    meter_id     bigint      NOT NULL,
    grain        "char"      NOT NULL CHECK (grain IN ('h', 'd', 'm')),
    bucket       timestamptz NOT NULL,
    group_values jsonb       NOT NULL,
    value        text        NOT NULL,
    PRIMARY KEY (tenant_id, meter_id, grain, bucket, group_values, value)
);

-- TIME_WEIGHTED: every reading of a series (tenant, meter, group values), append-only,
-- ordered by time; integrated when asked for.
CREATE TABLE meter_readings (
    tenant_id    text        NOT NULL,
    meter_id     bigint      NOT NULL,
    group_values jsonb       NOT NULL,
    event_time   timestamptz NOT NULL,
    -- Byte order, as Python compares strings: ties of event_time are broken by event_id.
    event_id     text        COLLATE "C" NOT NULL,
    value        numeric     NOT NULL,
    PRIMARY KEY (tenant_id, meter_id, group_values, event_time, event_id)
);
-- The series of a tenant's meter, so that a query finds each one's last reading before
-- its window without scanning readings.
CREATE TABLE meter_series (
    tenant_id    text   NOT NULL,
    meter_id     bigint NOT NULL,
    group_values jsonb  NOT NULL,
    PRIMARY KEY (tenant_id, meter_id, group_values)
);

-- The time-weighted cache: per series and closed hour, what the hour contributes given
-- the value carried into it (server.domain.aggregation.HourSummary), so that a month
-- query reads ~720 rows per series instead of every reading. Every hour of a series
-- before its watermark is summarised (an hour without a row had no reading), except the
-- hours marked dirty by a late reading or a cancellation, which queries read from the
-- readings until the background task summarises them again.
CREATE TABLE meter_tw_hours (
    tenant_id    text        NOT NULL,
    meter_id     bigint      NOT NULL,
    group_values jsonb       NOT NULL,
    hour         timestamptz NOT NULL,
    first_time   timestamptz NOT NULL,
    inner_total  numeric     NOT NULL,  -- unit-microseconds from first_time to the hour's end
    last_value   numeric     NOT NULL,
    PRIMARY KEY (tenant_id, meter_id, group_values, hour)
);
CREATE TABLE meter_tw_watermarks (
    tenant_id    text        NOT NULL,
    meter_id     bigint      NOT NULL,
    group_values jsonb       NOT NULL,
    cached_until timestamptz NOT NULL,
    PRIMARY KEY (tenant_id, meter_id, group_values)
);
-- Hours that got a reading (late) or lost one (cancelled) after they may have been
-- summarised. Written with ON CONFLICT DO UPDATE so that the background task, which
-- deletes a mark before it re-reads the hour, waits for a writer still holding it.
CREATE TABLE meter_tw_dirty (
    tenant_id    text        NOT NULL,
    meter_id     bigint      NOT NULL,
    group_values jsonb       NOT NULL,
    hour         timestamptz NOT NULL,
    changes      bigint      NOT NULL,
    PRIMARY KEY (tenant_id, meter_id, group_values, hour)
);
