"""The CLI forked from the zygote (`tests.support.cli_zygote`) answers exactly as a fresh
`python -m hivemesh.controlplane.cli` does: exit code, stdout, stderr, its environment and stdin; and a run past
its deadline is killed. The tests that run the CLI this way rely on it."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from pathlib import Path

import pytest

from tests.support import cli_zygote
from tests.support.cli_zygote import REPO, _spawned, run_hivemesh


async def test_a_forked_run_answers_as_a_fresh_interpreter_does(tmp_path: Path) -> None:
    # Not COLUMNS: the suite's xdist workers run with COLUMNS=80, and the console then folds the long tmp path at a
    # place set by its length; a fold inside "fresh" kept the replace below from matching (with pytest-15 and -16).
    env = {k: v for k, v in os.environ.items() if not k.startswith("HIVEMESH_") and k not in ("COLUMNS", "LINES")}
    env["HIVEMESH_HOME"] = str(tmp_path / "home")
    runs = [
        (["no-such-command"], None),  # 2, a usage error on stderr
        (["--certs-dir", str(tmp_path / "certs-{}"), "certs", "init"], None),  # 0, files written
        (["--certs-dir", str(tmp_path / "certs-{}"), "policy", "apply", "-f", "-"], b"kind: [\n"),  # 1, stdin read
    ]
    for args, stdin in runs:
        fresh = await _spawned([a.format("fresh") for a in args], env, REPO, stdin, 60)
        forked = await run_hivemesh([a.format("forked") for a in args], env, stdin=stdin)
        assert forked == tuple(x.replace("fresh", "forked") if isinstance(x, str) else x for x in fresh), args
    # A table sizes itself to COLUMNS, or to its content when output is not a terminal and COLUMNS is unset.
    for columns in ("50", None):
        run_env = env if columns is None else {**env, "COLUMNS": columns}
        fresh = await _spawned(["up", "--demo", "list"], run_env, REPO, None, 60)
        assert await run_hivemesh(["up", "--demo", "list"], run_env) == fresh
        assert (max(len(line) for line in fresh[1].splitlines()) == 50) == (columns == "50"), fresh[1]
    assert [code for code, *_ in [await run_hivemesh(a, env, stdin=s) for a, s in runs]] == [2, 0, 1]
    assert sorted(p.name for p in (tmp_path / "certs-forked").iterdir()) == sorted(
        p.name for p in (tmp_path / "certs-fresh").iterdir())


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


async def test_a_run_past_its_deadline_is_killed(tmp_path: Path) -> None:
    listener = socket.create_server(("127.0.0.1", 0))  # accepts connections, never answers: `call` waits 15 s
    port = listener.getsockname()[1]
    assert (await run_hivemesh(["--certs-dir", str(tmp_path / "certs"), "certs", "init"], dict(os.environ)))[0] == 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("HIVEMESH_")}
    env.update(HIVEMESH_HOME=str(tmp_path / "home"), HIVEMESH_CA=str(tmp_path / "certs" / "ca.pem"),
               HIVEMESH_CONTROLPLANE=f"127.0.0.1:{port}", HIVEMESH_ETCD=f"127.0.0.1:{port}",
               HIVEMESH_JOIN=f"127.0.0.1:{port}")
    try:
        with pytest.raises(TimeoutError):
            await run_hivemesh(["--certs-dir", str(tmp_path / "certs"), "call", "x", "--data", "{}"], env, timeout=1)
    finally:
        listener.close()
    assert cli_zygote._zygote is not None
    deadline = time.monotonic() + 5  # killed, not left to give up on its own
    while _children(cli_zygote._zygote.proc.pid):
        assert time.monotonic() < deadline, "the run past its deadline is still there"
        await asyncio.sleep(0.05)
