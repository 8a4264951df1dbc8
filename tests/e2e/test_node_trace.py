"""Issue 12, "a Node.js caller's trace continued": the Node caller (examples/node/caller.js) sends its own W3C
traceparent through a caller-only `hivemesh sidecar --client` to the Node pricing agent behind its `hivemesh
sidecar`; both sidecars trace from the standard OTEL_* environment to a real OTLP/gRPC receiver. The spans they
export are in the Node caller's trace, and the caller-only sidecar's Mesh.Call server span is the child of the
Node caller's span: the mesh continues a trace started outside Python."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aetcd
import pytest

from hivemesh.mesh.etcd import EtcdServer
from hivemesh.sdk import MeshClient
from tests.e2e.test_node_examples import GRANTS, ORDER, TOTAL_CENTS, node_agent, node_call
from tests.e2e.test_node_examples import node_modules as node_modules  # the `npm ci` fixture
from tests.support.meshenv import MeshEnv, start_mesh_env, stop_mesh_env
from tests.support.otlp_receiver import Receiver, otlp_receiver
from tests.support.spawn import start_client_sidecar, start_sidecar_ready, stop

pytestmark = pytest.mark.timeout(180)

MESH_CALL = "hivemesh.v1.Mesh/Call"
AGENT_INVOKE = "hivemesh.v1.Agent/Invoke"


def _otel_env(port: int, service: str) -> dict[str, str]:
    """The standard OTEL_* environment of one traced sidecar (a short batch delay: spans arrive while it runs)."""
    return {
        "OTEL_SDK_DISABLED": "false",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_SERVICE_NAME": service,
        "OTEL_TRACES_SAMPLER": "parentbased_always_on",
        "OTEL_BSP_SCHEDULE_DELAY": "200",
    }


def _by_service(rcv: Receiver) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for resource, span in rcv.spans():
        [service] = [a.value.string_value for a in resource.attributes if a.key == "service.name"]
        out.setdefault(service, []).append(span)
    return out


async def _until_exported(rcv: Receiver, want: dict[str, str], timeout: float) -> dict[str, list[Any]]:
    """The spans by service once every service in want has exported a span of its name (bounded wait)."""
    async def poll() -> dict[str, list[Any]]:
        while True:
            got = _by_service(rcv)
            if all(any(s.name == name for s in got.get(service, ())) for service, name in want.items()):
                return got
            rcv.got.clear()
            await rcv.got.wait()

    try:
        return await asyncio.wait_for(poll(), timeout)
    except TimeoutError:
        raise AssertionError(f"not exported within {timeout:.0f} s: {want}; got "
                             f"{ {k: [s.name for s in v] for k, v in _by_service(rcv).items()} }") from None


@pytest.fixture
async def mesh(etcd: aetcd.Client, etcd_server: EtcdServer, tmp_path: Path) -> AsyncIterator[MeshEnv]:
    env = await start_mesh_env(tmp_path, etcd_server.endpoint, GRANTS)
    try:
        yield env
    finally:
        await stop_mesh_env(env)


async def test_the_sidecars_continue_the_node_callers_trace(
    mesh: MeshEnv, node_modules: Path, tmp_path: Path
) -> None:
    procs: list[asyncio.subprocess.Process] = []
    async with otlp_receiver() as (rcv, port), node_agent(tmp_path / "agent.log") as (_, agent_address):
        try:
            pricing, _ = await start_sidecar_ready(mesh, agent_address, tmp_path / "pricing-home",
                                                   tmp_path / "pricing-sidecar.log", name="pricing",
                                                   **_otel_env(port, "pricing-sidecar"))
            procs.append(pricing)
            caller, ready = await start_client_sidecar(mesh, "node-caller", tmp_path / "caller-home",
                                                       tmp_path / "caller-sidecar.log",
                                                       **_otel_env(port, "caller-sidecar"))
            procs.append(caller)
            async with MeshClient.connect(name="py-watcher", settings=await mesh.settings_for("py-watcher", "client"),
                                          audit=False) as watcher:
                assert await watcher.node.registry.wait_for_capability("pricing.quote", 1, timeout=30)

            out = await node_call(ready["mesh"], "pricing.quote", ORDER)
            assert out["ok"] and out["output"]["total_cents"] == TOTAL_CENTS, out
            version, trace_id, span_id, flags = out["traceparent"].split("-")  # what caller.js sent, last attempt
            assert (version, flags, trace_id) == ("00", "01", out["trace_id"]), out

            spans = await _until_exported(rcv, {"caller-sidecar": MESH_CALL, "pricing-sidecar": AGENT_INVOKE}, 30)
        finally:
            for proc in procs:
                await stop(proc)

    # Every span either sidecar exported is in the Node caller's trace (no other call crossed them).
    for service in ("caller-sidecar", "pricing-sidecar"):
        assert {s.trace_id.hex() for s in spans[service]} == {trace_id}, (service, [s.name for s in spans[service]])
    # The caller-only sidecar's server span (one per attempt caller.js made) is the child of the span it sent.
    parents = [s.parent_span_id.hex() for s in spans["caller-sidecar"] if s.name == MESH_CALL]
    assert span_id in parents and len(parents) == out["attempts"], (span_id, parents)
    # The agent's sidecar continues it: its server span's parent is a span the caller-only sidecar exported.
    caller_span_ids = {s.span_id for s in spans["caller-sidecar"]}
    [invoke] = [s for s in spans["pricing-sidecar"] if s.name == AGENT_INVOKE]
    assert invoke.parent_span_id in caller_span_ids
