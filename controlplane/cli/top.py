"""`hivemesh top`: a live terminal view of every capability and instance, from the nodes' `/metrics`.

Targets are the Prometheus file-SD JSON (`--targets FILE`, re-read every refresh so new nodes appear) plus any
`--endpoint HOST:PORT`; with neither (or `--discover`), also every node whose status entry names its metrics
address (read as the operator, like `hivemesh status`): `hivemesh up` writes files only for the nodes it starts,
so an agent started by hand was never shown. The numbers come from `hivemesh.controlplane.livestats` (two
scrapes, their difference); this module only draws them and reads keys: c, e, p, $ sort by calls, errors, p99,
cost; q (or Ctrl-C) quits.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import sys
import termios
import threading
import time
import tty
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import click
from rich.console import Group
from rich.live import Live
from rich.text import Text

from hivemesh.controlplane import livestats
from hivemesh.controlplane.cli.context import CliContext, as_operator, err, friendly_errors, out, pass_cli
from hivemesh.controlplane.cli.output import CleanTable, clean
from hivemesh.controlplane.livestats import SORT_KEYS, Row, Target, View
from hivemesh.controlplane.metrics_sd import targets_from_status

_SD_DIR: Final = "prometheus"
"""Where `hivemesh up` writes its Prometheus file-SD files, under the state folder."""
_SORT_BY_KEY: Final = {"c": "calls", "e": "errors", "p": "p99", "$": "cost"}
_BREAKER_STYLE: Final = {"closed": "green", "half-open": "yellow", "open": "bold red"}
DISCOVER_EVERY_S: Final = 10.0
"""How often the nodes' status is asked again for new nodes: a control-plane connection per ask, and a new node
publishes within ~2 s, so a node started later shows within ~12 s."""


def _discover(obj: CliContext) -> list[Target]:
    """The metrics ports the mesh's nodes publish in their status (as `hivemesh status` reads it)."""
    from hivemesh.controlplane.cli.policy_client import PolicyClient

    nodes = as_operator(obj, lambda cp: PolicyClient(cp).status())
    return [Target(t.address, {"job": t.job, "node": t.node}) for t in targets_from_status(nodes)]


class _Targets:
    """The targets now: the file's (re-read each time; a file being rewritten keeps the last good list), the
    fixed endpoints, and what discover() found (asked every DISCOVER_EVERY_S; a failed ask keeps the last list).

    `rediscover` asks in the caller's thread (the first list, before the first scrape); later asks run in a
    thread of their own, so a control plane that does not answer (up to its 10 s timeout) never freezes the
    view. One at a time: the ask runs gRPC's asyncio on a loop of its own, and two at once are not supported."""

    def __init__(self, paths: Sequence[Path], endpoints: Sequence[str],
                 discover: Callable[[], list[Target]] | None = None) -> None:
        self._paths = list(paths)
        self._fixed = [livestats.parse_endpoint(e) for e in endpoints]
        self._last: dict[Path, list[Target]] = {p: livestats.load_targets(p) for p in self._paths}
        self._discover = discover
        self._found: list[Target] = []
        self._asked = -DISCOVER_EVERY_S
        self._asking: threading.Thread | None = None
        self.discover_error = ""
        """Why the last discovery failed ("" when it did not): said once, as a note, while the rest are shown."""

    def rediscover(self) -> None:
        """Ask discover() now (a failure is kept in discover_error, with the last list)."""
        if self._discover is None:
            return
        self._asked = time.monotonic()
        try:
            self._found, self.discover_error = self._discover(), ""
        except Exception as exc:  # noqa: BLE001 - a mesh not answering must not stop the view of the files' nodes
            self.discover_error = str(exc) or type(exc).__name__

    def now(self) -> list[Target]:
        for path in self._paths:
            with contextlib.suppress(ValueError):  # caught mid-write, or removed: keep scraping what we had
                self._last[path] = livestats.load_targets(path)
        due = time.monotonic() - self._asked >= DISCOVER_EVERY_S
        if self._discover is not None and due and (self._asking is None or not self._asking.is_alive()):
            self._asked = time.monotonic()
            self._asking = threading.Thread(target=self.rediscover, name="top-discover", daemon=True)
            self._asking.start()
        unique: dict[str, Target] = {}
        for t in (*(t for p in self._paths for t in self._last[p]), *self._fixed, *self._found):
            unique.setdefault(t.address, t)
        return list(unique.values())


