"""Server reflection under both of its names: `grpc.reflection.v1` and `grpc.reflection.v1alpha`.

Current grpcurl and `buf curl` ask `grpc.reflection.v1.ServerReflection` first; older
clients (grpcurl before 1.8.8, many IDE plugins) know only v1alpha. grpcio-reflection
serves only v1alpha. The two protocols are the same proto under another package name (v1
is v1alpha promoted, field for field), so the library's servicer answers both: its
messages are read and written on the v1 method as they are on v1alpha, and v1's file
descriptor, derived from v1alpha's with the package renamed, is added to the pool so that
a client can describe the v1 service too.

The servicer also finds the file of a method (`grpcurl describe pkg.Service.Method`):
protobuf's upb descriptor pool, which the library asks, indexes services but not their
methods, and answered NOT_FOUND.
"""

from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2

V1ALPHA = reflection.SERVICE_NAME
V1 = "grpc.reflection.v1.ServerReflection"
SERVICE_NAMES = (V1, V1ALPHA)
_V1_FILE = "grpc/reflection/v1/reflection.proto"


class _ReflectionServicer(reflection.aio.ReflectionServicer):  # type: ignore[misc]
    """The library's servicer, finding methods too."""

    def _file_containing_symbol(
        self, request: reflection_pb2.ServerReflectionRequest, fully_qualified_name: str
    ) -> reflection_pb2.ServerReflectionResponse:
        found = super()._file_containing_symbol(request, fully_qualified_name)
        if not found.HasField("error_response"):
            return found
        try:
            method = self._pool.FindMethodByName(fully_qualified_name)
        except KeyError:
            return found
        return self._file_containing_symbol(request, method.containing_service.full_name)


def _v1_file() -> descriptor_pb2.FileDescriptorProto:
    """v1alpha's file descriptor, renamed to v1's package and file."""
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    old, new = proto.package, V1.rsplit(".", 1)[0]
    proto.name, proto.package = _V1_FILE, new
    for message in proto.message_type:
        for field in message.field:
            if field.HasField("type_name"):
                field.type_name = field.type_name.replace(f".{old}.", f".{new}.")
    for service in proto.service:
        for method in service.method:
            method.input_type = method.input_type.replace(f".{old}.", f".{new}.")
            method.output_type = method.output_type.replace(f".{old}.", f".{new}.")
    return proto


def _describe_v1(pool: descriptor_pool.DescriptorPool) -> None:
    try:
        pool.FindFileByName(_V1_FILE)
    except KeyError:
        pool.AddSerializedFile(_v1_file().SerializeToString())


def enable_reflection(
    service_names: Iterable[str],
    server: grpc.aio.Server,
    pool: descriptor_pool.DescriptorPool | None = None,
) -> None:
    """Serve reflection of `service_names` (and of reflection itself) on `server`, under
    v1 and v1alpha, from `pool` (the default pool if None)."""
    pool = pool or descriptor_pool.Default()
    _describe_v1(pool)
    servicer = _ReflectionServicer([*service_names, *SERVICE_NAMES], pool=pool)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(name, {"ServerReflectionInfo": handler})
            for name in SERVICE_NAMES
        ]
    )
