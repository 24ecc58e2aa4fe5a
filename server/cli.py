"""The `agentmesh` command: serve, migrate, create-admin, call, envoy-config."""

import argparse
import asyncio
import json
import os
import secrets
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import yaml
from google.protobuf import descriptor_pool, json_format, message_factory

from server.config import Settings
from services.auth.principal import Role
from services.errors import AlreadyExists, DomainError


def _serve(settings: Settings, _args: argparse.Namespace) -> int:
    from server.main import serve

    asyncio.run(serve(settings))
    return 0


def _migrate(settings: Settings, args: argparse.Namespace) -> int:
    from server import migrations

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    migrations.upgrade(settings.resolved_database_url, args.revision)
    return 0


def _admin_password(settings: Settings, args: argparse.Namespace) -> tuple[str, str]:
    """The password for the new administrator and a note on where it came from."""
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\n"), "from standard input"
    if settings.admin_password is not None:
        return settings.admin_password.get_secret_value(), "from AGENTMESH_ADMIN_PASSWORD"
    password = secrets.token_urlsafe(18)
    path = settings.data_dir / "initial-admin-password"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(password + "\n")
    return password, f"generated and written to {path}"


async def _create_admin_async(settings: Settings, args: argparse.Namespace) -> int:
    from server.domain import build_domain

    domain = build_domain(settings)
    try:
        if args.if_no_admin and await domain.auth.has_admin():
            print("An administrator exists; none created.")
            return 0
        email = args.email or settings.admin_email
        password, source = _admin_password(settings, args)
        await domain.auth.register(
            email=email, password=password, full_name=args.full_name, role=Role.ADMIN
        )
        print(f"Created administrator {email}; password {source}.")
        return 0
    except AlreadyExists:
        print(
            f"An account with email {args.email or settings.admin_email} exists.", file=sys.stderr
        )
        return 1
    except DomainError as error:
        print(f"Cannot create the administrator: {error.message}", file=sys.stderr)
        return 2
    finally:
        await domain.close()


def _create_admin(settings: Settings, args: argparse.Namespace) -> int:
    return asyncio.run(_create_admin_async(settings, args))


def _method(full_name: str) -> Any:
    """The descriptor of `pkg.Service/Method` (or `pkg.Service.Method`)."""
    import server.served  # noqa: F401 - registers every agentmesh service in the default pool

    name = full_name.lstrip("/").replace("/", ".")
    return descriptor_pool.Default().FindMethodByName(name)


async def _call_async(settings: Settings, args: argparse.Namespace) -> int:
    method = _method(args.method)
    request_class = message_factory.GetMessageClass(method.input_type)
    response_class = message_factory.GetMessageClass(method.output_type)
    request = json_format.Parse(args.json or "{}", request_class())
    metadata = [("authorization", f"Bearer {args.token}")] if args.token else []
    path = f"/{method.containing_service.full_name}/{method.name}"
    target = args.target or f"127.0.0.1:{settings.grpc_port}"
    async with grpc.aio.insecure_channel(target) as channel:
        kind = channel.unary_stream if method.server_streaming else channel.unary_unary
        stub: Any = kind(
            path,
            request_serializer=request_class.SerializeToString,
            response_deserializer=response_class.FromString,
        )
        try:
            call = stub(request, metadata=metadata, timeout=args.timeout)
            if method.server_streaming:  # one JSON line per message, as it arrives
                async for item in call:
                    print(json_format.MessageToJson(item, True, indent=None), flush=True)
            else:
                print(json_format.MessageToJson(await call, True))
        except grpc.aio.AioRpcError as error:
            failure = {"code": error.code().name, "message": error.details()}
            print(json.dumps(failure), file=sys.stderr)
            return 1
    return 0


def _call(settings: Settings, args: argparse.Namespace) -> int:
    return asyncio.run(_call_async(settings, args))


def _envoy_config(settings: Settings, args: argparse.Namespace) -> int:
    """The config for an Envoy that runs apart from agentmesh (its own container)."""
    from server.envoy import add_stats_listener, envoy_config

    config = envoy_config(
        settings,
        grpc_port=settings.grpc_port,
        ops_port=settings.metrics_port,
        upstream=args.upstream,
        descriptor=args.descriptor,
    )
    if args.stats_port is not None:
        add_stats_listener(config, args.stats_port, settings.envoy_admin_port)
    print("# Rendered by `agentmesh envoy-config` from envoy/envoy.yaml: edit that, not this.")
    print(yaml.safe_dump(config, sort_keys=False), end="")
    return 0


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="agentmesh", description="A self-hosted AI agent platform.")
    commands = root.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "serve", help="run the gRPC server (and the Envoy sidecar for REST)"
    ).set_defaults(run=_serve)
    migrate = commands.add_parser("migrate", help="apply database migrations")
    migrate.add_argument("--revision", default="head")
    migrate.set_defaults(run=_migrate)
    admin = commands.add_parser("create-admin", help="create an administrator account")
    admin.add_argument("--email", help="default: AGENTMESH_ADMIN_EMAIL")
    admin.add_argument("--full-name", default="Administrator")
    admin.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    admin.add_argument("--if-no-admin", action="store_true", help="do nothing when an admin exists")
    admin.set_defaults(run=_create_admin)
    call = commands.add_parser("call", help="call an RPC with a JSON request, like grpcurl")
    call.add_argument("method", help="e.g. agentmesh.auth.v1.UserService/GetCurrentUser")
    call.add_argument("json", nargs="?", help="the request as JSON (default {})")
    call.add_argument("--token", help="access token to send as a bearer token")
    call.add_argument("--target", help="host:port (default 127.0.0.1:AGENTMESH_GRPC_PORT)")
    call.add_argument("--timeout", type=float, default=30.0)
    call.set_defaults(run=_call)
    envoy = commands.add_parser(
        "envoy-config", help="print the Envoy config for an Envoy in its own container"
    )
    envoy.add_argument("--upstream", help="agentmesh's host name (default: GRPC_HOST)")
    envoy.add_argument("--descriptor", type=Path, help="default: AGENTMESH_DESCRIPTOR_SET")
    envoy.add_argument(
        "--stats-port", type=int, help="also serve /stats/prometheus and /ready on this port"
    )
    envoy.set_defaults(run=_envoy_config)
    return root


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return int(args.run(Settings(), args))


if __name__ == "__main__":
    sys.exit(main())
