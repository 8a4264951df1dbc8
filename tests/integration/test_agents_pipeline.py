"""The document pipeline over the real mesh: three SDK agents in-process, the plain-gRPC validator behind a
real Sidecar, a MeshClient caller; mutual TLS, capability tokens and the etcd registry all real."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hivemesh.agents import ExtractorAgent, OcrAgent, StorageAgent, list_samples, process_document
from hivemesh.agents._samples import sample_image, sample_spec
from hivemesh.agents.validate_plain import CHECKS, start_server
from hivemesh.mesh.sidecar import Sidecar, SidecarConfig
from hivemesh.sdk import AgentServer, InvalidInputError, MeshClient
from tests.support.meshenv import MeshEnv


@dataclass
class Pipeline:
    mesh: MeshClient
    storage: StorageAgent
    sidecar: Sidecar


@pytest.fixture
async def pipeline(mesh_env: MeshEnv, tmp_path: Path) -> AsyncIterator[Pipeline]:
    server, port = await start_server("127.0.0.1", 0)
    storage = StorageAgent(tmp_path / "documents.db")
    try:
        async with contextlib.AsyncExitStack() as stack:
            sidecar = Sidecar(SidecarConfig(agent=f"127.0.0.1:{port}"), await mesh_env.settings_for("validator"))
            await stack.enter_async_context(sidecar)
            for agent in (OcrAgent(), ExtractorAgent(), storage):
                await stack.enter_async_context(AgentServer(agent, await mesh_env.settings_for(agent.name)))
            settings = await mesh_env.settings_for("pipeline-test", "client")
            mesh = await stack.enter_async_context(MeshClient.connect(name="pipeline-test", settings=settings))
            for capability in ("ocr", "extract", "validate", "store"):
                assert await mesh.node.registry.wait_for_capability(capability, 1, timeout=10), capability
            yield Pipeline(mesh, storage, sidecar)
    finally:
        await server.stop(None)


async def test_every_sample_goes_through_the_mesh(pipeline: Pipeline) -> None:
    for name in list_samples():
        run = await process_document(pipeline.mesh, name)
        valid = sample_spec(name).valid
        assert run["valid"] is valid, (name, run["errors"])
        assert run["status"] == ("stored" if valid else "rejected")
        assert [s["step"] for s in run["steps"]] == ["ocr", "extract", "validate", "store"]
        by_step = {s["step"]: s for s in run["steps"]}
        assert by_step["validate"]["packaging"] == "sidecar" and by_step["validate"]["agent"] == "validator"
        assert [h["kind"] for h in by_step["validate"]["hops"]] == ["sidecar"]
        assert by_step["validate"]["hops"][0]["identity"] == "spiffe://hivemesh.local/agent/validator"
        for step, agent in (("ocr", "ocr"), ("extract", "extractor"), ("store", "storage")):
            assert by_step[step]["agent"] == agent and by_step[step]["packaging"] == "in-process"
            assert [h["kind"] for h in by_step[step]["hops"]] == ["agent"]
        stored = await pipeline.mesh.call("get", {"id": run["id"]}, timeout=10)
        assert stored["document"] == run["document"]
        assert stored["status"] == run["status"]
        # Streamed through the sidecar: one chunk per check, then the verdict carried on the final chunk.
        items = [c async for c in pipeline.mesh.stream("validate", run["document"], timeout=10)]
        checks, verdict = items[:-1], items[-1]
        assert [c["check"] for c in checks] == list(CHECKS)
        assert verdict["valid"] == run["valid"]
        assert {e["field"] for c in checks for e in c["errors"]} == {e["field"] for e in run["errors"]}


async def test_same_document_twice_is_stored_once(pipeline: Pipeline) -> None:
    first = await process_document(pipeline.mesh, "invoice-001")
    # The same scan sent as image bytes: same content, so the derived idempotency key matches.
    again = await process_document(pipeline.mesh, sample_image("invoice-001"))
    assert first["status"] == "stored"
    assert (again["status"], again["id"]) == ("duplicate", first["id"])
    assert again["source"].startswith("image:")


async def test_the_mesh_refuses_bad_input_before_the_agents(pipeline: Pipeline) -> None:
    with pytest.raises(InvalidInputError) as bad_sample:
        await pipeline.mesh.call("ocr", {"sample": "../../etc/passwd"}, timeout=10)
    assert "input.sample" in bad_sample.value.field_violations
    with pytest.raises(InvalidInputError) as not_json:
        await pipeline.mesh.call("validate", b"{not json", timeout=10)
    assert "not valid JSON" in not_json.value.message
    with pytest.raises(ValueError, match="unknown sample"):
        await process_document(pipeline.mesh, "no-such-sample")
