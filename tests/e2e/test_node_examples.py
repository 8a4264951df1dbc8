"""Any language, proven with Node.js: examples/node installed with `npm ci` and run against a real mesh (TLS etcd,
control plane, real `hivemesh sidecar` processes). The Node pricing agent behind a sidecar is called from Python
(MeshClient) and from the Node caller through a caller-only sidecar (`--client`, no agent, no inbound port); a
Python SDK agent is called from Node; refusals (bad input caught by the sidecar's schema check or by the agent
itself, a capability without a grant, a rate limit) reach Node typed: ErrorInfo reason, BadRequest violations,
RetryInfo and pushback, which the caller honours; the caller's traceparent reaches the agent across both sidecars;
the sales-support demo sends its pricing question to the Node agent while it is live. Links, in Node at both ends:
agent.js serves Agent.Link (its sidecar sends it every unary call as a frame; raw frames show each answered as
its unary Invoke is, deadlines and cancels honoured), and `caller.js --link` calls over Mesh.Link with the same
answers, refusals and retries as its unary calls; a link call it gives up at its deadline is cancelled (no answer
comes back for it, the agent stops it) and the link carries the next call."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aetcd
import grpc
import pytest
from click.testing import CliRunner

from hivemesh.agents.demos import DemoContext, run_demo
from hivemesh.agents.sales import SALES_SUPPORT, ProductSpecialist, TechnicalSpecialist
from hivemesh.mesh.etcd import EtcdServer
from hivemesh.sdk import AgentServer, AgentServerConfig, MeshClient
from hivemesh.sdk.escalation import EscalationClient
from hivemesh.sdk.workflow import WorkflowEngine
from hivemesh.v1 import agent_pb2
from tests.support.agents_for_tests import EchoAgent
from tests.support.meshenv import TRUST_DOMAIN, MeshEnv, apply_policies_text, start_mesh_env, stop_mesh_env
from tests.support.spawn import REPO, start_client_sidecar, start_sidecar_ready, stop

NODE_DIR = REPO / "examples" / "node"
NODE_CALLER = f"spiffe://{TRUST_DOMAIN}/client/node-caller"
GRANTS = {
    "grants": [
        # Callers may quote and echo; nothing grants `restricted` to anyone (the refusal below).
        {"name": "callers", "subjects": [f"spiffe://{TRUST_DOMAIN}/client/*"],
         "capabilities": ["pricing.quote", "echo", "shout", "product-advice", "technical-advice"]},
    ]
}
ORDER = {"customer_tier": "gold", "items": [{"sku": "CRM-SEAT", "quantity": 60}, {"sku": "ONBOARDING", "quantity": 1}]}
# 60 seats: 60 x 360.00 = 21600.00, less 5% volume = 20520.00; onboarding 1500.00; subtotal 22020.00;
# gold 10% = 2202.00 off; total 19818.00.
TOTAL_CENTS = 1981800


@pytest.fixture(scope="module")
def node_modules() -> Path:
    """examples/node/node_modules from the committed package-lock.json (`npm ci`), reinstalled only when the
    lock file changed (its hash is stamped inside node_modules)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    assert node and npm, "node and npm are needed (./run installs Debian's nodejs and npm when they are missing)"
    stamp = NODE_DIR / "node_modules" / ".hivemesh-lock-sha256"
    want = hashlib.sha256((NODE_DIR / "package-lock.json").read_bytes()).hexdigest()
    if not stamp.exists() or stamp.read_text() != want:
        subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=NODE_DIR, check=True,
                       timeout=600)
        stamp.write_text(want)
    return NODE_DIR / "node_modules"


@pytest.fixture
async def mesh(etcd: aetcd.Client, etcd_server: EtcdServer, tmp_path: Path) -> AsyncIterator[MeshEnv]:
    env = await start_mesh_env(tmp_path, etcd_server.endpoint, GRANTS)
    try:
        yield env
    finally:
        await stop_mesh_env(env)


