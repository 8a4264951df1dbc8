"""A refused TLS handshake shows on the node's `/metrics`. The handshake audit reads gRPC's tracer, which must
be on before gRPC loads, so this runs a real owned agent process (`python -m hivemesh.agents.run ocr`, which
turns the tracer on itself), attacks its mesh port with one plaintext HTTP/2 connection, and scrapes the
metrics port it announces when serving: exactly one refusal, with the audit's reason."""

from __future__ import annotations

import asyncio
import re
import sys
import time
from pathlib import Path

import pytest

from hivemesh.mesh.audit.handshake.switch import ENV
from hivemesh.mesh.ports import free_port
from tests.e2e.test_handshake_switch import _wait_status
from tests.integration.test_metrics_mesh import sample, scrape
from tests.support.meshenv import MeshEnv
from tests.support.spawn import REPO, child_env, stop
from tests.support.tls_attacks import H2_PREFACE, raw_attempt

REFUSALS = "hivemesh_tls_handshake_refusals_total"


async def _metrics_address(log: Path, err: Path, timeout: float = 60) -> str:
    """HOST:PORT of the metrics port the process announces: `serving ... metrics=HOST:PORT` on stdout when it
    serves several agents, `agent ocr serving on ... (metrics HOST:PORT)` in its log when it serves one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(r"serving .*metrics[= ]([0-9.]+:[0-9]+)", _said(log) + _said(err))
        if m is not None:
            return m.group(1)
        await asyncio.sleep(0.1)
    raise AssertionError(f"no metrics port announced within {timeout} s:\n{_said(err)[-2000:]}")


def _said(path: Path) -> str:
    return path.read_text(errors="replace")


@pytest.mark.slow
async def test_a_plaintext_attempt_is_one_refusal_on_the_nodes_metrics(mesh_env: MeshEnv, tmp_path: Path) -> None:
    env = await child_env(mesh_env, "ocr", tmp_path / "home")
    env = {k: v for k, v in env.items() if k not in ("GRPC_TRACE", ENV)}  # the process turns the tracer on itself
    port = free_port()
    log, err = tmp_path / "ocr.out", tmp_path / "ocr.err"  # stdout and the log apart
    with log.open("wb") as out, err.open("wb") as errs:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "hivemesh.agents.run", "ocr", "--port", str(port), cwd=REPO, env=env,
            stdout=out, stderr=errs, start_new_session=True)
    try:
        address = await _metrics_address(log, err)
        node = await _wait_status(mesh_env, "ocr", "live")
        assert node is not None and node["handshake_audit"] == "live", (node, err.read_text()[-2000:])
        before = await asyncio.to_thread(scrape, address)
        assert f"{REFUSALS}{{" not in before, before  # nothing refused yet: no series

        await asyncio.to_thread(raw_attempt, port, H2_PREFACE)
        deadline = time.monotonic() + 30
        text = before
        while f"{REFUSALS}{{" not in text and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            text = await asyncio.to_thread(scrape, address)
        assert sample(text, REFUSALS, reason="TLS_PLAINTEXT") == 1, text
        # Only that one refusal, under no other reason.
        assert [line for line in text.splitlines() if line.startswith(f"{REFUSALS}{{")] == [
            f'{REFUSALS}{{reason="TLS_PLAINTEXT"}} 1.0'], text
        assert proc.returncode is None
    finally:
        await stop(proc)
