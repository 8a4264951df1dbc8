"""`hivemesh agents`, `hivemesh call` and `hivemesh join-token`: looking at and using the running mesh."""

from __future__ import annotations

import asyncio
import json
import math
import time
from typing import TYPE_CHECKING, Any, Final

import click

from hivemesh.controlplane.cli.context import (
    CliContext,
    as_operator,
    err,
    friendly_errors,
    out,
    pass_cli,
    run_async,
)
from hivemesh.controlplane.cli.inputs import read_text
from hivemesh.controlplane.cli.output import clean, new_table
from hivemesh.controlplane.joins import DEFAULT_TTL_S, MAX_TTL_S
from hivemesh.mesh import json_depth
from hivemesh.mesh.tls import MAX_MESSAGE_BYTES

if TYPE_CHECKING:
    from hivemesh.sdk.client import MeshClient

MAX_DATA_BYTES: Final = MAX_MESSAGE_BYTES
"""The most `call --data @FILE` reads: no node accepts a larger message, so reading more only costs memory."""
MAX_TIMEOUT_S: Final = 1e8
"""The longest `call --timeout` (~3 years): past it gRPC's deadline overflows, and a link frame's is read as none
(`hivemesh.mesh.link_server.MAX_TIMEOUT_S`, not imported: the CLI would load the link server to read a number)."""
WAIT_FOR_CAPABILITY_S: Final = 3.0
"""How long `call` waits for the registry to show an instance of the capability before calling anyway."""
NODE_START_S: Final = 15.0
"""The longest `call` waits for its node to load the registry from etcd (the SDK's default); a shorter --timeout
bounds it too, as it bounds the whole command."""


class Seconds(click.types.FloatParamType):
    """A deadline in seconds: a positive, finite number up to MAX_TIMEOUT_S. Anything else is a usage error: a
    negative or zero one only failed the call as past its deadline before sending it, and NaN or infinity is no
    deadline at all. A FloatParamType so that it types the same under click 8.1 and 8.5 (generic there)."""

    name = "seconds"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        seconds = click.FLOAT.convert(value, param, ctx)  # its "'x' is not a valid float." for a word
        if not (math.isfinite(seconds) and 0 < seconds <= MAX_TIMEOUT_S):
            self.fail(f"{value!r} is not a deadline: give a positive number of seconds (at most {MAX_TIMEOUT_S:g})",
                      param, ctx)
        return seconds


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_cli
@friendly_errors
def agents(obj: CliContext, as_json: bool) -> None:
    """List registered agents and their capabilities (read from etcd). A capability an agent offers but a
    `providers` policy does not let it serve is marked: callers never send it those calls (a misconfigured agent,
    or one squatting a capability name)."""
    instances, table = run_async(_instances_and_providers(obj))
    rows: list[dict[str, Any]] = [
        {
            "agent": i.card.name,
            "version": i.card.version,
            "instance": i.instance_id,
            "endpoint": i.endpoint,
            "packaging": i.packaging,
            "identity": i.identity,
            "capabilities": [c.name for c in i.card.capabilities],
            "left_out": {c.name: sorted(f"providers/{p}" for p in r.policies) for c in i.card.capabilities
                         if (r := table.restriction(c.name)) is not None and not r.allows(i.identity)},
        }
        for i in instances
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        out.print("no agents registered")
        return
    listing = new_table("agent", "version", "capabilities", "packaging", "endpoint", "instance")
    for r in rows:
        offered = [f"{c} (left out by {', '.join(r['left_out'][c])})" if c in r["left_out"] else c
                   for c in r["capabilities"]]
        listing.add_row(r["agent"], r["version"], ", ".join(offered), r["packaging"], r["endpoint"], r["instance"])
    out.print(listing)


async def _instances_and_providers(obj: CliContext) -> tuple[list[Any], Any]:
    """Every registered instance, and the providers policies in force (compiled as nodes compile them)."""
    from hivemesh.controlplane.policies import list_policies
    from hivemesh.mesh.etcd import client, wait_connected
    from hivemesh.mesh.providers import PROVIDERS, compile_providers
    from hivemesh.mesh.registry import read_instances

    access = obj.operator_settings().etcd_access()
    instances = list(await read_instances(access))  # first: its error names etcd and what it could not read
    c = client(access)
    try:
        await wait_connected(c)
        docs = await list_policies(c, PROVIDERS.name)
    finally:
        await c.close()
    return instances, compile_providers({d.name: d for d in docs})


def _read_data(data: str | None) -> Any:
    """The JSON --data gives, inline or in @FILE (read bounded: `inputs.read_text`); BadParameter otherwise.
    Without --data the input is `{}`: capabilities take JSON objects, and one whose fields are all optional is
    then called as meant (JSON null, sent before, was refused by every such schema); `--data null` sends null."""
    if data is None:
        return {}
    source = "the value"
    if data.startswith("@"):
        data, source = read_text(data[1:], limit=MAX_DATA_BYTES, param_hint="--data")
    try:
        return json_depth.loads(data)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"{source} is not valid JSON: {exc}", param_hint="--data") from None
    except (ValueError, RecursionError) as exc:  # an integer of thousands of digits; nesting past the stack
        why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise click.BadParameter(f"{source} is not JSON this can read: {why}", param_hint="--data") from None


