-- UNIQUE_COUNT at half the writes for a value new to its month (issue 10's worst case).
--
-- Before: three meter_distinct rows per value and hour it appeared in (its hour, UTC day
-- and UTC month) and three bucket counts. A value new to its month cost six index writes.
-- After: one row per value and hour, one per value and month that holds the month's days
-- as a bitmap, and one count row per hour that says how many values were new to the hour,
-- to their day and to their month there. A value new to its month costs three.
--
-- Writers still never wait for each other in the steady state. The hour row is inserted
-- with ON CONFLICT DO NOTHING. Only the writer whose hour row is new touches the month row:
-- it inserts it, or it sets the day's bit when the bit is not set yet.
--
-- The UNIQUE_COUNT tables key their group values as text: jsonb's own text form, which is
-- canonical (keys in jsonb's order, one spacing), so equal groups are equal strings, and
-- compared byte-wise (COLLATE "C"). A jsonb key compared container by container cost about
-- a quarter of each insert into these indexes. Reads parse the text only to group by a
-- dimension.
ALTER TABLE meter_unique_values ALTER COLUMN group_values TYPE text COLLATE "C" USING group_values::text;

-- The hours: meter_distinct without its day and month rows.
DELETE FROM meter_distinct WHERE grain <> 'h';
ALTER TABLE meter_distinct RENAME TO meter_distinct_hours;
ALTER TABLE meter_distinct_hours DROP CONSTRAINT meter_distinct_pkey;
ALTER TABLE meter_distinct_hours DROP COLUMN grain;
ALTER TABLE meter_distinct_hours RENAME COLUMN bucket TO hour;
ALTER TABLE meter_distinct_hours ALTER COLUMN group_values TYPE text COLLATE "C" USING group_values::text;
ALTER TABLE meter_distinct_hours ADD PRIMARY KEY (tenant_id, meter_id, hour, group_values, value);

-- The months: each distinct value of a month, with bit d - 1 of `days` set for each UTC
-- day d of the month that it appeared in. A range of whole days is one scan of the month's
-- values with a mask. `days_before` is only read back by the statement that writes the
-- row. It holds the days the row had before that statement set new ones (0 for a row that
-- statement inserted), so the statement knows which days and months are new to the value.
-- (RETURNING old.days would do it but needs PostgreSQL 18, and DATABASE_URL may name an
-- older server.)
CREATE TABLE meter_distinct_months (
    tenant_id    text        NOT NULL,
    meter_id     bigint      NOT NULL,
    month        timestamptz NOT NULL,
    group_values text        COLLATE "C" NOT NULL,
    value        text        NOT NULL,
    days         integer     NOT NULL CHECK (days <> 0),
    days_before  integer     NOT NULL,
    PRIMARY KEY (tenant_id, meter_id, month, group_values, value)
);
INSERT INTO meter_distinct_months (tenant_id, meter_id, month, group_values, value, days, days_before)
SELECT tenant_id, meter_id, date_trunc('month', hour, 'UTC'), group_values, value,
       bit_or(1 << (extract(day FROM hour AT TIME ZONE 'UTC')::int - 1)), 0
FROM meter_distinct_hours
GROUP BY 1, 2, 3, 4, 5;

-- The counts: per hour, group and writer (striped and folded like the rollups), the
-- values new to the hour, new to their UTC day and new to their UTC month that were first
-- written there. An hour's count is its `hour_values`. A day's count is the sum of
-- `day_values` over its hours, and a month's the sum of `month_values` over its hours.
-- Which hour of the day or month holds a value's 1 does not matter to the sums. A
-- cancellation subtracts from the cancelled event's hour, which need not be the hour that
-- added the 1. Storage: one row per hour, group and writer until folded, then one.
CREATE TABLE meter_unique_counts (
    tenant_id    text        NOT NULL,
    meter_id     bigint      NOT NULL,
    hour         timestamptz NOT NULL,
    group_values text        COLLATE "C" NOT NULL,
    stripe       integer     NOT NULL,
    hour_values  bigint      NOT NULL,
    day_values   bigint      NOT NULL,
    month_values bigint      NOT NULL,
    PRIMARY KEY (tenant_id, meter_id, hour, group_values, stripe)
);
-- The rows left to fold; few (recent hours), so cheap to maintain.
CREATE INDEX meter_unique_counts_unfolded ON meter_unique_counts (hour) WHERE stripe <> 0;

-- Each day's and month's count is put on its first hour.
INSERT INTO meter_unique_counts
    (tenant_id, meter_id, hour, group_values, stripe, hour_values, day_values, month_values)
SELECT tenant_id, meter_id, bucket, group_values::text, 0,
       coalesce(sum(distinct_values) FILTER (WHERE grain = 'h'), 0),
       coalesce(sum(distinct_values) FILTER (WHERE grain = 'd'), 0),
       coalesce(sum(distinct_values) FILTER (WHERE grain = 'm'), 0)
FROM meter_distinct_counts
GROUP BY 1, 2, 3, 4;
DROP TABLE meter_distinct_counts;
