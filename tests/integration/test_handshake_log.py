"""Reading handshake refusals out of gRPC's log: against what the pinned grpcio really prints (so an upgrade
that changes the format fails here), and line by line, where no line that is not the tracer's may be lost."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hivemesh.controlplane.ca import init_ca, load_ca
from hivemesh.mesh.audit.handshake.events import port_of
from hivemesh.mesh.audit.handshake.reasons import DEFAULT_REASON, classify, describe
from hivemesh.mesh.audit.handshake.switch import tracer_requested, with_tracer
from hivemesh.mesh.audit.handshake.tracelog import HandshakeLogParser, parse_entry, parse_text
from tests.support.tls_attacks import H2_PREFACE, attacker_context, raw_attempt, tls_attempt

REPO = Path(__file__).resolve().parents[2]
TD = "hivemesh.local"


def _context(tmp: Path, ca_dir: Path | None) -> ssl.SSLContext:
    if ca_dir is None:
        return attacker_context(tmp)
    return attacker_context(tmp, *load_ca(ca_dir).issue_with_new_key(
        f"spiffe://{TD}/client/x", common_name="x", dns_names=["x.client.hivemesh.local"], ttl_s=600))


@pytest.mark.slow
def test_what_the_pinned_grpcio_logs_is_parsed(tmp_path: Path) -> None:
    """A bare gRPC server (no mesh code, no tee) with the tracer on: every refused connection is found in its
    raw stderr with the right ports and reason, and nothing else is."""
    mesh_ca, rogue_ca = tmp_path / "ca", tmp_path / "rogue"
    init_ca(mesh_ca, TD)
    init_ca(rogue_ca, TD)
    err_path = tmp_path / "stderr.log"
    env = {**os.environ, "GRPC_TRACE": "handshaker"}
    with err_path.open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "tests.support.tls_server_main", str(mesh_ca)], cwd=REPO,
                                env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        assert line.startswith("port "), f"server said {line!r}: {err_path.read_text()[-2000:]}"
        port = int(line.split()[1])
        expected = {
            tls_attempt(port, _context(tmp_path, rogue_ca)): "TLS_CERT_UNTRUSTED",
            tls_attempt(port, _context(tmp_path, None)): "TLS_CERT_MISSING",
            raw_attempt(port, H2_PREFACE): "TLS_PLAINTEXT",
            raw_attempt(port, b""): "TLS_CONNECTION_CLOSED",
        }
        good = _ssl_attempt_ok(port, _context(tmp_path, mesh_ca))
        deadline = time.monotonic() + 20
        while True:
            found = parse_text(err_path.read_bytes())
            if len(found) >= len(expected) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        assert proc.stdout is not None
        proc.stdout.close()
    got = {f.peer_port: classify(f.error)[0] for f in found}
    assert got == expected, f"parsed {found}"
    assert good not in got  # a handshake that succeeded is not a failure
    assert all(f.local_port == port and f.local == f"ipv4:127.0.0.1:{port}" for f in found)
    # Everything the parser hides is the tracer's; everything else is kept.
    parser = HandshakeLogParser()
    kept = [ln for ln in err_path.read_bytes().split(b"\n") if parser.feed(ln)]
    assert not any(b"handshaker.cc" in ln or b"] handshake manager " in ln for ln in kept)
    assert any(b"Handshake failed with error" in ln for ln in kept)  # gRPC's own default log line stays


def _ssl_attempt_ok(port: int, ctx: ssl.SSLContext) -> int:
    """A handshake the server accepts (it answers with HTTP/2 SETTINGS); returns the source port."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        source = int(raw.getsockname()[1])
        with ctx.wrap_socket(raw) as tls:
            tls.sendall(H2_PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")  # and an empty SETTINGS
            assert tls.recv(9), "the server refused a good certificate"
    return source


# --- line by line --------------------------------------------------------------------------------------------------
FAILED = (
    b"I1125 18:00:48.081073   27042 handshaker.cc:155] CallNextHandshakerLocked: error=UNKNOWN: Ssl handshake "
    b"failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1000007d:SSL routines:OPENSSL_internal:"
    b"CERTIFICATE_VERIFY_FAILED: certificate has expired: OK\n"
    b"=== Source Location Trace: ===\n"
    b"src/core/util/status_helper.cc:68\n"
    b" shutdown=false index=2, args={endpoint=0x7f0bc00023d0, args={grpc.internal.endpoint_local_address="
    b"ipv4:127.0.0.1:34423, grpc.internal.endpoint_peer_address=ipv4:127.0.0.1:41366, "
    b"grpc.internal.server_credentials=0x55ee3e28ea20}, read_buffer.Length()=0, exit_early=0}\n"
    b"I1125 18:00:48.081081   27042 channel_trace.h:396] handshake manager 0x7f0bc0002050: Failed with error: "
    b"UNKNOWN: Ssl handshake failed\n"
    b"=== Source Location Trace: ===\n"
    b"src/core/util/status_helper.cc:68\n"
    b"\n"
)


def test_a_failure_entry_is_parsed_and_hidden() -> None:
    parser = HandshakeLogParser()
    kept = [ln for ln in FAILED.split(b"\n")[:-1] if parser.feed(ln)]
    parser.flush()
    assert kept == []
    [f] = parser.take()
    assert (f.local_port, f.peer_port, f.peer_host) == (34423, 41366, "ipv4:127.0.0.1")
    assert classify(f.error) == ("TLS_CERT_EXPIRED", "deny")
    assert describe(f.error) == ("the client certificate has expired "
                                 "(CERTIFICATE_VERIFY_FAILED: certificate has expired)")


def test_lines_that_are_not_the_tracers_are_never_dropped() -> None:
    """A traceback or a print right after a tracer entry ends that entry and is kept, blank or not."""
    others = [b"Traceback (most recent call last):", b'  File "x.py", line 1, in <module>', b"ValueError: boom",
              b"W1125 18:00:48.1 27042 chttp2_transport.cc:1] some warning", b"plain print",
              b"src/core/looks_like_a_location.cc:12 but is not"]
    parser = HandshakeLogParser()
    cut_short = FAILED.split(b"\n")[:2]  # a tracer entry without its addresses ...
    kept = [ln for ln in [*cut_short, *others] if parser.feed(ln)]
    assert kept == others
    assert parser.take() == []  # ... names no client, so it is no refusal
    # A complete entry followed at once by other output: the failure is found and the output kept.
    parser = HandshakeLogParser()
    kept = [ln for ln in [*FAILED.split(b"\n")[:4], b"ValueError: boom"] if parser.feed(ln)]
    assert kept == [b"ValueError: boom"]
    assert [f.peer_port for f in parser.take()] == [41366]


def test_successes_and_client_side_failures_are_not_refusals() -> None:
    ok = ("CallNextHandshakerLocked: error=OK shutdown=false index=2, args={grpc.internal.endpoint_local_address="
          "ipv4:127.0.0.1:1, grpc.internal.endpoint_peer_address=ipv4:127.0.0.1:2, "
          "grpc.internal.server_credentials=0x1}")
    assert parse_entry(ok) is None
    client = ("CallNextHandshakerLocked: error=UNKNOWN: Ssl handshake failed shutdown=false index=4, args={"
              "grpc.internal.channel_credentials=0x1, grpc.internal.endpoint_local_address=ipv4:127.0.0.1:5, "
              "grpc.internal.endpoint_peer_address=ipv4:127.0.0.1:6}")
    assert parse_entry(client) is None
    server = client.replace("grpc.internal.channel_credentials", "grpc.internal.server_credentials")
    f = parse_entry(server)
    assert f is not None and (f.local_port, f.peer_port) == (5, 6)


@pytest.mark.parametrize(("error", "reason", "decision"), [
    ("UNKNOWN: ...CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate: OK", "TLS_CERT_UNTRUSTED", "deny"),
    ("UNKNOWN: ...CERTIFICATE_VERIFY_FAILED: certificate has expired: OK", "TLS_CERT_EXPIRED", "deny"),
    ("UNKNOWN: ...CERTIFICATE_VERIFY_FAILED: certificate is not yet valid", "TLS_CERT_NOT_YET_VALID", "deny"),
    ("UNKNOWN: ...PEER_DID_NOT_RETURN_A_CERTIFICATE: Invalid certificate verification context", "TLS_CERT_MISSING",
     "deny"),
    ("UNKNOWN: ...WRONG_VERSION_NUMBER: Invalid certificate verification context", "TLS_PLAINTEXT", "deny"),
    ("DEADLINE_EXCEEDED: Handshake timed out", "TLS_HANDSHAKE_TIMEOUT", "deny"),
    ("UNAVAILABLE: Handshake read failed (Socket closed)", "TLS_CONNECTION_CLOSED", "error"),
    ("UNKNOWN: ...OPENSSL_internal:EXCESSIVE_MESSAGE_SIZE: Invalid certificate verification context", DEFAULT_REASON,
     "deny"),
])
def test_reasons(error: str, reason: str, decision: str) -> None:
    assert classify(error) == (reason, decision)
    assert "Invalid certificate verification context" not in describe(error)


def test_tracer_setting() -> None:
    assert with_tracer(None) == "handshaker"
    assert with_tracer("api, tcp") == "api,tcp,handshaker"
    assert with_tracer("all") == "all"
    assert tracer_requested("handshaker") and tracer_requested("api,all")
    assert not tracer_requested(None) and not tracer_requested("api") and not tracer_requested("all,-handshaker")
    assert port_of("ipv6:[::1]:5000") == 5000 and port_of("unix:/tmp/x") == 0


def test_warnings_and_fatal_checks_from_the_tracers_files_always_pass() -> None:
    """Only the tracer's INFO entries are hidden: a failed check in handshaker.cc is a crash's last words."""
    parser = HandshakeLogParser()
    fatal = b"F1125 19:45:18.889441   13723 handshaker.cc:99] Check failed: index_ <= handshakers_.size()"
    warning = b"W1125 19:45:18.889441   13723 channel_trace.h:1] handshake manager 0x1: something odd"
    assert parser.feed(fatal) and parser.feed(warning)
    assert not parser.feed(FAILED.split(b"\n")[0])
