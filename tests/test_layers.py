"""The house's import rules (CONTRIBUTING.md § Layers), read from the source with `ast`:
the domain never imports the transport, the feature packages stack one way on shared
infrastructure, and the composition root's domain layer imports no grpc."""

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.config import ROOT

# Bottom to top: a feature package may import the ones before it, never the ones after.
FEATURES = ["auth", "teams", "quotas", "knowledge", "agent", "feedback", "analytics", "accounts"]
# Shared infrastructure, below every feature; it imports no feature package.
SHARED = {
    "errors",
    "db",
    "cache",
    "pagination",
    "periods",
    "metrics",
    "limits",
    "usage_events",
    "audit",
    "outages",
}
# Every table in one module for Alembic's autogenerate: the one module above them all.
ALL_MODELS = "services.models"
TRANSPORT_ONLY = ("grpc", "grpc_health", "grpc_reflection", "agentmesh", "google.rpc")
# The composition root's first layer, and what it maps settings with.
DOMAIN_LAYER = ("server.domain", "server.domain_settings")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> Iterator[tuple[int, str]]:
    """Every module `path` imports, at any depth of the file (lazy imports included)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module


def _modules(package: str) -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((ROOT / package).rglob("*.py"))}


def _top(name: str, package: str) -> str | None:
    """`services.agent.tools.base` → `agent` (for package `services`); None outside it."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == package else None


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_every_services_module_is_in_a_known_layer() -> None:
    unknown = (
        {
            _top(name, "services")
            for name in _modules("services")
            if name not in ("services", ALL_MODELS)
        }
        - SHARED
        - set(FEATURES)
    )
    assert not unknown, f"put each in FEATURES or SHARED (and in CONTRIBUTING.md): {unknown}"


def test_domain_never_imports_the_transport() -> None:
    found = [
        f"{name}:{line} imports {imported}"
        for name, path in _modules("services").items()
        for line, imported in _imports(path)
        if _under(imported, (*TRANSPORT_ONLY, "server"))
    ]
    assert not found


def test_feature_packages_stack_one_way() -> None:
    found = []
    for name, path in _modules("services").items():
        owner = _top(name, "services")
        if name == ALL_MODELS or owner is None:
            continue
        for line, imported in _imports(path):
            target = _top(imported, "services")
            if target is None or target == owner or target in SHARED:
                continue
            if owner in SHARED:
                found.append(f"{name}:{line}: shared infrastructure imports {imported}")
            elif FEATURES.index(target) > FEATURES.index(owner):
                found.append(f"{name}:{line}: {owner} imports {imported}, which stacks above it")
    assert not found


@pytest.mark.parametrize("layer", DOMAIN_LAYER)
def test_the_domain_layer_of_the_root_imports_no_grpc(layer: str) -> None:
    """Checked through the server modules it imports, since they come along with it."""
    modules = _modules("server")
    seen, pending, found = set(), [layer], []
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        for line, imported in _imports(modules[name]):
            if _under(imported, TRANSPORT_ONLY):
                found.append(f"{name}:{line} imports {imported}")
            elif imported in modules:
                pending.append(imported)
    assert not found


def test_transport_modules_do_not_import_sqlalchemy() -> None:
    found = [
        f"{name}:{line} imports {imported}"
        for name, path in _modules("server").items()
        if not _under(name, DOMAIN_LAYER)
        for line, imported in _imports(path)
        if _under(imported, ("sqlalchemy",))
    ]
    assert not found
