"""The `agentmesh` command: serve, mesh, worker, migrate, create-admin, call, kb import,
envoy-config, reindex."""

import argparse
import asyncio
import json
import os
import secrets
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import yaml
from google.protobuf import descriptor_pool, json_format, message_factory
from pydantic import ValidationError

from server.config import Settings
from services.auth.principal import Role
from services.errors import AlreadyExists, DomainError

if TYPE_CHECKING:
    from server.kb_import import Credentials


def _serve(settings: Settings, args: argparse.Namespace) -> int:
    from server.main import serve

    if args.services is not None:
        # Through the settings' own parsing and checks, as AGENTMESH_SERVICES would go.
        settings = Settings(**{**settings.model_dump(), "services": args.services})
    asyncio.run(serve(settings))
    return 0


def _mesh(settings: Settings, args: argparse.Namespace) -> int:
    from server.mesh import run_mesh

    asyncio.run(run_mesh(settings, replicas=args.replicas, workers=args.workers))
    return 0


def _worker(settings: Settings, _args: argparse.Namespace) -> int:
    from server.worker import run_worker

    asyncio.run(run_worker(settings))
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

    domain = build_domain(settings.model_copy(update={"services": ["auth"]}))  # no models
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
    from server.channels import connect

    async with connect(target) as channel:
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


def _kb_credentials(args: argparse.Namespace) -> "Credentials | None":
    """--token / AGENTMESH_TOKEN, else --email with AGENTMESH_PASSWORD or a password read
    from stdin; None (with a message) when neither is given."""
    from server.kb_import import Credentials

    token = args.token or os.environ.get("AGENTMESH_TOKEN", "")
    if token:
        return Credentials(token=token)
    if not args.email:
        print("kb import: give --token (or AGENTMESH_TOKEN) or --email", file=sys.stderr)
        return None
    password = os.environ.get("AGENTMESH_PASSWORD")
    if password is None:
        if sys.stdin.isatty():
            import getpass

            password = getpass.getpass(f"Password for {args.email}: ")
        else:
            password = sys.stdin.readline().rstrip("\n")
    return Credentials(email=args.email, password=password)


def _kb_import(settings: Settings, args: argparse.Namespace) -> int:
    from server.kb_import import Display, ImportOptions, import_paths

    credentials = _kb_credentials(args)
    if credentials is None:
        return 2
    options = ImportOptions(
        shared=args.shared,
        concurrency=args.concurrency,
        max_retry_delay=args.max_retry_delay,
        poll_interval=args.poll_interval,
        timeout=args.timeout,
    )
    target = args.target or f"127.0.0.1:{settings.grpc_port}"
    # The bars go to stderr, and only when both streams are a terminal: logs stay plain.
    bars = not args.no_progress and sys.stdout.isatty() and sys.stderr.isatty()
    try:
        with Display(enabled=bars) as display:
            summary = asyncio.run(import_paths(target, credentials, args.paths, options, display))
    except KeyboardInterrupt:
        print("kb import: interrupted; uploaded documents keep ingesting", file=sys.stderr)
        return 130
    print(json.dumps(summary.as_json(), indent=2) if args.json else summary.as_text())
    return summary.exit_code


def _envoy_config(settings: Settings, args: argparse.Namespace) -> int:
    """The config for an Envoy that runs apart from agentmesh (its own container): in front
    of one process, or with ENVOY_UPSTREAMS set, the mesh's front and router."""
    from server.envoy import add_stats_listener, envoy_config
    from server.envoy_mesh import mesh_envoy_config

    if settings.envoy_upstreams:
        ops = settings.envoy_ops_upstreams or [
            f"{args.upstream or settings.metrics_host}:{settings.metrics_port}"
        ]
        config = mesh_envoy_config(
            settings, upstreams=settings.envoy_upstreams, ops=ops, descriptor=args.descriptor
        )
    else:
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


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, not {text}")
    return value


async def _reindex_async(settings: Settings, args: argparse.Namespace) -> int:
    from server import domain_settings as configured
    from services.knowledge.embeddings import Embedder
    from services.knowledge.qdrant_edge_store import ShardInUse
    from services.knowledge.reindexing import passage_encoder
    from services.knowledge.vector_backends import reindex_vector_store

    model = configured.embedder_settings(settings)
    embedder = Embedder.load(model)
    stamp = time.strftime("%Y%m%d%H%M%S")
    try:
        result = await reindex_vector_store(
            url=settings.qdrant_url,
            api_key=configured.revealed(settings.qdrant_api_key),
            data_dir=settings.data_dir,
            collection=settings.qdrant_collection,
            target_collection=args.collection or f"{settings.qdrant_collection}_{stamp}",
            embed=passage_encoder(embedder),
            dimension=embedder.dimension,
            progress=lambda done: print(f"{done} passages re-embedded", file=sys.stderr),
        )
    except (ShardInUse, FileNotFoundError, FileExistsError) as error:
        print(f"Cannot re-index: {error}", file=sys.stderr)
        return 1
    finally:
        embedder.close()
    print(f"Re-embedded {result.passages} passages with {model.model} into {result.index}.")
    if settings.qdrant_url:
        print(
            f"Set AGENTMESH_QDRANT_COLLECTION={result.index} and restart agentmesh; the old "
            f"collection {result.previous} is kept (delete it once satisfied)."
        )
    else:
        print(f"The previous index is kept in {result.previous} (delete it once satisfied).")
    return 0


