"""Regenerate the gRPC/protobuf modules and mypy stubs of `api/v1` from `api/v1/nodemesh.proto`.

Run from anywhere as `python -m api.generate`; the output is committed and a unit test checks
that regenerating yields the committed files.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc  # type: ignore[import-untyped]

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO = "api/v1/nodemesh.proto"
OUTPUTS = ("nodemesh_pb2.py", "nodemesh_pb2.pyi", "nodemesh_pb2_grpc.py", "nodemesh_pb2_grpc.pyi")


def generate(out_root: Path) -> list[Path]:
    """Run protoc (with the mypy-protobuf plugins) into `out_root`; return the generated files."""
    plugin_dir = Path(sys.executable).parent
    args = [
        "grpc_tools.protoc",
        f"-I{REPO_ROOT}",
        f"--plugin=protoc-gen-mypy={plugin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={plugin_dir / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        PROTO,
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError(f"protoc failed rc={rc} proto={PROTO}")
    return [out_root / "api" / "v1" / name for name in OUTPUTS]


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        for path in generate(Path(tmp)):
            shutil.copyfile(path, REPO_ROOT / "api" / "v1" / path.name)
            print(f"generated file=api/v1/{path.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
