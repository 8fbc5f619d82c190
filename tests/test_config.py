"""The settings table (server/config.py) and the `tally` flags and environment variables derived from it.

One table means a flag, its variable, its help and its default cannot drift apart; these tests hold
every setting to that, so a setting added to the table is covered without a new test.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import fields
from operator import attrgetter
from pathlib import Path
from typing import Any

import pytest

from server.cli import RETENTION_SETTINGS, SETTINGS, TOKEN_SETTINGS, config_from_args, main, parse_args
from server.config import (
    DURATION,
    DURATIONS,
    FLOAT,
    INT,
    OPTIONAL_INT,
    OPTIONAL_PATH,
    OPTIONAL_TEXT,
    PATH,
    TEXT,
    Config,
    Kind,
    LimitSettings,
    parse_duration,
    parse_durations,
)
from server.domain.access import SCOPES

ROOT = Path(__file__).resolve().parent.parent
# A text of each kind; a kind added to the table needs one here.
SAMPLES: dict[Kind[Any], str] = {
    TEXT: "tally.example",
    OPTIONAL_TEXT: "postgresql://example/tally",
    INT: "7",
    OPTIONAL_INT: "9464",
    FLOAT: "2.5",
    PATH: "/srv/tally-example",
    OPTIONAL_PATH: "/srv/tally-example/file.pem",
    DURATION: "90s",
    DURATIONS: "1d,36h",
}
TOKEN_ARGS = ["token", "--all-tenants", "--scope", SCOPES[0]]
RETENTION_ARGS = ["retention", "--keep-months", "3"]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings come from the test alone, not from the shell that runs it."""
    for setting in SETTINGS.values():
        monkeypatch.delenv(setting.env, raising=False)


def default(path: str) -> Any:
    return attrgetter(path)(Config())


def sample(path: str) -> tuple[str, Any]:
    """A text for the setting, and the value it stands for, which is not the default."""
    kind = SETTINGS[path].kind
    if kind.switch:
        text = kind.show(not default(path))
    elif kind.choices:
        text = next(c for c in kind.choices if kind.parse(c) != default(path))
    else:
        text = SAMPLES[kind]
    value = kind.parse(text)
    assert value != default(path)
    return text, value


def flags(path: str, value: Any) -> list[str]:
    """The command-line words that set the setting at `path` to `value`."""
    setting = SETTINGS[path]
    if setting.kind.switch:
        return [setting.flag if value else setting.flag.replace("--", "--no-", 1)]
    return [setting.flag, "" if value is None else setting.kind.show(value)]


def serve_config(*flags: str) -> Config:
    return config_from_args(parse_args(["serve", *flags]))


