"""The CLI runs async work one way (`context.run_async`), so every command's failures leave through
`friendly_errors` alike: no command module calls `asyncio.run` itself, and an etcd read that cannot reach etcd
ends as one clear line (or, with `--json`, one JSON error), never a traceback."""

from __future__ import annotations

import ast
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from hivemesh.controlplane.cli import context
from hivemesh.controlplane.cli.app import cli

CLI_DIR = Path(context.__file__).parent


def _asyncio_run_calls(path: Path) -> list[int]:
    """Lines of `asyncio.run(...)`, `loop.run(...)` (the mesh's runner, `hivemesh.mesh.loop`) or a bare `run(...)`
    imported from asyncio, in one module."""
    tree = ast.parse(path.read_text(), str(path))
    bare = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "asyncio"
            for a in n.names if a.name == "run"}
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if (isinstance(f, ast.Attribute) and f.attr == "run" and isinstance(f.value, ast.Name)
                and f.value.id in ("asyncio", "loop")) or (isinstance(f, ast.Name) and f.id in bare):
            lines.append(node.lineno)
    return lines


def test_only_the_context_module_runs_coroutines() -> None:
    found = {p.name: lines for p in sorted(CLI_DIR.glob("*.py")) if (lines := _asyncio_run_calls(p))}
    assert set(found) == {"context.py"}, f"call context.run_async instead of asyncio.run or loop.run: {found}"
    assert len(found["context.py"]) == 1  # the runner itself


@pytest.fixture
def unreachable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """An operator identity and a mesh whose etcd, control plane and join port refuse connections."""
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = ["--home", str(tmp_path / "home"), "--certs-dir", str(tmp_path / "certs")]
    monkeypatch.setenv("HIVEMESH_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HIVEMESH_CERTS", raising=False)
    assert CliRunner().invoke(cli, [*base, "certs", "init", "--trust-domain", "runner.test"]).exit_code == 0
    monkeypatch.setenv("HIVEMESH_ETCD", f"https://127.0.0.1:{port}")
    monkeypatch.setenv("HIVEMESH_CONTROLPLANE", f"127.0.0.1:{port}")
    monkeypatch.setenv("HIVEMESH_JOIN", f"127.0.0.1:{port}")
    monkeypatch.setenv("HIVEMESH_CA", str(tmp_path / "certs" / "ca.pem"))
    yield base


def test_an_etcd_read_that_cannot_reach_etcd_is_one_line_or_one_json_error(unreachable: list[str]) -> None:
    def hivemesh(*args: str) -> Result:
        return CliRunner().invoke(cli, [*unreachable, *args], prog_name="hivemesh")

    plain = hivemesh("agents")
    assert plain.exit_code == 1 and plain.stdout == "", plain.output
    (line,) = plain.stderr.splitlines()
    assert line.startswith("error: cannot read the registry from etcd at https://127.0.0.1:"), line
    assert "Traceback" not in plain.stderr
    as_json = hivemesh("agents", "--json")
    assert as_json.exit_code == 1 and as_json.stdout == ""
    error = json.loads(as_json.stderr)["error"]
    assert error["code"] == "UNAVAILABLE" and error["details"]["reason"] == "REGISTRY_UNAVAILABLE"


def test_a_control_plane_that_cannot_be_reached_is_named_as_such(unreachable: list[str]) -> None:
    """gRPC's own UNAVAILABLE (no control plane answered) read as a bare UNAVAILABLE, which the errors map to
    AGENT_UNAVAILABLE: the operator was told an agent was down. It names the control plane and its address."""
    result = CliRunner().invoke(cli, [*unreachable, "policy", "list", "--json"], prog_name="hivemesh")
    assert result.exit_code == 1 and result.stdout == "", result.output
    error = json.loads(result.stderr)["error"]
    assert error["code"] == "UNAVAILABLE" and error["details"]["reason"] == "CONTROL_PLANE_UNAVAILABLE", error
    assert error["message"].startswith("the control plane at 127.0.0.1:"), error["message"]


def test_an_expired_operator_certificate_is_named_before_any_connection(unreachable: list[str],
                                                                         tmp_path: Path) -> None:
    """The control plane's TLS refuses an expired client certificate, which gRPC reports as "Socket closed":
    the CLI said the connection failed and never named the certificate."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    certs = tmp_path / "certs"
    ca_key = serialization.load_pem_private_key((certs / "ca.key").read_bytes(), None)
    ca = x509.load_pem_x509_certificate((certs / "ca.pem").read_bytes())
    current = x509.load_pem_x509_certificate((certs / "operator.pem").read_bytes())
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(current.subject).issuer_name(ca.subject)
               .public_key(current.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(days=2)).not_valid_after(now - datetime.timedelta(days=1)))
    for extension in current.extensions:
        builder = builder.add_extension(extension.value, extension.critical)
    expired = builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    (certs / "operator.pem").write_bytes(expired.public_bytes(serialization.Encoding.PEM))

    for args in (["policy", "list"], ["policy", "list", "--json"]):
        result = CliRunner().invoke(cli, [*unreachable, *args], prog_name="hivemesh")
        assert result.exit_code == 1, result.output
        assert "the operator certificate" in result.stderr and "expired at" in result.stderr, result.stderr
    assert json.loads(result.stderr)["error"]["code"] == "FAILED_PRECONDITION"