class _Keys:
    """Single key presses from a terminal stdin (cbreak mode, restored on exit), and SIGINT as a request to leave.

    SIGINT sets a flag and wakes `read` (a byte on a pipe) instead of raising KeyboardInterrupt wherever the main
    thread happens to be: raised inside the scrape pool's or the screen's bookkeeping, it can leave them half
    done. The view then leaves between two scrapes (a scrape waits 2 s at most), the terminal put back."""

    def __init__(self) -> None:
        self._fd = sys.stdin.fileno() if sys.stdin is not None and sys.stdin.isatty() else -1
        self._saved: list[Any] | None = None
        self._wake_r = self._wake_w = -1
        self._previous: Any = None
        self.interrupted = False

    def __enter__(self) -> _Keys:
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        if self._fd >= 0:
            self._saved = termios.tcgetattr(self._fd)
            tty.setcbreak(self._fd)
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        try:
            if self._saved is not None:
                termios.tcsetattr(self._fd, termios.TCSADRAIN, self._saved)
        finally:
            signal.signal(signal.SIGINT, self._previous)
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        self.interrupted = True
        with contextlib.suppress(OSError):  # the pipe is full: a wake-up is already waiting
            os.write(self._wake_w, b"\0")

    def read(self, timeout: float) -> str:
        """The keys pressed within timeout seconds ("" if none); returns at once after a SIGINT."""
        watched = [self._wake_r] if self._fd < 0 else [self._fd, self._wake_r]
        ready, _w, _x = select.select(watched, [], [], max(timeout, 0.0))
        if self.interrupted or self._fd not in ready:
            return ""
        return os.read(self._fd, 64).decode("utf-8", "replace")


