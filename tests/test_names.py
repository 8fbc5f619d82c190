"""Resource names (server.domain.names): what the API formats, it parses back, and nothing else."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.domain.errors import InvalidArgument
from server.domain.events import check_id
from server.domain.names import (
    invoice_name,
    parse_invoice_name,
    parse_tenant_name,
    parse_usage_summary_name,
    rate_name,
    tenant_name,
    usage_summary_name,
)

TENANT_IDS = st.text(min_size=1, max_size=40).filter(lambda t: check_id(t) is None)


@given(TENANT_IDS)
def test_every_valid_tenant_id_round_trips_through_each_name(tenant_id: str) -> None:
    assert parse_tenant_name(tenant_name(tenant_id)) == tenant_id
    assert parse_usage_summary_name(usage_summary_name(tenant_id)) == tenant_id
    assert parse_invoice_name(invoice_name(tenant_id, "inv_0a1b")) == (tenant_id, "inv_0a1b")


def test_a_tenant_id_that_looks_like_a_path_still_parses() -> None:
    assert parse_invoice_name("tenants/a/invoices/b/invoices/inv_1") == ("a/invoices/b", "inv_1")


@pytest.mark.parametrize(
    ("parse", "name"),
    [
        (parse_tenant_name, ""),
        (parse_tenant_name, "acme"),
        (parse_tenant_name, "tenants/"),
        (parse_tenant_name, "tenants/ padded"),
        (parse_invoice_name, "tenants/acme"),
        (parse_invoice_name, "tenants/acme/invoices/"),
        (parse_invoice_name, "invoices/inv_1"),
        (parse_invoice_name, "tenants//invoices/inv_1"),
        (parse_invoice_name, "tenants/acme/invoices/inv_\x00"),
        (parse_usage_summary_name, "tenants/acme"),
        (parse_usage_summary_name, "tenants/usageSummary"),
    ],
)
def test_malformed_names_are_invalid_arguments_naming_the_field(parse: object, name: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        parse(name, "the_field")  # type: ignore[operator]
    assert [v.field for v in raised.value.violations] == ["the_field"]


def test_rate_names_carry_the_effective_time_in_utc() -> None:
    effective = datetime(2026, 12, 1, 1, tzinfo=timezone(timedelta(hours=1)))
    assert rate_name("compute", "cpu_hour", effective) == (
        "services/compute/usageTypes/cpu_hour/rates/2026-12-01T00:00:00Z"
    )
    assert rate_name("s", "u", datetime(1970, 1, 1, tzinfo=UTC)).endswith("/rates/1970-01-01T00:00:00Z")
