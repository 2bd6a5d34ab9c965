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
import os
import shutil
import tempfile
import uuid
from pathlib import Path

from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.core.specs import BackboneSpec, LoraSpec, Schedule

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


def fsync_tree(folder: Path) -> None:
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


# ---------------------------------------------------------------- reading checkpoints back

DCP_METADATA = ".metadata"  # torch.distributed.checkpoint's index of a sharded folder, written last
LIGHTNING_META = "meta.pt"  # Lightning's non-tensor checkpoint entries (hyperparameters, loops, RNG)


def is_sharded_checkpoint(path: Path) -> bool:
    """A complete sharded (FSDP2 / DCP) checkpoint folder."""
    return path.is_dir() and (path / DCP_METADATA).is_file()


def safe_torch_load(path: str | Path, *, mmap: bool = False):
    """``torch.load(weights_only=True)`` with our config dataclasses allow-listed (``mmap``: tensors stay on disk
    until touched)."""
    import torch


    # the specs by their current names and by the names checkpoints of earlier versions recorded
    allowed = [Schedule, LoraSpec, BackboneSpec, (Schedule, "bidirlm_pl.stages.base.Schedule"),
               (LoraSpec, "bidirlm_pl.backbone.LoraSpec"), (BackboneSpec, "bidirlm_pl.backbone.BackboneSpec"),
               (Schedule, "bidirlm_pl.specs.Schedule"), (LoraSpec, "bidirlm_pl.specs.LoraSpec"),
               (BackboneSpec, "bidirlm_pl.specs.BackboneSpec")]
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def load_checkpoint(path: str | Path) -> dict:
    """A Lightning checkpoint (file or sharded folder) loaded with ``weights_only=True``."""
    path = Path(path)
    if path.is_dir() and not is_sharded_checkpoint(path):
        raise BidirLMError(f"checkpoint '{path}' is a folder without '{DCP_METADATA}'; expected a .ckpt file or a "
                           "sharded checkpoint folder written by `bidirlm fit` (FSDP2, save_distributed_checkpoint)")
    if not path.exists():
        raise BidirLMError(f"checkpoint '{path}' does not exist; expected a .ckpt file written by `bidirlm fit`")
    try:
        ckpt = _load_sharded(path) if path.is_dir() else safe_torch_load(path)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        first = first.split(". ")[0][:90]  # the library's first sentence; the rest explains torch.load's options
        raise BidirLMError(f"checkpoint '{path}' cannot be loaded safely (weights_only): {first}") from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise BidirLMError(f"checkpoint '{path}' has no state_dict/hyper_parameters; expected a Lightning checkpoint")
    return ckpt


def _load_sharded(folder: Path) -> dict:
    """A sharded (DCP) Lightning checkpoint consolidated into one dict in this process."""

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        consolidated = Path(tmp) / "full.pt"
        dcp_to_torch_save(folder, consolidated)
        ckpt = safe_torch_load(consolidated)
    meta = folder / LIGHTNING_META
    if meta.is_file():
        ckpt.update(safe_torch_load(meta))
    return ckpt
