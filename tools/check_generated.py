"""Fail when gen/ differs from a fresh generation of protos/ (messages, stubs, .pyi and
the Envoy descriptor set)."""

import filecmp
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DESCRIPTOR = "agentmesh.binpb"


def generate(out: Path) -> None:
    """Run the same generation as `make gen`, into `out` instead of gen/."""
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


def _files(base: Path) -> set[str]:
    paths = [*base.joinpath("agentmesh").rglob("*"), base / DESCRIPTOR]
    return {str(p.relative_to(base)) for p in paths if p.is_file() and "__pycache__" not in p.parts}


def stale_files() -> list[str]:
    """The files of gen/ that are missing, extra or different from a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh, committed = Path(tmp) / "gen", ROOT / "gen"
        fresh_files, committed_files = _files(fresh), _files(committed)
        differ = [
            name
            for name in fresh_files & committed_files
            if not filecmp.cmp(fresh / name, committed / name, shallow=False)
        ]
        return sorted((fresh_files ^ committed_files) | set(differ))


if __name__ == "__main__":
    stale = stale_files()
    for name in stale:
        print(f"stale: gen/{name}")
    if stale:
        print("gen/ is out of date: run `make gen` and commit the result.")
    sys.exit(1 if stale else 0)
