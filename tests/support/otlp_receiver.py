"""A real OTLP/gRPC trace receiver (opentelemetry-proto's collector TraceService) on 127.0.0.1, so tests check the
spans a process exported over the wire, as a collector would receive them."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP trace receiver: keeps every ExportTraceServiceRequest."""

    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.got = asyncio.Event()

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.requests.append(request)
        self.got.set()
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self) -> list[tuple[Any, Any]]:
        """(resource, span) for every span received so far."""
        return [(rs.resource, span) for req in self.requests for rs in req.resource_spans
                for ss in rs.scope_spans for span in ss.spans]


@contextlib.asynccontextmanager
async def otlp_receiver() -> AsyncIterator[tuple[Receiver, int]]:
    """A Receiver serving on 127.0.0.1 (a free port); (receiver, port). Stopped on exit."""
    server = grpc.aio.server()
    rcv = Receiver()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(rcv, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield rcv, port
    finally:
        await server.stop(0)
