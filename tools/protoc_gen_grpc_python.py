"""A protoc plugin that runs grpcio-tools' built-in grpc_python generator.

buf refuses `protoc_builtin: grpc_python` and grpcio-tools ships no plugin binary, so buf
calls this script as a local plugin: it hands the request's descriptors to grpc_tools'
protoc (`--descriptor_set_in`) and returns the files it writes.
"""

import sys
import tempfile
from pathlib import Path

from google.protobuf import descriptor_pb2
from google.protobuf.compiler import plugin_pb2
from grpc_tools import protoc


def main() -> int:
    request = plugin_pb2.CodeGeneratorRequest.FromString(sys.stdin.buffer.read())
    response = plugin_pb2.CodeGeneratorResponse(
        supported_features=plugin_pb2.CodeGeneratorResponse.FEATURE_PROTO3_OPTIONAL
    )
    with tempfile.TemporaryDirectory() as tmp:
        descriptors = Path(tmp) / "request.binpb"
        out = Path(tmp) / "out"
        out.mkdir()
        file_set = descriptor_pb2.FileDescriptorSet(file=request.proto_file)
        descriptors.write_bytes(file_set.SerializeToString())
        args = [
            "grpc_tools.protoc",
            f"--descriptor_set_in={descriptors}",
            f"--grpc_python_out={out}",
        ]
        if protoc.main([*args, *request.file_to_generate]) != 0:
            response.error = "grpc_tools.protoc failed to generate the gRPC stubs"
        else:
            for path in sorted(out.rglob("*.py")):
                response.file.add(name=str(path.relative_to(out)), content=path.read_text())
    sys.stdout.buffer.write(response.SerializeToString())
    return 0


if __name__ == "__main__":
    sys.exit(main())