def _num(v: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def _cost(per_min: dict[str, float]) -> str:
    return " ".join(f"{v:.4f} {cur}".rstrip() for cur, v in sorted(per_min.items())) or "-"


def _cells(r: Row) -> list[str | Text]:
    breaker = Text(r.breaker or "-", style=_BREAKER_STYLE.get(r.breaker, "dim"))
    errors = _num(r.error_pct, "{:.1f}%")
    return [_num(r.calls_per_s), Text(errors, style="red" if (r.error_pct or 0) >= 1 else ""),
            _num(r.p50_ms), _num(r.p99_ms), breaker, str(r.in_flight), str(r.queue),
            _num(r.tokens_per_s), _cost(r.cost_per_min)]


def render(view: View | None, *, sort: str, interval: float, live: bool) -> Group:
    """The screen: a header, one row per capability with its instances under it, and targets that are down."""
    if view is None:
        return Group(Text("hivemesh top: first scrape taken, rates follow in a moment…", style="dim"))
    up = sum(t.up for t in view.targets)
    header = Text.assemble(
        ("hivemesh top", "bold"), f"  {view.direction} calls · sorted by {sort} · {up}/{len(view.targets)} targets up",
        f" · every {interval:g} s" if live else "",
        ("   keys: c e p $ sort · q quit" if live else "", "dim"),
    )
    table = CleanTable("capability / instance", "calls/s", "err %", "p50 ms", "p99 ms", "breaker", "in flight",
                       "queue", "tokens/s", "cost/min", expand=False, pad_edge=False, box=None, header_style="bold")
    for r in view.rows:
        table.add_row(Text(r.capability, style="bold cyan"), *_cells(r))
        for i in r.instances:
            name = Text("  └ " + i.instance, style="" if i.scraped else "dim")
            table.add_row(name, *_cells(i))
    if not view.rows:
        table.add_row(Text("(no calls seen yet)", style="dim"), *[""] * 9)
    total = view.total
    footer = Text(f"all: {_num(total.calls_per_s)} calls/s · {_num(total.tokens_per_s)} tokens/s · "
                  f"{_cost(total.cost_per_min)}/min", style="dim")
    down = [Text(f"down: {clean(t.address)} ({clean(t.error)})", style="red") for t in view.targets if not t.up]
    return Group(header, table, footer, *down)


@click.command("top")
@click.option("--targets", "targets_files", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Prometheus file-SD JSON listing the nodes' metrics ports (repeatable). Default, without "
                   "--endpoint: the files `hivemesh up` writes, <home>/prometheus/*.json.")
@click.option("--endpoint", "endpoints", multiple=True, metavar="HOST:PORT",
              help="A node's metrics port (repeatable; added to --targets).")
@click.option("--discover/--no-discover", default=None,
              help="Also scrape every node that publishes its metrics port in its status (read as the operator, "
                   "like `hivemesh status`). Default: on without --targets and --endpoint.")
@click.option("--sort", type=click.Choice(SORT_KEYS), default="calls", show_default=True,
              help="Order of capabilities and instances (largest first).")
@click.option("--direction", type=click.Choice(["inbound", "outbound"]), default="inbound", show_default=True,
              help="Calls the nodes served, or calls they made.")
@click.option("--interval", type=click.FloatRange(0.2, 60), default=1.0, show_default=True,
              help="Seconds between scrapes (rates are over this interval).")
@click.option("--once", is_flag=True, help="Scrape twice, print one view and exit.")
@click.option("--json", "as_json", is_flag=True, help="With --once: machine-readable output.")
@pass_cli
@friendly_errors
def top(obj: CliContext, targets_files: tuple[Path, ...], endpoints: tuple[str, ...], discover: bool | None,
        sort: str, direction: str, interval: float, once: bool, as_json: bool) -> None:
    """Live calls/s, p50/p99, error %, breaker state, in-flight, queue, tokens/s and cost/min per capability and
    instance, refreshed from every node's /metrics (their plaintext ports: no identity needed)."""
    if as_json and not once:
        raise click.UsageError("--json needs --once (one view for a script)")
    chosen = bool(targets_files or endpoints)
    if discover is None:
        discover = not chosen
    if not chosen:
        targets_files = tuple(sorted((obj.home / _SD_DIR).glob("*.json")))
    targets = _Targets(targets_files, endpoints, (lambda: _discover(obj)) if discover else None)
    targets.rediscover()
    if not targets_files and not endpoints and not targets.now():
        why = f" (asking the mesh for its nodes failed: {targets.discover_error})" if targets.discover_error else \
            " (no node publishes its metrics port in its status)" if discover else ""
        raise click.UsageError(f"say what to scrape: --targets FILE (file-SD JSON; none in {obj.home / _SD_DIR},"
                               f" where `hivemesh up` writes them) and/or --endpoint HOST:PORT{why}")
    if targets.discover_error:
        err.print(f"note: nodes outside the target files (agents started by hand) are not shown; asking the mesh "
                  f"for them failed: {clean(targets.discover_error)}", style="dim", highlight=False)
    if once:
        _once(targets, sort=sort, direction=direction, interval=interval, as_json=as_json)
        return
    if not out.is_terminal:
        raise click.UsageError("not a terminal: use --once (with --json for scripts)")
    _live(targets, sort=sort, direction=direction, interval=interval)


def _once(targets: _Targets, *, sort: str, direction: str, interval: float, as_json: bool) -> None:
    before = livestats.scrape_all(targets.now())
    time.sleep(interval)  # the rate window: what a one-shot view of rates costs
    view = livestats.compute(before, livestats.scrape_all(targets.now()), direction=direction).sorted(sort)
    if as_json:
        click.echo(json.dumps({"interval_s": interval, "sort": sort, **view.to_json()}, indent=2))
    else:
        out.print(render(view, sort=sort, interval=interval, live=False))
    if not any(t.up for t in view.targets):
        err.print("[red]error:[/red] no target answered", markup=True, highlight=False)
        sys.exit(1)


def _live(targets: _Targets, *, sort: str, direction: str, interval: float) -> None:
    before = livestats.scrape_all(targets.now())
    view: View | None = None
    with _Keys() as keys, Live(render(None, sort=sort, interval=interval, live=True), console=out,
                               screen=True, auto_refresh=False) as live:
        while not keys.interrupted:
            deadline = time.monotonic() + interval
            while (left := deadline - time.monotonic()) > 0 and not keys.interrupted:
                pressed = keys.read(left)
                if "q" in pressed.lower():
                    return
                for k in pressed:
                    sort = _SORT_BY_KEY.get(k, sort)
                if pressed and view is not None:
                    live.update(render(view.sorted(sort), sort=sort, interval=interval, live=True), refresh=True)
            if keys.interrupted:
                return
            after = livestats.scrape_all(targets.now())
            view = livestats.compute(before, after, direction=direction).sorted(sort)
            live.update(render(view, sort=sort, interval=interval, live=True), refresh=True)
            before = after
