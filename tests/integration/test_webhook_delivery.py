"""One webhook delivery against receivers that misbehave, on real sockets: a redirect is an answer, not a delivery
(followed, the signed headers went wherever it pointed), and timeout_s bounds the whole delivery, not each read."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from hivemesh.controlplane.escalation_webhooks import _post


class _Receiver(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, answer: str) -> None:
        self.answer = answer
        self.seen: list[tuple[str, str]] = []
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: _Receiver

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _answer(self) -> None:
        self.server.seen.append((self.command, self.path))
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        if self.server.answer.startswith("redirect "):
            self.send_response(302)
            self.send_header("Location", self.server.answer.removeprefix("redirect "))
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

    def do_GET(self) -> None:
        self._answer()

    def do_POST(self) -> None:
        self._answer()


@pytest.fixture
def receivers() -> Iterator[list[_Receiver]]:
    started: list[_Receiver] = []
    yield started
    for r in started:
        r.shutdown()
        r.server_close()


def _serve(receivers: list[_Receiver], answer: str) -> _Receiver:
    r = _Receiver(answer)
    threading.Thread(target=r.serve_forever, daemon=True).start()
    receivers.append(r)
    return r


def test_a_redirect_is_not_followed_nor_counted_delivered(receivers: list[_Receiver]) -> None:
    inside = _serve(receivers, "ok")
    hook = _serve(receivers, f"redirect {inside.url}/internal-admin?x=1")
    outcome = _post(f"{hook.url}/hook", b"{}", {"X-Hivemesh-Signature": "v1=abc"}, 5.0)
    assert outcome == "HTTP 302 (redirects are not followed)"
    assert hook.seen == [("POST", "/hook")] and inside.seen == []
    assert _post(f"{inside.url}/hook", b"{}", {}, 5.0) == ""  # a 2xx is delivered


def test_the_timeout_bounds_a_receiver_that_trickles_its_answer() -> None:
    """A byte a second keeps each read within a 1 s socket timeout; the delivery must end anyway."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def trickle() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            for ch in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"x" * 60:
                if stop.wait(0.3):
                    return
                try:
                    conn.sendall(bytes([ch]))
                except OSError:
                    return

    worker = threading.Thread(target=trickle, daemon=True)
    worker.start()
    try:
        started = time.monotonic()
        outcome = _post(f"http://127.0.0.1:{listener.getsockname()[1]}/hook", b"{}", {}, 1.0)
        took = time.monotonic() - started
    finally:
        stop.set()
        worker.join(10)
        listener.close()
    assert outcome == "no answer within 1 s"
    assert took < 10, f"the delivery took {took:.1f} s; the trickle alone lasts ~23 s"
