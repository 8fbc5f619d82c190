"""`tally serve` as a user runs it (embedded PostgreSQL, no DATABASE_URL, no key configured), driven by
the real grpcurl binary through server reflection, with no .proto files at hand, with tokens from
`tally token` signed by the development secret that `tally serve` created, starting with the
commands that `tally serve` prints, run by a shell as a user pastes them."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import pytest

from server.cli import _runnable

GRPCURL = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
TALLY = shutil.which("tally") or str(Path(sys.executable).parent / "tally")


# A user who has not activated the virtual environment: what `tally serve` prints must run as is.
PATH_WITHOUT_VENV = os.pathsep.join(
    p for p in os.environ.get("PATH", "").split(os.pathsep) if p and Path(p) != Path(sys.executable).parent
)


def shell(script: str) -> str:
    """Run lines as a user pastes them into a shell (one with no virtual environment active)."""
    env = {**os.environ, "PATH": PATH_WITHOUT_VENV}
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout


class Served:
    def __init__(
        self, process: subprocess.Popen[str], address: str, data_dir: Path, next_steps: list[str]
    ) -> None:
        self.process = process
        self.address = address
        # The lines `tally serve` printed: `TOKEN=$(tally token ...)`, then a grpcurl call using it.
        self.next_steps = next_steps
        # The README's token for tenant acme with every scope, and an administrator's for the rate card.
        self.token = shell(f'{next_steps[0]}\nprintf %s "$TOKEN"')
        admin = [TALLY, "token", "--data-dir", str(data_dir), "--all-tenants", "--scope", "billing:admin"]
        self.admin_token = subprocess.run(
            admin, capture_output=True, text=True, timeout=30, check=True
        ).stdout.strip()

    def grpcurl(
        self, method: str, *messages: dict[str, object], ok: bool = True, token: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        args = [GRPCURL, "-plaintext", "-format-error"]
        if method and not method.startswith("grpc.") and token != "":
            args += ["-H", f"authorization: Bearer {token or self.token}"]
        if messages:
            args += ["-d", "@"]
        result = subprocess.run(
            [*args, self.address, *([method] if method else [])],
            input="\n".join(json.dumps(m) for m in messages),
            capture_output=True,
            text=True,
            timeout=30,
        )
        if ok:
            assert result.returncode == 0, result.stderr
        return result

    def call(self, method: str, *messages: dict[str, object], token: str | None = None) -> dict[str, object]:
        return json.loads(self.grpcurl(method, *messages, token=token).stdout)


def start(data_dir: Path) -> Served:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env.update(TALLY_PORT="0", TALLY_DATA_DIR=str(data_dir), PATH=PATH_WITHOUT_VENV)
    process = subprocess.Popen(
        [TALLY, "serve", "--log-level", "WARNING"], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        return _started(process, data_dir)
    except BaseException:
        # A server whose start-up did not go as expected is stopped, not left running.
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=60)
        raise


def _started(process: subprocess.Popen[str], data_dir: Path) -> Served:
    """The server, once its start-up lines are read and checked."""
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line.startswith("tally listening on "), line
    address = line.split()[3]
    warning = process.stdout.readline()
    assert warning.startswith("WARNING: no JWT key configured; using the DEVELOPMENT secret"), warning
    assert warning.rstrip().endswith("Get a token with:"), warning
    token_step = process.stdout.readline().strip()
    assert token_step.startswith("TOKEN=$(") and " token --data-dir " in token_step, token_step
    assert process.stdout.readline().startswith("then record a first event with grpcurl"), token_step
    grpcurl_step = process.stdout.readline().strip()
    assert grpcurl_step.endswith(f"{address} tally.v1.UsageService/ReportUsage"), grpcurl_step
    assert (data_dir / "dev-jwt-secret").stat().st_mode & 0o077 == 0  # readable by its owner only
    return Served(process, address, data_dir, [token_step, grpcurl_step])


def stop(served: Served) -> str:
    served.process.send_signal(signal.SIGTERM)
    out, _ = served.process.communicate(timeout=30)
    assert served.process.returncode == 0
    return out


@pytest.fixture(scope="module")
def data_dir(new_cluster_dir: Callable[[str], Path]) -> Path:
    return new_cluster_dir("tally-data")


@pytest.fixture(scope="module")
def served(data_dir: Path) -> Iterator[Served]:
    served = start(data_dir)
    yield served
    if served.process.poll() is None:
        stop(served)


def hour(offset: int = 0) -> str:
    now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) + timedelta(hours=offset)
    return now.strftime("%Y-%m-%dT%H:%M:%SZ")


def test_reflection_lists_every_service(served: Served) -> None:
    listed = served.grpcurl("list").stdout.split()
    assert listed == [
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "tally.v1.BillingService",
        "tally.v1.MeterService",
        "tally.v1.NotificationService",
        "tally.v1.PaymentService",
        "tally.v1.UsageService",
    ]
    described = served.grpcurl("describe").stdout
    assert (
        "rpc StreamUsage ( stream .tally.v1.StreamUsageRequest )"
        " returns ( stream .tally.v1.StreamUsageResponse );" in described
    )


def test_the_printed_next_steps_record_a_first_event(served: Served) -> None:
    start = hour(0)
    recorded = json.loads(shell("\n".join(served.next_steps)))
    assert recorded == {"tenant_id": "acme", "event_id": "hello-1", "outcome": "REPORT_OUTCOME_RECORDED"}
    summary = served.call(
        "tally.v1.UsageService/GetUsageSummary",
        {"name": "tenants/acme/usageSummary", "start_time": start, "end_time": hour(1)},
    )["summary"]
    rows = [(a["service"], a["usage_type"], a["quantity"]) for a in summary["aggregates"]]  # type: ignore[index]
    assert rows == [("analytics", "query", "1")]
    # A partial response (AIP-157). grpcurl reads a FieldMask as an object of paths.
    meters_only = served.call(
        "tally.v1.UsageService/GetUsageSummary",
        {
            "name": "tenants/acme/usageSummary",
            "start_time": start,
            "end_time": hour(1),
            "meters": ["meters/analytics-query"],
            "read_mask": {"paths": ["meter_aggregates"]},
        },
    )["summary"]
    sums = [{"meter": "meters/analytics-query", "aggregation": "METER_AGGREGATION_SUM", "value": "1"}]
    assert meters_only == {"meter_aggregates": sums}  # nothing else: not even the name


def test_describe_shows_the_proto_comments_and_annotations(served: Served) -> None:
    result = subprocess.run(
        [GRPCURL, "-plaintext", served.address, "describe", "tally.v1.UsageEvent"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    described = result.stdout
    # The field's comment, then the field with its behaviour, as in resources.proto.
    assert "// The client's idempotency key for this event, unique within the tenant." in described
    assert "string event_id = 2 [" in described and "(.google.api.field_behavior) = REQUIRED" in described


def test_printed_commands_are_bare_names_only_where_the_shell_finds_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bin_dir = Path(sys.executable).parent  # where pip put tally and grpcurl
    monkeypatch.setattr(sys, "argv", [str(bin_dir / "tally"), "serve"])
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{PATH_WITHOUT_VENV}")  # the venv is active
    assert (_runnable("tally"), _runnable("grpcurl")) == ("tally", "grpcurl")
    monkeypatch.setenv("PATH", PATH_WITHOUT_VENV)
    assert (_runnable("tally"), _runnable("grpcurl")) == (str(bin_dir / "tally"), str(bin_dir / "grpcurl"))


def test_health_checks(served: Served) -> None:
    assert served.call("grpc.health.v1.Health/Check") == {"status": "SERVING"}
    assert served.call("grpc.health.v1.Health/Check", {"service": "tally.v1.UsageService"}) == {
        "status": "SERVING"
    }


def test_report_ingest_stream_summary_and_invoice(served: Served) -> None:
    when, end = hour(-2), hour(0)  # once: the test may run across an hour boundary
    upload = {
        "tenant_id": "acme",
        "service": "marketplace",
        "usage_type": "wpk_upload",
        "quantity": "1.0",
        "event_time": when,
    }
    first = served.call("tally.v1.UsageService/ReportUsage", {"event": {**upload, "event_id": "u1"}})
    assert first["outcome"] == "REPORT_OUTCOME_RECORDED"
    again = served.call("tally.v1.UsageService/ReportUsage", {"event": {**upload, "event_id": "u1"}})
    assert again["outcome"] == "REPORT_OUTCOME_DUPLICATE"

    ingested = served.call(
        "tally.v1.UsageService/IngestUsage",
        {"events": [{**upload, "event_id": "u2"}, {**upload, "event_id": "u3"}]},
        {"events": [{**upload, "event_id": "u3"}, {**upload, "event_id": "bad", "quantity": "-1"}]},
    )
    assert ingested == {
        "batch_count": "2",
        "accepted_count": "2",
        "duplicate_count": "1",
        "rejected_count": "1",
        "rejections": [
            {
                "batch_index": "1",
                "event_index": 1,
                "event_id": "bad",
                "field": "quantity",
                "reason": "must not be negative",
                "cause": "REJECTION_CAUSE_INVALID",
            }
        ],
    }

    acks = served.grpcurl(
        "tally.v1.UsageService/StreamUsage",
        {"sequence": 1, "events": [{**upload, "event_id": "u4"}]},
        {"sequence": 2, "events": [{**upload, "event_id": "u5"}, {**upload, "event_id": "u4"}]},
    ).stdout
    decoded = [json.loads(chunk) for chunk in acks.replace("}\n{", "}\x00{").split("\x00")]
    assert [(a["sequence"], a["accepted_count"], a.get("duplicate_count")) for a in decoded] == [
        ("1", "1", None),
        ("2", "1", "1"),
    ]

    summary = served.call(
        "tally.v1.UsageService/GetUsageSummary",
        {"name": "tenants/acme/usageSummary", "start_time": when, "end_time": end},
    )["summary"]
    aggregates = summary["aggregates"]  # type: ignore[index]
    assert [(a["service"], a["usage_type"], a["quantity"]) for a in aggregates] == [
        ("marketplace", "wpk_upload", "5")
    ]

    invoice = served.call(
        "tally.v1.BillingService/GenerateInvoice",
        {"parent": "tenants/acme", "period_start_time": when, "period_end_time": end},
    )["invoice"]
    assert invoice["total"] == "0.50"  # type: ignore[index]
    fetched = served.call("tally.v1.BillingService/GetInvoice", {"name": invoice["name"]})  # type: ignore[index]
    # A draft is priced again when read, so only its compute_time differs.
    generated_at = datetime.fromisoformat(invoice["compute_time"])  # type: ignore[index]
    assert datetime.fromisoformat(fetched["invoice"]["compute_time"]) >= generated_at  # type: ignore[index]
    assert {**fetched["invoice"], "compute_time": ""} == {**invoice, "compute_time": ""}  # type: ignore[dict-item]
    listed = served.call("tally.v1.BillingService/ListInvoices", {"parent": "tenants/acme"})
    assert [i["name"] for i in listed["invoices"]] == [invoice["name"]]  # type: ignore[index,union-attr]


def test_rates_are_listed_and_set(served: Served) -> None:
    rates = served.call("tally.v1.BillingService/ListRates")["rates"]
    assert len(rates) == 7  # type: ignore[arg-type]
    set_rate = served.call(
        "tally.v1.BillingService/SetRate",
        {"service": "compute", "usage_type": "gpu_hour", "unit_price": "2.40"},
        token=served.admin_token,
    )["rate"]
    assert set_rate["unit_price"] == "2.40"  # type: ignore[index]


def test_bad_input_and_missing_invoice_give_precise_statuses(served: Served) -> None:
    bad = served.grpcurl(
        "tally.v1.UsageService/ReportUsage",
        {
            "event": {
                "tenant_id": "acme",
                "event_id": "x",
                "service": "marketplace",
                "usage_type": "wpk_upload",
                "quantity": "NaN",
            }
        },
        ok=False,
    )
    error = json.loads(bad.stderr)
    assert error["code"] == 3  # INVALID_ARGUMENT
    assert error["details"][0]["@type"] == "type.googleapis.com/google.rpc.BadRequest"
    assert [v["field"] for v in error["details"][0]["field_violations"]] == ["event.quantity"]
    missing = served.grpcurl(
        "tally.v1.BillingService/GetInvoice", {"name": "tenants/acme/invoices/inv_nope"}, ok=False
    )
    assert json.loads(missing.stderr)["code"] == 5  # NOT_FOUND
    anonymous = served.grpcurl("tally.v1.BillingService/ListRates", {}, ok=False, token="")
    assert json.loads(anonymous.stderr)["code"] == 16  # UNAUTHENTICATED
    other_tenant = served.grpcurl(
        "tally.v1.BillingService/ListInvoices", {"parent": "tenants/globex"}, ok=False
    )
    assert json.loads(other_tenant.stderr)["code"] == 7  # PERMISSION_DENIED


def test_plan_preview_close_and_late_event_with_grpcurl_money_by_hand(served: Served, data_dir: Path) -> None:
    """The README's walk-through: every amount below is computed by hand."""
    tenant = "walkthrough"
    mint = [TALLY, "token", "--data-dir", str(data_dir), "--tenant", tenant]
    mint += ["--scope", "usage:write", "--scope", "billing:read", "--scope", "billing:admin"]
    token = subprocess.run(mint, capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    served.call(
        "tally.v1.BillingService/CreatePlan",
        {
            "plan_id": "starter",
            "display_name": "Starter",
            "currency_code": "USD",
            "charges": [
                {
                    "key": "uploads",
                    "description": "Uploads",
                    "usage_type": {"service": "marketplace", "usage_type": "wpk_upload"},
                    "graduated": {"tiers": [{"up_to": "100", "unit_price": "0.10"}, {"unit_price": "0.05"}]},
                },
                {"key": "platform", "description": "Platform fee", "flat_fee": {"amount": "10"}},
            ],
        },
        token=served.admin_token,
    )
    # Periods on the 1st of the month (00:00 UTC); billed from this hour on.
    profile = served.call(
        "tally.v1.BillingService/SetBillingProfile",
        {
            "billing_profile": {
                "name": f"tenants/{tenant}/billingProfile",
                "display_name": "Walkthrough Ltd",
                "plan": "plans/starter",
                "billing_start_time": hour(),
            }
        },
        token=token,
    )["billing_profile"]
    assert profile["plan"] == "plans/starter" and profile["currency_code"] == "USD"
    served.call(
        "tally.v1.UsageService/ReportUsage",
        {
            "event": {
                "tenant_id": tenant,
                "event_id": "u1",
                "service": "marketplace",
                "usage_type": "wpk_upload",
                "quantity": "120",
            }
        },
        token=token,
    )
    preview = served.call(
        "tally.v1.BillingService/PreviewInvoice", {"parent": f"tenants/{tenant}"}, token=token
    )
    lines = preview["invoice"]["line_items"]
    # 120 uploads: 100 x 0.10 + 20 x 0.05 = 11.00, tiers exact.
    assert (lines[0]["charge_key"], lines[0]["quantity"], lines[0]["amount"]) == ("uploads", "120", "11.00")
    assert [(t["quantity"], t["amount"]) for t in lines[0]["tiers"]] == [("100", "10"), ("20", "1")]
    # The fee, prorated by the hour from the billing start to the end of the month.
    start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    month = start.replace(day=1, hour=0)
    next_month = (month + timedelta(days=32)).replace(day=1)
    covered = int((next_month - start) / timedelta(hours=1))
    full = int((next_month - month) / timedelta(hours=1))
    fee = (Decimal(10) * covered / full).quantize(Decimal("0.01"), ROUND_HALF_UP)
    assert (lines[1]["charge_key"], lines[1]["amount"]) == ("platform", str(fee))
    assert preview["invoice"]["total"] == str(Decimal("11.00") + fee)

    first = served.call("tally.v1.BillingService/ClosePeriod", {"parent": f"tenants/{tenant}"}, token=token)[
        "invoice"
    ]
    assert first["status"] == "INVOICE_STATUS_FINALIZED"
    assert re.fullmatch(r"TALLY-\d{4}-\d{6}", first["number"]), first["number"]
    assert first["customer"]["name"] == "Walkthrough Ltd" and first["issuer"]["name"] == "Tally"
    assert first["total"] == str(Decimal("11.00") + fee)

    # A late event in the closed period: 130 uploads cost 11.50, 11.00 were billed.
    served.call(
        "tally.v1.UsageService/ReportUsage",
        {
            "event": {
                "tenant_id": tenant,
                "event_id": "u2",
                "service": "marketplace",
                "usage_type": "wpk_upload",
                "quantity": "10",
                "event_time": hour(),
            }
        },
        token=token,
    )
    again = served.call("tally.v1.BillingService/GetInvoice", {"name": first["name"]}, token=token)["invoice"]
    assert again == first
    second = served.call("tally.v1.BillingService/ClosePeriod", {"parent": f"tenants/{tenant}"}, token=token)[
        "invoice"
    ]
    amounts = [(li.get("kind"), li.get("charge_key", ""), li["amount"]) for li in second["line_items"]]
    assert amounts == [
        ("INVOICE_LINE_KIND_USAGE", "uploads", "0.00"),
        ("INVOICE_LINE_KIND_FLAT_FEE", "platform", "10.00"),
        ("INVOICE_LINE_KIND_ADJUSTMENT", "uploads", "0.50"),
    ]
    assert second["line_items"][2]["period_start_time"] == first["period_start_time"]
    assert second["total"] == "10.50" and int(second["number"][-6:]) == int(first["number"][-6:]) + 1
    paid = served.call("tally.v1.BillingService/MarkInvoicePaid", {"name": first["name"]}, token=token)[
        "invoice"
    ]
    assert paid["status"] == "INVOICE_STATUS_PAID"


def test_meters_of_active_users_and_gb_hours_with_grpcurl(served: Served, data_dir: Path) -> None:
    """The README's meter walk-through (issue 10's "done when"), every value computed by hand."""
    tenant = "meter-walkthrough"
    tally_token = [TALLY, "token", "--data-dir", str(data_dir)]
    meter_admin = subprocess.run(
        [
            *tally_token,
            "--all-tenants",
            "--scope",
            "meters:admin",
            "--scope",
            "usage:read",
            "--subject",
            "meter-admin",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.strip()
    scopes = ["--scope", "usage:write", "--scope", "usage:read", "--scope", "billing:admin"]
    token = subprocess.run(
        [*tally_token, "--tenant", tenant, *scopes], capture_output=True, text=True, timeout=30, check=True
    ).stdout.strip()
    users = served.call(
        "tally.v1.MeterService/CreateMeter",
        {
            "meter": {
                "meter_id": "e2e-active-users",
                "service": "analytics",
                "usage_type": "query",
                "aggregation": "METER_AGGREGATION_UNIQUE_COUNT",
                "value_dimension": "user_id",
            },
            "request_id": "create-e2e-active-users",
        },
        token=meter_admin,
    )["meter"]
    assert users["name"] == "meters/e2e-active-users"  # type: ignore[index]
    assert users["state"] == "METER_STATE_BACKFILLING"  # type: ignore[index]  # counts new events at once; rebuilds the earlier ones
    served.call(
        "tally.v1.MeterService/CreateMeter",
        {
            "meter": {
                "meter_id": "e2e-storage-gb-hours",
                "service": "storage",
                "usage_type": "gb_hour",
                "aggregation": "METER_AGGREGATION_TIME_WEIGHTED",
                "group_by_dimensions": ["bucket"],
            }
        },
        token=meter_admin,
    )
    # Once: the test may run across an hour boundary. The queries are timed explicitly in
    # this hour, so that the month they count in is the month read below.
    this_hour, last_hour = hour(0), hour(-1)
    half_past = last_hour.replace(":00:00Z", ":30:00Z")
    queries = [("q-ann-1", "ann"), ("q-ann-2", "ann"), ("q-bob-1", "bob")]
    events = [
        {
            "tenant_id": tenant,
            "event_id": event_id,
            "service": "analytics",
            "usage_type": "query",
            "quantity": "1",
            "event_time": this_hour,
            "dimensions": {"user_id": user},
        }
        for event_id, user in queries
    ]
    for event_id, gb, when in (("gb-1", "100", last_hour), ("gb-2", "300", half_past)):
        events.append(
            {
                "tenant_id": tenant,
                "event_id": event_id,
                "service": "storage",
                "usage_type": "gb_hour",
                "quantity": gb,
                "event_time": when,
                "dimensions": {"bucket": "logs"},
            }
        )
    ingested = served.call("tally.v1.UsageService/IngestUsage", {"events": events}, token=token)
    assert ingested["accepted_count"] == "5"
    # Sent again: duplicates, counted nowhere.
    again = served.call("tally.v1.UsageService/IngestUsage", {"events": events[2:]}, token=token)
    assert again["duplicate_count"] == "3" and "accepted_count" not in again

    start = datetime.fromisoformat(this_hour)
    month = start.replace(day=1, hour=0).strftime("%Y-%m-%dT%H:%M:%SZ")
    next_month = (
        (start.replace(day=1, hour=0) + timedelta(days=32)).replace(day=1).strftime("%Y-%m-%dT%H:%M:%SZ")
    )

    def monthly_users() -> list[tuple[str, str, str]]:
        summary = served.call(
            "tally.v1.UsageService/GetUsageSummary",
            {
                "name": f"tenants/{tenant}/usageSummary",
                "start_time": month,
                "end_time": next_month,
                "bucket": "TIME_BUCKET_MONTH",
                "meters": ["meters/e2e-active-users"],
            },
            token=token,
        )["summary"]
        found = summary["meter_aggregates"]  # type: ignore[index]
        return [(a["meter"], a["aggregation"], a["value"]) for a in found]

    # Two distinct users over the month (ann twice, bob once).
    assert monthly_users() == [("meters/e2e-active-users", "METER_AGGREGATION_UNIQUE_COUNT", "2")]
    # 100 GB for the first half of the last hour, 300 GB for the second: 200 GB-hours.
    storage = served.call(
        "tally.v1.UsageService/GetUsageSummary",
        {
            "name": f"tenants/{tenant}/usageSummary",
            "start_time": last_hour,
            "end_time": this_hour,
            "meters": ["meters/e2e-storage-gb-hours"],
            "read_mask": {"paths": ["meter_aggregates"]},
        },
        token=token,
    )["summary"]
    assert storage == {  # the read mask leaves the usage types' aggregates out
        "meter_aggregates": [
            {
                "meter": "meters/e2e-storage-gb-hours",
                "aggregation": "METER_AGGREGATION_TIME_WEIGHTED",
                "value": "200",
            }
        ]
    }
    # Bob's only query cancelled: one active user left, and bob's query stays a duplicate.
    served.call(
        "tally.v1.UsageService/CancelEvent", {"tenant_id": tenant, "event_id": "q-bob-1"}, token=token
    )
    assert monthly_users() == [("meters/e2e-active-users", "METER_AGGREGATION_UNIQUE_COUNT", "1")]
    resent = served.call("tally.v1.UsageService/IngestUsage", {"events": events[2:3]}, token=token)
    assert resent["duplicate_count"] == "1"
    assert monthly_users() == [("meters/e2e-active-users", "METER_AGGREGATION_UNIQUE_COUNT", "1")]


def test_sigterm_shuts_down_cleanly_and_data_survives_a_restart(served: Served, data_dir: Path) -> None:
    out = stop(served)
    assert "shutting down" in out
    again = start(data_dir)
    try:
        listed = again.call("tally.v1.BillingService/ListInvoices", {"parent": "tenants/acme"})
        assert listed["invoices"][0]["total"] == "0.50"  # type: ignore[index]
    finally:
        stop(again)
