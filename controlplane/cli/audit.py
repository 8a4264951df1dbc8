"""`hivemesh audit tail|query|verify|export`: read and prove the audit log, as the operator.

`verify` does not take the control plane's word for it: it downloads the log, the signed checkpoints and a
signed head, and checks them here with a key it trusts: pinned (`--key`), or the control plane's checkpoint-key
certificate checked against the operator's own trust bundle; never a key from an exported folder. It also
verifies an export folder (`--file`, compared with the control plane's signed heads or `--head`) and a node's
spool directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import click
import grpc
from cryptography.hazmat.primitives.asymmetric import ed25519
from rich.text import Text

from hivemesh.controlplane.access import spiffe_id
from hivemesh.controlplane.audit import KINDS, LogReport, load_public_key, verify_log
from hivemesh.controlplane.audit.heads import trusted_key_from_cert, verify_head
from hivemesh.controlplane.cli.authz import operator_trust_domain
from hivemesh.controlplane.cli.context import CliContext, as_operator, err, friendly_errors, out, pass_cli
from hivemesh.controlplane.cli.output import clean, escape, new_table
from hivemesh.mesh import json_depth
from hivemesh.mesh.audit import DECISIONS, verify_chain
from hivemesh.mesh.audit.chain import GENESIS, link_fields_problem
from hivemesh.mesh.controlplane_client import ControlPlaneClient
from hivemesh.mesh.controlplane_errors import rpc_failure
from hivemesh.mesh.errors import HivemeshError
from hivemesh.mesh.pki import KINDS as IDENTITY_KINDS
from hivemesh.mesh.pki import SCHEME, trust_domain_of_bundle
from hivemesh.v1 import audit_pb2

MAX_RECORDS: Final = 10_000
"""The most records one read asks for: the control plane's own cap (`controlplane/audit/store.py`). `-n`/`--limit`
outside 1..MAX_RECORDS is a usage error, not a read of some other number (0 read 100, -3 read 1)."""
RECORDS: Final = click.IntRange(1, MAX_RECORDS)
EXPORT_TIMEOUT_S: Final = 300.0
"""How long `audit export` waits for the whole log (a large one streams for a while)."""
IDENTITY_FILTERS: Final = ("caller", "principal", "agent")
"""The filters that match SPIFFE ids: each takes KIND/NAME too (`_identity_filters`)."""
_GLOB_CHARS: Final = "*?["


def _entries(raw: list[bytes]) -> list[dict[str, Any]]:
    return [_entry(r) for r in raw]


def _entry(raw: bytes) -> dict[str, Any]:
    """One entry as JSON; one the CLI's json cannot read (nested too deep) is shown as unreadable, not a crash."""
    try:
        value = json_depth.loads(raw)
    except (ValueError, RecursionError):
        value = None
    return value if isinstance(value, dict) else {"unreadable": raw[:128].decode("utf-8", "replace")}


def _text(value: Any) -> str:
    """A record field as table text: records hold what a node shipped (a status may be a number, a chain may
    hold anything), and one odd field must not take the whole table down."""
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)


def _number(value: Any) -> float | None:
    """A record's numeric field, or None when it is not a finite number."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            number = float(value)
            return number if math.isfinite(number) else None
    return None


def _row(entry: Any) -> dict[str, str]:
    """One entry's table cells, all strings ("?" for a number that is not one)."""
    if not isinstance(entry, dict):
        entry = {}
    rec = entry.get("record")
    if not isinstance(rec, dict):
        rec = {}
    status, reason = _text(rec.get("status", "")), _text(rec.get("reason"))
    chain = rec.get("chain")
    kind = rec.get("kind")
    remote = _text(rec.get("remote"))
    count = _number(rec.get("count", 1))
    latency = _number(rec.get("latency_us", 0))
    what = _text(rec.get("capability")) or _text(rec.get("method"))
    if not what and kind == "handshake":
        what = "TLS handshake" + (f" ×{int(count)}" if count is not None and count > 1 else "")
    return {
        "seq": _text(entry.get("seq")),
        "time": _text(rec.get("time", "")),
        "decision": _text(rec.get("decision", "")),
        "status": status + (f"/{reason}" if reason and reason != status else ""),
        # A shadow record written before it named its caller: the node that wrote it is the one that mirrored.
        "caller": _text(rec.get("caller")) or _text(rec.get("caller_unverified")) or (
            _text(rec.get("node")) if kind == "shadow" else "") or (
            f"{remote} (no identity)" if kind == "handshake" and remote else "?"),
        "chain": " → ".join(_text(x) for x in chain) if isinstance(chain, list) else _text(chain),
        "what": what,
        "node": _text(rec.get("node", "")).rsplit("/", 1)[-1],
        "rule": _text(rec.get("rule", "")),
        "ms": f"{latency / 1000:.1f}" if latency is not None else "?",
    }