def _reindex(settings: Settings, args: argparse.Namespace) -> int:
    return asyncio.run(_reindex_async(settings, args))


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="agentmesh", description="A self-hosted AI agent platform.")
    commands = root.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve", help="run the gRPC server (and the Envoy sidecar for REST)"
    )
    serve.add_argument(
        "--services",
        metavar="LIST",
        help="comma-separated services to serve (auth, users, agent, knowledge, feedback,"
        " analytics, audit); default AGENTMESH_SERVICES, or all",
    )
    serve.set_defaults(run=_serve)
    mesh = commands.add_parser(
        "mesh",
        help="run the services as a mesh of processes behind one Envoy (PostgreSQL, Redis)",
    )
    mesh.add_argument("--replicas", type=_positive_int, default=2, help="of the stateless services")
    mesh.add_argument("--workers", type=_positive_int, default=1, help="ingestion workers")
    mesh.set_defaults(run=_mesh)
    commands.add_parser(
        "worker",
        help="run ingestion jobs from the PostgreSQL queue (scale embedding out; see README)",
    ).set_defaults(run=_worker)
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
    kb = commands.add_parser("kb", help="knowledge-base commands").add_subparsers(
        dest="kb_command", required=True
    )
    kb_import = kb.add_parser(
        "import",
        help="upload files and folders (PDF, DOCX, TXT, MD), wait for ingestion, summarize",
        epilog="Exit status: 0 when no file failed, 1 when one did, 2 when the import stopped "
        "(credentials or permission refused, server unreachable).",
    )
    kb_import.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    kb_import.add_argument("--target", help="host:port (default 127.0.0.1:AGENTMESH_GRPC_PORT)")
    kb_import.add_argument("--token", help="access token (default: AGENTMESH_TOKEN)")
    kb_import.add_argument(
        "--email", help="log in as this user; password from AGENTMESH_PASSWORD or stdin"
    )
    kb_import.add_argument("--shared", action="store_true", help="share with every user (admins)")
    kb_import.add_argument("--concurrency", type=_positive_int, default=4, help="uploads at once")
    kb_import.add_argument(
        "--max-retry-delay",
        type=_positive_float,
        default=60.0,
        help="longest wait when the server is busy, whatever delay it asks (seconds)",
    )
    kb_import.add_argument("--poll-interval", type=_positive_float, default=1.0, help="seconds")
    kb_import.add_argument("--timeout", type=_positive_float, default=120.0, help="seconds per RPC")
    kb_import.add_argument("--no-progress", action="store_true", help="no progress bars")
    kb_import.add_argument("--json", action="store_true", help="print the summary as JSON")
    kb_import.set_defaults(run=_kb_import)
    envoy = commands.add_parser(
        "envoy-config",
        help="print the Envoy config for an Envoy in its own container (the mesh's front and "
        "router when AGENTMESH_ENVOY_UPSTREAMS is set)",
    )
    envoy.add_argument(
        "--upstream",
        help="agentmesh's host name (default: GRPC_HOST); in the mesh, the operations "
        "server's when AGENTMESH_ENVOY_OPS_UPSTREAMS is empty",
    )
    envoy.add_argument("--descriptor", type=Path, help="default: AGENTMESH_DESCRIPTOR_SET")
    envoy.add_argument(
        "--stats-port", type=int, help="also serve /stats/prometheus and /ready on this port"
    )
    envoy.set_defaults(run=_envoy_config)
    reindex = commands.add_parser(
        "reindex",
        help="re-embed every stored passage with the configured embedding model",
        description=(
            "Re-embed every stored passage from its text with the configured embedding model "
            "(after changing AGENTMESH_EMBEDDING_MODEL), keeping ids and payloads. Embedded "
            "index: stop the server first (one process owns DATA_DIR/vectors); the new index "
            "replaces it and the old one is kept beside it. Qdrant server: the passages go "
            "into a new collection while the server keeps serving the old one; then set "
            "AGENTMESH_QDRANT_COLLECTION to it and restart."
        ),
    )
    reindex.add_argument(
        "--collection",
        help="Qdrant server only: the new collection (default: QDRANT_COLLECTION_<timestamp>)",
    )
    reindex.set_defaults(run=_reindex)
    return root


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.run(Settings(), args))
    except ValidationError as error:  # the settings, from the environment or the flags
        problems = "\n".join(
            f"  {'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in error.errors()
        )
        print(f"agentmesh: invalid configuration\n{problems}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
