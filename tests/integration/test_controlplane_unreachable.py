"""A control plane that does not answer is named as such, with its address, by every client of its services.

Frozen (SIGSTOP, a real `hivemesh controlplane` process): gRPC ends the call DEADLINE_EXCEEDED with no status
details, which read as a bare `Deadline Exceeded (DEADLINE_EXCEEDED, DEADLINE_EXCEEDED)` naming neither the control
plane nor its address. Refused: the escalation and state clients mapped gRPC's own UNAVAILABLE as every status is
mapped, to AGENT_UNAVAILABLE, blaming an agent (`hivemesh escalations list`, `hivemesh state list`).
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from click.testing import CliRunner

from hivemesh.controlplane.cli.app import cli
from hivemesh.mesh.controlplane_client import ControlPlaneClient
from hivemesh.mesh.errors import ControlPlaneUnavailableError, DeadlineExceededError, abort
from hivemesh.mesh.etcd import EtcdServer
from hivemesh.mesh.pki import controlplane_dns_name
from hivemesh.mesh.tls import secure_channel
from hivemesh.sdk.escalation import EscalationClient
from hivemesh.sdk.state import StateClient
from hivemesh.v1 import control_pb2_grpc, trust_pb2
from tests.support.controlplane_process import controlplane_process
from tests.support.controlplane_replica import serving_replica
from tests.support.meshenv import DEFAULT_GRANTS, TRUST_DOMAIN, copy_session_ca
from tests.support.spawn import frozen

SHORT_S = 1.0
"""The deadline the frozen control plane is given: each call fails within it (plus gRPC's own slack)."""


def _calls(cp: ControlPlaneClient, timeout_s: float) -> dict[str, Callable[[], Awaitable[Any]]]:
    """One call through each way a client talks to the control plane: a feature stub (`call`), an idempotent
    control call (`_call`, failover and hedging), and the SDK's escalation and state clients."""
    return {
        "tokens revocations": lambda: cp.call(cp.trust.ListRevocations, trust_pb2.ListRevocationsRequest()),
        "list agents": cp.list_agents,
        "escalations list": lambda: EscalationClient(cp, timeout_s=timeout_s).list(),
        "state list": lambda: StateClient(cp, timeout_s=timeout_s).list("workflow/unreachable/r-1"),
    }


class _SaysDeadline(control_pb2_grpc.ControlPlaneServicer):
    """A control plane that answers, and what it answers is DEADLINE_EXCEEDED (with its ErrorInfo)."""

    async def ListAgents(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await abort(context, DeadlineExceededError("the registry read ran out of the call's time"))


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_a_frozen_control_plane_is_named_with_its_address_and_the_time_it_had(
    etcd_server: EtcdServer, tmp_path: Path
) -> None:
    certs = copy_session_ca(tmp_path / "certs").certs_dir
    (tmp_path / "grants.yaml").write_text(yaml.safe_dump(DEFAULT_GRANTS))
    async with controlplane_process(tmp_path, certs, etcd_server.endpoint, launched=False,
                                    extra=("--grants", str(tmp_path / "grants.yaml"))) as cp_process:
        pid, address = cp_process.proc.pid, cp_process.controlplane
        wanted = (f"the control plane at {address} did not answer within {SHORT_S:g} s (it may be overloaded, paused "
                  "or partitioned)")
        async with ControlPlaneClient.from_certs_dir(address, certs) as cp:
            await cp.list_agents()  # answered: the connection is up, as a node's is, when the process freezes
            cp.timeout_s = SHORT_S
            with frozen(pid):
                for what, call in _calls(cp, SHORT_S).items():
                    with pytest.raises(ControlPlaneUnavailableError) as caught:
                        await asyncio.wait_for(call(), 15)
                    err = caught.value
                    # The request may have reached the frozen process, which can still carry it out when it
                    # resumes: DEADLINE_EXCEEDED, not an UNAVAILABLE that reads as safe to send again.
                    assert (err.code, err.reason, err.message) == (
                        grpc.StatusCode.DEADLINE_EXCEEDED, "CONTROL_PLANE_UNAVAILABLE", wanted), (what, err)
                    assert err.metadata["address"] == address, what
                    assert cp.reachable is False, what
                # A new connection (the CLI's): the kernel completes the TCP handshake, the TLS one never ends.
                async with ControlPlaneClient(address, cp.workload, timeout_s=SHORT_S) as fresh:
                    for what, call in _calls(fresh, SHORT_S).items():
                        with pytest.raises(ControlPlaneUnavailableError) as caught:
                            await asyncio.wait_for(call(), 15)
                        assert (caught.value.code, caught.value.message) == (
                            grpc.StatusCode.DEADLINE_EXCEEDED, wanted), (what, caught.value)
            cp.timeout_s = 10.0
            assert await cp.list_agents() is not None and cp.reachable  # resumed: it answers again

    # A DEADLINE_EXCEEDED a control plane said itself (its ErrorInfo) stays what it said.
    async with serving_replica(certs, _SaysDeadline()) as said, \
            ControlPlaneClient.from_certs_dir(said, certs) as cp:
        cp.timeout_s = SHORT_S
        with pytest.raises(DeadlineExceededError) as told:
            await asyncio.wait_for(cp.list_agents(), 15)
        assert not isinstance(told.value, ControlPlaneUnavailableError)
        assert (told.value.reason, told.value.message) == (
            "DEADLINE_EXCEEDED", "the registry read ran out of the call's time")


def _refusing_address() -> str:
    """A port that was free a moment ago: nothing listens there, so connecting is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


async def test_a_refused_control_plane_is_named_by_the_escalation_and_state_clients(tmp_path: Path) -> None:
    certs = copy_session_ca(tmp_path / "certs").certs_dir
    address = _refusing_address()
    async with ControlPlaneClient.from_certs_dir(address, certs) as cp:
        for what, call in _calls(cp, 5.0).items():
            with pytest.raises(ControlPlaneUnavailableError) as caught:
                await asyncio.wait_for(call(), 15)
            err = caught.value
            assert (err.code, err.reason) == (grpc.StatusCode.UNAVAILABLE, "CONTROL_PLANE_UNAVAILABLE"), (what, err)
            assert err.message.startswith(f"the control plane at {address} cannot be reached: "), (what, err)
            assert err.metadata["address"] == address, what
        with pytest.raises(ControlPlaneUnavailableError) as caught:  # a watch's stream, too
            await asyncio.wait_for(StateClient(cp).watch("workflow/unreachable/r-1"), 15)
        assert caught.value.message.startswith(f"the control plane at {address} cannot be reached: ")

        # Given only a channel, the clients cannot name the address, but still name the control plane.
        channel = secure_channel(address, cp.workload.channel_credentials(),
                                 server_name=controlplane_dns_name(TRUST_DOMAIN))
        try:
            for call in (lambda: EscalationClient(channel).list(), lambda: StateClient(channel).list("ns")):
                with pytest.raises(ControlPlaneUnavailableError) as caught:
                    await asyncio.wait_for(call(), 15)
                assert caught.value.code == grpc.StatusCode.UNAVAILABLE
                assert caught.value.message.startswith("the control plane cannot be reached: "), caught.value
        finally:
            await channel.close()


def test_the_cli_names_a_refused_control_plane_for_escalations_and_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the operator reads: `hivemesh escalations list` and `hivemesh state list` said an agent was down."""
    certs = copy_session_ca(tmp_path / "certs").certs_dir
    address = _refusing_address()
    monkeypatch.delenv("HIVEMESH_CERTS", raising=False)
    for name, value in (("HIVEMESH_CONTROLPLANE", address), ("HIVEMESH_JOIN", address),
                        ("HIVEMESH_ETCD", f"https://{address}"), ("HIVEMESH_CA", str(certs / "ca.pem"))):
        monkeypatch.setenv(name, value)
    base = ["--home", str(tmp_path / "home"), "--certs-dir", str(certs)]
    for command in (["escalations", "list"], ["state", "list", "workflow/unreachable/r-1"]):
        result = CliRunner().invoke(cli, [*base, *command, "--json"], prog_name="hivemesh")
        assert result.exit_code == 1 and result.stdout == "", (command, result.output)
        error = json.loads(result.stderr)["error"]
        assert (error["code"], error["details"]["reason"]) == ("UNAVAILABLE", "CONTROL_PLANE_UNAVAILABLE"), error
        assert error["message"].startswith(f"the control plane at {address} cannot be reached: "), error
        plain = CliRunner().invoke(cli, [*base, *command], prog_name="hivemesh")
        assert plain.exit_code == 1, (command, plain.output)
        assert f"the control plane at {address} cannot be reached" in plain.stderr, plain.stderr
        assert "AGENT_UNAVAILABLE" not in plain.stderr, plain.stderr


async def test_joining_through_a_refused_or_silent_join_port_names_the_control_plane(tmp_path: Path) -> None:
    """The first start's join called the Join service through its own stub and mapped gRPC's statuses as any
    status: a refused join port read AGENT_UNAVAILABLE, a silent one a bare Deadline Exceeded."""
    from hivemesh.mesh.tls import join

    bundle = copy_session_ca(tmp_path / "certs").ca_cert.read_bytes()
    refused = _refusing_address()
    with pytest.raises(ControlPlaneUnavailableError) as caught:
        await asyncio.wait_for(join(refused, bundle, "a-token", "joiner", timeout_s=5), 15)
    assert (caught.value.code, caught.value.reason) == (grpc.StatusCode.UNAVAILABLE, "CONTROL_PLANE_UNAVAILABLE")
    assert caught.value.message.startswith(f"the control plane at {refused} cannot be reached: "), caught.value

    with socket.socket() as silent:  # listening, never accepting: TCP connects, the TLS handshake never ends
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(ControlPlaneUnavailableError) as caught:
            await asyncio.wait_for(join(address, bundle, "a-token", "joiner", timeout_s=SHORT_S), 15)
    assert (caught.value.code, caught.value.message) == (
        grpc.StatusCode.DEADLINE_EXCEEDED,
        f"the control plane at {address} did not answer within {SHORT_S:g} s (it may be overloaded, paused or "
        "partitioned)"), caught.value
