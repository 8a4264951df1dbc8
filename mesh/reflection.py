"""Server reflection on both APIs: `grpc.reflection.v1` (current; grpcurl asks it first) and `v1alpha`.

grpcio-reflection serves only v1alpha. v1 is the same protocol under another package name (the messages are
field for field the same), so the v1 service here runs grpcio-reflection's own servicer with the v1alpha message
classes, and the v1 file descriptor (v1alpha's, renamed) is added to the default pool so that v1 can describe
itself like every other service it lists.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

V1ALPHA_SERVICE: Final = reflection.SERVICE_NAME
V1_SERVICE: Final = "grpc.reflection.v1.ServerReflection"
_V1_FILE: Final = "grpc/reflection/v1/reflection.proto"


def _ensure_v1_descriptor() -> None:
    """Add grpc.reflection.v1's file to the default pool once (v1alpha's file, renamed), unless it is there."""
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(_V1_FILE)
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    proto.name, proto.package = _V1_FILE, "grpc.reflection.v1"
    proto.options.Clear()
    for message in proto.message_type:
        for field in message.field:
            if field.type_name.startswith(".grpc.reflection.v1alpha."):
                field.type_name = ".grpc.reflection.v1." + field.type_name.rpartition(".")[2]
    for service in proto.service:
        for method in service.method:
            method.input_type = ".grpc.reflection.v1." + method.input_type.rpartition(".")[2]
            method.output_type = ".grpc.reflection.v1." + method.output_type.rpartition(".")[2]
    pool.AddSerializedFile(proto.SerializeToString())


def enable_reflection(server: grpc.aio.Server, services: Iterable[str]) -> None:
    """Serve reflection on both APIs, listing services plus health and both reflection services."""
    _ensure_v1_descriptor()
    names = sorted({*services, "grpc.health.v1.Health", V1ALPHA_SERVICE, V1_SERVICE})
    servicer = reflection.aio.ReflectionServicer(names)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    method = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(V1_SERVICE, {"ServerReflectionInfo": method}),)
    )


class ServiceRecorder(grpc.aio.Server):
    """The server given, noting the services added to it, so reflection can list what installers added without
    a second list to keep in step (`names` once they ran)."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server
        self.names: list[str] = []

    def add_generic_rpc_handlers(self, generic_rpc_handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        generic_rpc_handlers = tuple(generic_rpc_handlers)
        for handler in generic_rpc_handlers:
            if isinstance(handler, grpc.ServiceRpcHandler) and handler.service_name() not in self.names:
                self.names.append(handler.service_name())
        self._server.add_generic_rpc_handlers(generic_rpc_handlers)

    def add_registered_method_handlers(self, service_name: str, method_handlers: Any) -> None:
        if service_name not in self.names:
            self.names.append(service_name)
        self._server.add_registered_method_handlers(service_name, method_handlers)

    def add_insecure_port(self, address: str) -> int:
        return self._server.add_insecure_port(address)

    def add_secure_port(self, address: str, server_credentials: grpc.ServerCredentials) -> int:
        return self._server.add_secure_port(address, server_credentials)

    async def start(self) -> None:
        await self._server.start()

    async def stop(self, grace: float | None) -> None:
        await self._server.stop(grace)

    async def wait_for_termination(self, timeout: float | None = None) -> bool:
        return await self._server.wait_for_termination(timeout)
