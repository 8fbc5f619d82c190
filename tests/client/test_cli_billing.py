"""`tally` commands for plans, billing profiles, the open period, credit notes, meters and cancelled
events, against the real server: what they print, their exit status, and what the database holds."""

from __future__ import annotations

import json
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg

from tally_client.cli.meters import AGGREGATIONS
from tally_client.cli.parser import build_parser
from tests.billing_helpers import far_anchor_day
from tests.client.conftest import Tally
from tests.client.test_cli import iso

UPLOADS = {"service": "marketplace", "usage_type": "wpk_upload"}
# The first 100 uploads at 0.10, the rest at 0.05.
GRADUATED = [
    {
        "key": "uploads",
        "description": "Uploads",
        "usage_type": UPLOADS,
        "graduated": {"tiers": [{"up_to": "100", "unit_price": "0.10"}, {"unit_price": "0.05"}]},
    }
]


def write_json(path: Path, value: Any) -> str:
    path.write_text(json.dumps(value))
    return str(path)


def cells(out: str, containing: str) -> list[str]:
    [line] = [line for line in out.splitlines() if containing in line]
    return [cell.strip() for cell in line.split("│")[1:-1]]


async def test_a_tenants_period_from_plan_and_profile_to_preview_close_and_credit_note(
    cli: Tally, tenant: str, db: asyncpg.Pool, tmp_path: Path
) -> None:
    plan = f"plan-{uuid.uuid4().hex[:12]}"
    created = await cli(
        "plans", "create", plan, "--display-name", "CLI plan", "--currency", "USD",
        "--charges", write_json(tmp_path / "charges.json", GRADUATED), "--effective", iso(-48), "-o", "json",
    )  # fmt: skip
    assert created.code == 0, created.err
    assert [c["key"] for c in json.loads(created.out)["versions"][0]["charges"]] == ["uploads"]

    profile = await cli(
        "profiles", "set", "--tenant", tenant, "--display-name", f"Customer {tenant}", "--plan", plan,
        "--anchor-day", str(far_anchor_day()), "--billing-start", iso(-5), "--tax-percentage", "20",
        "-o", "json",
    )  # fmt: skip
    assert profile.code == 0, profile.err
    assert (json.loads(profile.out)["plan"], json.loads(profile.out)["display_name"]) == (
        f"plans/{plan}",
        f"Customer {tenant}",
    )
    shown = await cli("profiles", "show", "--tenant", tenant)
    assert cells(shown.out, "display name") == ["display name", f"Customer {tenant}"]
    assert cells(shown.out, " plan ") == ["plan", plan]

    await cli(
        "report", "--tenant", tenant, "--event-id", "u-1", *("--service", "marketplace"),
        *("--usage-type", "wpk_upload", "--quantity", "120", "--time", iso(-3, 5)),
    )  # fmt: skip
    preview = json.loads((await cli("invoices", "preview", "--tenant", tenant, "-o", "json")).out)
    assert (preview["invoice_id"], preview["status"], preview["total"]) == ("", "draft", "13.20")
    # A graduated line has no single unit price: null, not a made-up number.
    assert [
        (li["charge_key"], li["quantity"], li["unit_price"], li["amount"]) for li in preview["line_items"]
    ] == [("uploads", "120", None, "11.00"), ("", "11", "0.2", "2.20")]
    table = await cli("invoices", "preview", "--tenant", tenant)
    assert table.out.startswith(f"open period of {tenant} so far (a preview: not stored)")
    assert cells(table.out, "Uploads") == ["Uploads", "marketplace", "wpk_upload", "120", "", "11.00", "1"]

    closed = await cli("invoices", "close-period", "--tenant", tenant, "-o", "json")
    assert closed.code == 0, closed.err
    invoice = json.loads(closed.out)
    assert (invoice["status"], invoice["total"]) == ("finalized", "13.20")
    assert invoice["number"].startswith("TALLY-")

    credited = await cli(
        "credit-notes", "create", invoice["name"], "--amount", "4.5", "--reason", "goodwill", "-o", "json"
    )
    assert credited.code == 0, credited.err
    note = json.loads(credited.out)
    assert (note["invoice"], note["amount"], note["reason"]) == (invoice["name"], "4.50", "goodwill")
    too_much = await cli(
        "credit-notes", "create", invoice["invoice_id"], "--tenant", tenant, "--amount", "9", "--reason", "x"
    )
    assert too_much.code == 1 and too_much.out == ""
    assert too_much.err.startswith("tally: FAILED_PRECONDITION (CREDIT_EXCEEDS_INVOICE): ")

    listed = json.loads((await cli("credit-notes", "list", "--tenant", tenant, "-o", "json")).out)
    assert [(n["number"], n["amount"]) for n in listed] == [(note["number"], "4.50")]
    listing = await cli("credit-notes", "list", "--tenant", tenant)
    assert cells(listing.out, "goodwill")[1:5] == [note["number"], invoice["invoice_id"], "4.50", "USD"]
    rows = await db.fetch("SELECT amount, reason FROM credit_notes WHERE tenant_id = $1", tenant)
    assert [(r["amount"], r["reason"]) for r in rows] == [(Decimal("4.50"), "goodwill")]


