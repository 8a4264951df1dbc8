"""Child processes start by vfork + exec, never by a fork() of a process that may run gRPC.

A fork() copies a process whose gRPC threads are gone in the copy; gRPC's fork handlers then run there, and the
child may die before its exec (measured: 38 of 200 children of a process making gRPC calls, by SIGSEGV, when a
`preexec_fn` forced the fork; the SIGABRT "epoll_wait error" of earlier full runs was the same). Limits for a
child are set by an exec wrapper instead (`tests.support.rlimits`), checked here for real, and the repository's
code is read for anything that forks such a process again.
"""

from __future__ import annotations

import ast
import errno
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.rlimits import limited

REPO = Path(__file__).resolve().parents[2]
SOURCES = ("mesh", "controlplane", "sdk", "agents", "tests", "bench", "examples")
FORK_ALLOWED = {"tests/support/cli_zygote.py": "a zygote that never runs gRPC forks each CLI run from itself"}


def _child(code: str, **limits: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(limited([sys.executable, "-c", code], **limits), capture_output=True, text=True,
                          timeout=60, check=False)


def test_the_wrapper_sets_both_limits_and_leaves_others_as_they_are() -> None:
    code = ("import resource; print(resource.getrlimit(resource.RLIMIT_FSIZE)[0], "
            "resource.getrlimit(resource.RLIMIT_AS)[0])")
    done = _child(code, file_bytes=4096, address_space=3 << 30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["4096", str(3 << 30)]

    only_files = _child(code, file_bytes=4096)
    assert only_files.stdout.split() == ["4096", str(resource.getrlimit(resource.RLIMIT_AS)[0])]


def test_a_write_past_the_file_limit_fails_with_efbig_and_does_not_kill(tmp_path: Path) -> None:
    target = tmp_path / "big"
    code = (f"f = open({str(target)!r}, 'wb', buffering=0)\nprint(f.write(b'x' * 2048))\n"
            "try:\n    f.write(b'y')\nexcept OSError as e:\n    print('refused', e.errno)\n")
    done = _child(code, file_bytes=2048)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["2048", "refused", str(errno.EFBIG)]
    assert target.stat().st_size == 2048


def test_an_allocation_past_the_address_space_fails_in_the_child_only() -> None:
    done = _child("import sys\ntry:\n    b = bytearray(1 << 30)\nexcept MemoryError:\n    sys.exit(7)\n",
                  address_space=512 << 20)
    assert done.returncode == 7, (done.returncode, done.stderr)
    assert bytearray(1 << 20)  # this process keeps its own limit


@pytest.mark.parametrize("command, limits", [([], {}), (["python3"], {}), ([sys.executable], {"file_bytes": -1})])
def test_the_wrapper_refuses_what_it_cannot_run(command: list[str], limits: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        limited(command, **limits)


def _forks(path: Path) -> list[str]:
    """What in one module forks its process: a `preexec_fn=` argument, `os.fork()`, or a multiprocessing
    process or pool from the module itself (whose start method is fork on Linux) rather than from a context."""
    tree = ast.parse(path.read_text(), str(path))
    mp_names = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.Import)
                for a in n.names if a.name == "multiprocessing"}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        if any(k.arg == "preexec_fn" for k in node.keywords):
            found.append(f"{node.lineno}: preexec_fn")
        f = node.func
        if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
            if f.value.id == "os" and f.attr in ("fork", "forkpty"):
                found.append(f"{node.lineno}: os.{f.attr}()")
            if f.value.id in mp_names and f.attr in ("Process", "Pool", "Queue"):
                found.append(f"{node.lineno}: {f.value.id}.{f.attr}() with the default start method")
    return found


def _modules() -> list[Path]:
    return sorted(p for top in SOURCES for p in (REPO / top).rglob("*.py")
                  if not any(part.startswith(".") for part in p.relative_to(REPO).parts))


def test_nothing_in_the_repository_forks_a_process_that_may_run_grpc() -> None:
    modules = _modules()
    assert len(modules) > 300 and REPO / "tests/support/cli_zygote.py" in modules
    found = {str(p.relative_to(REPO)): hits for p in modules if (hits := _forks(p))}
    assert set(found) <= set(FORK_ALLOWED), {k: v for k, v in found.items() if k not in FORK_ALLOWED}
    assert found.keys() == FORK_ALLOWED.keys(), "the allowed fork is gone: drop it from FORK_ALLOWED"


def test_the_reader_finds_each_kind_of_fork(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("import os, subprocess\nimport multiprocessing as mp\n"
                      "subprocess.run(['x'], preexec_fn=os.setsid)\nos.fork()\nmp.Process(target=print)\n"
                      "mp.get_context('spawn').Process(target=print)\nsubprocess.run(['x'], start_new_session=True)\n")
    assert _forks(sample) == ["3: preexec_fn", "4: os.fork()", "5: mp.Process() with the default start method"]
