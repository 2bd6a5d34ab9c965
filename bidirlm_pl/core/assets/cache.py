"""Where offline assets are built and cached, and the lock that builds each one once across processes."""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path


def cache_dir() -> Path:
    """Where converted assets live: $BIDIRLM_CACHE or ~/.cache/bidirlm-pl."""
    root = Path(os.environ.get("BIDIRLM_CACHE", Path.home() / ".cache" / "bidirlm-pl"))
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextmanager
def file_lock(path: Path):
    """Serialise conversions across processes (pytest workers, parallel CLI calls)."""
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