async def test_a_period_cannot_close_without_a_billing_profile(cli: Tally, tenant: str) -> None:
    run = await cli("invoices", "close-period", "--tenant", tenant)
    assert run.code == 1 and run.err.startswith("tally: NOT_FOUND (BILLING_PROFILE_NOT_FOUND)")
    missing = await cli("profiles", "show", "--tenant", tenant)
    assert missing.code == 1 and missing.err.startswith("tally: NOT_FOUND (BILLING_PROFILE_NOT_FOUND)")


async def test_plans_take_charges_and_versions_from_json_files(cli: Tally, tmp_path: Path) -> None:
    plan = f"plan-{uuid.uuid4().hex[:12]}"
    per_unit = [{"key": "uploads", "usage_type": UPLOADS, "per_unit": {"unit_price": "0.000000000001"}}]
    await cli(
        "plans", "create", plan, "--display-name", "P", "--currency", "USD", "--minimum", "5",
        "--charges", write_json(tmp_path / "v1.json", per_unit), "--effective", iso(-24),
    )  # fmt: skip
    per_unit[0]["per_unit"] = {"unit_price": "0.2"}
    added = await cli(
        "plans", "add-version", f"plans/{plan}", "--charges", write_json(tmp_path / "v2.json", per_unit),
        "--effective", iso(2), "-o", "json",
    )  # fmt: skip
    assert added.code == 0, added.err
    versions = json.loads(added.out)["versions"]
    assert [
        (v["version"], v["minimum_amount"], v["charges"][0]["per_unit"]["unit_price"]) for v in versions
    ] == [
        (1, "5.00", "0.000000000001"),
        (2, "0.00", "0.20"),
    ]
    # A file that is not a list of charges is a usage error: exit 2, nothing sent.
    not_list = await cli(
        "plans", "add-version", plan, "--charges", write_json(tmp_path / "x.json", {"key": "a"})
    )
    assert not_list.code == 2 and "must hold a JSON list" in not_list.err
    unknown = await cli(
        "plans", "add-version", plan, "--charges", write_json(tmp_path / "y.json", [{"kee": 1}])
    )
    assert unknown.code == 2 and "item 0 of" in unknown.err
    shown = json.loads((await cli("plans", "show", plan, "-o", "json")).out)
    assert len(shown["versions"]) == 2


async def test_a_plan_charge_can_price_a_meter(cli: Tally, tmp_path: Path) -> None:
    meter, plan = f"m-{uuid.uuid4().hex[:12]}", f"plan-{uuid.uuid4().hex[:12]}"
    created = await cli(
        "meters", "create", meter, "--service", "marketplace", "--usage-type", "wpk_upload",
        "--aggregation", "count",
    )  # fmt: skip
    assert created.code == 0, created.err
    uploads = [{"key": "uploads", "meter": f"meters/{meter}", "per_unit": {"unit_price": "2"}}]
    made = await cli(
        "plans", "create", plan, "--display-name", "P", "--currency", "USD",
        "--charges", write_json(tmp_path / "uploads.json", uploads), "--effective", iso(-24), "-o", "json",
    )  # fmt: skip
    assert made.code == 0, made.err
    assert json.loads(made.out)["versions"][0]["charges"][0]["meter"] == f"meters/{meter}"
    shown = await cli("plans", "show", plan)
    assert cells(shown.out, "per_unit")[2:4] == ["uploads", f"meters/{meter}"]


