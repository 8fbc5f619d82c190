"""MeterMap.contributions (a batch's meter entries) against contribution() event by event."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from server.domain.events import EventRow
from server.domain.meters import Aggregation, Meter, MeterMap, MeterSpec, MeterState, contribution

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def meter(meter_id: int, aggregation: Aggregation, **spec: object) -> Meter:
    return Meter(
        meter_id,
        MeterSpec(f"m{meter_id}", "svc", "calls", aggregation, **spec),  # type: ignore[arg-type]
        MeterState.ACTIVE,
        EPOCH,
        None,
    )


METERS = [
    meter(1, Aggregation.UNIQUE_COUNT, value_dimension="user", filter={"tier": "gold"}, group_by=("region",)),
    meter(2, Aggregation.UNIQUE_COUNT, group_by=("region", "tier")),  # distinct quantities
    meter(3, Aggregation.MAX, group_by=("region",)),
    meter(4, Aggregation.TIME_WEIGHTED),
]
dimension_sets = st.dictionaries(
    st.sampled_from(["region", "tier", "user"]), st.sampled_from(["eu", "gold", "u1", ""]), max_size=3
)
rows = st.lists(
    st.tuples(
        dimension_sets, st.sampled_from(["1", "1.50", "1.5", "2"]), st.sampled_from(["calls", "other"])
    ),
    max_size=30,
)


@given(rows)
def test_a_batch_gets_the_entries_of_its_events_one_by_one(
    batch: list[tuple[dict[str, str], str, str]],
) -> None:
    events = [
        EventRow(
            "t1",
            f"e{i}",
            "svc",
            usage_type,
            quantity,
            i,
            json.dumps(dims, sort_keys=True, separators=(",", ":")) if dims else "{}",
        )
        for i, (dims, quantity, usage_type) in enumerate(batch)
    ]
    found = MeterMap(METERS).contributions(events)
    got = list(
        zip(found.event_ids, found.meter_ids, found.kinds, found.values, found.group_values, strict=True)
    )
    expected = []
    for row in events:
        if row.usage_type != "calls":
            continue
        for m in METERS:
            entry = contribution(m, json.loads(row.dimensions_json), row.quantity)
            if entry is not None:
                expected.append((row.event_id, entry.meter_id, entry.kind, entry.value, entry.group_values))
    assert got == expected
