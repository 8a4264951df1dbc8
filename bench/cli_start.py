"""What one `hivemesh` command costs to start: each command's module loaded on its own, against every command's.

The root group loads a command's module only when that command runs (`controlplane/cli/app.py`, COMMANDS). Until
7 Dec it imported all of them first, so `hivemesh --version` loaded the control plane, the SDK, rich and A2A, and
so did every sidecar (`hivemesh sidecar`). This measures both ways in one run, interleaved: `lazy` is the command
as shipped; `eager` is the same command after loading every command's module first, as before. `python -c pass`
is the floor. Each case is a fresh process; CPU is its user+sys time and memory its peak RSS (`os.wait4`).

    .venv/bin/python bench/cli_start.py                  # 7 rounds (~1 min on 2 cores)
    .venv/bin/python bench/cli_start.py --rounds 15 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = (["--version"], ["agents", "--help"], ["sidecar", "--help"], ["policy", "--help"])
_EAGER = ("import sys; from hivemesh.controlplane.cli import app; "
          "[app.cli.get_command(None, name) for name in app.COMMANDS]; "
          "sys.argv = ['hivemesh', *sys.argv[1:]]; app.main()")


def _run(argv: list[str]) -> tuple[float, float, float]:
    """(wall s, CPU s, peak RSS MiB) of one process, its output discarded."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    _pid, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{argv} exited {proc.returncode}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", type=Path, help="also save every sample here")
    args = parser.parse_args()
    py = sys.executable
    cases: dict[str, list[str]] = {"floor: python -c pass": [py, "-c", "pass"]}
    for words in COMMANDS:
        shown = " ".join(words)
        cases[f"lazy: hivemesh {shown}"] = [py, "-m", "hivemesh.controlplane.cli", *words]
        cases[f"eager: hivemesh {shown}"] = [py, "-c", _EAGER, *words]
    samples: dict[str, list[tuple[float, float, float]]] = {name: [] for name in cases}
    for argv in cases.values():  # one warm-up each: byte-code caches, the page cache
        _run(argv)
    for _ in range(args.rounds):
        for name, argv in cases.items():
            samples[name].append(_run(argv))
    medians = {name: tuple(statistics.median(s[i] for s in runs) for i in range(3)) for name, runs in samples.items()}
    lines = [f"# {platform.node()} {os.cpu_count()} CPUs, Python {platform.python_version()}, {args.rounds} rounds; "
             "medians", "| case | wall ms | CPU ms | peak RSS MiB | CPU vs eager |", "|---|---|---|---|---|"]
    for name, (wall, cpu, rss) in medians.items():
        eager = medians.get(name.replace("lazy:", "eager:")) if name.startswith("lazy:") else None
        ratio = f"{cpu / eager[1]:.2f}x" if eager else ""
        lines.append(f"| {name} | {wall * 1000:.0f} | {cpu * 1000:.0f} | {rss:.0f} | {ratio} |")
    sys.stdout.write("\n".join(lines) + "\n")
    if args.json:
        args.json.write_text(json.dumps({"rounds": args.rounds, "samples": samples}, indent=1))


if __name__ == "__main__":
    main()
