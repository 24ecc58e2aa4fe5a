"""`buf breaking` against main, comparing workspace with workspace.

`--against .git#branch=main` alone cannot work here: the googleapis module the protos
import is copied at build time into a git-ignored folder, so main's tree in git lacks it.
This exports main's tree, adds the same copy, and compares against that directory.
"""

import io
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from tools.copy_googleapis import copy

ROOT = Path(__file__).resolve().parents[1]


def has_baseline(ref: str = "main") -> bool:
    """Whether `ref` exists and has protos to compare against."""
    probe = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{ref}:protos"], cwd=ROOT,
                           capture_output=True, check=False)  # fmt: skip
    return probe.returncode == 0


def breaking(ref: str = "main") -> subprocess.CompletedProcess[str]:
    archive = subprocess.run(
        ["git", "archive", "--format=tar", ref], cwd=ROOT, capture_output=True, check=True
    )
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            tar.extractall(tmp, filter="data")
        copy(Path(tmp) / "build" / "third_party")
        return subprocess.run(["buf", "breaking", "--against", tmp], cwd=ROOT, capture_output=True,
                              text=True, check=False)  # fmt: skip


if __name__ == "__main__":
    result = breaking(sys.argv[1] if len(sys.argv) > 1 else "main")
    print(result.stdout + result.stderr, end="")
    sys.exit(result.returncode)
