"""The OpenAPI 3 document: gen/openapi/agentmesh.openapi.json, converted from the Swagger 2.0
one protoc-gen-swagger writes (no protoc plugin for OpenAPI 3 is installable here) by npm's
swagger2openapi.

swagger2openapi and every package it pulls in are pinned by tools/npm/package-lock.json and
installed with `npm ci` into tools/npm/node_modules (git-ignored), again whenever the lock
file changes: an `npx swagger2openapi@7.0.8` would pin the tool but let its dependencies
drift, and the output must be byte-identical on every machine (CI compares it with the
committed file). Needs Node.js and npm; `make gen` and tools/check_generated.py skip the
document without them, except under CI=true.

    python -m tools.openapi3 [gen/openapi]   # converts the directory's Swagger 2.0 document
"""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NPM_PROJECT = ROOT / "tools" / "npm"
LOCK_FILE = NPM_PROJECT / "package-lock.json"
MODULES = NPM_PROJECT / "node_modules"
# A copy of the lock file `npm ci` last installed from: a different lock file reinstalls.
INSTALLED_LOCK = MODULES / ".agentmesh-installed-lock.json"
CONVERTER = MODULES / ".bin" / "swagger2openapi"
SWAGGER = "agentmesh.swagger.json"
OPENAPI3 = "agentmesh.openapi.json"
TOOLS = ("node", "npm")
INSTALL_HINT = "install Node.js with npm, e.g. apt-get install nodejs npm"


def converter_available() -> bool:
    """Whether Node.js and npm are on PATH (the converter itself is installed on demand)."""
    return all(shutil.which(tool) for tool in TOOLS)


def install() -> Path:
    """The pinned swagger2openapi, installed with `npm ci` if the lock file changed."""
    lock = LOCK_FILE.read_bytes()
    current = INSTALLED_LOCK.exists() and INSTALLED_LOCK.read_bytes() == lock
    if not (current and CONVERTER.exists()):
        npm_ci = ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"]
        subprocess.run(npm_ci, cwd=NPM_PROJECT, check=True)
        INSTALLED_LOCK.write_bytes(lock)
    return CONVERTER


def convert(swagger: Path, out: Path) -> None:
    """Write the OpenAPI 3.0 form of the Swagger 2.0 document `swagger` to `out`, indented
    as the Swagger one is (two spaces); a document it cannot convert fails."""
    command = [
        str(install()),
        "--targetVersion", "3.0.0",
        # A message-typed field's description sits beside its $ref: kept, as in the 2.0
        # document (the default drops it, and with it most fields' documentation).
        "--refSiblings", "preserve",
        "--indent", "  ",
        str(swagger),
    ]  # fmt: skip
    # Its complaints go to stderr, where whoever ran this sees them.
    converted = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)
    out.write_text(converted.stdout)


if __name__ == "__main__":
    directory = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "gen" / "openapi"
    convert(directory / SWAGGER, directory / OPENAPI3)
