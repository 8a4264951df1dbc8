"""A loopback TCP proxy that delays every chunk, each way, by a random time: a link with a jittery round trip.

Bytes keep their order (a chunk is never released before the one read before it) and nothing is lost, so TLS
and HTTP/2 pass through unchanged; only the timing changes. Each direction holds a chunk for a uniform
0..max_delay_s, so a request and its answer see a round trip of 0..2 * max_delay_s on top of the real one. `hold`
stops the relaying altogether (every byte kept, in order) until `release`: a connection that stalls, then resumes.
"""

from __future__ import annotations

import asyncio
import contextlib
import random


class JitterProxy:
    """Listen on 127.0.0.1 (a free port) and relay each connection to host:port with jitter (seeded)."""

    def __init__(self, host: str, port: int, *, max_delay_s: float = 0.0, seed: int = 0) -> None:
        self._target = (host, port)
        self._open = asyncio.Event()
        self._open.set()
        self._max_delay_s = max_delay_s
        self._rng = random.Random(seed)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.chunks = 0
        """Chunks relayed (both ways): proof that traffic went through."""

    @property
    def endpoint(self) -> str:
        assert self._server is not None
        return f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)

    def hold(self) -> None:
        """Relay nothing more, either way, until `release` (what is read meanwhile is kept, in order)."""
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._relay(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _relay(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        """Read chunks as they come and write each at its release time, in order, until either side closes."""
        loop = asyncio.get_running_loop()
        held: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def release() -> None:
            while True:
                at, data = await held.get()
                if not data:
                    return
                await asyncio.sleep(max(0.0, at - loop.time()))
                await self._open.wait()
                dst.write(data)
                await dst.drain()
                self.chunks += 1

        sender = asyncio.create_task(release())
        last = 0.0
        try:
            while data := await src.read(65536):
                last = max(last, loop.time() + self._rng.uniform(0.0, self._max_delay_s))
                held.put_nowait((last, data))
            held.put_nowait((last, b""))
            await sender
        except (ConnectionError, OSError):
            pass
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError, OSError):
                await sender
            dst.close()

    async def stop(self) -> None:
        self._open.set()
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
