-- No hot rows on the meters' write path (issue 10).
--
-- Time-weighted dirty marks are striped per writer, as usage_rollups and meter_hourly are:
-- `stripe` is the backend pid of the connection that wrote the mark (0 for marks made
-- before this migration), so concurrent batches with late readings of one series and
-- hour upsert rows of their own instead of waiting for each other's lock on one row. The
-- background task (server.storage.folding) still takes a mark by deleting every stripe of
-- its key before it re-reads the hour's readings: a writer that updated an existing
-- stripe holds its lock, so the delete waits for it and the re-read sees its reading; a
-- writer whose mark is a new row (invisible to the delete) leaves it behind, and the hour
-- is summarised again on the next pass.
ALTER TABLE meter_tw_dirty ADD COLUMN stripe integer NOT NULL DEFAULT 0;
ALTER TABLE meter_tw_dirty DROP CONSTRAINT meter_tw_dirty_pkey;
ALTER TABLE meter_tw_dirty ADD PRIMARY KEY (tenant_id, meter_id, group_values, hour, stripe);
ALTER TABLE meter_tw_dirty ALTER COLUMN stripe DROP DEFAULT;

-- UNIQUE_COUNT: the number of rows of meter_distinct per bucket and group, kept in step
-- with it, so that a bucket that is one piece (an hour, a UTC day, a UTC month) is counted
-- by reading a few numbers instead of every distinct value (a daily summary of a month
-- with 100,000 users read over a million index entries). Striped per writer like the
-- rollups: each batch adds the rows its own statement inserted (ON CONFLICT DO NOTHING ...
-- RETURNING), a cancellation subtracts the row it deleted, and the background task folds
-- the stripes of past buckets into stripe 0. The count of a bucket is the sum over its
-- stripes. Storage: one row per bucket, group and writer until folded, then one.
CREATE TABLE meter_distinct_counts (
    tenant_id       text        NOT NULL,
    meter_id        bigint      NOT NULL,
    grain           "char"      NOT NULL CHECK (grain IN ('h', 'd', 'm')),
    bucket          timestamptz NOT NULL,
    group_values    jsonb       NOT NULL,
    stripe          integer     NOT NULL,
    distinct_values bigint      NOT NULL,
    PRIMARY KEY (tenant_id, meter_id, grain, bucket, group_values, stripe)
);
-- The rows left to fold; few (recent buckets), so cheap to maintain.
CREATE INDEX meter_distinct_counts_unfolded ON meter_distinct_counts (bucket) WHERE stripe <> 0;

INSERT INTO meter_distinct_counts (tenant_id, meter_id, grain, bucket, group_values, stripe, distinct_values)
SELECT tenant_id, meter_id, grain, bucket, group_values, 0, count(*)
FROM meter_distinct
GROUP BY 1, 2, 3, 4, 5;