_COLUMNS: Final = ("seq", "time", "decision", "status", "caller", "capability/method", "node", "rule", "ms")
_COLOURS: Final = {"allow": "green", "deny": "red", "invalid": "yellow", "error": "magenta"}


class _Printer:
    """Prints entries as a table, or one JSON entry a line. Across the batches of `tail -f` the header is printed
    once, with the first rows; later rows keep the widths the columns have grown to, so they line up under it."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.widths: list[int] | None = None  # set once the header is out

    def print(self, entries: list[dict[str, Any]], *, say_none: bool = True) -> None:
        if self.as_json:
            for e in entries:
                click.echo(json.dumps(e, sort_keys=True))
            return
        if not entries:
            if say_none:
                out.print("no matching audit records")
            return
        rows = []
        for e in entries:
            r = _row(e)
            caller = r["caller"] + (f" (chain {r['chain']})" if r["chain"] else "")
            # Text, never markup: a shipped field like "[/x]" is printed as it is, not parsed (or refused) by rich.
            colour = _COLOURS.get(r["decision"], "cyan")
            rows.append([Text(r["seq"]), Text(r["time"]), Text(r["decision"], style=colour), Text(r["status"]),
                         Text(caller), Text(r["what"]), Text(r["node"]), Text(r["rule"]), Text(r["ms"])])
        first = self.widths is None
        before = [len(h) for h in _COLUMNS] if self.widths is None else self.widths
        self.widths = [max(w, *(row[i].cell_len for row in rows)) for i, w in enumerate(before)]
        table = new_table(*_COLUMNS, show_edge=False, pad_edge=False, show_header=first)
        for column, width in zip(table.columns, self.widths, strict=True):
            column.min_width = width
        for row in rows:
            table.add_row(*row)
        out.print(table)


def _print(entries: list[dict[str, Any]], as_json: bool) -> None:
    _Printer(as_json).print(entries)


async def _fetch(
    cp: ControlPlaneClient, limit: int, tail: bool, after_seq: int = 0, **filters: Any
) -> tuple[list[bytes], int]:
    """Up to limit matching entries after after_seq (the last limit with tail), paging on while the control
    plane's answers are cut short by their byte budget; (them, the seq the next read goes on after).

    An answer covers `scanned` seqs after its after_seq: short of its head_seq with fewer entries than asked
    for, the rest follows from there (a cut tail sends its oldest entries first, so paging forward completes
    it). limit is 1..MAX_RECORDS: the options are bounded so, and the control plane reads 0 as 100."""
    want = limit
    got: list[bytes] = []
    after = after_seq
    page_tail = tail
    while True:
        resp: audit_pb2.AuditQueryResponse = await cp.call(
            cp.audit.Query, _request(want - len(got), page_tail, after_seq=after, **filters)
        )
        got.extend(resp.entries)
        after += resp.scanned
        if len(got) >= want or not resp.scanned or after >= resp.head_seq:
            return got, after
        page_tail = False


def _identity_filters(obj: CliContext, filters: dict[str, Any]) -> dict[str, Any]:
    """filters with --caller, --principal and --agent given as KIND/NAME (or TRUST_DOMAIN/KIND/NAME) completed to
    the SPIFFE id in the mesh's trust domain, as `hivemesh allow` does (`access.spiffe_id`; `client/*` is a glob
    over the client ids). A SPIFFE id or a glob over one (`*reporter`) is kept as given. A value that can match no
    SPIFFE id (a bare name) is a usage error: it used to print "no matching audit records" and exit 0."""
    td: str | None = None
    done = dict(filters)
    for name in IDENTITY_FILTERS:
        value: str = filters[name]
        if not value or value.startswith(SCHEME):
            continue
        parts = value.split("/")
        short = (len(parts) == 2 and parts[0] in IDENTITY_KINDS) or (
            len(parts) == 3 and parts[1] in IDENTITY_KINDS and not any(c in parts[0] for c in _GLOB_CHARS))
        if short:
            td = td or operator_trust_domain(obj)
            try:
                done[name] = spiffe_id(value, td, what=f"--{name}", globs=True)
            except ValueError as exc:
                raise click.BadParameter(str(exc), param_hint=f"--{name}") from None
        elif not any(c in value for c in _GLOB_CHARS):
            raise click.BadParameter(
                f"{value!r} matches no identity: give a SPIFFE id (spiffe://TRUST_DOMAIN/KIND/NAME), KIND/NAME (KIND "
                f"one of {', '.join(sorted(IDENTITY_KINDS))}), or a glob over SPIFFE ids such as '*{value}'",
                param_hint=f"--{name}")
    return done


def _identity_help(what: str, example: str) -> str:
    kind, name = example.split("/")
    return (f"{what}: a SPIFFE id, or KIND/NAME ({example}) in the mesh's trust domain; globs allowed ({kind}/*, "
            f"*{name}).")


def _query_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    for opt in reversed([
        click.option("--caller", default="", help=_identity_help("The caller", "client/orders")),
        click.option("--capability", default="", help="Capability (glob)."),
        click.option("--decision", type=click.Choice(sorted(DECISIONS)), default=None),
        click.option("--kind", type=click.Choice(sorted(KINDS)), default=None,
                     help="inbound calls, outbound refusals, TLS handshake refusals, or the control plane's own."),
        click.option("--principal", default="",
                     help=_identity_help("The original principal of a delegated call", "client/orders")),
        click.option("--agent", default="", help=_identity_help("The node that recorded it", "agent/echo")),
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
@click.option("-n", "--lines", "limit", type=RECORDS, default=20, show_default=True,
              help="How many of the newest records.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new records as they arrive (Ctrl-C stops).")
@_query_options
@click.option("--json", "as_json", is_flag=True, help="One JSON entry per line.")
@pass_cli
@friendly_errors
def audit_tail(obj: CliContext, /, limit: int, follow: bool, as_json: bool, **filters: Any) -> None:
    """The newest audit records (optionally filtered), oldest of them first. With -f, the table's header is
    printed once and each new record as a row under it."""
    filters = _identity_filters(obj, filters)
    printer = _Printer(as_json)

    async def go(cp: ControlPlaneClient) -> None:
        lines, after = await _fetch(cp, limit, True, **filters)
        printer.print(_entries(lines))
        while follow:
            await asyncio.sleep(1.0)
            lines, after = await _fetch(cp, 1000, False, after_seq=after, **filters)
            printer.print(_entries(lines), say_none=False)

    with contextlib.suppress(KeyboardInterrupt):
        as_operator(obj, go)


@audit.command("query")
@_query_options
@click.option("--limit", type=RECORDS, default=100, show_default=True, help="At most this many records.")
@click.option("--json", "as_json", is_flag=True, help="One JSON entry per line.")
@pass_cli
@friendly_errors
def audit_query(obj: CliContext, /, limit: int, as_json: bool, **filters: Any) -> None:
    """Records matching every given filter, oldest first."""
    filters = _identity_filters(obj, filters)
    lines, _ = as_operator(obj, lambda cp: _fetch(cp, limit, False, **filters))
    _print(_entries(lines), as_json)


@dataclass
class _Fetched:
    """What the CLI got from the control plane for one verify or export."""

    lines: list[bytes] = field(default_factory=list)
    checkpoints: list[bytes] = field(default_factory=list)
    pem: str = ""
    head: bytes = b""
    latest: bytes = b""
    exports: list[bytes] = field(default_factory=list)
    key_cert_pem: bytes = b""


async def _download(cp: ControlPlaneClient) -> _Fetched:
    """The log up to a head signed for this export (its first chunk), the checkpoints and the key certificate."""
    got = _Fetched()
    try:
        stream: Any = cp.audit.Export(audit_pb2.ExportRequest(), timeout=EXPORT_TIMEOUT_S)  # async in grpc.aio
        async for chunk in stream:
            got.lines.extend(chunk.entries)
            got.head = got.head or chunk.head
    except grpc.aio.AioRpcError as exc:
        raise rpc_failure(exc, cp.address, timeout_s=EXPORT_TIMEOUT_S) from exc
    cps: audit_pb2.CheckpointsResponse = await cp.call(cp.audit.Checkpoints, audit_pb2.CheckpointsRequest())
    got.checkpoints, got.pem, got.key_cert_pem = list(cps.checkpoints), cps.public_key_pem, cps.key_cert_pem
    return got


async def _heads(cp: ControlPlaneClient) -> _Fetched:
    resp: audit_pb2.HeadResponse = await cp.call(cp.audit.Head, audit_pb2.HeadRequest())
    return _Fetched(latest=resp.latest, exports=list(resp.exports), key_cert_pem=resp.key_cert_pem)


def _file_lines(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        for raw in f:
            yield raw.rstrip(b"\n")


NO_SIGNATURE: Final = "no signature was checked"


def _report(report: LogReport, as_json: bool, what: str, *, untrusted: str = "") -> None:
    """Print the verdict; exit 1 when the log is not intact or when no trusted key checked any signature."""
    ok = report.ok and not untrusted
    if as_json:
        doc = report.to_json()
        doc["ok"] = ok
        if untrusted:
            doc["untrusted"] = f"{NO_SIGNATURE}: {untrusted}"
        click.echo(json.dumps(doc, sort_keys=True))
    elif not report.ok:
        p = report.problem
        assert p is not None
        err.print(f"[red]TAMPERED[/red] {escape(clean(what))}: first bad record seq {clean(p.seq)} (line "
                  f"{clean(p.line)}): {escape(clean(p.reason))}", markup=True, highlight=False)
    elif untrusted:
        err.print(f"[yellow]UNVERIFIED[/yellow] {escape(clean(what))}: the chain of {report.entries} entries links, "
                  f"but {escape(NO_SIGNATURE)} ({escape(clean(untrusted))}): a cut tail or forged checkpoints cannot "
                  "be told apart", markup=True, highlight=False)
    else:
        head = f"; signed head {report.head_no} covers it" if report.head_no else ""
        # A copy that took up the chain after older checkpoints were trimmed starts past 1: say so, not hide it.
        since = f" (from checkpoint {report.first_checkpoint})" if report.first_checkpoint > 1 else ""
        out.print(f"[green]OK[/green] {escape(clean(what))}: {report.entries} entries, {report.sources} source "
                  f"chain(s), {report.checkpoints} signed checkpoint(s){since} checked; head seq {report.head_seq} "
                  f"{escape(clean(report.head_hash[:16]))}…{escape(clean(head))}", markup=True, highlight=False)
    if not ok:
        sys.exit(1)


def _trusted_key(obj: CliContext, key_file: Path | None, key_cert_pem: bytes) -> ed25519.Ed25519PublicKey:
    """The pinned key (--key), or the control plane's checkpoint-key certificate checked against the operator's
    own trust bundle (never a key from the control plane's word alone, or from an exported folder)."""
    if key_file is not None:
        try:
            return load_public_key(key_file.read_bytes())
        except ValueError as exc:
            raise click.ClickException(f"--key {key_file}: {exc}") from None
    if not key_cert_pem:
        raise click.ClickException("the control plane sent no checkpoint-key certificate")
    bundle = (obj.certs_dir / "ca.pem").read_bytes()
    try:
        return trusted_key_from_cert(key_cert_pem, bundle, trust_domain_of_bundle(bundle))
    except ValueError as exc:
        raise click.ClickException(f"refusing the control plane's checkpoint key: {exc}") from None


def _checked_head(raw: bytes, key: ed25519.Ed25519PublicKey, what: str) -> dict[str, Any]:
    """The head in raw, signed by key; else a refusal naming what (exit 1), never a traceback or UNAVAILABLE."""
    try:
        return verify_head(raw, key)
    except ValueError as exc:
        raise click.ClickException(f"refusing {what}: {exc}") from None
    except RecursionError:  # json's decoder recurses: a few thousand nested brackets exhaust the stack
        raise click.ClickException(f"refusing {what}: the head is not a signed audit head (JSON nested too "
                                   "deeply)") from None


def _export_head(raw: bytes) -> dict[str, Any]:
    """The head the control plane signed for an export ({} when it sent none); ClickException when it is not a
    JSON object (nothing is written then). Its signature is checked by `verify`, which has a trusted key."""
    if not raw:
        return {}
    try:
        head = json_depth.loads(raw)
    except (ValueError, RecursionError):
        head = None
    if not isinstance(head, dict):
        raise click.ClickException("the control plane's export head is not a signed audit head (not a JSON "
                                   "object): nothing was written")
    return head


def _pick_head(
    lines: list[bytes], heads: list[dict[str, Any]], latest: dict[str, Any] | None
) -> dict[str, Any] | None:
    """The head an export folder is compared with: the export head it ends at, else the first signed head past
    its end (so what is missing is named), else the latest."""
    end_seq, end_hash = 0, ""
    with contextlib.suppress(ValueError, IndexError, KeyError, TypeError):
        last = json_depth.loads(lines[-1])
        end_seq, end_hash = int(last["seq"]), str(last["hash"])
    for head in heads:
        if head["log_seq"] == end_seq and head["head"] == end_hash:
            return head
    later = [h for h in heads if h["log_seq"] > end_seq]
    if later:
        return min(later, key=lambda h: int(h["log_seq"]))
    if latest is not None and int(latest["log_seq"]) > end_seq:
        return latest
    candidates = [h for h in [*heads, latest] if h is not None]
    return max(candidates, key=lambda h: int(h["log_seq"])) if candidates else None


@audit.command("verify")
@click.option("--key", "key_file", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="Pinned checkpoint public key (PEM); default: the control plane's key certificate, checked "
                   "against your trust bundle (ca.pem).")
@click.option("--file", "log_file", type=click.Path(exists=True, path_type=Path), default=None,
              help="Verify an export folder (or its log.jsonl), or a node's spool directory.")
@click.option("--checkpoints", "cp_file", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              default=None, help="With --file LOG: the exported checkpoints.jsonl.")
@click.option("--head", "head_file", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="Compare with this signed head (an export's head.json kept apart) instead of asking the "
                   "control plane for its signed heads.")
@click.option("--json", "as_json", is_flag=True)
@pass_cli
@friendly_errors
def audit_verify(obj: CliContext, key_file: Path | None, log_file: Path | None, cp_file: Path | None,
                 head_file: Path | None, as_json: bool) -> None:
    """Prove the log is intact: every chain links, nothing changed, deleted, inserted or reordered, it matches
    every signed checkpoint, and nothing a signed head covers is missing (a cut tail or cut trailing
    checkpoints are named). Exits 1 when it is not, and when no trusted key checked a signature."""
    started = time.perf_counter()
    if log_file is not None and log_file.is_dir() and not (log_file / "log.jsonl").exists():
        segments = sorted(log_file.glob("audit-*.log"))

        def spool_lines() -> Iterator[bytes]:
            for seg in segments:
                yield from _file_lines(seg)

        first, prev = _spool_start(segments)
        count, problem = verify_chain(spool_lines(), first_seq=first, prev=prev)
        rep = LogReport(entries=count, sources=1, problem=problem, head_seq=first + count - 1)
        _report(rep, as_json, f"spool {log_file}")
        return
    if log_file is None:
        got = as_operator(obj, _download)
        key = _trusted_key(obj, key_file, got.key_cert_pem)
        head_raw = head_file.read_bytes() if head_file is not None else got.head
        signed = _checked_head(head_raw, key, "the control plane's export head" if head_file is None else
                               str(head_file))
        report = verify_log(got.lines, got.checkpoints, key, signed)
        _report(report, as_json, f"control-plane log ({time.perf_counter() - started:.1f} s)")
        return
    log_path = log_file / "log.jsonl" if log_file.is_dir() else log_file
    cp_path: Path | None = cp_file or (log_file / "checkpoints.jsonl" if log_file.is_dir() else None)
    lines = list(_file_lines(log_path))
    cps = [c for c in _file_lines(cp_path) if c] if cp_path is not None and cp_path.exists() else []
    fetched: _Fetched | None = None
    if key_file is None or head_file is None:
        try:
            fetched = as_operator(obj, _heads)
        except (HivemeshError, OSError, click.ClickException) as exc:
            if key_file is None:
                _report(verify_log(lines, cps), as_json, str(log_file),
                        untrusted=f"no --key given and the control plane's certified key cannot be had: {exc}")
                return
            raise click.ClickException(f"no --head given and the control plane's signed heads cannot be had: "
                                       f"{exc}") from None
    key = _trusted_key(obj, key_file, fetched.key_cert_pem if fetched is not None else b"")
    head: dict[str, Any] | None
    if head_file is not None:
        head = _checked_head(head_file.read_bytes(), key, str(head_file))
    else:
        assert fetched is not None
        heads = [_checked_head(h, key, "an export head from the control plane") for h in fetched.exports]
        latest = _checked_head(fetched.latest, key, "the control plane's latest head") if fetched.latest else None
        head = _pick_head(lines, heads, latest)
    report = verify_log(lines, cps, key, head)
    _report(report, as_json, str(log_file))


def _spool_start(segments: list[Path]) -> tuple[int, str]:
    """Where a spool's chain starts (its first record's seq and prev; shipped segments are gone): (1, genesis)
    unless that record is well-formed, so a mangled first line is reported by the chain check as TAMPERED,
    like any other problem, never a traceback."""
    for seg in segments:
        for raw in _file_lines(seg):
            try:
                first = json_depth.loads(raw)
            except (ValueError, RecursionError):
                return 1, GENESIS
            if isinstance(first, dict) and not link_fields_problem(first):
                return int(first["seq"]), str(first["prev"])
            return 1, GENESIS
    return 1, GENESIS


@audit.command("export")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory for log.jsonl, checkpoints.jsonl, head.json and the checkpoint key.")
@pass_cli
@friendly_errors
def audit_export(obj: CliContext, out_dir: Path) -> None:
    """Download the whole log with its checkpoints and the head signed for this export, to archive or verify
    offline. Keep head.json somewhere else too: `verify --file DIR --head IT` then needs no control plane."""
    got = as_operator(obj, _download)
    head = _export_head(got.head)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "log.jsonl").write_bytes(b"".join(line + b"\n" for line in got.lines))
    (out_dir / "checkpoints.jsonl").write_bytes(b"".join(c + b"\n" for c in got.checkpoints))
    (out_dir / "head.json").write_bytes(got.head + b"\n")
    (out_dir / "checkpoint-key.pem").write_text(got.pem)
    (out_dir / "checkpoint-key.crt").write_bytes(got.key_cert_pem)
    out.print(f"exported {len(got.lines)} entries and {len(got.checkpoints)} checkpoints to {clean(out_dir)}; "
              f"signed head {clean(head.get('head_no', '?'))} covers seq {clean(head.get('log_seq', '?'))}",
              highlight=False)
