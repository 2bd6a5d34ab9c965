"""Atomic checkpoint files: written to a temporary sibling, flushed to disk, renamed into place.

Lightning's default ``TorchCheckpointIO`` serialises into memory and then writes the final path in place,
so a job killed during that write leaves a truncated ``.ckpt`` under the real name (and
``ModelCheckpoint(save_top_k=...)`` may already have removed the previous good one). Here a kill at any
moment leaves either the previous file set or the new one complete: never a partial file under a
checkpoint's name (a stray ``.NAME.tmp-PID`` at most, which nothing reads and the next save replaces).
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO


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
