"""The import direction is one way: api -> services (metering, billing...) -> domain <- storage.

Read from the source (every import statement, those inside functions and TYPE_CHECKING
blocks too), so that a layer reaching past another fails here rather than in review.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SERVER = Path(__file__).resolve().parent.parent / "server"


def imports_of(package: str) -> dict[str, set[str]]:
    """Each module of server/<package> and the modules it imports (absolute names)."""
    found: dict[str, set[str]] = {}
    for path in sorted((SERVER / package).rglob("*.py")):
        parts = ("server", *path.relative_to(SERVER).with_suffix("").parts)
        module = ".".join(parts[:-1] if path.name == "__init__.py" else parts)
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: resolve against the importing module's package
                    parts = module.split(".")
                    if path.name != "__init__.py":
                        parts = parts[:-1]
                    base = ".".join(parts[: len(parts) - node.level + 1])
                    names.add(f"{base}.{node.module}" if node.module else base)
                else:
                    assert node.module is not None
                    names.add(node.module)
        found[module] = names
    return found


def breaches(package: str, allowed: tuple[str, ...], forbidden: tuple[str, ...]) -> list[str]:
    return sorted(
        f"{module} imports {name}"
        for module, names in imports_of(package).items()
        for name in names
        if name.startswith(forbidden) and not name.startswith(allowed)
    )


def test_the_api_layer_never_imports_storage() -> None:
    """The edge converts protos and maps domain errors; storage's types and exceptions stay below it."""
    assert breaches("api", (), ("server.storage", "asyncpg")) == []


@pytest.mark.parametrize("package", ["metering", "billing"])
def test_the_services_never_import_the_api_layer_or_grpc(package: str) -> None:
    """A use case is whole below the edge (a stream's pipelining included); the edge only converts."""
    assert breaches(package, (), ("server.api", "grpc", "tally.")) == []


def test_the_domain_imports_nothing_of_the_server_but_itself() -> None:
    """Pure logic on plain values: no storage, no services, no gRPC, no database driver."""
    assert breaches("domain", ("server.domain",), ("server", "asyncpg", "grpc", "tally")) == []


def test_storage_never_imports_the_layers_above_it() -> None:
    above = ("server.api", "server.metering", "server.billing", "server.app", "grpc", "tally")
    assert breaches("storage", (), above) == []


@pytest.mark.parametrize("package", ["billing", "notifications", "metering"])
def test_the_use_cases_leave_transactions_and_retries_to_storage(package: str) -> None:
    """A use case hands its body to a store (e.g. InvoiceStore.run_in_tenant_transaction), which
    opens the transaction and applies the retry policy: no use case calls run_with_retries."""
    assert breaches(package, (), ("server.storage.database",)) == []


# Payments modules that import server.storage.database, and why; none of them for retries.
PAYMENTS_DATABASE_IMPORTS = {
    # The webhook receiver is a process of its own: like server.app, it opens its own pool.
    "server.payments.receiving",
    # The outbox worker tells a lost connection (the job stays due) from a handler's bug.
    "server.payments.outbox",
}


def test_payments_leave_transactions_and_retries_to_storage() -> None:
    importing = {m for m, names in imports_of("payments").items() if "server.storage.database" in names}
    assert importing <= PAYMENTS_DATABASE_IMPORTS
    for module in importing:
        path = SERVER.parent / (module.replace(".", "/") + ".py")
        assert "run_with_retries" not in path.read_text(), module


@pytest.mark.parametrize(
    ("package", "module", "imported"),
    [
        ("api", "server.api.errors", "server.domain.errors"),
        ("domain", "server.domain.models", "server.domain.pricing"),
        ("storage", "server.storage.invoices", "server.storage.database"),
    ],
)
def test_the_walk_sees_the_imports_it_judges(package: str, module: str, imported: str) -> None:
    """A walk that found nothing would pass the tests above without checking anything."""
    modules = imports_of(package)
    assert len(modules) > 5 and imported in modules[module]


# Use cases that see storage only through the Protocols of server.domain.stores, so that
# their unit tests run against in-memory fakes (tests/memory_stores.py).
BEHIND_PROTOCOLS = [
    "server.billing.closing",
    "server.billing.lifecycle",
    "server.billing.periods",
    "server.billing.plans",
    "server.billing.pricer",
    "server.billing.service",
    "server.metering.service",
    "server.payments.collection",
    "server.payments.ledger",
]


@pytest.mark.parametrize("module", BEHIND_PROTOCOLS)
def test_use_cases_behind_protocols_import_no_storage(module: str) -> None:
    package = module.split(".")[1]
    names = imports_of(package)[module]
    assert sorted(name for name in names if name.startswith(("server.storage", "asyncpg"))) == []
