"""HFExport: write the stage's model as a Hugging Face folder at fit end and every N steps."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info


class HFExport(L.Callback):
    """Export ``pl_module.export_hf`` to ``dirpath`` (default ``<log_dir>/hf``) at fit end.

    Args:
        dirpath: target folder; ``every_n_steps`` exports go to ``<dirpath>/step-<N>``.
        every_n_steps: also export every N optimizer steps (0 = only at the end).
    """

    def __init__(self, dirpath: str | None = None, every_n_steps: int = 0):
        self.dirpath = dirpath
        self.every_n_steps = every_n_steps
        self.last_export: Path | None = None
        self._last_step: int | None = None

    def _root(self, trainer) -> Path:
        if self.dirpath is not None:
            return Path(self.dirpath)
        return Path(trainer.log_dir or trainer.default_root_dir) / "hf"

    def _export(self, trainer, pl_module, target: Path) -> None:
        # every rank takes part (sharded parameters are gathered), rank 0 writes
        pl_module.export_hf(target)
        self.last_export = Path(target)
        rank_zero_info(f"exported Hugging Face folder: {target}")
        trainer.strategy.barrier("hf_export")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        # gradient accumulation repeats a global_step over several batches: export it once
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self._last_step = step
            self._export(trainer, pl_module, self._root(trainer) / f"step-{step}")

    def on_fit_end(self, trainer, pl_module):
        self._export(trainer, pl_module, self._root(trainer))
