"""Generate the Python code in generated/ from the contracts in protos/.

Run `python scripts/generate.py` after changing a .proto file and commit the result;
the test suite regenerates into a temporary directory and fails if the committed
code differs. Uses grpcio-tools' bundled protoc and the mypy-protobuf plugins for
the .pyi type stubs, so nothing outside the dev dependencies is needed.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import sysconfig
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PACKAGE_MARKER = '"""Code generated from protos/ by scripts/generate.py. Do not edit."""\n'


def _plugin(name: str) -> str:
    """Path of a protoc plugin installed beside this interpreter."""
    for directory in (Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))):
        candidate = directory / name
        if candidate.exists():
            return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise SystemExit(f"{name} not found: install the dev dependencies (pip install -e '.[dev]')")
    return found


def generate(out_dir: Path) -> None:
    """Write the generated package tree (tally/v1/...) under out_dir."""
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    well_known = str(Path(protoc.__file__).parent / "_proto")
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"--proto_path={PROTO_ROOT}",
        f"--proto_path={well_known}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    # protoc writes modules only; the packages and the PEP 561 marker are ours.
    for package in {p.parent for p in out_dir.rglob("*_pb2.py")} | {out_dir / "tally"}:
        (package / "__init__.py").write_text(PACKAGE_MARKER)
    (out_dir / "tally" / "py.typed").write_text("")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "generated", help="output directory")
    args = parser.parse_args()
    if args.out.exists():
        shutil.rmtree(args.out)
    generate(args.out)
    print(f"generated {sum(1 for _ in args.out.rglob('*.py*'))} files in {args.out}")


if __name__ == "__main__":
    main()
