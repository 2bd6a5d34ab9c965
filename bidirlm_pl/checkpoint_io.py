"""Atomic checkpoint files: written to a temporary sibling, flushed to disk, renamed into place.

Lightning's default ``TorchCheckpointIO`` serialises into memory and then writes the final path in place,
so a job killed during that write leaves a truncated ``.ckpt`` under the real name (and
``ModelCheckpoint(save_top_k=...)`` may already have removed the previous good one). Here a kill at any
moment leaves either the previous file set or the new one complete: never a partial file under a
checkpoint's name (a stray ``.NAME.tmp-PID`` at most, which nothing reads and the next save replaces).

Sharded FSDP2 checkpoints (``ModelParallelStrategy(save_distributed_checkpoint=True)``, a folder per
checkpoint) are written by every rank into a staging folder beside the final one, which rank 0 then
swaps into place (:func:`replace_path`): the same guarantee for folders.
"""

from __future__ import annotations

import ctypes
import io
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.strategies import ModelParallelStrategy

RENAME_EXCHANGE = 2  # linux/fs.h: swap two paths atomically


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2``); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), RENAME_EXCHANGE) == 0


def replace_path(staging: str | Path, target: str | Path) -> Path:
    """Move a complete ``staging`` file or folder to ``target``, replacing what is there.

    When ``target`` exists the two are exchanged atomically where the OS can (so ``target`` is never
    missing); elsewhere the old one is first moved aside to ``.NAME.old-*``. The old one is then removed.
    """
    staging, target = Path(staging), Path(target)
    if not os.path.lexists(target):
        os.replace(staging, target)
        return target
    if _exchange(staging, target):
        old = staging
    else:
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(target, old)
        os.replace(staging, target)
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)
    return target


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")) + [folder]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes | memoryview) -> Path:
    """Write ``data`` to ``path`` atomically (same-folder temporary file, fsync, rename, fsync of the folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
    return path


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose saves are atomic renames (local filesystems; the default of every stage)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write_bytes(path, buffer.getbuffer())


class AtomicModelParallelStrategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` (FSDP2) whose sharded checkpoint folders appear complete or not at all.

    Every rank writes its shards into ``.NAME.partial`` beside the final folder; after a barrier rank 0
    flushes it and swaps it into place. Full (non-sharded) checkpoints go through the checkpoint I/O
    plugin as before (:class:`AtomicCheckpointIO` under ``bidirlm fit``). ``bidirlm fit`` puts this class
    in place of a configured ``lightning.pytorch.strategies.ModelParallelStrategy``.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        staging = path.with_name(f".{path.name}.partial")
        if self.global_rank == 0 and os.path.lexists(staging):  # left by a killed save: never complete
            shutil.rmtree(staging) if staging.is_dir() else staging.unlink()
        self.barrier("atomic_checkpoint_start")
        super().save_checkpoint(checkpoint, staging, storage_options)
        self.barrier("atomic_checkpoint_written")
        if self.global_rank == 0:
            _fsync_tree(staging)
            replace_path(staging, path)
        self.barrier("atomic_checkpoint_renamed")
