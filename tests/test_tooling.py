"""The repository's own checks, run as tests so that the one test command covers them."""

from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
IMAGE = ROOT / "protos" / "tally-v1-image.binpb"


def tool(name: str) -> str:
    return shutil.which(name, path=str(BIN)) or shutil.which(name) or name


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_protos_pass_buf_lint() -> None:
    result = run(tool("buf"), "lint")
    assert result.returncode == 0, result.stdout + result.stderr


def test_committed_generated_code_is_up_to_date(tmp_path: Path) -> None:
    image = tmp_path / "image.binpb"
    result = run(
        sys.executable, "scripts/generate.py", "--out", str(tmp_path / "generated"), "--image", str(image)
    )
    assert result.returncode == 0, result.stderr
    # The buf image, baseline of `buf breaking`, is reproducible and describes the protos as they are.
    assert image.read_bytes() == IMAGE.read_bytes(), (
        "protos/tally-v1-image.binpb is stale: run scripts/generate.py"
    )
    comparison = filecmp.dircmp(ROOT / "generated", tmp_path / "generated")
    stale: list[str] = []

    def collect(cmp: filecmp.dircmp[str], prefix: str) -> None:
        stale.extend(
            prefix + name for name in cmp.diff_files + cmp.left_only + cmp.right_only if name != "__pycache__"
        )
        for name, sub in cmp.subdirs.items():
            if name != "__pycache__":
                collect(sub, f"{prefix}{name}/")

    collect(comparison, "")
    assert not stale, f"generated/ is stale, run `python scripts/generate.py`: {stale}"


def test_protos_do_not_break_the_committed_image() -> None:
    result = run(tool("buf"), "breaking", "protos", "--against", str(IMAGE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_breaking_catches_a_renamed_field(tmp_path: Path) -> None:
    for part in ("protos", "third_party", "buf.yaml"):
        source = ROOT / part
        if source.is_dir():
            shutil.copytree(source, tmp_path / part)
        else:
            shutil.copy(source, tmp_path / part)
    resources = tmp_path / "protos/tally/v1/resources.proto"
    text = resources.read_text()
    assert "  string event_id = 2 [" in text
    resources.write_text(text.replace("  string event_id = 2 [", "  string event_key = 2 [", 1))
    result = subprocess.run(
        [tool("buf"), "breaking", "protos", "--against", str(IMAGE)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0 and "event_key" in result.stdout, result.stdout + result.stderr


def test_ruff_lint_and_format_are_clean() -> None:
    lint = run(tool("ruff"), "check", ".")
    assert lint.returncode == 0, lint.stdout
    fmt = run(tool("ruff"), "format", "--check", ".")
    assert fmt.returncode == 0, fmt.stdout


def test_mypy_strict_is_clean() -> None:
    result = run(sys.executable, "-m", "mypy")
    assert result.returncode == 0, result.stdout
