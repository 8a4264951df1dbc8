"""What every `hivemesh` command shares: the context object, the consoles, the one error formatter, and the one
way to run async work against the control plane.

Errors are one clear line on stderr (with the gRPC status and reason where there is one), or with `--json` one
JSON object (`output.emit_error`), and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import datetime
import functools
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from hivemesh.controlplane.cli.localmesh import where_hint
from hivemesh.controlplane.cli.output import clean, emit_error, err, out
from hivemesh.mesh import loop
from hivemesh.mesh.errors import HivemeshError
from hivemesh.mesh.etcd import EtcdNotFoundError
from hivemesh.mesh.pki import cert_expiry
from hivemesh.mesh.settings import MeshSettings

if TYPE_CHECKING:
    from hivemesh.mesh.controlplane_client import ControlPlaneClient

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")
__all__ = ["CliContext", "as_operator", "err", "friendly_errors", "out", "pass_cli", "run_async"]


@dataclass(frozen=True)
class CliContext:
    """Shared options of every command."""

    home: Path
    certs_dir: Path
    verbose: bool

    def operator_settings(self) -> MeshSettings:
        """Where the mesh is (env or the `hivemesh up` state file), acting as the operator identity. When that
        fails, a mesh running elsewhere is named rather than advising a second CA (`localmesh.where_hint`)."""
        cert, key = self.certs_dir / "operator.pem", self.certs_dir / "operator.key"
        if not cert.exists() or not key.exists():
            advice = where_hint() or ("run `hivemesh certs init` or point --certs-dir / HIVEMESH_CERTS at your "
                                      "certificates")
            raise click.ClickException(f"no operator identity in {self.certs_dir} (operator.pem/.key): {advice}")
        _refuse_expired(cert)
        try:
            return MeshSettings.resolve(cert_file=cert, key_file=key)
        except ValueError as exc:
            found = where_hint()
            raise ValueError(f"{exc}; {found}" if found else str(exc)) from None


def _refuse_expired(cert: Path) -> None:
    """An operator certificate past its notAfter is named as such: the control plane's TLS refuses it, which
    gRPC reports only as "Socket closed" (UNAVAILABLE), with no word of the certificate."""
    try:
        not_after = cert_expiry(cert.read_bytes())
    except (OSError, ValueError):
        return  # unreadable or not a certificate: loading it for the connection says what is wrong
    if not_after <= time.time():
        when = datetime.datetime.fromtimestamp(not_after, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        raise click.ClickException(f"the operator certificate {cert} expired at {when}: the control plane refuses "
                                   "it; issue a new one from the mesh's CA and put it there")


_LOCAL_CODES: dict[type[BaseException], str] = {EtcdNotFoundError: "NOT_FOUND", TimeoutError: "DEADLINE_EXCEEDED"}
"""The gRPC code name a --json error carries for a local failure (no server said which)."""

pass_cli = click.make_pass_decorator(CliContext)
"""Hands a command the CliContext the root group made."""


def friendly_errors(fn: F) -> F:
    """Turn the errors a user can cause into one readable line and exit code 1 (2 for usage problems); with the
    command's `--json` (its `as_json` parameter), into one JSON error object with the same exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        as_json = bool(kwargs.get("as_json"))
        try:
            return fn(*args, **kwargs)
        except HivemeshError as exc:
            details = {"reason": exc.reason, "field_violations": exc.field_violations, "metadata": exc.metadata}
            # A reason that only repeats the code (an error with no mesh reason of its own) is said once.
            hint = exc.code.name if exc.reason == exc.code.name else f"{exc.code.name}, {exc.reason}"
            emit_error(exc.code.name, exc.message, details, as_json=as_json, hint=hint)
            sys.exit(1)
        except click.Abort:
            raise  # a RuntimeError, but not a failure to word here: click says "Aborted!" (it was an empty error)
        except (ValueError, EtcdNotFoundError, TimeoutError, RuntimeError, OSError) as exc:
            code = _LOCAL_CODES.get(type(exc), "INVALID_ARGUMENT" if isinstance(exc, ValueError) else "UNAVAILABLE")
            emit_error(code, str(exc), as_json=as_json)
            sys.exit(2 if isinstance(exc, ValueError) else 1)
        except click.ClickException as exc:
            if not as_json:
                # It may quote what a server or workload said. (Final in click's stubs; an attribute all the same.)
                exc.message = clean(exc.message, layout=True)  # type: ignore[misc]
                raise  # click prints it as usual
            code = "INVALID_ARGUMENT" if isinstance(exc, click.UsageError) else "FAILED_PRECONDITION"
            emit_error(code, exc.format_message(), as_json=True)
            sys.exit(exc.exit_code)

    return wrapper  # type: ignore[return-value]


def as_operator(obj: CliContext, action: Callable[[ControlPlaneClient], Awaitable[T]]) -> T:
    """Run action to completion with a client of the control plane, as the operator (mutual TLS)."""
    from hivemesh.mesh.controlplane_client import ControlPlaneClient

    settings = obj.operator_settings()

    async def go() -> T:
        async with ControlPlaneClient.from_certs_dir(settings.controlplane, obj.certs_dir) as cp:
            return await action(cp)

    return run_async(go())


def run_async(work: Coroutine[Any, Any, T], *, spawns: bool = False) -> T:
    """The CLI's one way to run async work (control-plane calls, etcd reads, servers), so no command grows its
    own runner and every failure leaves through `friendly_errors` alike (tests/unit/test_cli_runner.py pins it).

    On the mesh's loop (`hivemesh.mesh.loop`: uvloop), except for work that spawns processes (`hivemesh up`):
    uvloop starts children with a plain fork() of a process with gRPC's threads, where asyncio's loop uses
    vfork + exec (`mesh/lifeline.py`), and gRPC logs a line at every such fork."""
    return loop.run(work, choice="asyncio" if spawns else None)
