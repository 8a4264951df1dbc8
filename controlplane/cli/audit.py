"""`hivemesh audit tail|query|verify|export`: read and prove the audit log, as the operator.

`verify` does not take the control plane's word for it: it downloads the log and the signed checkpoints and
checks them here, against a checkpoint key you can pin (`--key`). It also verifies files offline (`--file`,
an export or a node's spool directory).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
import grpc
from rich.table import Table

from hivemesh.controlplane.audit import KINDS, LogReport, load_public_key, verify_log
from hivemesh.controlplane.cli.context import CliContext, as_operator, err, friendly_errors, out, pass_cli
from hivemesh.mesh.audit import DECISIONS, verify_chain
from hivemesh.mesh.controlplane_client import ControlPlaneClient
from hivemesh.mesh.errors import from_rpc_error
from hivemesh.v1 import audit_pb2


def _entries(raw: list[bytes]) -> list[dict[str, Any]]:
    return [json.loads(r) for r in raw]


def _row(entry: dict[str, Any]) -> dict[str, Any]:
    rec = entry.get("record", {})
    return {
        "seq": entry.get("seq"),
        "time": rec.get("time", ""),
        "decision": rec.get("decision", ""),
        "status": rec.get("status", "") + (f"/{rec['reason']}" if rec.get("reason") and rec.get("reason") != rec.get(
            "status") else ""),
        "caller": rec.get("caller") or rec.get("caller_unverified") or (
            f"{rec['remote']} (no identity)" if rec.get("kind") == "handshake" and rec.get("remote") else "?"),
        "chain": " → ".join(rec.get("chain", [])),
        "what": rec.get("capability") or rec.get("method") or (
            "TLS handshake" + (f" ×{rec['count']}" if int(rec.get("count", 1)) > 1 else "")
            if rec.get("kind") == "handshake" else ""),
        "node": str(rec.get("node", "")).rsplit("/", 1)[-1],
        "rule": rec.get("rule", ""),
        "ms": f"{int(rec.get('latency_us', 0)) / 1000:.1f}",
    }


def _print(entries: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        for e in entries:
            click.echo(json.dumps(e, sort_keys=True))
        return
    if not entries:
        out.print("no matching audit records")
        return
    table = Table("seq", "time", "decision", "status", "caller", "capability/method", "node", "rule", "ms",
                  show_edge=False, pad_edge=False)
    colours = {"allow": "green", "deny": "red", "invalid": "yellow", "error": "magenta"}
    for e in entries:
        r = _row(e)
        c = colours.get(r["decision"], "cyan")
        caller = r["caller"] + (f" (chain {r['chain']})" if r["chain"] else "")
        table.add_row(str(r["seq"]), r["time"], f"[{c}]{r['decision']}[/{c}]", r["status"], caller, r["what"],
                      r["node"], r["rule"], r["ms"])
    out.print(table)


def _query_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    for opt in reversed([
        click.option("--caller", default="", help="Caller SPIFFE id (glob)."),
        click.option("--capability", default="", help="Capability (glob)."),
        click.option("--decision", type=click.Choice(sorted(DECISIONS)), default=None),
        click.option("--kind", type=click.Choice(sorted(KINDS)), default=None,
                     help="inbound calls, outbound refusals, TLS handshake refusals, or the control plane's own."),
        click.option("--principal", default="", help="Original principal of a delegated call (glob)."),
        click.option("--agent", default="", help="SPIFFE id of the node that recorded it (glob)."),
        click.option("--since", default="", help="RFC 3339, unix seconds, or relative (-15m, -2h, -1d)."),
        click.option("--until", default="", help="RFC 3339, unix seconds, or relative."),
        click.option("--jti", default="", help="Token id."),
        click.option("--trace-id", default="", help="Trace id (W3C traceparent) or call id."),
    ]):
        fn = opt(fn)
    return fn


def _request(limit: int, tail: bool, after_seq: int = 0, **filters: Any) -> audit_pb2.AuditQueryRequest:
    return audit_pb2.AuditQueryRequest(
        caller=filters["caller"], capability=filters["capability"], decision=filters["decision"] or "",
        principal=filters["principal"], agent=filters["agent"], since=filters["since"], until=filters["until"],
        jti=filters["jti"], trace_id=filters["trace_id"], kind=filters["kind"] or "", limit=limit, tail=tail,
        after_seq=after_seq,
    )


@click.group()
def audit() -> None:
    """The tamper-evident audit log of every decision in the mesh."""


@audit.command("tail")
@click.option("-n", "--lines", "limit", default=20, show_default=True, help="How many of the newest records.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new records as they arrive (Ctrl-C stops).")
@_query_options
@click.option("--json", "as_json", is_flag=True, help="One JSON entry per line.")
@pass_cli
@friendly_errors
def audit_tail(obj: CliContext, /, limit: int, follow: bool, as_json: bool, **filters: Any) -> None:
    """The newest audit records (optionally filtered), oldest of them first."""

    async def go(cp: ControlPlaneClient) -> None:
        resp: audit_pb2.AuditQueryResponse = await cp.call(cp.audit.Query, _request(limit, True, **filters))
        _print(_entries(list(resp.entries)), as_json)
        after = resp.head_seq
        while follow:
            await asyncio.sleep(1.0)
            more: audit_pb2.AuditQueryResponse = await cp.call(
                cp.audit.Query, _request(1000, False, after_seq=after, **filters)
            )
            entries = _entries(list(more.entries))
            if entries:
                _print(entries, as_json)
            after = max([after, *[int(e["seq"]) for e in entries]]) if entries else max(after, more.head_seq)

    with contextlib.suppress(KeyboardInterrupt):
        as_operator(obj, go)


@audit.command("query")
@_query_options
@click.option("--limit", default=100, show_default=True, help="At most this many records (max 10000).")
@click.option("--json", "as_json", is_flag=True, help="One JSON entry per line.")
@pass_cli
@friendly_errors
def audit_query(obj: CliContext, /, limit: int, as_json: bool, **filters: Any) -> None:
    """Records matching every given filter, oldest first."""
    resp: audit_pb2.AuditQueryResponse = as_operator(obj, lambda cp: cp.call(cp.audit.Query, _request(limit, False,
                                                                                                     **filters)))
    _print(_entries(list(resp.entries)), as_json)


async def _download(cp: ControlPlaneClient) -> tuple[list[bytes], list[bytes], str]:
    lines: list[bytes] = []
    try:
        stream: Any = cp.audit.Export(audit_pb2.ExportRequest(), timeout=300)  # async in grpc.aio
        async for chunk in stream:
            lines.extend(chunk.entries)
    except grpc.aio.AioRpcError as exc:
        raise from_rpc_error(exc) from exc
    cps: audit_pb2.CheckpointsResponse = await cp.call(cp.audit.Checkpoints, audit_pb2.CheckpointsRequest())
    return lines, list(cps.checkpoints), cps.public_key_pem


def _file_lines(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        for raw in f:
            yield raw.rstrip(b"\n")


def _report(report: LogReport, as_json: bool, what: str) -> None:
    if as_json:
        click.echo(json.dumps(report.to_json(), sort_keys=True))
    elif report.ok:
        out.print(f"[green]OK[/green] {what}: {report.entries} entries, {report.sources} source chain(s), "
                  f"{report.checkpoints} signed checkpoint(s); head seq {report.head_seq} {report.head_hash[:16]}…",
                  highlight=False)
    else:
        p = report.problem
        assert p is not None
        err.print(f"[red]TAMPERED[/red] {what}: first bad record seq {p.seq} (line {p.line}): {p.reason}",
                  highlight=False)
    if not report.ok:
        sys.exit(1)


@audit.command("verify")
@click.option("--key", "key_file", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="Pinned checkpoint public key (PEM); default: the one the control plane serves.")
@click.option("--file", "log_file", type=click.Path(exists=True, path_type=Path), default=None,
              help="Verify an exported log file (log.jsonl) offline, or a node's spool directory.")
@click.option("--checkpoints", "cp_file", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              default=None, help="With --file: the exported checkpoints.jsonl.")
@click.option("--json", "as_json", is_flag=True)
@pass_cli
@friendly_errors
def audit_verify(obj: CliContext, key_file: Path | None, log_file: Path | None, cp_file: Path | None,
                 as_json: bool) -> None:
    """Prove the log is intact: every chain links, nothing changed, deleted, inserted or reordered, and it
    matches every signed checkpoint. Names the first bad record and exits 1 when it is not."""
    started = time.perf_counter()
    pinned = load_public_key(key_file.read_bytes()) if key_file is not None else None
    if log_file is not None and log_file.is_dir():
        segments = sorted(log_file.glob("audit-*.log"))

        def spool_lines() -> Iterator[bytes]:
            for seg in segments:
                yield from _file_lines(seg)

        first = json.loads(next(iter(spool_lines()), b'{"seq":1}')).get("seq", 1)
        count, problem = verify_chain(spool_lines(), first_seq=first, prev=_first_prev(segments))
        rep = LogReport(entries=count, sources=1, problem=problem, head_seq=first + count - 1)
        _report(rep, as_json, f"spool {log_file}")
        return
    if log_file is not None:
        cps = list(_file_lines(cp_file)) if cp_file is not None else []
        report = verify_log(_file_lines(log_file), [c for c in cps if c], pinned)
        _report(report, as_json, str(log_file))
        return
    lines, cps, pem = as_operator(obj, _download)
    key = pinned or load_public_key(pem)
    report = verify_log(lines, cps, key)
    if not as_json and pinned is None:
        err.print("[dim]checkpoint key not pinned (--key): trusting the one the control plane serves[/dim]")
    _report(report, as_json, f"control-plane log ({time.perf_counter() - started:.1f} s)")


def _first_prev(segments: list[Path]) -> str:
    for seg in segments:
        for raw in _file_lines(seg):
            prev = json.loads(raw).get("prev")
            return prev if isinstance(prev, str) else "0" * 64
    return "0" * 64


@audit.command("export")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory for log.jsonl, checkpoints.jsonl and checkpoint-key.pem.")
@pass_cli
@friendly_errors
def audit_export(obj: CliContext, out_dir: Path) -> None:
    """Download the whole log with its checkpoints and key, to archive or verify offline."""
    lines, cps, pem = as_operator(obj, _download)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "log.jsonl").write_bytes(b"".join(line + b"\n" for line in lines))
    (out_dir / "checkpoints.jsonl").write_bytes(b"".join(c + b"\n" for c in cps))
    (out_dir / "checkpoint-key.pem").write_text(pem)
    out.print(f"exported {len(lines)} entries and {len(cps)} checkpoints to {out_dir}", highlight=False)
