"""The descriptor set of lf.a2a.v1 (A2A v1.0's `a2a.proto` and its imports, with
google.rpc's error types), from the installed a2a-sdk, which ships the proto's descriptor
but not its source.

Envoy transcodes A2A's HTTP+JSON binding with it: envoy/envoy.yaml holds it inline (the
a2a-rest route's `proto_descriptor_bin`), so the template validates and runs as it is, in
every image, without a second generated file. `python -m server.a2a_descriptors` prints
it; tests/test_a2a.py fails when the template's copy differs from the installed package's.
"""

from a2a.types import a2a_pb2
from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FileDescriptor
from google.rpc import error_details_pb2, status_pb2

SERVICE = "lf.a2a.v1.A2AService"


def _add(file: FileDescriptor, into: descriptor_pb2.FileDescriptorSet, seen: set[str]) -> None:
    """`file` after its imports (a descriptor set lists a file after what it imports)."""
    if file.name in seen:
        return
    seen.add(file.name)
    for imported in file.dependencies:
        _add(imported, into, seen)
    file.CopyToProto(into.file.add())


def _post_subscribe(a2a_file: descriptor_pb2.FileDescriptorProto) -> None:
    """Bind SubscribeToTask to POST as well as to its proto's GET: a2a-sdk's own HTTP+JSON
    client (1.3) POSTs `/tasks/{id}:subscribe`, as the A2A specification's table does."""
    (service,) = a2a_file.service
    method = next(m for m in service.method if m.name == "SubscribeToTask")
    # googleapis-common-protos types the extension as a plain FieldDescriptor.
    rule: http_pb2.HttpRule = method.options.Extensions[annotations_pb2.http]  # type: ignore[index]
    rule.additional_bindings.add(post="/tasks/{id=*}:subscribe", body="*")


def a2a_descriptor_set() -> descriptor_pb2.FileDescriptorSet:
    """a2a.proto (with SubscribeToTask's POST binding) and everything it imports."""
    files, seen = descriptor_pb2.FileDescriptorSet(), set[str]()
    _add(a2a_pb2.DESCRIPTOR, files, seen)
    _post_subscribe(files.file[-1])
    # With convert_grpc_status, Envoy renders an error's google.rpc.Status and its details
    # as the JSON body only when its descriptor set knows their types.
    for errors in (status_pb2.DESCRIPTOR, error_details_pb2.DESCRIPTOR):
        _add(errors, files, seen)
    return files


def main() -> None:
    import base64

    print(base64.b64encode(a2a_descriptor_set().SerializeToString(deterministic=True)).decode())


if __name__ == "__main__":
    main()
