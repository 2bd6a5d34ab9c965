"""HFExport: write the stage's model as a Hugging Face folder at fit end and every N steps."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.core.hub import push_folder, split_hub_id


class HFExport(L.Callback):
    """Export ``pl_module.export_hf`` to ``dirpath`` (default ``<default_root_dir>/hf``) at fit end.

    Args:
        dirpath: target folder; ``every_n_steps`` exports go to ``<dirpath>/step-<N>``.
        every_n_steps: also export every N optimizer steps (0 = only at the end).
        push_to_hub: upload the final export to this hub repo (``org/name``, created when missing; the token
            comes from ``HF_TOKEN`` or ``hf auth login``).
        private: create the ``push_to_hub`` repo as private.
    """

    def __init__(self, dirpath: str | None = None, every_n_steps: int = 0, push_to_hub: str | None = None,
                 private: bool = False):

        if push_to_hub is not None and (split_hub_id(push_to_hub) is None or "@" in push_to_hub):
            raise BidirLMError(f"HFExport push_to_hub '{push_to_hub}' is not a hub repo id; expected 'org/name'")
        self.dirpath = dirpath
        self.every_n_steps = every_n_steps
        self.push_to_hub, self.private = push_to_hub, private
        self.last_export: Path | None = None
        self._last_step: int | None = None

    def _root(self, trainer) -> Path:
        if self.dirpath is not None:
            return Path(self.dirpath)
        # beside the run's other outputs (its checkpoints and logs live under default_root_dir too)
        return Path(trainer.default_root_dir) / "hf"

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
        target = self._root(trainer)
        self._export(trainer, pl_module, target)
        if self.push_to_hub is not None and trainer.is_global_zero:

            rank_zero_info(f"pushed {target} -> {push_folder(target, self.push_to_hub, private=self.private)}")
