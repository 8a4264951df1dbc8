"""A scripted OpenAI-compatible endpoint on 127.0.0.1 (`POST /v1/chat/completions`), for the tool tests.

The model name picks the script:
- `tooler`: to a user message, asks for every tool it was offered, in offer order, with `{"text": "mesh"}` as
  arguments; once the results are in, answers "done: " + the results joined by " | ".
- `insistent`: always asks for the first offered tool again.
- `busy`: answers 429 (Retry-After-Ms: 20) to the first `busy_failures` requests, then "finally".
- `streamer`: (with "stream": true) sends "str", "eam", "ed" as server-sent events, then usage.
- `slow`: waits `slow_s` before answering "late".
- any name in `canned`: that fixed reply, however malformed (the hostile-answer tests script bad endpoints so).
Every request is kept in `seen`.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Canned:
    """A fixed reply: `body` as is, with Content-Length `declared` (default: the body's true length; -1: none,
    the body then ends when the connection closes) and any extra headers (e.g. Content-Encoding)."""

    body: bytes
    status: int = 200
    content_type: str = "application/json"
    declared: int | None = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class ChatScript:
    seen: list[dict[str, Any]] = field(default_factory=list)
    busy_failures: int = 1
    slow_s: float = 5.0
    canned: dict[str, Canned] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _completion(model: str, message: dict[str, Any], finish: str) -> bytes:
    return json.dumps({
        "id": "chatcmpl-1", "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
    }).encode()


class _Handler(BaseHTTPRequestHandler):
    script: ChatScript

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes, content_type: str = "application/json",
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        # The client may have given up (the timeout and cancellation checks do that on purpose).
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.wfile.write(body)

    def _send_canned(self, canned: Canned) -> None:
        self.send_response(canned.status)
        self.send_header("Content-Type", canned.content_type)
        declared = len(canned.body) if canned.declared is None else canned.declared
        if declared >= 0:
            self.send_header("Content-Length", str(declared))
        for k, v in canned.headers.items():
            self.send_header(k, v)
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.wfile.write(canned.body)
        self.close_connection = True  # a body shorter than declared, or one with no length, ends here

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.script.lock:
            self.script.seen.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
            busy_left = sum(1 for s in self.script.seen if s["body"]["model"] == "busy") <= self.script.busy_failures
        model = body["model"]
        tools = [t["function"]["name"] for t in body.get("tools") or ()]
        last = body["messages"][-1]
        if model in self.script.canned:
            self._send_canned(self.script.canned[model])
        elif model == "busy" and busy_left:
            self._send(429, b'{"error": {"message": "slow down"}}', headers={"Retry-After-Ms": "20"})
        elif model == "slow":
            time.sleep(self.script.slow_s)
            self._send(200, _completion(model, {"content": "late"}, "stop"))
        elif model == "streamer" and body.get("stream"):
            events = [{"choices": [{"index": 0, "delta": {"content": part}}]} for part in ("str", "eam", "ed")]
            events.append({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}})
            data = b"".join(b"data: " + json.dumps({"id": "c", "object": "chat.completion.chunk", "created": 0,
                                                     "model": model, **e}).encode() + b"\n\n" for e in events)
            self._send(200, data + b"data: [DONE]\n\n", "text/event-stream")
        elif model in ("tooler", "insistent") and tools and (last["role"] == "user" or model == "insistent"):
            names = tools if model == "tooler" else tools[:1]
            calls = [{"id": f"call_{len(body['messages'])}_{i}", "type": "function",
                      "function": {"name": name, "arguments": json.dumps({"text": "mesh"})}}
                     for i, name in enumerate(names)]
            self._send(200, _completion(model, {"content": None, "tool_calls": calls}, "tool_calls"))
        else:
            results = [m["content"] for m in body["messages"] if m["role"] == "tool"]
            text = "done: " + " | ".join(results) if results else "finally"
            self._send(200, _completion(model, {"content": text}, "stop"))


@contextmanager
def chat_server() -> Iterator[tuple[str, ChatScript]]:
    """(base URL ending in /v1, its script) for as long as the block runs."""
    script = ChatScript()
    handler = type("Handler", (_Handler,), {"script": script})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", script
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
