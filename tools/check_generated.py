"""Fail when gen/ differs from a fresh generation of protos/: the messages, stubs, .pyi and
the Envoy descriptor set (buf.gen.yaml), and the OpenAPI document (buf.gen.openapi.yaml).

The OpenAPI document needs protoc-gen-swagger (Debian's golang-grpc-gateway). Without it
that file is not checked, with a note, except under CI=true, where its absence fails."""

import filecmp
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DESCRIPTOR = "agentmesh.binpb"
OPENAPI_TEMPLATE = "buf.gen.openapi.yaml"
OPENAPI_DIR = "openapi"
OPENAPI = f"{OPENAPI_DIR}/agentmesh.swagger.json"
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


def stale_openapi() -> list[str]:
    """The files of gen/openapi/ that are missing, extra or different from a fresh
    generation (needs protoc-gen-swagger on PATH)."""
    with tempfile.TemporaryDirectory() as tmp:
        generate_openapi(Path(tmp))
        return _differences(Path(tmp) / "gen", ROOT / "gen", [OPENAPI_DIR])


def _ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


if __name__ == "__main__":
    stale = stale_files()
    failed = False
    if openapi_plugin_available():
        stale += stale_openapi()
    elif _ci():
        print(f"{SWAGGER_PLUGIN} is not on PATH ({INSTALL_HINT}); CI=true requires it")
        failed = True
    else:
        print(f"gen/{OPENAPI} not checked: {SWAGGER_PLUGIN} is not on PATH ({INSTALL_HINT})")
    for name in stale:
        print(f"stale: gen/{name}")
    if stale:
        print("gen/ is out of date: run `make gen` and commit the result.")
    sys.exit(1 if stale or failed else 0)
