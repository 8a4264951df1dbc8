"""Small jobs run inside a network-namespace host (`python -m tests.support.netns_main JOB ...`).

- `plain-agent HOST:PORT`: serve the plain-gRPC `PlainAgent` (capabilities prefixed `p`: `pecho`, ...) on
  loopback, as an agent in any language would behind a sidecar; prints `ready HOST:PORT`, serves until SIGTERM.
- `join-tokens CONTROLPLANE CERTS_DIR NAME:KIND ...`: mint one-time join tokens as the operator, the call
  `hivemesh join-token NAME --kind KIND` makes, all from one process (one interpreter start instead of one per
  token on a busy machine); prints them as one JSON list.
- `etcd-bootstrap ENDPOINTS CA CERT KEY`: wait until every member answers with a leader (quorum), then create
  etcd's users and roles and turn auth on, as `EtcdCluster.start()` does for members on loopback.
- `cp-issuer`: join as client `issuer` (HIVEMESH_JOIN_TOKEN) through the join addresses in HIVEMESH_JOIN, print
  `ready`; on `go` (stdin) issue one token and renew once, print `going`, then issue a token every 0.1 s and
  renew the certificate after every fourth token through a `ControlPlaneClient` given every replica in
  HIVEMESH_CONTROLPLANE; on `report-after T N` wait (at most 20 s) until N tokens and one certificate started
  after T (time.monotonic) were issued, stop, and print every operation as one JSON list (kind, start, end, ok,
  replica, error).
- `wf-owner`: join as client `orch` (HIVEMESH_JOIN_TOKEN) and own one durable run (5 s owner lease) that asks a
  person; print `{"event": "waiting", "escalation": ID}` once it is INPUT_REQUIRED, `{"event": "owner_lost"}` the
  first time it loses its owner lease, then, with nobody running `workflows resume`, `{"event": "done", "state",
  "output", "runs", "owner_lost", "at"}` once it ends (at most 120 s): the test cuts this host meanwhile and
  approves from host 1 (issue 11).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import sys
import time
from typing import Any

import grpc
from aetcd import rpc

from hivemesh.mesh.etcd import EtcdTls, parse_endpoints
from hivemesh.mesh.etcd_roles import bootstrap_auth
from tests.support.plain_agent import PlainAgent


async def _plain_agent(address: str) -> None:
    from hivemesh.v1 import agent_pb2_grpc

    agent = PlainAgent("plain", prefix="p")
    server = grpc.aio.server()
    agent_pb2_grpc.add_AgentServicer_to_server(agent, server)
    server.add_insecure_port(address)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"ready {address}", flush=True)
    await stop.wait()
    await server.stop(0.5)


def _has_leader(endpoint: str, tls: EtcdTls) -> bool:
    with grpc.secure_channel(endpoint, tls.credentials()) as ch:
        try:
            return bool(rpc.MaintenanceStub(ch).Status(rpc.StatusRequest(), timeout=1.0).leader)
        except grpc.RpcError:
            return False


def _etcd_bootstrap(endpoints: str, ca: str, cert: str, key: str, timeout: float = 60.0) -> None:
    with open(ca, "rb") as c, open(cert, "rb") as k, open(key, "rb") as s:
        tls = EtcdTls(c.read(), k.read(), s.read())
    deadline = time.monotonic() + timeout
    for host, port in parse_endpoints(endpoints):
        while not _has_leader(f"{host}:{port}", tls):
            if time.monotonic() > deadline:
                sys.exit(f"etcd member {host}:{port} has no leader after {timeout:.0f} s")
            time.sleep(0.1)
    first = parse_endpoints(endpoints)[0]
    bootstrap_auth(f"{first[0]}:{first[1]}", tls)
    print("ready", flush=True)


async def _join_tokens(controlplane: str, certs_dir: str, wanted: list[str]) -> None:
    from hivemesh.mesh.controlplane_client import ControlPlaneClient

    async with ControlPlaneClient.from_certs_dir(controlplane, certs_dir) as cp:
        tokens = []
        for item in wanted:
            name, _, kind = item.partition(":")
            tokens.append((await cp.create_join_token(name, kind, 120)).token)
    print(json.dumps(tokens), flush=True)


async def _cp_issuer(ca: bytes) -> None:
    from hivemesh.mesh.controlplane_client import ControlPlaneClient
    from hivemesh.mesh.errors import HivemeshError
    from hivemesh.mesh.tls import join

    td = os.environ["HIVEMESH_TRUST_DOMAIN"]
    workload = await join(os.environ["HIVEMESH_JOIN"], ca, os.environ["HIVEMESH_JOIN_TOKEN"], "issuer", "client",
                          trust_domain=td, timeout_s=30.0)
    ops: list[dict[str, object]] = []
    # The deadline every node's client has (ControlPlaneClient's default, 10 s): a request that meets a cut replica
    # and an etcd election at once waits for the election, which took 4.4 s in one loaded run (docs/multihost.md).
    async with ControlPlaneClient(os.environ["HIVEMESH_CONTROLPLANE"], workload, td) as cp:

        async def once(kind: str) -> None:
            t0 = time.monotonic()
            op: dict[str, object] = {"kind": kind, "start": t0}
            try:
                if kind == "token":
                    await cp.issue_token(f"spiffe://{td}/agent/echo", ["echo"])
                else:
                    await cp.renew()
                op.update(ok=True, replica=cp.address)
            except HivemeshError as exc:
                op.update(ok=False, error=f"{exc.reason}: {exc.message}")
            except Exception as exc:  # noqa: BLE001 - any failure is a failed operation, reported
                op.update(ok=False, error=f"{type(exc).__name__}: {exc}")
            op["end"] = time.monotonic()
            ops.append(op)

        async def every() -> None:
            # One after the other: a renewal closes the client's channels, which ends a call in flight on them
            # with something other than a HivemeshError (docs/multihost.md); a node renews between its calls.
            for n in itertools.count():
                await once("renew" if n % 5 == 4 else "token")
                await asyncio.sleep(0.1)

        def served_after(t: float, n: int) -> bool:
            ok = [o for o in ops if o["ok"] and float(str(o["start"])) > t]
            return sum(o["kind"] == "token" for o in ok) >= n and any(o["kind"] == "renew" for o in ok)

        loop = asyncio.get_running_loop()
        print("ready", flush=True)
        tasks: list[asyncio.Task[None]] = []
        while line := (await loop.run_in_executor(None, sys.stdin.readline)).strip():
            if line == "go":
                await once("token")
                await once("renew")
                print("going", flush=True)
                tasks = [asyncio.create_task(every())]
            elif line.startswith("report-after "):
                _, after, count = line.split()
                for _ in range(400):  # at most 20 s
                    if served_after(float(after), int(count)):
                        break
                    await asyncio.sleep(0.05)
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                print(json.dumps(ops), flush=True)
                return


async def _approval_flow(run: Any, input: Any) -> dict[str, Any]:
    """Asks a person, then finishes with their answer."""
    info = await run.escalate("approve", "may the change go out?", {"change": input["change"]})
    return {"approved": info.approved, "answer": info.answer}


async def _wf_owner() -> None:
    from hivemesh.sdk import MeshClient
    from hivemesh.sdk.workflow import WorkflowEngine

    lost: list[str] = []
    asked: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def on_event(_wid: str, kind: str, data: Any) -> None:
        if kind == "owner_lost":
            if not lost:  # the test keeps the cable cut until the owner has lost its lease
                print(json.dumps({"event": "owner_lost", "at": time.monotonic()}), flush=True)
            lost.append(str(data.get("reason", "")))
        elif kind == "input_required" and not asked.done():  # emitted once the run recorded the escalation
            asked.set_result(str(data["escalation_id"]))

    async with MeshClient.connect(name="orch") as mesh, WorkflowEngine(
        mesh, lock_ttl_s=5, on_event=on_event
    ) as engine:
        handle = await engine.submit(_approval_flow, {"change": "c-1"}, workflow_id="cut")
        escalation = await asyncio.wait_for(asked, 60)
        print(json.dumps({"event": "waiting", "escalation": escalation}), flush=True)
        state = await handle.result(timeout=120)
        print(json.dumps({"event": "done", "state": state.state, "output": state.output, "runs": state.runs,
                          "owner_lost": lost, "at": time.monotonic()}), flush=True)


def main(argv: list[str]) -> None:
    job, *args = argv
    if job == "plain-agent":
        asyncio.run(_plain_agent(args[0]))
    elif job == "join-tokens":
        asyncio.run(_join_tokens(args[0], args[1], args[2:]))
    elif job == "cp-issuer":
        with open(os.environ["HIVEMESH_CA"], "rb") as f:
            asyncio.run(_cp_issuer(f.read()))
    elif job == "wf-owner":
        asyncio.run(_wf_owner())
    elif job == "etcd-bootstrap":
        _etcd_bootstrap(*args)
    else:
        sys.exit(f"unknown job {job!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