@click.command()
@click.argument("capability")
@click.option("--data", "-d", default=None, help="JSON input, or @file.json. Default: {} (an empty object).")
@click.option("--timeout", type=Seconds(), default=None,
              help="Deadline in seconds (a positive number), of the whole command: finding the agents in etcd "
                   "included. Default: the capability's `timeouts` policy (default_ms), else the mesh's default "
                   "(30 s), as for an SDK call given no timeout.")
@click.option("--stream", is_flag=True, help="Use the streaming call and print items as they arrive.")
@click.option("--json", "as_json", is_flag=True, help="Print only the JSON output.")
@click.option("--detailed", is_flag=True,
              help="Print one JSON object: the output, whether it is degraded (fallback:<capability> or cache, "
                   "else \"\"), and the agent, instance, packaging and hops that answered.")
@pass_cli
@friendly_errors
def call(obj: CliContext, capability: str, data: str | None, timeout: float | None, stream: bool, as_json: bool,
         detailed: bool) -> None:
    """Call CAPABILITY through the mesh (as the operator) and print its result.

    The input is the JSON of --data ({} without it; `--data null` sends null). The deadline is --timeout, else
    the one a `timeouts` policy gives CAPABILITY, else 30 s.

    An answer the mesh gave in the capability's place (its route's fallback, or the cached last good answer)
    says so on stderr, and in the `degraded` field of --detailed.
    """
    from hivemesh.sdk.client import MeshClient

    if detailed and stream:  # a stream's items have no one answer to describe
        raise click.UsageError("--detailed describes a single call's answer; it does not apply to --stream")
    payload = _read_data(data)
    settings = obj.operator_settings()

    async def go() -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        mesh = MeshClient.connect(name="admin", kind="operator", settings=settings)
        await _start_node(mesh, NODE_START_S if timeout is None else min(timeout, NODE_START_S))
        async with mesh:  # the node is started: this opens the client's audit log
            # The rest of --timeout (not all of it again): the whole command ends within about --timeout.
            left = None if deadline is None else max(deadline - time.monotonic(), 0.05)
            wait = WAIT_FOR_CAPABILITY_S if left is None else min(left, WAIT_FOR_CAPABILITY_S)
            await mesh.node.registry.wait_for_capability(capability, 1, timeout=wait)
            left = None if deadline is None else max(deadline - time.monotonic(), 0.05)
            # No --timeout: None, so the SDK applies the capability's `timeouts` policy, then the client default.
            if stream:
                async for item in mesh.stream(capability, payload, timeout=left):
                    click.echo(json.dumps(item))
                return
            result = await mesh.call_detailed(capability, payload, timeout=left)
            if result.degraded:  # on stderr even with --json: stdout stays the output alone
                err.print(f"degraded: {_degraded_how(capability, result.degraded)}", style="yellow",
                          highlight=False)
            if detailed:
                i = result.instance
                click.echo(json.dumps({
                    "output": result.output, "degraded": result.degraded, "agent": i.card.name,
                    "instance": i.instance_id, "packaging": i.packaging,
                    "hops": [{"kind": h.kind, "identity": h.identity, "instance": h.instance} for h in result.hops],
                }, indent=2))
                return
            if as_json:
                click.echo(json.dumps(result.output, indent=2))
                return
            out.print_json(json.dumps(result.output))
            hops = " → ".join(f"{h.kind}:{h.identity.rsplit('/', 1)[-1]}" for h in result.hops)
            err.print(f"served by {clean(result.instance.card.name)} ({clean(result.instance.instance_id)}, "
                      f"{clean(result.instance.packaging)}) via {clean(hops)}", style="dim", highlight=False)

    run_async(go())


