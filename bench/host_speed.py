"""How fast this host runs right now, by four short probes a benchmark takes before each window.

On a shared machine the same code ran a quarter to a half slower in some stretches than in others, every process
alike, with the hypervisor's steal at zero: a busy sibling thread of the same physical core, or a busy memory
system, slows a vCPU without taking it away. This machine has no hardware counters to show it, so these probes
measure it directly, each on this thread's CPU time (waiting for a core does not count, running slowly does):

- `aes_gbs`: AES-128-GCM over 64 KiB through the `cryptography` package's own OpenSSL (4.1.1 in its wheel here):
  how fast the host's AES units run;
- `tls_gbs`: 64 KiB written as TLS 1.3 records by Python's `ssl` and read out of its memory BIO, as uvloop's TLS
  layer writes a link's message: the cipher and record work the links pay for, on the OpenSSL Python's `ssl`
  links (the system's, 3.0.19 here). It is not `aes_gbs`: on 6 Dec the system's AES-256-GCM (what TLS 1.3
  negotiates first) ran at 4.5 GB/s in `openssl speed` where the wheel's ran at 8.4-8.9 on the same host;
- `copy_gbs`: copying 1 MiB in memory, as TLS and the socket do with every payload;
- `python_mops`: a fixed piece of pure-Python work (dict, str and int operations), in millions of loop turns a
  second, as the mesh's own per-call code is.

Each probe repeats its work for about `budget_s` of wall time and reports the median rate over its repetitions;
`python_rate` runs the Python probe once, for sampling during a window (here the host's speed flipped between two
levels, ~6.7 and ~3.3, within a second, on either vCPU: 6 Dec, 80 samples of each vCPU, half of them slow).
A window measured when these read lower than usual ran on a slower host; comparing systems measured in windows at
different host speeds compares the host, too. Run alone, `python bench/host_speed.py` prints a few probes.
"""

from __future__ import annotations

import contextlib
import os
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

AES_BYTES = 64 * 1024
COPY_BYTES = 1024 * 1024
_PY_TURNS = 2_000


def _tls_pair() -> tuple[ssl.SSLObject, ssl.MemoryBIO]:
    """A TLS 1.3 client, its mutual-TLS handshake with a server done over memory BIOs (transport_echo's throwaway
    self-signed certificate and contexts), and the BIO its records are written to."""
    import transport_echo  # here, not at the top: it imports grpc, which the probes themselves never need

    with tempfile.TemporaryDirectory() as folder:
        cert, key = transport_echo.make_cert(Path(folder))
        server_ctx = transport_echo.tls_context(cert, key, server=True)
        client_ctx = transport_echo.tls_context(cert, key, server=False)
    server_ctx.num_tickets = 0  # nothing for the client to read after the handshake
    s_in, s_out, c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="localhost")
    for _ in range(10):  # a TLS 1.3 handshake takes two flights each way
        for end in (client, server):
            with contextlib.suppress(ssl.SSLWantReadError):  # until the other end's next flight arrives
                end.do_handshake()
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if client.version() and server.version():
            break
    if not (client.version() and server.version()):
        raise RuntimeError("host_speed: the TLS probe's handshake did not finish")
    return client, c_out


class _Probes:
    """The probes' inputs, made (and each probe run a few times: the first runs are slower, with cold caches and
    the interpreter not yet specialized) at the first `probe`, so importing this module costs nothing."""

    def __init__(self) -> None:
        self.aead = AESGCM(bytes(16))
        self.plain = os.urandom(AES_BYTES)
        self.tls, self.tls_out = _tls_pair()
        self.source = bytearray(os.urandom(COPY_BYTES))
        self.target = bytearray(COPY_BYTES)
        for work in (self.aes, self.tls_write, self.copy, self.python):
            for _ in range(20):
                work()

    def aes(self) -> None:
        self.aead.encrypt(bytes(12), self.plain, None)

    def tls_write(self) -> None:
        self.tls.write(self.plain)
        self.tls_out.read()

    def copy(self) -> None:
        self.target[:] = self.source

    @staticmethod
    def python() -> None:
        d: dict[str, int] = {}
        for i in range(_PY_TURNS):
            key = "k" + str(i & 63)
            d[key] = d.get(key, 0) + i


_probes: _Probes | None = None


def _rate(work: Callable[[], None], units: float, budget_s: float) -> float:
    """Median units per CPU second of this thread over repetitions of work within budget_s of wall time (at
    least 5 repetitions, at most 10,000)."""
    rates: list[float] = []
    end = time.perf_counter() + budget_s
    while len(rates) < 10_000 and (len(rates) < 5 or time.perf_counter() < end):
        start = time.thread_time_ns()
        work()
        took = time.thread_time_ns() - start
        if took > 0:
            rates.append(units * 1e9 / took)
    return statistics.median(rates) if rates else 0.0


def probe(budget_s: float = 0.03) -> dict[str, float]:
    """The four rates now: AES-GCM, TLS writes and copy in GB/s, Python in millions of loop turns a second."""
    global _probes
    if _probes is None:
        _probes = _Probes()
    p = _probes
    return {
        "aes_gbs": round(_rate(p.aes, AES_BYTES / 1e9, budget_s), 3),
        "tls_gbs": round(_rate(p.tls_write, AES_BYTES / 1e9, budget_s), 3),
        "copy_gbs": round(_rate(p.copy, COPY_BYTES / 1e9, budget_s), 3),
        "python_mops": round(_rate(p.python, _PY_TURNS / 1e6, budget_s), 3),
    }


def python_rate() -> float:
    """One run of the Python probe (~0.3 ms on this machine), in millions of loop turns a CPU second: cheap enough
    to take every 100 ms during a window, where the host's speed flips within a second."""
    global _probes
    if _probes is None:
        _probes = _Probes()
    start = time.thread_time_ns()
    _probes.python()
    took = time.thread_time_ns() - start
    return _PY_TURNS * 1e3 / took if took > 0 else 0.0


def main() -> int:
    for _ in range(int(sys.argv[1]) if len(sys.argv) > 1 else 5):
        sys.stdout.write(f"{probe()}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
