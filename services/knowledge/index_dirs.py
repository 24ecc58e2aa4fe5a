"""Directories beside the embedded index: leftovers of interrupted runs, names for kept copies."""

import shutil
from pathlib import Path


def unused_name(path: Path) -> Path:
    """`path`, or `path.2`, `path.3`, ...: the first that does not exist."""
    candidate, number = path, 1
    while candidate.exists():
        number += 1
        candidate = path.with_name(f"{path.name}.{number}")
    return candidate


def remove_stale(path: Path) -> None:
    """Remove a directory an interrupted run of ours left behind, if there is one."""
    if path.exists():
        shutil.rmtree(path)


def keep_aside(path: Path, suffix: str) -> Path:
    """Rename `path` to an unused `path.suffix` (a user's data is never deleted); the name."""
    kept = unused_name(path.with_name(f"{path.name}.{suffix}"))
    path.rename(kept)
    return kept
