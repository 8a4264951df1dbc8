"""The committed generated code matches the .proto sources, and the wire contract does not drift."""

from __future__ import annotations

import importlib.util
import re
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ROOT / "protos" / "hivemesh" / "v1"


def _load_generator():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("hivemesh_generate", ROOT / "protos" / "generate.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["hivemesh_generate"] = module
    spec.loader.exec_module(module)
    return module


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    _load_generator().generate(tmp_path)
    fresh = {p.relative_to(tmp_path / "hivemesh" / "v1"): p.read_bytes()
             for p in (tmp_path / "hivemesh" / "v1").iterdir() if p.is_file()}
    assert fresh, "protoc produced nothing"
    stale = [str(name) for name, data in fresh.items() if (GENERATED / name).read_bytes() != data]
    assert not stale, f"regenerate with `python protos/generate.py`: stale {stale}"


def test_wire_contract() -> None:
    from hivemesh.v1 import agent_pb2, control_pb2, mesh_pb2

    services = {
        s.full_name: sorted(m.name for m in s.methods)
        for f in (agent_pb2, mesh_pb2, control_pb2)
        for s in f.DESCRIPTOR.services_by_name.values()
    }
    assert services["hivemesh.v1.Agent"] == ["Describe", "Invoke", "InvokeStream", "Link"]
    assert services["hivemesh.v1.Mesh"] == ["Call", "CallBatch", "CallStream", "Enqueue", "GetQueued", "Link",
                                            "ListCapabilities", "ListQueued", "Resolve"]
    assert "SignCertificate" in services["hivemesh.v1.Join"]
    assert {"IssueToken", "CreateJoinToken", "ListAgents", "GetJwks"} <= set(services["hivemesh.v1.ControlPlane"])
    req = agent_pb2.InvokeRequest.DESCRIPTOR.fields_by_name
    assert (req["capability"].number, req["input"].number, req["context"].number) == (1, 2, 4)
    # Forwarders append hops as raw bytes to field 15: it must stay 15.
    assert agent_pb2.InvokeResponse.DESCRIPTOR.fields_by_name["hops"].number == 15
    assert agent_pb2.InvokeChunk.DESCRIPTOR.fields_by_name["hops"].number == 15
    # A2A task-state names and meanings.
    assert agent_pb2.TaskState.Name(6) == "TASK_STATE_INPUT_REQUIRED"


def _lowest_admitted(requirement: str) -> Version:
    """The oldest version a pyproject requirement admits (its `>=` or `==` bound)."""
    bounds = [Version(s.version) for s in Requirement(requirement).specifier if s.operator in (">=", "==")]
    assert bounds, f"{requirement}: no lower bound, so any old runtime may be installed"
    return max(bounds)


def test_the_oldest_declared_runtimes_load_the_committed_generated_code() -> None:
    """protoc's code refuses a protobuf runtime older than itself (VersionError at import), and grpc's a grpcio
    older than the tools that made it: the lowest versions pyproject admits must not be older. (It admitted
    protobuf 6.31 while the code needed 7.35.1: beside a package that caps protobuf below 7, import failed.)"""
    declared = {Requirement(r).name: r for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "dependencies"]}
    gencode = {Version(m.group(1)) for p in GENERATED.glob("*_pb2.py")
               if (m := re.search(r"^# Protobuf Python Version: (\S+)$", p.read_text(), re.M))}
    grpc_gencode = {Version(m.group(1)) for p in GENERATED.glob("*_pb2_grpc.py")
                    if (m := re.search(r"^GRPC_GENERATED_VERSION = '([^']+)'$", p.read_text(), re.M))}
    assert len(gencode) == 1 and len(grpc_gencode) == 1, (gencode, grpc_gencode)
    assert _lowest_admitted(declared["protobuf"]) >= max(gencode), (declared["protobuf"], gencode)
    assert _lowest_admitted(declared["grpcio"]) >= max(grpc_gencode), (declared["grpcio"], grpc_gencode)
