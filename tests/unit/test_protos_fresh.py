"""The committed generated code matches the .proto sources, and the wire contract does not drift."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

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
