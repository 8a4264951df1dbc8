"""AutoGen's distributed gRPC runtime set up as its docs show, for bench/peers.py: one role per process.

    host    GrpcWorkerAgentRuntimeHost on 127.0.0.1:<port> (prints {"ready": true, "port": ...})
    echo    a GrpcWorkerAgentRuntime worker hosting the `echo` agent (a RoutedAgent that returns what it gets)
    caller  a worker that sends Echo messages to echo/default (runtime.send_message: a request that goes through
            the host to the echo worker and back), driven by bench/peer_load.py

Runs with the Python of bench/.venv-autogen (autogen-core and autogen-ext[grpc] pinned by bench/peers.py); it
imports nothing of hivemesh. AutoGen's runtime has no TLS and no authorization: that is how it ships.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peer_load
from autogen_core import AgentId, MessageContext, RoutedAgent, message_handler, try_get_known_serializers_for_type
from autogen_ext.runtimes.grpc import GrpcWorkerAgentRuntime, GrpcWorkerAgentRuntimeHost


@dataclass
class Echo:
    text: str


class EchoAgent(RoutedAgent):
    """Returns the text it was sent: the AutoGen twin of the hivemesh SDK echo agent."""

    def __init__(self) -> None:
        super().__init__("echo")

    @message_handler
    async def on_echo(self, message: Echo, ctx: MessageContext) -> Echo:
        return Echo(text=message.text)


def _die_with_parent() -> None:
    """SIGTERM this process when the bench driver dies (Linux), so nothing outlives a killed run."""
    parent = os.environ.get("HIVEMESH_PARENT_PID")
    if parent and sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if str(os.getppid()) != parent:
            os._exit(1)


async def _until_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def host(args: argparse.Namespace) -> None:
    with socket.socket() as s:  # the host does not report the port it bound, so pick a free one first
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    runtime = GrpcWorkerAgentRuntimeHost(address=f"127.0.0.1:{port}")
    runtime.start()
    peer_load.emit({"ready": True, "port": port})
    try:
        await _until_signal()
    finally:
        await runtime.stop(grace=1)


async def _worker(address: str) -> GrpcWorkerAgentRuntime:
    runtime = GrpcWorkerAgentRuntime(host_address=address)
    runtime.add_message_serializer(try_get_known_serializers_for_type(Echo))
    await runtime.start()
    return runtime


async def echo(args: argparse.Namespace) -> None:
    runtime = await _worker(args.host)
    await EchoAgent.register(runtime, "echo", EchoAgent)
    peer_load.emit({"ready": True})
    try:
        await _until_signal()
    finally:
        await runtime.stop()


async def caller(args: argparse.Namespace) -> None:
    runtime = await _worker(args.host)
    target = AgentId("echo", "default")

    async def call(payload: dict[str, str]) -> dict[str, Any]:
        reply = await runtime.send_message(Echo(text=payload["text"]), target)
        return {"text": reply.text}

    try:
        await peer_load.serve_commands(call)
    finally:
        await runtime.stop()


def main() -> None:
    _die_with_parent()
    p = argparse.ArgumentParser()
    p.add_argument("role", choices=["host", "echo", "caller"])
    p.add_argument("--host", default="")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    asyncio.run({"host": host, "echo": echo, "caller": caller}[args.role](args))


if __name__ == "__main__":
    main()
