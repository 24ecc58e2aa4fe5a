"""`buf breaking` against the released contract: the last release tag, or the previous commit.

What it compares against (`baseline`), in order:
1. the newest release tag (`vMAJOR.MINOR.PATCH`) reachable from HEAD: what clients were
   given. A change breaking it fails, however many commits ago it was made; what was added
   after the release may still change.
2. with no release yet, the commit before HEAD (its first parent; on a branch, the merge
   base with main): the change under test must not break what came before it.
Comparing with `main` itself, as CI runs on a clean clone of main, compares main with
itself and can never fail.

`--against .git#ref=...` alone cannot work here: the googleapis module the protos import is
copied at build time into a git-ignored folder, so a commit's tree lacks it. This exports
the baseline's tree, adds the same copy, and compares against that directory.

Run as `python -m tools.check_breaking [REF]` (REF: compare against that instead).
"""

import io
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from tools.copy_googleapis import copy

ROOT = Path(__file__).resolve().parents[1]
RELEASE_TAGS = "v[0-9]*.[0-9]*.[0-9]*"
MAIN = "main"


def _git(root: Path, *args: str) -> str | None:
    """The output of `git args` in `root`, or None when it fails."""
    done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=False)
    return done.stdout.strip() if done.returncode == 0 else None


def resolve(root: Path, ref: str) -> str | None:
    return _git(root, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")


def baseline(root: Path = ROOT) -> str | None:
    """The commit to compare HEAD's contract against (see the module docstring): None when
    there is nothing before HEAD."""
    tag = _git(root, "describe", "--tags", "--abbrev=0", "--match", RELEASE_TAGS, "HEAD")
    if tag:
        return resolve(root, tag)
    head, main = resolve(root, "HEAD"), resolve(root, MAIN)
    if main and main != head:
        return _git(root, "merge-base", "HEAD", MAIN)
    return resolve(root, "HEAD^")


def has_protos(ref: str, root: Path = ROOT) -> bool:
    """Whether `ref` has protos to compare against."""
    return _git(root, "rev-parse", "--verify", "--quiet", f"{ref}:protos") is not None


def breaking(ref: str, root: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """`buf breaking` of the working tree at `root` against the commit `ref`."""
    archive = subprocess.run(
        ["git", "archive", "--format=tar", ref], cwd=root, capture_output=True, check=True
    )
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            tar.extractall(tmp, filter="data")
        copy(Path(tmp) / "build" / "third_party")
        return subprocess.run(["buf", "breaking", "--against", tmp], cwd=root, capture_output=True,
                              text=True, check=False)  # fmt: skip


if __name__ == "__main__":
    against = sys.argv[1] if len(sys.argv) > 1 else baseline()
    if against is None or not has_protos(against):
        print("nothing to compare against: no release tag and no earlier commit with protos")
        sys.exit(0)
    print(f"buf breaking against {against}", file=sys.stderr)
    result = breaking(against)
    print(result.stdout + result.stderr, end="")
    sys.exit(result.returncode)
