"""`python -m server.healthcheck`: exit 0 when agentmesh answers grpc.health.v1 SERVING.

The Docker image's HEALTHCHECK. grpc_health_probe is not available, and `agentmesh call`
imports the whole server (models included) on every probe; this needs only grpcio, the
settings and the generated messages (server/channels.py), so a probe costs a fraction of a
second. It prints the status it saw, which
Docker keeps in `docker inspect` for the last probes.
"""

import argparse
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.channels import connect_sync
from server.config import Settings


def status(target: str, service: str = "", timeout: float = 3.0) -> str:
    """The serving status `target` reports for `service` ("" = the whole server), or the
    gRPC error code name when it does not answer within `timeout` seconds."""
    with connect_sync(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as error:
            code = error.code() if isinstance(error, grpc.Call) else None
            return code.name if code is not None else "UNKNOWN"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m server.healthcheck", description="Check agentmesh's gRPC health."
    )
    parser.add_argument("--target", help="host:port (default 127.0.0.1:AGENTMESH_GRPC_PORT)")
    parser.add_argument("--service", default="", help="a service name; default: the server")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds (default 3)")
    args = parser.parse_args(argv)
    target = args.target or f"127.0.0.1:{Settings().grpc_port}"
    seen = status(target, args.service, args.timeout)
    print(f"{target} {args.service or '(server)'}: {seen}")
    return 0 if seen == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