@contextlib.asynccontextmanager
async def node_agent(log: Path, *args: str) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """`node agent.js --port 0 [args]`; (process, its loopback address) once it listens."""
    with log.open("ab") as err:
        proc = await asyncio.create_subprocess_exec(
            "node", "agent.js", "--port", "0", *args, cwd=NODE_DIR, stdout=asyncio.subprocess.PIPE, stderr=err,
            start_new_session=True,
        )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        assert line.startswith("listening 127.0.0.1:"), f"agent.js said {line!r} (log: {log})"
        yield proc, line.split()[1]
    finally:
        await stop(proc)


async def node_call(mesh_address: str, capability: str, payload: Any, *args: str) -> dict[str, Any]:
    """`node caller.js` once; its one JSON line (exit 0: ok, 1: a refusal it read)."""
    proc = await asyncio.create_subprocess_exec(
        "node", "caller.js", "--mesh", mesh_address, "--capability", capability,
        "--input", payload if isinstance(payload, str) else json.dumps(payload), *args,
        cwd=NODE_DIR, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        await stop(proc)
    assert proc.returncode in (0, 1), f"caller.js exited {proc.returncode}: {err.decode()}"
    result: dict[str, Any] = json.loads(out)
    assert result["ok"] is (proc.returncode == 0), result
    return result


@dataclass
class Rig:
    mesh: MeshEnv
    caller_mesh: str
    """The caller-only sidecar's Mesh address (unix:PATH)."""
    caller_pid: int
    python: MeshClient


@pytest.fixture
def agent_args() -> tuple[str, ...]:
    """Options for the rig's `agent.js` (a test parametrizes it, e.g. with --delay-ms)."""
    return ()


@pytest.fixture
async def rig(mesh: MeshEnv, node_modules: Path, tmp_path: Path, agent_args: tuple[str, ...]) -> AsyncIterator[Rig]:
    procs: list[asyncio.subprocess.Process] = []
    try:
        async with node_agent(tmp_path / "agent.log", *agent_args) as (_, agent_address), AgentServer(
            EchoAgent("sdk"), await mesh.settings_for("echo"), AgentServerConfig(audit_dir=tmp_path / "echo-audit")
        ):
            pricing, ready = await start_sidecar_ready(mesh, agent_address, tmp_path / "pricing-home",
                                                       tmp_path / "pricing-sidecar.log", name="pricing")
            procs.append(pricing)
            caller, caller_ready = await start_client_sidecar(mesh, "node-caller", tmp_path / "caller-home",
                                                              tmp_path / "caller-sidecar.log")
            procs.append(caller)
            async with MeshClient.connect(name="py-caller", settings=await mesh.settings_for("py-caller", "client"),
                                          audit=False) as python:
                for capability in ("pricing.quote", "echo"):
                    assert await python.node.registry.wait_for_capability(capability, 1, timeout=30)
                assert set(ready) == {"inbound", "mesh", "metrics", "link"}
                assert set(caller_ready) == {"mesh", "metrics"}
                yield Rig(mesh, caller_ready["mesh"], caller.pid, python)
    finally:
        for proc in procs:
            await stop(proc)


def _listening_tcp_ports(pid: int) -> set[int]:
    inodes = {os.readlink(fd)[len("socket:["):-1] for fd in Path(f"/proc/{pid}/fd").iterdir()
              if fd.is_symlink() and os.readlink(fd).startswith("socket:[")}
    ports = set()
    for table in ("tcp", "tcp6"):
        for row in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            cols = row.split()
            if cols[3] == "0A" and cols[9] in inodes:
                ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


async def test_python_and_node_call_each_other_and_refusals_arrive(rig: Rig) -> None:
    """Read-only checks on one rig (two sidecar processes, a Node agent and an SDK agent cost seconds to
    start): each would fail on its own."""
    await _the_node_agent_is_called_from_python_and_from_node(rig)
    await _a_python_agent_is_called_from_node_through_a_caller_only_sidecar(rig)
    await _refusals_arrive_in_node_with_their_reason(rig)
    await _the_sales_demo_sends_pricing_to_the_node_agent(rig)


async def _the_node_agent_is_called_from_python_and_from_node(rig: Rig) -> None:
    # Python, in-process mesh layers, to the Node agent behind its sidecar.
    result = await rig.python.call_detailed("pricing.quote", ORDER, timeout=15)
    assert result.output["total_cents"] == TOTAL_CENTS
    assert [line["line_total_cents"] for line in result.output["lines"]] == [2052000, 150000]
    assert [h.kind for h in result.hops] == ["sidecar"]
    parts = [part async for part in rig.python.stream("pricing.quote", ORDER, timeout=15)]
    assert [next(iter(p)) for p in parts] == ["line", "line", "total"]
    assert parts[-1]["total"]["total_cents"] == TOTAL_CENTS

    # Node, through the caller-only sidecar's Mesh socket.
    assert rig.caller_mesh.startswith("unix:")
    out = await node_call(rig.caller_mesh, "pricing.quote", ORDER)
    assert out["output"]["total_cents"] == TOTAL_CENTS and out["attempts"] == 1
    # The traceparent the Node caller made crossed its sidecar, the mesh and the agent's sidecar.
    seen = out["metadata"]
    assert seen["traceparent"].split("-")[1] == out["trace_id"], seen
    assert seen["caller"] == NODE_CALLER  # the verified identity, set by the agent's sidecar
    # The agent serves Agent.Link: its sidecar sent every call so far (Python's too) as a frame on one link.
    assert (out["via"], seen["arrived"], seen["links"]) == ("call", "link", "1"), seen
    # The Node caller on one Mesh.Link to its sidecar: the same quote, and its traceparent as a frame header.
    linked = await node_call(rig.caller_mesh, "pricing.quote", ORDER, "--link")
    assert (linked["via"], linked["output"], linked["attempts"]) == ("link", out["output"], 1), linked
    assert linked["link"] == {"opened": 1, "answers": 1}, linked  # the answer came back as a frame
    assert linked["metadata"]["traceparent"].split("-")[1] == linked["trace_id"] != out["trace_id"], linked
    assert (linked["metadata"]["caller"], linked["metadata"]["arrived"]) == (NODE_CALLER, "link"), linked
    streamed = await node_call(rig.caller_mesh, "pricing.quote", {"customer_tier": "silver", "items": [
        {"sku": "CRM-SEAT", "quantity": 2}]}, "--stream")
    assert streamed["chunks"] == [
        {"line": {"sku": "CRM-SEAT", "name": "CRM seat, one user for one year", "quantity": 2,
                  "unit_price_cents": 36000, "volume_discount_percent": 0, "line_total_cents": 72000}},
        {"total": {"currency": "EUR", "customer_tier": "silver", "subtotal_cents": 72000,
                   "tier_discount_percent": 5, "discount_cents": 3600, "total_cents": 68400}},
    ]
    assert [h["kind"] for h in streamed["hops"]] == ["sidecar"]


async def _a_python_agent_is_called_from_node_through_a_caller_only_sidecar(rig: Rig) -> None:
    out = await node_call(rig.caller_mesh, "echo", {"text": "from node"})
    assert out["output"] == {"text": "from node", "caller": NODE_CALLER, "served_by": "sdk"}
    shouted = await node_call(rig.caller_mesh, "shout", {"text": "two words"}, "--stream")
    assert [c for c in shouted["chunks"] if c] == ["TWO", "WORDS"]
    # A caller-only sidecar registers nothing and listens on no TCP port: the mesh cannot call into it.
    assert _listening_tcp_ports(rig.caller_pid) == set()
    assert {i.identity for i in rig.python.instances("pricing.quote")} == {f"spiffe://{TRUST_DOMAIN}/agent/pricing"}
    assert not any(NODE_CALLER in i.identity for c in ("echo", "shout", "pricing.quote")
                   for i in rig.python.instances(c))


async def _refusals_arrive_in_node_with_their_reason(rig: Rig) -> None:
    # Each refusal twice: as a unary Mesh.Call's status and trailers, and decoded from a Mesh.Link answer frame.
    for mode in ((), ("--link",)):
        via = "link" if mode else "call"
        # Refused by the agent's sidecar: the input breaks the card's JSON Schema.
        bad_tier = await node_call(rig.caller_mesh, "pricing.quote", {"customer_tier": "diamond", "items": []}, *mode)
        err = bad_tier["error"]
        assert (err["code"], err["reason"], err["domain"]) == ("INVALID_ARGUMENT", "INVALID_INPUT", "hivemesh"), err
        assert err["violations"] and bad_tier["attempts"] == 1  # never retried: a refusal on the merits
        assert (bad_tier["via"], bad_tier.get("link")) == (via, {"opened": 1, "answers": 1} if mode else None)
        # Refused by the Node agent itself (the schema cannot know the catalogue), in its answer to a Link frame
        # from its sidecar: its BadRequest arrives intact.
        unknown = await node_call(rig.caller_mesh, "pricing.quote", {"customer_tier": "gold", "items": [
            {"sku": "CRM-SEAT", "quantity": 1}, {"sku": "YACHT", "quantity": 1}]}, *mode)
        err = unknown["error"]
        assert (err["code"], err["reason"]) == ("INVALID_ARGUMENT", "INVALID_INPUT"), err
        assert [v["field"] for v in err["violations"]] == ["input.items[1].sku"]
        assert 'unknown SKU "YACHT"' in err["violations"][0]["description"]
        # No grant gives `restricted` to callers: refused before anything is sent.
        denied = await node_call(rig.caller_mesh, "restricted", {"text": "x"}, *mode)
        err = denied["error"]
        assert (err["code"], err["reason"]) == ("PERMISSION_DENIED", "GRANT_DENIED"), err
        assert err["metadata"]["capability"] == "restricted"  # ErrorInfo's metadata arrives too
        not_json = await node_call(rig.caller_mesh, "pricing.quote", "{not json", *mode)
        assert (not_json["error"]["reason"], not_json["via"]) == ("INVALID_INPUT", via), not_json


async def _the_sales_demo_sends_pricing_to_the_node_agent(rig: Rig) -> None:
    """The pricing specialist of the sales example is the Node agent here (no Python one is served): a pricing
    question with a seat count becomes a catalogue order for it, in the pattern and in the demo's workflows."""
    question = {"text": "How much would 120 seats cost?", "seats": 120}
    result = await SALES_SUPPORT.run(rig.python, question)
    route = result.details["route"]
    assert route["capabilities"] == ["pricing.quote"] and route["served_by"] == "node"
    # 120 x 360.00 = 43200.00, less 5% volume = 41040.00; the standard tier has no discount.
    assert result.output == {"specialist": "pricing", "served_by": "node", "seats": 120, "currency": "EUR",
                             "discount_percent": 5, "annual_total": 41040.0,
                             "answer": "120 seats: EUR 41,040.00 a year after a 5% volume discount."}
    async with (AgentServer(ProductSpecialist(), await rig.mesh.settings_for("product-specialist"),
                            AgentServerConfig(audit=False)),
                AgentServer(TechnicalSpecialist(), await rig.mesh.settings_for("technical-specialist"),
                            AgentServerConfig(audit=False)),
                WorkflowEngine(rig.python) as engine):
        for capability in ("product-advice", "technical-advice"):
            assert await rig.python.node.registry.wait_for_capability(capability, 1, timeout=10)
        said: list[str] = []
        row = await run_demo("sales", DemoContext(engine, EscalationClient(rig.mesh.operator.channel), said.append,
                                                  once=True))
    assert row["state"] == "COMPLETED", said
    assert row["highlight"] == "answered by product, pricing (Node.js), technical", said
    assert any("→ pricing.quote (by rule): 120 seats: EUR 41,040.00 a year" in line for line in said), said


async def test_the_node_caller_honours_the_pushback_of_a_rate_limit(rig: Rig) -> None:
    await apply_policies_text(rig.mesh.etcd, """
kind: ratelimits
name: quotes
spec: {agents: [pricing], capabilities: [pricing.quote], per_identity_rps: 0.2, burst_s: 5}
""")
    # One call in 5 s. The policy reaches the nodes through their etcd watch: call until the limit bites.
    refused: dict[str, Any] | None = None
    for _ in range(20):
        out = await node_call(rig.caller_mesh, "pricing.quote", ORDER, "--retries", "0")
        if not out["ok"]:
            refused = out
            break
    assert refused is not None, "the rate limit never refused a call"
    # The same refusal read from a Mesh.Link answer frame (the limit's one call in 5 s is spent): the pushback
    # trailer and RetryInfo arrive as they do in a unary call's trailers.
    linked = await node_call(rig.caller_mesh, "pricing.quote", ORDER, "--retries", "0", "--link")
    for out in (refused, linked):
        err = out["error"]
        assert (err["code"], err["reason"]) == ("RESOURCE_EXHAUSTED", "RATE_LIMITED"), err
        assert 0 < err["pushback_ms"] <= 5000 and 0 < err["retry_delay_ms"] <= 5000, err
    # With retries, the caller waits as long as the mesh asked, then gets its quote (same idempotency key); on a
    # link, each attempt is a new frame, after the pushback its previous answer frame carried. (The attempt loop
    # is the unary mode's: only the transport differs, and the unary refusal is read above.)
    out = await node_call(rig.caller_mesh, "pricing.quote", ORDER, "--retries", "3", "--timeout-ms", "20000",
                          "--link")
    assert out["ok"] and out["output"]["total_cents"] == TOTAL_CENTS and out["via"] == "link", out
    assert out["attempts"] >= 2 and all(0 < w <= 5000 for w in out["waits_ms"]), out
    # A refusal leaves the link open: every attempt's answer came back as a frame on the one link.
    assert out["link"] == {"opened": 1, "answers": out["attempts"]}, out


# Two calls on one Mesh.Link (lib/linkclient.js, as caller.js --link makes them) in one process, so the link is
# still open after the first is given up: argv address, input JSON, give-up ms. Call 1 carries a deadline 30 s
# away (its timeout_s, which every hop keeps), but its local timer, the one that gives it up with a cancel frame,
# is made to fire at give-up ms: a caller that gives up long before any hop's own deadline, so only the cancel
# frame can stop the call out there. Prints the two outcomes, the ids of every answer frame that came back on the
# link (its own listener: linkclient drops answers to calls given up), and the link's stats.
TWO_LINK_CALLS = """
const { grpc, loadHivemesh } = require('./lib/contracts');
const { MeshLinks } = require('./lib/linkclient');
const [address, input, giveUpMs] = process.argv.slice(1);
const hivemesh = loadHivemesh();
const links = new MeshLinks(new hivemesh.Mesh(address, grpc.credentials.createInsecure()), hivemesh.Mesh.service.Call);
const link = links.open();
links.links.push(link);
const answered = [];
link.stream.on('data', (m) => {
  for (const f of m.batch.length ? m.batch : [m]) if (f.body === 'answer') answered.push(Number(f.id));
});
const request = { capability: 'pricing.quote', input: Buffer.from(input), content_type: 'application/json' };
const outcome = (pending) => pending.then(
  (r) => ({ ok: true, metadata: r.metadata }), (e) => ({ ok: false, code: grpc.status[e.code] }));
(async () => {
  const setTimer = global.setTimeout; // the call's deadline timer is the first one it sets
  global.setTimeout = (fn, _ms, ...rest) => {
    global.setTimeout = setTimer;
    return setTimer(fn, Number(giveUpMs), ...rest);
  };
  const first = await outcome(links.call(request, {}, Date.now() + 30000));
  const second = await outcome(links.call(request, {}, Date.now() + 30000));
  process.stdout.write(JSON.stringify({ first, second, answered, broken: link.broken, stats: links.stats() }));
  process.exit(0);
})();
"""
SLOW_MS = 2500
GIVE_UP_MS = 1000  # ample for a first call to reach the agent through both sidecars, on a busy CI machine too


@pytest.mark.parametrize("agent_args", [("--delay-ms", str(SLOW_MS))])
async def test_a_link_call_given_up_locally_is_cancelled_and_its_link_goes_on(rig: Rig) -> None:
    """The Node agent takes SLOW_MS over every quote. A `caller.js --link` call whose deadline passes first gets
    the mesh's DEADLINE_EXCEEDED as its link's answer, naming the agent (its sidecar keeps a margin of the
    caller's deadline, so the mesh's status arrives before the caller's own timer), or else is given up locally;
    either is read like a unary call's (never retried). Meanwhile two calls on one
    link in one process (TWO_LINK_CALLS): the first is given up while its deadline is still far at every hop, and
    its cancel frame alone stops it: its sidecar sends no answer for it and the agent stops making its quote (else
    the quote is made and answered after SLOW_MS); the link carries the next call, which the agent answers."""
    async def two_link_calls() -> dict[str, Any]:
        proc = await asyncio.create_subprocess_exec(
            "node", "-e", TWO_LINK_CALLS, rig.caller_mesh, json.dumps(ORDER), str(GIVE_UP_MS),
            cwd=NODE_DIR, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        try:
            said, err = await asyncio.wait_for(proc.communicate(), 60)
        finally:
            await stop(proc)
        assert proc.returncode == 0, err.decode()
        result: dict[str, Any] = json.loads(said)
        return result

    # Side by side: both give up at GIVE_UP_MS, SLOW_MS before the second call on the link is answered.
    out, done = await asyncio.gather(
        node_call(rig.caller_mesh, "pricing.quote", ORDER, "--link", "--timeout-ms", str(GIVE_UP_MS)),
        two_link_calls())
    assert (out["error"]["code"], out["attempts"], out["via"]) == ("DEADLINE_EXCEEDED", 1, "link"), out
    # Its sidecar's margin (5% of the deadline, at least 20 ms) lets the mesh's status win the race on a quiet
    # machine; on a loaded one the caller's own timer may still end the call first, as before the margin.
    if out["link"]["answers"]:
        assert out["link"] == {"opened": 1, "answers": 1}, out
        assert out["error"]["reason"] == "DEADLINE_EXCEEDED" and "did not answer 'pricing.quote'" in out["error"][
            "message"], out
    else:
        assert out["link"] == {"opened": 1, "answers": 0} and out["error"]["reason"] == "", out
    assert done["first"] == {"ok": False, "code": "DEADLINE_EXCEEDED"}, done
    assert done["second"]["ok"] and not done["broken"], done
    assert done["answered"] == [2], done  # none for call 1: dropped by its sidecar, never made by the agent
    assert done["stats"] == {"opened": 1, "answers": 1}, done
    # The agent stopped both given-up calls before making their quotes: caller.js's (its deadline, which every
    # hop has, stops it at the latest) and call 1 (its cancel frame only).
    assert done["second"]["metadata"]["stopped"] == "2", done


def _quote_request(order: Any) -> bytes:
    return agent_pb2.InvokeRequest(capability="pricing.quote", input=json.dumps(order).encode()).SerializeToString()


async def test_agent_js_answers_link_frames_as_its_unary_invoke(node_modules: Path, tmp_path: Path) -> None:
    """Agent.Link on agent.js itself, raw frames on loopback (no mesh: what its sidecar sends): each call answered
    in its own frame with the bytes its unary Invoke gives (the same status details), its deadline honoured and a
    cancelled call stopped without an answer. --delay-ms makes every quote take DELAY_S, so calls are open while
    the deadline passes and the cancel arrives."""
    delay_s = 0.4
    yacht = _quote_request({"customer_tier": "gold", "items": [{"sku": "YACHT", "quantity": 1}]})
    good = _quote_request({"customer_tier": "silver", "items": [{"sku": "CRM-SEAT", "quantity": 2}]})
    calls = {
        1: agent_pb2.LinkCall(request=yacht, metadata=[agent_pb2.LinkHeader(key="traceparent", value="00-t-s-01")]),
        2: agent_pb2.LinkCall(request=good, timeout_s=delay_s / 4),  # expires while the quote is being made
        3: agent_pb2.LinkCall(request=b"\xff\xff\xff"),  # not an InvokeRequest
        4: agent_pb2.LinkCall(request=good),  # cancelled at once
        5: agent_pb2.LinkCall(request=good),  # sent after 4, made as long: answered after 4 would have been
    }

    async def frames() -> AsyncIterator[agent_pb2.LinkFrame]:
        for call_id, call in calls.items():
            yield agent_pb2.LinkFrame(id=call_id, call=call)
        yield agent_pb2.LinkFrame(id=4, cancel=True)

    async with node_agent(tmp_path / "agent.log", "--delay-ms", str(int(delay_s * 1000))) as (_, address), \
            grpc.aio.insecure_channel(address) as channel:
        link = channel.stream_stream("/hivemesh.v1.Agent/Link",
                                     request_serializer=agent_pb2.LinkFrame.SerializeToString,
                                     response_deserializer=agent_pb2.LinkFrame.FromString)
        answers: dict[int, agent_pb2.LinkAnswer] = {}
        async with asyncio.timeout(20):
            async for message in link(frames()):
                assert not message.batch, "agent.js announced no batches and must send none"
                assert message.id not in answers, f"call {message.id} answered twice"
                answers[message.id] = message.answer
        invoke = channel.unary_unary("/hivemesh.v1.Agent/Invoke", request_serializer=None,
                                     response_deserializer=agent_pb2.InvokeResponse.FromString)
        both = asyncio.gather(invoke(good, timeout=10), invoke(yacht, timeout=10), return_exceptions=True)
        # Meanwhile: a server without Mesh.Link (agent.js serves no Mesh at all) refuses the link UNIMPLEMENTED,
        # so `caller.js --link` sends the call as a unary Mesh.Call instead (refused the same way, by grpc-js).
        (unary, refused), fallback = await asyncio.gather(both, node_call(address, "pricing.quote", {}, "--link"))
    # The stream ended once every call still open was answered: never the cancelled one.
    assert sorted(answers) == [1, 2, 3, 5], answers
    assert isinstance(unary, agent_pb2.InvokeResponse) and isinstance(refused, grpc.aio.AioRpcError), refused
    details = dict(refused.trailing_metadata() or ())["grpc-status-details-bin"]
    assert (answers[1].code, answers[1].message) == (refused.code().value[0], refused.details())
    assert [(h.key, h.value) for h in answers[1].binary_trailers] == [("grpc-status-details-bin", details)]
    assert (answers[2].code, answers[2].message) == (grpc.StatusCode.DEADLINE_EXCEEDED.value[0], "Deadline Exceeded")
    assert answers[3].code == grpc.StatusCode.INVALID_ARGUMENT.value[0], answers[3]
    assert [h.key for h in answers[3].binary_trailers] == ["grpc-status-details-bin"]
    linked = agent_pb2.InvokeResponse.FromString(answers[5].response)
    assert answers[5].code == 0 and linked.output == unary.output and json.loads(linked.output)["total_cents"] == 68400
    # Calls 2 (expired) and 4 (cancelled) were stopped before their quote was made, and counted so.
    assert (dict(linked.metadata), dict(unary.metadata)) == (
        {"arrived": "link", "links": "1", "stopped": "2"}, {"arrived": "unary", "stopped": "2"})
    assert (fallback["via"], fallback["link"], fallback["error"]["code"]) == (
        "call", {"opened": 1, "answers": 0}, "UNIMPLEMENTED"), fallback
    assert "/hivemesh.v1.Mesh/Call" in fallback["error"]["message"], fallback


def test_caller_only_sidecar_needs_an_agent_or_a_client() -> None:
    """The CLI refuses a sidecar with neither --agent nor --client (or both), or a caller-only one given inbound
    options, saying what to give. In-process (click's CliRunner): the refusal comes before anything starts."""
    from hivemesh.controlplane.cli.app import cli

    for args, said in (
        ([], "give --agent ADDRESS (front an agent) or --client NAME (caller only), exactly one"),
        (["--agent", "127.0.0.1:1", "--client", "x"], "exactly one"),
        (["--client", "x", "--name", "y", "--limit", "a=1"], "--name, --limit: only with --agent"),
    ):
        done = CliRunner().invoke(cli, ["sidecar", *args], prog_name="hivemesh")
        assert done.exit_code == 2, done.output
        assert said in " ".join(done.stderr.split()), done.stderr
