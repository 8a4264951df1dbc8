"""`hivemesh a2a`: the A2A bridge, both directions (hivemesh.sdk.a2a; needs the extra `hivemesh[a2a]`).

- `hivemesh a2a serve`: the gateway, serving every mesh agent as an A2A agent over HTTPS.
- `hivemesh a2a register URL`: a bridge node serving the external A2A agent at URL on the mesh, its skills as
  capabilities, for as long as it runs (its registration is a lease, like any agent's).

Both join the mesh with the usual HIVEMESH_* settings and one-time join token, keep their identity in
<home>/identity/, print one ready line (or a JSON object with --json) and run until SIGINT/SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import signal
import ssl
from typing import Any

import click

from hivemesh.controlplane.cli.context import friendly_errors, run_async
from hivemesh.controlplane.cli.output import clean
from hivemesh.mesh.settings import MeshSettings


def _host_port(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise click.BadParameter(f"{listen!r}: expected HOST:PORT", param_hint="--listen")
    return host, int(port)


def _ready(as_json: bool, what: str, fields: dict[str, Any]) -> None:
    """The one ready line. Its values are `clean`ed: `a2a` is the name on an external agent's card, any text."""
    if as_json:
        click.echo(json.dumps({"ready": what, **fields}))
    else:
        click.echo(f"{what} ready " + " ".join(f"{k}={clean(v)}" for k, v in fields.items()))


async def _until_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


@click.group("a2a")
def a2a() -> None:
    """The A2A bridge: mesh agents as A2A agents (serve), A2A agents as mesh agents (register)."""


@a2a.command("serve")
@click.option("--name", default="a2a-gateway", show_default=True,
              help="The gateway's workload name (it joins as this agent; A2A callers get tokens for it).")
@click.option("--listen", default="127.0.0.1:0", show_default=True, help="HTTPS listener (HOST:PORT).")
@click.option("--public-url", default=None, help="The base URL cards advertise (default: https://<listen>).")
@click.option("--timeout", default=60.0, show_default=True, help="Deadline of each mesh call, seconds.")
@click.option("--json", "as_json", is_flag=True, help="Print the ready line as JSON.")
@friendly_errors
def serve(name: str, listen: str, public_url: str | None, timeout: float, as_json: bool) -> None:
    """Serve every mesh agent as an A2A agent over HTTPS (agent cards, message/send, message/stream, tasks)."""
    from hivemesh.sdk.a2a.gateway import A2AGateway, GatewayConfig

    host, port = _host_port(listen)
    config = GatewayConfig(name=name, host=host, port=port, public_url=public_url, call_timeout_s=timeout)

    async def go() -> None:
        async with A2AGateway(MeshSettings.resolve(), config) as gateway:
            _ready(as_json, "a2a-gateway", {"url": gateway.url, "card": f"{gateway.url}/.well-known/agent-card.json",
                                            "audience": gateway.spiffe_id})
            await _until_signal()

    run_async(go())


@a2a.command("register")
@click.argument("url")
@click.option("--name", default=None, help="The mesh agent name (default: from the card's name).")
@click.option("--listen", default="127.0.0.1:0", show_default=True, help="The bridge's mutual-TLS listener.")
@click.option("--ca", "ca_file", default=None, type=click.Path(exists=True, dir_okay=False),
              help="CA bundle to verify the A2A agent's HTTPS with (default: the system's).")
@click.option("--timeout", default=60.0, show_default=True, help="HTTP timeout towards the A2A agent, seconds.")
@click.option("--json", "as_json", is_flag=True, help="Print the ready line as JSON.")
@friendly_errors
def register(url: str, name: str | None, listen: str, ca_file: str | None, timeout: float, as_json: bool) -> None:
    """Serve the A2A agent whose card is at URL on the mesh: its skills become capabilities in the registry."""
    from hivemesh.sdk.a2a.bridge import A2ABridgeAgent, fetch_card, http_client
    from hivemesh.sdk.serve import AgentServer, AgentServerConfig

    host, port = _host_port(listen)
    verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=ca_file) if ca_file else True

    async def go() -> None:
        async with http_client(verify=verify, timeout=timeout) as http:  # every answer bounded
            card = await fetch_card(url, http)
            bridge = await A2ABridgeAgent.from_card(card, http, name=name)
            try:
                async with AgentServer(bridge, MeshSettings.resolve(), AgentServerConfig(host=host, port=port)):
                    _ready(as_json, "a2a-bridge", {"agent": bridge.name, "a2a": card.name,
                                                   "capabilities": ",".join(sorted(bridge.capabilities))})
                    await _until_signal()
            finally:
                await bridge.close()

    run_async(go())
