"""`hivemesh policy ...` and `hivemesh status`: traffic policies and how they act, through the control plane's
`Policies` service as the operator (so the same works from any language's gRPC client)."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

import click
import yaml
from google.protobuf.message import Message
from rich.text import Text

from hivemesh.controlplane.cli.context import CliContext, as_operator, err, friendly_errors, out, pass_cli
from hivemesh.controlplane.cli.inputs import read_text
from hivemesh.controlplane.cli.output import CleanTable, clean, new_table
from hivemesh.controlplane.cli.policy_client import PolicyClient
from hivemesh.controlplane.policies import parse_documents, validate_documents
from hivemesh.mesh import json_depth
from hivemesh.v1 import policy_pb2

_T = TypeVar("_T")

MAX_FILE_BYTES: Final = 1 << 20
"""The most `policy apply -f` reads: `parse_documents` refuses larger text anyway."""


def _run(obj: CliContext, action: Callable[[PolicyClient], Awaitable[_T]]) -> _T:
    return as_operator(obj, lambda cp: action(PolicyClient(cp)))


def _doc(p: policy_pb2.Policy) -> dict[str, Any]:
    doc: dict[str, Any] = {"kind": p.kind, "name": p.name}
    if p.description:
        doc["description"] = p.description
    doc["version"] = p.version
    doc["spec"] = json_depth.loads(p.spec_json) if p.spec_json else {}
    return doc


@click.group()
def policy() -> None:
    """Traffic policies (routes, retries, timeouts, breakers, ratelimits, concurrency, ...), stored in etcd."""


@policy.command("apply")
@click.option("-f", "--file", "path", required=True, type=click.Path(dir_okay=False, allow_dash=True),
              help="YAML or JSON documents ('-' for stdin); several with '---' or as a JSON list.")
@click.option("--dry-run", is_flag=True, help="Validate (and compile) without writing anything.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_cli
@friendly_errors
def policy_apply(obj: CliContext, path: str, dry_run: bool, as_json: bool) -> None:
    """Validate every document and store them all in one transaction, or none of them."""
    text, source = read_text(path, limit=MAX_FILE_BYTES, param_hint="--file", stdin_dash=True)
    documents = parse_documents(text, source=source)
    # Every mistake of every document now, even with no mesh running; conflicts between documents (and with the
    # stored ones) are the control plane's to find, in the apply below.
    validate_documents(documents)
    resp = _run(obj, lambda c: c.apply(documents, dry_run=dry_run))
    show_applied(resp, as_json)


def show_applied(resp: Any, as_json: bool, **extra: Any) -> bool:
    """Report an ApplyPolicies answer (as JSON with extra fields, or a line per document); True when it was
    written, False for a dry run or JSON (nothing more for a person to read)."""
    if as_json:
        click.echo(json.dumps({
            **extra, "dry_run": resp.dry_run, "revision": resp.revision,
            "applied": [{"kind": a.kind, "name": a.name, "action": a.action, "version": a.version}
                        for a in resp.applied],
        }, indent=2))
        return False
    verb = "would be" if resp.dry_run else "is"
    for a in resp.applied:
        out.print(f"{clean(a.kind)}/{clean(a.name)} {verb} {clean(a.action)} (version {a.version or '-'})",
                  highlight=False)
    if resp.dry_run:
        out.print("dry run: nothing was written", highlight=False)
        return False
    return True


@policy.command("get")
@click.argument("kind")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="JSON instead of YAML.")
@pass_cli
@friendly_errors
def policy_get(obj: CliContext, kind: str, name: str, as_json: bool) -> None:
    """Print one stored document (it can be edited and applied again)."""
    doc = _doc(_run(obj, lambda c: c.get(kind, name)))
    if as_json:
        click.echo(json.dumps(doc, indent=2))
    else:
        click.echo(yaml.safe_dump(doc, sort_keys=False).rstrip())


@policy.command("list")
@click.argument("kind", required=False, default="")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (whole documents).")
@pass_cli
@friendly_errors
def policy_list(obj: CliContext, kind: str, as_json: bool) -> None:
    """List stored documents, of one KIND or of every kind."""
    docs = [_doc(p) for p in _run(obj, lambda c: c.list_policies(kind))]
    if as_json:
        click.echo(json.dumps(docs, indent=2))
        return
    if not docs:
        out.print("no policies" + (f" of kind {kind}" if kind else ""), highlight=False)
        return
    table = new_table("kind", "name", "version", "targets", "description")
    for d in docs:
        spec = d["spec"]
        targets = ", ".join(_targets(spec))
        table.add_row(d["kind"], d["name"], str(d["version"]), targets, d.get("description", ""))
    out.print(table)


@policy.command("delete")
@click.argument("kind")
@click.argument("name")
@click.option("--version", type=int, default=None, help="Delete only if the document is still at this version.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@pass_cli
@friendly_errors
def policy_delete(obj: CliContext, kind: str, name: str, version: int | None, yes: bool) -> None:
    """Delete one document; every node stops applying it within about a second."""
    if not yes:
        try:
            confirmed = click.confirm(f"Delete policy {kind}/{name}?")
        except click.Abort:  # Ctrl-C, or stdin ended before an answer
            if sys.stdin.isatty():
                raise
            raise click.UsageError(f"refusing to delete {kind}/{name} without --yes when stdin is not a terminal "
                                   "(no answer to confirm it)") from None
        if not confirmed:
            raise click.ClickException(f"not deleted: {kind}/{name} was not confirmed")
    revision = _run(obj, lambda c: c.delete(kind, name, version=version))
    out.print(f"deleted {clean(kind)}/{clean(name)} (revision {revision})", highlight=False)


@policy.command("kinds")
@click.option("--json", "as_json", is_flag=True, help="Include each kind's JSON Schema.")
@pass_cli
@friendly_errors
def policy_kinds(obj: CliContext, as_json: bool) -> None:
    """The policy kinds the control plane knows."""
    infos: list[policy_pb2.PolicyKindInfo] = _run(obj, lambda c: c.kinds())
    if as_json:
        click.echo(json.dumps([{"name": k.name, "description": k.description,
                                "spec_schema": json_depth.loads(k.spec_schema_json)} for k in infos], indent=2))
        return
    table = new_table("kind", "description")
    for k in infos:
        table.add_row(k.name, k.description)
    out.print(table)


def _plain(message: Message) -> dict[str, Any]:
    """A status message as plain JSON data: every field (zeros too), numbers as numbers."""
    out: dict[str, Any] = {}
    for fd in message.DESCRIPTOR.fields:
        value = getattr(message, fd.name)
        if fd.message_type is not None:
            if fd.is_repeated:
                out[fd.name] = [_plain(v) for v in value]
            elif message.HasField(fd.name):
                out[fd.name] = _plain(value)
        else:
            out[fd.name] = value
    return out


def _audit_colour(state: str) -> str:
    """A node's handshake audit state (its gRPC port's, then "; port N: <state>" for another port whose state
    differs): red where one is off, yellow where one is still starting, green when all are live."""
    states = [state.split("; port ", 1)[0], *_OTHER_PORT.findall(state)]
    if any(one.startswith("off") or one == "none" for one in states):
        return "red"
    return "yellow" if "starting" in states else "green"


_OTHER_PORT = re.compile(r"; port \d+: (off|starting|live)")


def _short(identity: str) -> str:
    return "/".join(identity.split("/")[-2:])


def _limiter(cap: policy_pb2.CapabilityTraffic) -> str:
    """The limiter cell: the total's use, then the per-identity limit and how many callers it refused (a caller
    at its own limit is refused while the total shows room: without it, refusals had no limit to point at)."""
    parts = [f"{cap.limiter_use:.0%} of {cap.limit_rps:g}/s"] if cap.limit_rps else []
    ident = f"per identity {cap.identity_limit_rps:g}/s" if cap.identity_limit_rps else ""
    if cap.identity_overrides:
        s = "s" if cap.identity_overrides > 1 else ""
        ident = f"{ident} +{cap.identity_overrides} override{s}" if ident else \
            f"per identity: {cap.identity_overrides} override{s}"
    if ident:
        parts.append(ident + (f", {cap.identities_limited} at limit" if cap.identities_limited else ""))
    return "; ".join(parts)


def traffic_table(nodes: list[policy_pb2.NodeTraffic]) -> CleanTable:
    """`hivemesh status`'s table: a row per node's capability and direction, one per instance it calls below."""
    table = new_table("node", "dir", "capability", "instance", "breaker", "in flight", "calls/10s", "errors",
                      "limiter", "retries/limited")
    for n in nodes:
        node = f"{_short(n.identity)} ({n.instance})"
        if n.HasField("concurrency"):
            c = n.concurrency
            table.add_row(node, "in", "(all)", "", "", f"{c.in_flight}/{c.max_in_flight} q{c.queued}", "", "",
                          f"shed {c.shed}", "")
        for cap in n.capabilities:
            limiter = _limiter(cap)
            extra = str(cap.retries) if cap.direction == "outbound" else str(cap.rate_limited)
            table.add_row(node, cap.direction[:3], cap.capability, "", cap.breaker or "-", str(cap.in_flight),
                          str(cap.calls), f"{cap.error_rate:.1%}", limiter, extra)
            for inst in cap.instances:
                breaker = (inst.breaker or "-") + (f", {inst.avoided}" if inst.avoided else "")
                table.add_row("", "", "", inst.instance, breaker, str(inst.in_flight), str(inst.calls),
                              f"{inst.error_rate:.1%}", "", "")
    return table


@click.command("status")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_cli
@friendly_errors
def status(obj: CliContext, as_json: bool) -> None:
    """Per node, capability and instance: breaker state (and why an instance is skipped for a while: unreachable or
    unanswering), limiter use, in-flight calls, recent error rate."""
    nodes: list[policy_pb2.NodeTraffic] = _run(obj, lambda c: c.status())
    if as_json:
        click.echo(json.dumps([_plain(n) for n in nodes], indent=2))
        return
    if not nodes:
        out.print("no node has published its status (nodes publish every ~2 s while they run)")
        return
    out.print(traffic_table(nodes))
    audited = [n for n in nodes if n.handshake_audit]
    if audited:
        tls = new_table("node", "TLS handshake audit", "refusals on record")
        for n in audited:
            colour = _audit_colour(n.handshake_audit)
            tls.add_row(f"{_short(n.identity)} ({n.instance})", Text(n.handshake_audit, style=colour),
                        str(n.handshakes_refused))
        out.print(tls)
    err.print("counts are over the last ~10 s, published by each node every ~2 s", style="dim", highlight=False)


def _targets(spec: Any) -> list[str]:
    """What a document applies to, for the listing: its capabilities (or agents, or subjects); a document of rules
    (providers) the capabilities its rules name; "*" only for one that names none."""
    if not isinstance(spec, dict):
        return ["*"]
    for field in ("capabilities", "agents", "subjects"):
        named = spec.get(field)
        if isinstance(named, list) and named:
            return [str(n) for n in named]
    rules = spec.get("rules")
    if isinstance(rules, list):
        found = [str(c) for r in rules if isinstance(r, dict) and isinstance(r.get("capabilities"), list)
                 for c in r["capabilities"]]
        if found:
            return list(dict.fromkeys(found))
    return ["*"]