async def test_meters_are_created_shown_listed_and_archived(cli: Tally) -> None:
    meter = f"m-{uuid.uuid4().hex[:12]}"
    created = await cli(
        "meters", "create", meter, "--service", "analytics", "--usage-type", "query",
        "--aggregation", "unique_count", "--value-dimension", "user_id", "--filter", "tier=premium",
        "--group-by", "region", "--description", "premium users", "-o", "json",
    )  # fmt: skip
    assert created.code == 0, created.err
    answer = json.loads(created.out)
    assert (answer["name"], answer["aggregation"], answer["filter"], answer["state"]) == (
        f"meters/{meter}",
        "METER_AGGREGATION_UNIQUE_COUNT",
        {"tier": "premium"},
        "METER_STATE_BACKFILLING",  # a UNIQUE_COUNT meter is rebuilt from the earlier events first
    )
    shown = await cli("meters", "show", meter)
    assert cells(shown.out, " analytics ")[:7] == [
        meter, "analytics", "query", "unique_count(user_id)", "tier=premium", "region", "backfilling",
    ]  # fmt: skip
    listed = json.loads((await cli("meters", "list", "-o", "json")).out)
    assert f"meters/{meter}" in [m["name"] for m in listed]

    archived = json.loads((await cli("meters", "archive", f"meters/{meter}", "-o", "json")).out)
    assert archived["state"] == "METER_STATE_ARCHIVED" and archived["archive_time"]
    again = await cli("meters", "create", meter, "--service", "analytics", "--usage-type", "query",
                      "--aggregation", "sum")  # fmt: skip
    assert again.code == 1 and again.err.startswith("tally: ALREADY_EXISTS (METER_EXISTS)")
    missing = await cli("meters", "show", "no-such-meter")
    assert missing.code == 1 and missing.err.startswith("tally: NOT_FOUND (METER_NOT_FOUND)")


async def test_a_cancelled_event_leaves_the_summary_and_cancelling_again_answers_the_same(
    cli: Tally, tenant: str
) -> None:
    for event_id, quantity in (("c-1", "2"), ("c-2", "3")):
        await cli(
            "report", "--tenant", tenant, "--event-id", event_id, "--service", "analytics",
            "--usage-type", "query", "--quantity", quantity, "--time", iso(-1, 5),
        )  # fmt: skip
    first = await cli("cancel", "c-2", "--tenant", tenant)
    assert first.code == 0 and first.out.startswith(f"cancelled: tenant {tenant}, event c-2, at "), first.err
    summary = json.loads(
        (await cli("summary", "--tenant", tenant, "--start", iso(-1), "--end", iso(0), "-o", "json")).out
    )
    assert [(a["quantity"], a["event_count"]) for a in summary["aggregates"]] == [("2", 1)]
    again = json.loads((await cli("cancel", "c-2", "--tenant", tenant, "-o", "json")).out)
    assert first.out.rstrip().endswith(again["cancel_time"])
    never = await cli("cancel", "never-sent", "--tenant", tenant)
    assert never.code == 1 and never.err.startswith("tally: NOT_FOUND (EVENT_NOT_FOUND)")


def test_the_aggregation_choices_are_the_protos() -> None:
    meters = build_parser()._subparsers._group_actions[0].choices["meters"]  # type: ignore[union-attr]
    create = meters._subparsers._group_actions[0].choices["create"]
    [aggregation] = [a for a in create._actions if a.dest == "aggregation"]
    assert list(aggregation.choices) == AGGREGATIONS


async def test_summary_shows_the_named_meters_beside_the_usage_types(cli: Tally, tenant: str) -> None:
    meter = f"m-{uuid.uuid4().hex[:12]}"
    await cli(
        "meters", "create", meter, "--service", "analytics", "--usage-type", "query",
        "--aggregation", "sum", "--filter", "tier=premium",
    )  # fmt: skip
    for event_id, quantity, tier in (
        ("s-1", "0.5", "premium"),
        ("s-2", "2", "basic"),
        ("s-3", "0.25", "premium"),
    ):
        await cli(
            "report", "--tenant", tenant, "--event-id", event_id, "--service", "analytics",
            "--usage-type", "query", "--quantity", quantity, "--time", iso(0, 1), "-d", f"tier={tier}",
        )  # fmt: skip
    window = ("--start", iso(0), "--end", iso(1))
    summary = json.loads(
        (await cli("summary", "--tenant", tenant, *window, "--meter", meter, "-o", "json")).out
    )
    assert [(a["quantity"], a["event_count"]) for a in summary["aggregates"]] == [("2.75", 3)]
    assert [(m["meter"], m["aggregation"], m["value"]) for m in summary["meter_aggregates"]] == [
        (f"meters/{meter}", "sum", "0.75")
    ]
    table = await cli("summary", "--tenant", tenant, *window, "--meter", meter)
    assert cells(table.out, meter) == [meter, "sum", "0.75"]
    unknown = await cli("summary", "--tenant", tenant, *window, "--meter", "no-such-meter")
    assert unknown.code == 1 and unknown.err.startswith("tally: NOT_FOUND (METER_NOT_FOUND)")
