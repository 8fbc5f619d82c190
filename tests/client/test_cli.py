"""The `tally` command against the real server: what it prints, its exit status, and what the database holds.

The commands run in a thread (tally_client.cli.main, as the console script calls it):
its blocking gRPC calls must not hold up the event loop that serves them.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest

from server.domain.access import BILLING_READ, SCOPES, USAGE_READ
from tally_client.cli import main
from tests.client.conftest import Tally
from tests.conftest import make_token
from tests.helpers import hour_start, totals

TALLY = Path(sys.executable).parent / "tally"


def iso(hours_from_now: int, minutes: int = 0) -> str:
    return (hour_start(hours_from_now) + timedelta(minutes=minutes)).isoformat()


async def test_reported_events_show_in_the_summary_table_with_exact_quantities(
    cli: Tally, tenant: str
) -> None:
    for event_id, quantity, region in (
        ("e-1", "0.000000001", "eu"),
        ("e-2", "2.5", "us"),
        ("e-3", "1", "eu"),
    ):
        run = await cli(
            "report",
            *("--tenant", tenant, "--event-id", event_id, "--service", "analytics", "--usage-type", "query"),
            *("--quantity", quantity, "--time", iso(-1, 5), "-d", f"region={region}"),
        )
        assert run == (0, f"recorded: tenant {tenant}, event {event_id}\n", "")
    again = await cli(
        "report",
        *("--tenant", tenant, "--event-id", "e-1", "--service", "analytics", "--usage-type", "query"),
        *("--quantity", "0.000000001", "--time", iso(-1, 5)),
    )
    assert again.out == f"duplicate: tenant {tenant}, event e-1\n"

    whole = await cli("summary", "--tenant", tenant, "--start", iso(-1), "--end", iso(0))
    assert whole.code == 0, whole.err
    [row] = [line for line in whole.out.splitlines() if "analytics" in line]
    assert row.split("│")[1:-1] == [" analytics ", " query      ", " 3.500000001 ", "      3 "]

    grouped = await cli(
        "summary", "--tenant", tenant, "--start", iso(-1), "--end", iso(0), "--group-by", "region"
    )
    cells = [
        [c.strip() for c in line.split("│")[1:-1]] for line in grouped.out.splitlines() if "query" in line
    ]
    assert cells == [
        ["analytics", "query", "eu", "1.000000001", "2"],
        ["analytics", "query", "us", "2.5", "1"],
    ]


async def test_summary_as_json_has_exact_strings_buckets_and_utc_times(cli: Tally, tenant: str) -> None:
    for event_id, hours in (("a", -2), ("b", -1)):
        await cli(
            "report",
            *("--tenant", tenant, "--event-id", event_id, "--service", "storage", "--usage-type", "gb_hour"),
            *("--quantity", "0.1", "--time", iso(hours, 30)),
        )
    run = await cli(
        "summary", "--tenant", tenant, "--start", iso(-2), "--end", iso(0), "--bucket", "hour", "-o", "json"
    )
    summary = json.loads(run.out)
    assert (summary["tenant_id"], summary["bucket"], summary["start_time"]) == (
        tenant,
        "hour",
        hour_start(-2).isoformat().replace("+00:00", "Z"),
    )
    assert [
        (a["bucket_start_time"][11:16], a["quantity"], a["event_count"]) for a in summary["aggregates"]
    ] == [
        (hour_start(-2).strftime("%H:%M"), "0.1", 1),
        (hour_start(-1).strftime("%H:%M"), "0.1", 1),
    ]


def write_jsonl(path: Path, tenant: str, time: str) -> Path:
    def line(event_id: str, quantity: str | float, **extra: object) -> str:
        fields = {
            "tenant_id": tenant,
            "event_id": event_id,
            "service": "analytics",
            "usage_type": "query",
            "quantity": quantity,
            "event_time": time,
            **extra,
        }
        return json.dumps(fields)

    lines = [
        line("j-1", "1.25"),
        line("j-2", "0.000001", dimensions={"region": "eu"}),
        line("j-1", "1.25"),  # the same event again: a duplicate
        '{"tenant_id": "broken", ',  # not JSON: never sent
        line("j-3", "-4"),  # the server refuses a negative quantity
        "",
        line("j-4", 3),  # a JSON number, read exactly
        line("j-2", "0.000001", dimensions={"region": "eu"}),
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


async def test_ingest_of_jsonl_counts_duplicates_and_bad_lines_exactly_and_the_database_agrees(
    cli: Tally, tenant: str, db: asyncpg.Pool, tmp_path: Path
) -> None:
    events = write_jsonl(tmp_path / "events.jsonl", tenant, iso(-1, 10))
    run = await cli("ingest", str(events), "--batch-size", "2")
    assert run.code == 1  # some events were rejected
    assert run.out == "accepted 3, duplicate 2, rejected 2 (1 unreadable line)\n"
    assert "line 4: not JSON" in run.err
    assert "event j-3: quantity: " in run.err
    assert await totals(db, tenant) == (3, Decimal("4.250001"), 3, Decimal("4.250001"))

    again = await cli("ingest", str(events), "--output", "json")
    report = json.loads(again.out)
    assert (report["accepted"], report["duplicate"], report["rejected"], report["unreadable"]) == (0, 5, 2, 1)
    assert (report["lines"], report["not_acknowledged"]) == (7, 0)
    assert [(r["event_id"], r["field"], r["cause"]) for r in report["rejections"]] == [
        ("j-3", "quantity", "invalid")
    ]
    assert await totals(db, tenant) == (3, Decimal("4.250001"), 3, Decimal("4.250001"))


async def test_ingest_of_csv_reads_dimension_columns_and_exits_0_when_all_are_accepted(
    cli: Tally, tenant: str, db: asyncpg.Pool, tmp_path: Path
) -> None:
    time = iso(-1, 20)
    events = tmp_path / "events.csv"
    events.write_text(
        "event_id,service,usage_type,quantity,event_time,dimensions.region\n"
        f"c-1,analytics,query,0.5,{time},eu\n"
        f"c-2,analytics,query,0.25,{time},\n"
        f'c-3,analytics,query,"1.125",{time},us\n'
    )
    run = await cli("ingest", str(events), "--tenant", tenant)
    assert (run.code, run.out) == (0, "accepted 3, duplicate 0, rejected 0\n"), run.err
    assert await totals(db, tenant) == (3, Decimal("1.875"), 3, Decimal("1.875"))
    rows = await db.fetch(
        "SELECT event_id, dimensions FROM usage_events WHERE tenant_id = $1 ORDER BY event_id", tenant
    )
    assert [(r["event_id"], json.loads(r["dimensions"])) for r in rows] == [
        ("c-1", {"region": "eu"}),
        ("c-2", {}),
        ("c-3", {"region": "us"}),
    ]


async def test_ingest_shows_a_progress_bar_with_the_counts_when_asked(
    cli: Tally, tenant: str, tmp_path: Path
) -> None:
    events = tmp_path / "events.jsonl"
    events.write_text(
        "".join(
            json.dumps(
                {
                    "tenant_id": tenant,
                    "event_id": f"p-{i}",
                    "service": "analytics",
                    "usage_type": "query",
                    "quantity": "1",
                }
            )
            + "\n"
            for i in range(50)
        )
    )
    run = await cli("ingest", str(events), "--progress", "--batch-size", "10")
    assert (run.code, run.out) == (0, "accepted 50, duplicate 0, rejected 0\n")
    assert "ingesting" in run.err and "100%" in run.err and "accepted 50, duplicate 0, rejected 0" in run.err
    quiet = await cli("ingest", str(events), "--no-progress")
    assert (quiet.out, quiet.err) == ("accepted 0, duplicate 50, rejected 0\n", "")


async def test_invoices_generate_list_and_show_print_the_exact_amounts(cli: Tally, tenant: str) -> None:
    for event_id, quantity in (("i-1", "1"), ("i-2", "2.5")):
        await cli(
            "report",
            *("--tenant", tenant, "--event-id", event_id, "--service", "compute", "--usage-type", "cpu_hour"),
            *("--quantity", quantity, "--time", iso(-2, 1)),
        )
    generated = await cli("invoices", "generate", "--tenant", tenant, "--start", iso(-2), "--end", iso(-1))
    assert generated.code == 0, generated.err
    first = generated.out.splitlines()[0]
    assert first.startswith(f"created tenants/{tenant}/invoices/")
    name = first.removeprefix("created ")
    invoice_id = name.rsplit("/", 1)[1]

    listed = json.loads((await cli("invoices", "list", "--tenant", tenant, "-o", "json")).out)
    assert [(i["invoice_id"], i["total"], i["status"]) for i in listed] == [(invoice_id, "1.75", "draft")]
    table = (await cli("invoices", "list", "--tenant", tenant)).out
    assert invoice_id in table and "1.75" in table

    shown = json.loads((await cli("invoices", "show", name, "-o", "json")).out)
    assert [
        (li["quantity"], li["unit_price"], li["amount"], li["event_count"]) for li in shown["line_items"]
    ] == [("3.5", "0.50", "1.75", 2)]
    by_id = await cli("invoices", "show", invoice_id, "--tenant", tenant)
    [line_item] = [line for line in by_id.out.splitlines() if "cpu_hour" in line]
    assert [c.strip() for c in line_item.split("│")[1:-1]] == [
        "compute",
        "cpu_hour",
        "3.5",
        "0.50",
        "1.75",
        "2",
    ]


async def test_rates_list_and_set_show_exact_prices(cli: Tally) -> None:
    table = await cli("rates", "list")
    [row] = [line for line in table.out.splitlines() if " analytics " in line and " query " in line]
    assert [c.strip() for c in row.split("│")[1:4]] == ["analytics", "query", "0.01"]

    usage_type = f"t_{os.urandom(6).hex()}"
    set_run = await cli("rates", "set", "compute", usage_type, "0.000000000001", "-o", "json")
    assert json.loads(set_run.out)["unit_price"] == "0.000000000001"
    rates = json.loads((await cli("rates", "list", "-o", "json")).out)
    assert {(r["usage_type"], r["unit_price"]) for r in rates} >= {(usage_type, "0.000000000001")}


async def test_audit_lists_the_invoice_it_created_as_json(cli: Tally, tenant: str) -> None:
    await cli("invoices", "generate", "--tenant", tenant, "--start", iso(-2), "--end", iso(-1))
    entries = json.loads((await cli("audit", "--tenant", tenant, "-o", "json")).out)
    assert [(e["action"], e["tenant_id"], e["principal"]) for e in entries] == [
        ("invoice_created", tenant, "test-service")
    ]
    table = await cli("audit", "--tenant", tenant)
    assert "invoice_created" in table.out and table.code == 0


async def test_a_failed_call_prints_its_code_reason_and_fields_and_exits_1(cli: Tally, tenant: str) -> None:
    run = await cli(
        "report",
        *("--tenant", tenant, "--service", "analytics", "--usage-type", "query", "--quantity", "-1"),
    )
    assert run.code == 1 and run.out == ""
    lines = run.err.splitlines()
    assert lines[0].startswith("tally: INVALID_ARGUMENT (FIELD_INVALID): ")
    assert lines[1].startswith("  event.quantity: ")
    assert lines[-1].startswith("  request id ")

    other = await cli(
        "summary", "--tenant", tenant, token=make_token(["someone-else"], (USAGE_READ, BILLING_READ))
    )
    assert other.code == 1
    assert other.err.startswith("tally: PERMISSION_DENIED (")


async def test_usage_errors_exit_2_before_any_call(cli: Tally, tmp_path: Path) -> None:
    missing_flag = await cli("report", "--tenant", "acme", "--service", "analytics", "--quantity", "1")
    assert missing_flag.code == 2 and "--usage-type" in missing_flag.err
    float_like = await cli(
        "report", "--tenant", "a", "--service", "s", "--usage-type", "u", "--quantity", "one"
    )
    assert float_like.code == 2 and "'one' is not a decimal number" in float_like.err
    missing_file = await cli("ingest", str(tmp_path / "nope.jsonl"))
    assert missing_file.code == 2 and "cannot read" in missing_file.err


async def test_address_and_token_come_from_the_environment(
    address: str, tenant: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TALLY_ADDR", address)
    monkeypatch.setenv("TALLY_TOKEN", make_token([tenant], SCOPES))
    argv = ["report", "--tenant", tenant, "--event-id", "env-1", "--service", "analytics"]
    code = await asyncio.to_thread(main, [*argv, "--usage-type", "query", "--quantity", "1"])
    assert (code, capsys.readouterr().out) == (0, f"recorded: tenant {tenant}, event env-1\n")


def test_installed_tally_lists_the_server_commands_beside_the_client_commands() -> None:
    result = subprocess.run([str(TALLY), "--help"], capture_output=True, text=True, timeout=60, check=True)
    listed = [line for line in result.stdout.splitlines() if line.startswith("    ") and line[4] != " "]
    commands = [line.split()[0] for line in listed]
    assert commands == [
        "report",
        "cancel",
        "ingest",
        "summary",
        "invoices",
        "credit-notes",
        "rates",
        "plans",
        "profiles",
        "meters",
        "collection-status",
        "webhooks",
        "audit",
        "serve",
        "token",
        "retention",
    ]
    serve = subprocess.run(
        [str(TALLY), "serve", "--help"], capture_output=True, text=True, timeout=60, check=True
    )
    assert serve.stdout.startswith("usage: tally serve") and "--database-url" in serve.stdout


def test_help_loads_neither_grpc_nor_rich() -> None:
    code = (
        "import sys; from tally_client.cli.parser import build_parser; build_parser(); "
        "print(sorted({'grpc', 'rich', 'tally_client.client'} & set(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "[]"


def test_server_commands_run_through_the_client_tally_check_their_settings(
    monkeypatch: pytest.MonkeyPatch, secret_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TALLY_PORT", "bogus")
    with pytest.raises(SystemExit) as raised:
        main(["serve"])
    assert str(raised.value) == "tally: TALLY_PORT must be an integer, got 'bogus'"

    argv = ["token", "--jwt-secret-file", str(secret_file), "--tenant", "acme", "--scope", USAGE_READ]
    assert main([*argv, "--jwt-issuer", "tally-tests"]) == 0
    token = capsys.readouterr().out.strip()
    assert token.count(".") == 2  # a JWT, minted by the server's `tally token`


async def test_invoice_lifecycle_actions_finalize_then_mark_paid(cli: Tally, tenant: str) -> None:
    await cli(
        "report",
        *("--tenant", tenant, "--event-id", "l-1", "--service", "compute", "--usage-type", "cpu_hour"),
        *("--quantity", "2", "--time", iso(-2, 1)),
    )
    generated = await cli(
        "invoices", "generate", "--tenant", tenant, "--start", iso(-2), "--end", iso(-1), "-o", "json"
    )
    name = json.loads(generated.out)["invoice"]["name"]
    finalized = await cli("invoices", "finalize", name, "-o", "json")
    assert finalized.code == 0, finalized.err
    assert (json.loads(finalized.out)["status"], json.loads(finalized.out)["total"]) == ("finalized", "1.00")
    paid = await cli("invoices", "mark-paid", name.rsplit("/", 1)[1], "--tenant", tenant)
    assert paid.code == 0 and " paid " in paid.out, paid.err
    again = await cli("invoices", "finalize", name)
    assert again.code == 1 and again.err.startswith("tally: FAILED_PRECONDITION (INVOICE_STATUS_INVALID)")


async def test_plans_list_and_show_the_default_plan(cli: Tally) -> None:
    plans = json.loads((await cli("plans", "list", "-o", "json")).out)
    assert plans[0]["name"] == "plans/default"
    table = await cli("plans", "list")
    assert table.code == 0 and " default " in table.out
    shown = await cli("plans", "show", "default", "-o", "json")
    plan = json.loads(shown.out)
    assert plan["name"] == "plans/default" and plan["versions"]
    missing = await cli("plans", "show", "no-such-plan")
    assert missing.code == 1 and missing.err.startswith("tally: NOT_FOUND")
