"""Fail when gen/ differs from a fresh generation of protos/: the messages, stubs, .pyi and
the Envoy descriptor set (buf.gen.yaml), the OpenAPI 2.0 document (buf.gen.openapi.yaml) and
its OpenAPI 3 conversion (tools/openapi3.py).

The 2.0 document needs protoc-gen-swagger (Debian's golang-grpc-gateway), the 3.0 one
Node.js and npm. Without protoc-gen-swagger the 3.0 document is still checked against the
committed 2.0 one; a document whose tool is missing is not checked, with a note, except
under CI=true, where the tool's absence fails."""

import filecmp
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tools import openapi3

ROOT = Path(__file__).resolve().parents[1]
DESCRIPTOR = "agentmesh.binpb"
OPENAPI_TEMPLATE = "buf.gen.openapi.yaml"
OPENAPI_DIR = "openapi"
OPENAPI = f"{OPENAPI_DIR}/{openapi3.SWAGGER}"
OPENAPI3 = f"{OPENAPI_DIR}/{openapi3.OPENAPI3}"
SWAGGER_PLUGIN = "protoc-gen-swagger"
INSTALL_HINT = "apt-get install golang-grpc-gateway"


def generate(out: Path) -> None:
    """Run the same generation as `make gen`, into `out` instead of gen/ (without OpenAPI)."""
    subprocess.run(["buf", "generate", "-o", str(out)], cwd=ROOT, check=True)
    subprocess.run(
        [
            "buf",
            "build",
            "--exclude-source-info",
            "--as-file-descriptor-set",
            "-o",
            str(out / "gen" / DESCRIPTOR),
        ],
        cwd=ROOT,
        check=True,
    )


def generate_openapi(out: Path) -> None:
    """Write the OpenAPI document as `make gen` does, into `out` instead of gen/."""
    command = ["buf", "generate", "--template", OPENAPI_TEMPLATE, "-o", str(out)]
    subprocess.run(command, cwd=ROOT, check=True)


def openapi_plugin_available() -> bool:
    return shutil.which(SWAGGER_PLUGIN) is not None


def _files(base: Path, roots: list[str]) -> set[str]:
    """The files at or under `roots` (relative to `base`), relative to `base`."""
    found: set[str] = set()
    for root in roots:
        path = base / root
        candidates = path.rglob("*") if path.is_dir() else [path]
        found |= {
            str(p.relative_to(base))
            for p in candidates
            if p.is_file() and "__pycache__" not in p.parts
        }
    return found


def _differences(fresh: Path, committed: Path, roots: list[str]) -> list[str]:
    fresh_files, committed_files = _files(fresh, roots), _files(committed, roots)
    differ = [
        name
        for name in fresh_files & committed_files
        if not filecmp.cmp(fresh / name, committed / name, shallow=False)
    ]
    return sorted((fresh_files ^ committed_files) | set(differ))


def stale_files() -> list[str]:
    """The files of gen/ (messages, stubs, .pyi, descriptor set) that are missing, extra or
    different from a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        return _differences(Path(tmp) / "gen", ROOT / "gen", ["agentmesh", DESCRIPTOR])


def stale_openapi(*, convert: bool = True) -> list[str]:
    """The files of gen/openapi/ that are missing, extra or different from a fresh
    generation (needs protoc-gen-swagger on PATH); with `convert` false, only the 2.0
    document (the 3.0 one needs Node.js)."""
    with tempfile.TemporaryDirectory() as tmp:
        generate_openapi(Path(tmp))
        fresh = Path(tmp) / "gen"
        if not convert:
            return _differences(fresh, ROOT / "gen", [OPENAPI])
        openapi3.convert(fresh / OPENAPI, fresh / OPENAPI3)
        return _differences(fresh, ROOT / "gen", [OPENAPI_DIR])


def stale_openapi3() -> list[str]:
    """[OPENAPI3] if it differs from a fresh conversion of the committed 2.0 document
    (needs Node.js and npm, not protoc-gen-swagger)."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "gen"
        (fresh / OPENAPI_DIR).mkdir(parents=True)
        openapi3.convert(ROOT / "gen" / OPENAPI, fresh / OPENAPI3)
        return _differences(fresh, ROOT / "gen", [OPENAPI3])


def _ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


if __name__ == "__main__":
    stale = stale_files()
    plugin, node = openapi_plugin_available(), openapi3.converter_available()
    if plugin:
        stale += stale_openapi(convert=node)
    elif node:
        stale += stale_openapi3()
    needs = [
        (f"gen/{OPENAPI}", SWAGGER_PLUGIN, INSTALL_HINT, plugin),
        (f"gen/{OPENAPI3}", " and ".join(openapi3.TOOLS), openapi3.INSTALL_HINT, node),
    ]
    failed = False
    for document, tool, hint, present in needs:
        if present:
            continue
        if _ci():
            print(f"{tool} not on PATH ({hint}); CI=true requires it")
            failed = True
        else:
            print(f"{document} not checked: {tool} not on PATH ({hint})")
    for name in stale:
        print(f"stale: gen/{name}")
    if stale:
        print("gen/ is out of date: run `make gen` and commit the result.")
    sys.exit(1 if stale or failed else 0)
