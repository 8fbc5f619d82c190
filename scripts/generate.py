"""Generate the Python code in generated/ and the buf image from the contracts in protos/.

Run `python scripts/generate.py` after changing a .proto file and commit the result;
the test suite regenerates into a temporary directory and fails if the committed
files differ. Uses grpcio-tools' bundled protoc and the mypy-protobuf plugins for
the .pyi type stubs, and buf, so nothing outside the dev dependencies is needed.

The generated `tally.v1` package is part of the client distribution (clients/python,
`tally-client`), which the server depends on: one copy of the stubs for both.

Besides the modules, it writes:
- generated/tally/v1/descriptor_set.binpb: the contracts with their comments
  (source info) and imports, from which the server answers reflection, so that
  `grpcurl describe` shows the proto comments;
- protos/tally-v1-image.binpb: the buf image of the contracts, the baseline of
  `buf breaking`. A new image is written only if the contracts pass `buf breaking`
  against the committed one; --allow-breaking overrides that (only before a
  release, or for a new major version).

Only tally's protos are generated: the vendored google/api protos in third_party/
come from the googleapis-common-protos package at run time.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
THIRD_PARTY = ROOT / "third_party"
IMAGE = PROTO_ROOT / "tally-v1-image.binpb"
GENERATED = ROOT / "generated"
DESCRIPTOR_SET = "tally/v1/descriptor_set.binpb"
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
    (out_dir / DESCRIPTOR_SET).parent.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"--proto_path={PROTO_ROOT}",
        f"--proto_path={THIRD_PARTY}",
        f"--proto_path={well_known}",
        f"--descriptor_set_out={out_dir / DESCRIPTOR_SET}",
        "--include_source_info",
        "--include_imports",
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


def build_image(image: Path, *, against: Path, allow_breaking: bool) -> None:
    """Write the buf image of the contracts, refusing breaking changes against `against`."""
    buf = _plugin("buf")
    if against.exists() and not allow_breaking:
        # The module directory as input: the image holds tally's files, with their imports.
        check = subprocess.run([buf, "breaking", "protos", "--against", str(against)], cwd=ROOT)
        if check.returncode != 0:
            raise SystemExit(f"buf breaking: the contracts break {against.relative_to(ROOT)} (see above)")
    image.parent.mkdir(parents=True, exist_ok=True)
    if subprocess.run([buf, "build", "protos", "-o", str(image)], cwd=ROOT).returncode != 0:
        raise SystemExit("buf build failed")


def main() -> None:
    """Build and check the buf image, then regenerate the Python stubs into --out."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=GENERATED, help="output directory")
    parser.add_argument("--image", type=Path, default=IMAGE, help="where to write the buf image")
    parser.add_argument(
        "--allow-breaking",
        action="store_true",
        help=f"write the image even if the contracts break {IMAGE.relative_to(ROOT)}",
    )
    args = parser.parse_args()
    build_image(args.image.resolve(), against=IMAGE, allow_breaking=args.allow_breaking)
    if args.out.exists():
        shutil.rmtree(args.out)
    generate(args.out)
    print(f"generated {sum(1 for _ in args.out.rglob('*.py*'))} files in {args.out} and {args.image}")


if __name__ == "__main__":
    main()