async def _start_node(mesh: MeshClient, wait_s: float) -> None:
    """Start the call's own node within wait_s: its identity comes from the operator's files, so what it waits
    on is etcd (the registry, policies and trust state). When etcd does not answer, say why this command needs
    it, and that callers already running do not (they call on their cached registry view)."""
    from hivemesh.mesh.errors import RegistryUnavailableError

    try:
        # The node's own etcd waits take wait_s each; the outer bound (a little longer, so the registry's own
        # error, naming etcd's address and what it answered, comes first) holds the whole start to about wait_s.
        async with asyncio.timeout(wait_s + 1.0):
            await mesh.node.start(timeout=wait_s)
        return
    except RegistryUnavailableError as exc:
        why = exc.message
    except TimeoutError:
        why = f"etcd at {mesh.node.settings.etcd} did not answer within {wait_s:g} s"
    except BaseException:
        await mesh.close()
        raise
    await mesh.close()
    raise RegistryUnavailableError(
        f"`hivemesh call` starts a node of its own, which needs etcd to find the agents: {why}. Retry once etcd "
        "answers; SDK callers already running keep calling meanwhile, on their registry caches.",
        metadata={"etcd": str(mesh.node.settings.etcd)},
    )


def _degraded_how(capability: str, marker: str) -> str:
    """What the `x-hivemesh-degraded` marker of an answer means, for people (docs/resilience.md, "Degrade")."""
    if marker == "cache":
        return f"{clean(capability)} failed; answered with its cached last good answer to the same input"
    if marker.startswith("fallback:"):
        return f"{clean(capability)} failed; answered by its fallback {clean(marker[len('fallback:'):])}"
    return f"{clean(capability)} was answered in a degraded mode ({clean(marker)})"


@click.command("join-token")
@click.argument("name")
@click.option("--kind", type=click.Choice(["agent", "client"]), default="agent", show_default=True)
@click.option("--ttl", type=click.IntRange(1, MAX_TTL_S), default=DEFAULT_TTL_S, show_default=True,
              help="Seconds the token stays usable if unused.")
@click.option("--json", "as_json", is_flag=True)
@pass_cli
@friendly_errors
def join_token(obj: CliContext, name: str, kind: str, ttl: int, as_json: bool) -> None:
    """Mint a one-time join token for a workload NAME (give it to the agent/sidecar as HIVEMESH_JOIN_TOKEN)."""
    # --ttl is bounded here: the request's ttl_seconds reads 0 as the default (600 s) and holds no more than int32.
    resp = as_operator(obj, lambda cp: cp.create_join_token(name, kind, ttl))
    if as_json:
        click.echo(json.dumps({"token": resp.token, "expires_at_unix": resp.expires_at_unix, "name": name,
                               "kind": kind}))
    else:
        click.echo(resp.token)
