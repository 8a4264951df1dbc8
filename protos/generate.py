"""Regenerate the Python code for protos/hivemesh/v1/*.proto (one command: `python protos/generate.py`).

Output is written beside the sources, so protoc's absolute imports (`from hivemesh.v1 import agent_pb2`)
resolve as they are, with no import rewriting. tests/test_protos_fresh.py fails when the committed files
differ from what this produces.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent


def generate(out_dir: Path) -> None:
    """Run protoc with the pinned grpcio-tools and mypy-protobuf plugins into out_dir."""
    from grpc_tools import protoc  # pinned in the dev extra; imported lazily so the runtime needs no codegen

    sources = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "hivemesh" / "v1").glob("*.proto"))
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *sources,
    ]
    # protoc finds the mypy plugins on PATH; make it the one installed beside this interpreter.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    code = protoc.main(args)
    if code != 0:
        raise SystemExit(f"protoc failed with exit code {code}")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_ROOT)
