"""One run per output folder: ``bidirlm run`` and ``bidirlm fit`` hold ``<folder>/.bidirlm.lock`` while they work.

The lock file records the holder (host, pid, command, start time). A second run into the same folder
fails in one line naming the holder; a lock whose holder is gone (its pid is dead on this host) is
taken over with a message. Only the launching process locks: the extra processes of a distributed
run (``RANK`` / ``LOCAL_RANK`` > 0) share the lock of their rank 0.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import sys
import time
from pathlib import Path

from bidirlm_pl.core.errors import BidirLMError

LOCK_NAME = ".bidirlm.lock"
_held: list[Path] = []
_created: dict[Path, Path] = {}  # lock -> the topmost folder its acquire created (removed again when left empty)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_launcher() -> bool:
    return all(int(os.environ.get(name, "0") or 0) == 0 for name in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def acquire(folder: str | Path) -> Path | None:
    """Take the lock of ``folder`` for this process (released by :func:`release_all` or at exit)."""
    if not _is_launcher():
        return None
    folder = Path(folder).resolve()
    path = folder / LOCK_NAME
    if path in _held:
        return path
    top = folder
    while not top.parent.exists():
        top = top.parent
    created = None if folder.exists() else top
    folder.mkdir(parents=True, exist_ok=True)
    record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": " ".join(["bidirlm", *sys.argv[1:]])[:200]}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError as err:
            holder = _read(path)
            if holder.get("host") == record["host"] and not _alive(int(holder.get("pid", -1))):
                print(f"taking over the stale lock of {folder} (pid {holder.get('pid')} on {holder.get('host')} "
                      "is gone)", file=sys.stderr, flush=True)
                path.unlink(missing_ok=True)
                continue
            raise BidirLMError(f"output folder '{folder}' is in use by pid {holder.get('pid')} on "
                               f"{holder.get('host')} since {holder.get('started')}; wait for it, stop it, or use "
                               "another folder") from err
        with os.fdopen(fd, "w") as handle:
            json.dump(record, handle)
        _held.append(path)
        if created is not None:
            _created[path] = created
        return path
    raise BidirLMError(f"output folder '{folder}': could not take its lock {path}")


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def held() -> int:
    """How many locks this process holds (pass it to :func:`release_since`)."""
    return len(_held)


def release_since(count: int = 0) -> None:
    """Remove the locks taken after ``held()`` returned ``count`` (all of them by default)."""
    while len(_held) > count:
        path = _held.pop()
        if _read(path).get("pid") == os.getpid():
            path.unlink(missing_ok=True)
        _remove_if_empty(path.parent, _created.pop(path, None))


def _remove_if_empty(folder: Path, top: Path | None) -> None:
    """A failed run leaves nothing: the folders the lock created go again when nothing else was written."""
    if top is None:
        return
    while True:
        try:
            folder.rmdir()
        except OSError:
            return
        if folder == top:
            return
        folder = folder.parent


def release_all() -> None:
    release_since(0)


atexit.register(release_all)
