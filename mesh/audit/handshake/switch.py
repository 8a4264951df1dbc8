"""Whether this process audits its TLS handshake refusals, and turning gRPC's handshaker tracer on for it.

Two settings decide it:
- the process's consent to have its standard error routed through the tee. A process hivemesh owns (the
  sidecar, the control plane, `python -m hivemesh.agents.run`) gives it by calling `enable()`; a program that
  embeds an SDK agent gives it only if it asks, by calling `enable()` too or with `HIVEMESH_AUDIT_HANDSHAKES=1`.
  Without it nothing touches that program's stderr. `HIVEMESH_AUDIT_HANDSHAKES=0` always wins: off.
- gRPC's `handshaker` tracer (`GRPC_TRACE=handshaker`). grpcio reads GRPC_TRACE exactly once, when its core
  loads at `import grpc` (pinned grpcio 1.85.1: setting it after the import has no effect, see
  tests/e2e/test_handshake_switch.py). So `enable()` can only turn it on in a process that has not imported
  grpc yet: the `hivemesh` entry point calls it for `sidecar` and `controlplane` before their modules load, and
  a launcher whose program loads gRPC first sets the variable itself (`child_environment`, as `hivemesh up` does).

No process is ever restarted for it. This module imports nothing of gRPC, so a main can call `enable()` first.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Final

ENV: Final = "HIVEMESH_AUDIT_HANDSHAKES"
"""1: this process audits the TLS handshakes it refuses (opt in); 0: it does not, even if it would by default."""
TRACER: Final = "handshaker"
"""The gRPC tracer whose output carries handshake failures."""
_GRPC_CORE: Final = "grpc._cython.cygrpc"
"""The module whose import loads gRPC's core, which reads GRPC_TRACE."""
_ON: Final = ("1", "true", "yes", "on")
_OFF: Final = ("0", "false", "no", "off")

_enabled = False


def _setting(environ: Mapping[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    return env.get(ENV, "").strip().lower()


def opted_out(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the operator turned the handshake audit off (`HIVEMESH_AUDIT_HANDSHAKES=0`)."""
    return _setting(environ) in _OFF


def opted_in() -> bool:
    """Whether this process consented to the audit (its stderr then goes through the tee): `enable()` was
    called or `HIVEMESH_AUDIT_HANDSHAKES=1` is set, and it is not turned off."""
    return not opted_out() and (_enabled or _setting() in _ON)


def with_tracer(value: str | None) -> str:
    """A GRPC_TRACE value that also enables the handshaker tracer (other tracers asked for are kept)."""
    names = [n.strip() for n in (value or "").split(",") if n.strip()]
    if TRACER in names or "all" in names:
        return ",".join(names)
    return ",".join([*names, TRACER])


def tracer_requested(value: str | None) -> bool:
    """Whether a GRPC_TRACE value enables the handshaker tracer."""
    names = {n.strip() for n in (value or "").split(",")}
    return bool(names & {TRACER, "all"}) and f"-{TRACER}" not in names


def tracer_on() -> bool:
    """Whether gRPC's handshaker tracer is on in this process (or will be, when gRPC loads). Only `enable()`
    changes GRPC_TRACE in-process, and only before gRPC loads, so the variable tells the truth."""
    return tracer_requested(os.environ.get("GRPC_TRACE"))


def enable() -> bool:
    """Audit the TLS handshakes this process refuses (unless `HIVEMESH_AUDIT_HANDSHAKES=0`): consent to the
    stderr tee, and turn gRPC's handshaker tracer on if gRPC has not loaded yet. Call it first thing in a main.
    Returns whether the tracer is (or will be) on."""
    global _enabled
    if opted_out():
        return False
    _enabled = True
    if _GRPC_CORE not in sys.modules:
        os.environ["GRPC_TRACE"] = with_tracer(os.environ.get("GRPC_TRACE"))
    return tracer_on()


def child_environment(env: Mapping[str, str], *, inherit: Mapping[str, str]) -> dict[str, str]:
    """env, plus the handshaker tracer and the consent, for a mesh process about to start with inherit + env as
    its environment (unless that opts out): what a launcher such as `hivemesh up` sets."""
    merged = {**inherit, **env}
    if opted_out(merged):
        return dict(env)
    return {**env, "GRPC_TRACE": with_tracer(merged.get("GRPC_TRACE")), ENV: "1"}

