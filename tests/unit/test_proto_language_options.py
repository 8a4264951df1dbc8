"""Generated code for other languages lands in sane packages: every hivemesh/v1 file declares the same Go
import path (this folder of the repository, which exists), Java package and C# namespace, and a Java outer class
that cannot clash with a message or service of the same name (Agent, Mesh...)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parents[2]
FILES = sorted(p.stem for p in (ROOT / "protos" / "hivemesh" / "v1").glob("*.proto"))
GO_MODULE = "github.com/hivemesh/hivemesh"


def _options(stem: str) -> tuple[descriptor_pb2.FileOptions, set[str]]:
    module = importlib.import_module(f"hivemesh.v1.{stem}_pb2")
    proto = descriptor_pb2.FileDescriptorProto()
    module.DESCRIPTOR.CopyToProto(proto)
    names = {m.name for m in proto.message_type} | {s.name for s in proto.service} | {e.name for e in proto.enum_type}
    return proto.options, names


@pytest.mark.parametrize("stem", FILES)
def test_each_file_names_where_its_code_lands(stem: str) -> None:
    options, names = _options(stem)
    import_path, _, go_name = options.go_package.partition(";")
    assert go_name == "hivemeshv1"
    assert import_path.startswith(GO_MODULE + "/")
    assert (ROOT / import_path.removeprefix(GO_MODULE + "/") / f"{stem}.proto").is_file(), import_path
    assert (options.java_package, options.java_multiple_files) == ("dev.hivemesh.v1", True)
    assert options.java_outer_classname.endswith("Proto") and options.java_outer_classname not in names
    assert options.csharp_namespace == "Hivemesh.V1"


def test_the_files_agree() -> None:
    assert len(FILES) >= 7
    seen = {(o.go_package, o.java_package, o.csharp_namespace) for o, _ in map(_options, FILES)}
    assert len(seen) == 1
