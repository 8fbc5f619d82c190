-- MAX, MIN and LATEST key their group values as text too, as UNIQUE_COUNT's tables do
-- since migration 0054: jsonb's own text form, which is canonical (equal groups are equal
-- strings), compared byte-wise. A jsonb key compared container by container cost about a
-- quarter of each insert into these indexes (one meter_values row per event). Reads parse
-- the text only to group by a dimension.
ALTER TABLE meter_values ALTER COLUMN group_values TYPE text COLLATE "C" USING group_values::text;
ALTER TABLE meter_hourly ALTER COLUMN group_values TYPE text COLLATE "C" USING group_values::text;
