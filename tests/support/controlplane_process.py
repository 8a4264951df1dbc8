"""A real `hivemesh controlplane` process for a test: started on free ports against a test's etcd, its ready line
read, stopped on exit (continued first, should the test have frozen it with SIGSTOP)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from hivemesh.mesh.audit.handshake.switch import child_environment
from tests.support.meshenv import TRUST_DOMAIN
from tests.support.spawn import REPO, stop


@dataclass(frozen=True)
class ControlPlaneProcess:
    proc: asyncio.subprocess.Process
    controlplane: str
    """Its mutual-TLS address, from its ready line."""
    join: str
    """Its join address."""
    log: Path
    """Its stderr."""


@contextlib.asynccontextmanager
async def controlplane_process(tmp: Path, certs: Path, etcd: str, *, launched: bool = True,
                               extra: Sequence[str] = ()) -> AsyncIterator[ControlPlaneProcess]:
    """A control plane with its state under tmp, the CA in certs, etcd at etcd. launched: with the environment a
    launcher gives it (the handshake tracer on, as `hivemesh up` does); extra: more `controlplane` arguments."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HIVEMESH_") and k != "GRPC_TRACE"}
    if launched:
        env.update(child_environment({}, inherit=env))
    log = tmp / "controlplane.log"
    with log.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "hivemesh.controlplane.cli", "--certs-dir", str(certs), "--home", str(tmp / "home"),
            "controlplane", "--etcd", etcd, "--state-dir", str(tmp / "state"), "--trust-domain", TRUST_DOMAIN,
            *extra, cwd=REPO, env=env, stdout=asyncio.subprocess.PIPE, stderr=err, start_new_session=True,
        )
    try:
        assert proc.stdout is not None
        try:
            line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        except TimeoutError:
            line = ""
        m = re.match(r"ready controlplane=(\S+) join=(\S+)", line)
        assert m, f"the control plane said {line!r}: {log.read_text()[-3000:]}"
        yield ControlPlaneProcess(proc, m.group(1), m.group(2), log)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)  # a stopped process never handles the SIGTERM that stop() sends
        await stop(proc)
