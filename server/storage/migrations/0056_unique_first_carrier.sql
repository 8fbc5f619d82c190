-- UNIQUE_COUNT: a value's hour row names the event that brought it to the hour, so that
-- event needs no row of its own (issue 10's worst case: every value new).
--
-- Before: one meter_unique_values row per event, so that a cancellation could find whether
-- another event still carries the value in its hour, and an hour row per value and hour.
-- An event whose value was new to its hour wrote both, and two index entries.
-- After: the hour row holds its first carrier's event_id; meter_unique_values holds only
-- the other carriers (events whose value their hour had already). The carriers of a value
-- in an hour are the hour row's event plus its meter_unique_values rows. A value new to
-- its month costs two rows (hour and month) instead of three. A repeated value costs what
-- it did: one meter_unique_values row and the hour row's probe.
--
-- A cancellation of the hour row's event hands the row to another carrier (whose own row
-- then goes), or deletes the row when there is none (server.storage.corrections).
ALTER TABLE meter_distinct_hours ADD COLUMN event_id text;

UPDATE meter_distinct_hours AS h SET event_id = u.event_id
FROM (SELECT DISTINCT ON (tenant_id, meter_id, hour, group_values, value)
             tenant_id, meter_id, hour, group_values, value, event_id
      FROM meter_unique_values
      ORDER BY tenant_id, meter_id, hour, group_values, value, event_id COLLATE "C") AS u
WHERE h.tenant_id = u.tenant_id AND h.meter_id = u.meter_id AND h.hour = u.hour
  AND h.group_values = u.group_values AND h.value = u.value;

DELETE FROM meter_unique_values AS u
USING meter_distinct_hours AS h
WHERE h.tenant_id = u.tenant_id AND h.meter_id = u.meter_id AND h.hour = u.hour
  AND h.group_values = u.group_values AND h.value = u.value AND h.event_id = u.event_id;

-- Every hour row has a carrier: a row without one would fail here rather than be kept.
ALTER TABLE meter_distinct_hours ALTER COLUMN event_id SET NOT NULL;
