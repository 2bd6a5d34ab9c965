"""The Lightning side of atomic saves: a CheckpointIO plugin and an FSDP2 strategy that write through
:mod:`bidirlm_pl.core.checkpoint_io` (``bidirlm fit`` puts both in place; see that module for the guarantee)."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.strategies import ModelParallelStrategy

from bidirlm_pl.core import checkpoint_io
from bidirlm_pl.core.errors import BidirLMError


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose saves are atomic renames (local filesystems; the default of every stage)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise BidirLMError("AtomicCheckpointIO takes no storage_options; remove them from the save call")
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        checkpoint_io.atomic_write_bytes(path, buffer.getbuffer())


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
            checkpoint_io.fsync_tree(staging)
            checkpoint_io.replace_path(staging, path)
        self.barrier("atomic_checkpoint_renamed")