@pytest.mark.parametrize("path", list(SETTINGS))
def test_each_setting_is_set_by_its_flag_and_by_its_environment_variable(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    text, value = sample(path)
    assert attrgetter(path)(serve_config(*flags(path, value))) == value
    monkeypatch.setenv(SETTINGS[path].env, text)
    assert attrgetter(path)(serve_config()) == value
    assert attrgetter(path)(serve_config(*flags(path, default(path)))) == default(path)


def test_a_flag_wins_over_its_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TALLY_POOL_SIZE", "3")
    assert serve_config("--pool-size", "5").pool_size == 5


def test_serve_without_flags_or_variables_has_configs_defaults() -> None:
    assert serve_config() == Config()
    assert Config().limits == LimitSettings()


def help_entries(command: str, capsys: pytest.CaptureFixture[str]) -> dict[str, str]:
    """`tally COMMAND --help`, one entry per option (its first word, e.g. --port), whitespace collapsed."""
    with pytest.raises(SystemExit) as raised:
        main([command, "--help"])
    assert raised.value.code == 0
    text = capsys.readouterr().out
    return {entry.split()[0].rstrip(","): " ".join(entry.split()) for entry in re.split(r"\n {2}(?=-)", text)}


@pytest.mark.parametrize(
    ("command", "paths"),
    [("serve", list(SETTINGS)), ("token", TOKEN_SETTINGS), ("retention", RETENTION_SETTINGS)],
)
def test_help_names_each_settings_variable_and_shows_configs_default(
    command: str, paths: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    entries = help_entries(command, capsys)
    for path in paths:
        setting = SETTINGS[path]
        entry = entries[setting.flag]
        assert f"(env {setting.env})" in entry
        value = default(path)
        assert entry.endswith(f"(default: {setting.kind.show(value) if value is not None else None})")


def test_help_shows_a_variables_value_as_the_default(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TALLY_READ_POOL_SIZE", "6")
    assert help_entries("serve", capsys)["--read-pool-size"].endswith("(default: 6)")


def rejects(kind: Kind[Any], text: str) -> bool:
    try:
        kind.parse(text)
    except ValueError:
        return True
    return False


@pytest.mark.parametrize("path", [path for path, s in SETTINGS.items() if rejects(s.kind, "bogus")])
def test_a_bad_environment_value_exits_with_a_message_naming_the_variable(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    setting = SETTINGS[path]
    monkeypatch.setenv(setting.env, "bogus")
    with pytest.raises(SystemExit) as raised:
        parse_args(["serve"])
    assert str(raised.value) == f"tally: {setting.env} must be {setting.kind.what}, got 'bogus'"


def test_an_empty_numeric_variable_is_refused_not_taken_for_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TALLY_GRACE_SECONDS", "")
    with pytest.raises(SystemExit, match="TALLY_GRACE_SECONDS must be a number, got ''"):
        parse_args(["serve"])


def test_a_bad_variable_matters_only_to_a_command_that_uses_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TALLY_PORT", "bogus")
    assert parse_args(TOKEN_ARGS).command == "token"
    assert serve_config("--port", "8080").port == 8080


def test_a_bad_flag_value_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        parse_args(["serve", "--max-batch-size", "many"])
    assert raised.value.code == 2
    assert "argument --max-batch-size: 'many' is not an integer" in capsys.readouterr().err


def test_an_empty_audience_turns_the_audience_check_off(monkeypatch: pytest.MonkeyPatch) -> None:
    assert serve_config("--jwt-audience", "").jwt_audience is None
    monkeypatch.setenv("TALLY_JWT_AUDIENCE", "")
    assert serve_config().jwt_audience is None
    assert parse_args(TOKEN_ARGS).jwt_audience is None


def test_access_lines_are_on_by_default_and_off_below_log_level_info(monkeypatch: pytest.MonkeyPatch) -> None:
    assert serve_config().access_log
    assert not serve_config("--log-level", "WARNING").access_log
    monkeypatch.setenv("TALLY_ACCESS_LOG", "on")
    assert not serve_config("--log-level", "ERROR").access_log
    assert serve_config("--log-level", "DEBUG").access_log


def test_a_switch_reads_yes_and_no_words_from_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    for text, on in (("1", True), ("YES", True), ("true", True), ("0", False), ("off", False), ("", False)):
        monkeypatch.setenv("TALLY_METRICS_TENANT_LABELS", text)
        assert serve_config().metrics_tenant_labels is on, text


def test_token_and_retention_read_their_shared_settings_like_serve(monkeypatch: pytest.MonkeyPatch) -> None:
    for path in {*TOKEN_SETTINGS, *RETENTION_SETTINGS}:
        monkeypatch.setenv(SETTINGS[path].env, sample(path)[0])
    served = serve_config()
    for argv, paths in ((TOKEN_ARGS, TOKEN_SETTINGS), (RETENTION_ARGS, RETENTION_SETTINGS)):
        args = parse_args(argv)
        for path in paths:
            assert getattr(args, SETTINGS[path].dest) == attrgetter(path)(served) == sample(path)[1]


def test_every_config_field_is_a_setting_but_the_health_interval() -> None:
    paths = {f.name for f in fields(Config) if f.name != "limits"}
    paths |= {f"limits.{f.name}" for f in fields(LimitSettings)}
    assert paths - set(SETTINGS) == {"health_interval_seconds"}


def test_readme_configuration_table_lists_every_flag_and_variable() -> None:
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Configuration") :].split("\n\n")[2]
    for setting in SETTINGS.values():
        assert f"`{setting.flag}`" in table and f"`{setting.env}`" in table, setting.flag


@pytest.mark.parametrize(("text", "seconds"), [("3600", 3600), ("90s", 90), ("30m", 1800), ("7d", 604_800)])
def test_durations_take_a_unit(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


def test_a_list_of_durations_reads_each_and_shows_them_back() -> None:
    assert parse_durations("3d,5d,7d") == (259_200, 432_000, 604_800)
    assert DURATIONS.show((90, 7200, 86_400 + 1)) == "90s,2h,86401s"
    with pytest.raises(ValueError, match="is not a duration"):
        parse_durations("3d,,7d")


@pytest.mark.parametrize("text", ["0", "-5", "5w", "1.5h", ""])
def test_durations_must_be_positive_whole_numbers_with_a_known_unit(text: str) -> None:
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(text)


def test_the_command_line_imports_neither_grpc_nor_asyncpg() -> None:
    """What keeps `tally --help` fast: the server's heavy imports wait for the command that needs them."""
    code = "import sys, server.cli; print(sorted({'grpc', 'asyncpg'} & set(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "[]"
