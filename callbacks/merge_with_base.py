"""MergeWithBase: at fit end, export the trained model and write its merge with the base checkpoint.

BidirLM's anti-forgetting step: average the adapted model with the model it started from (50/50
by default) so that what adaptation erased (languages, code, math) comes back. The merge runs
through the streaming engine, so it needs a few tensors of memory on top of the trained model.

    callbacks:
      - class_path: bidirlm_pl.callbacks.MergeWithBase
        init_args: {ratio: 0.5}          # weight of the trained model; the base gets 1 - ratio
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.models.merging.engine import MergeReport, MergeSpec, merge
from bidirlm_pl.models.merging.safetensors_io import Checkpoint


class MergeWithBase(L.Callback):
    """Write ``<dirpath>/trained`` (the stage's export) and ``<dirpath>/merged`` (trained x base).

    Args:
        dirpath: output root (default ``<log_dir>/merge_with_base``).
        base: the base checkpoint (default: the stage's starting ``model``).
        ratio: weight of the trained model in the merge (base: ``1 - ratio``).
        method: ``linear`` or ``slerp``, with weights ``[ratio, 1 - ratio]``.
        dtype: output dtype (default: the trained model's).
    """

    def __init__(self, dirpath: str | None = None, base: str | None = None, ratio: float = 0.5,
                 method: str = "linear", dtype: str | None = None):
        if not 0.0 <= ratio <= 1.0:
            raise BidirLMError(f"MergeWithBase ratio {ratio} is not in [0, 1] (the trained model's weight)")
        if method not in ("linear", "slerp"):
            raise BidirLMError(f"MergeWithBase method '{method}' is not one of ['linear', 'slerp']")
        self.dirpath, self.base, self.ratio, self.method, self.dtype = dirpath, base, ratio, method, dtype
        self.report: MergeReport | None = None

    def _root(self, trainer) -> Path:
        if self.dirpath is not None:
            return Path(self.dirpath)
        return Path(trainer.log_dir or trainer.default_root_dir) / "merge_with_base"

    def setup(self, trainer, pl_module, stage=None):
        base = self.base or getattr(pl_module, "model_path", None)
        if base is None:
            raise BidirLMError("MergeWithBase needs 'base' (the stage has no model_path to merge back into)")
        Checkpoint(base)  # a missing or weightless base fails now, not after training

    def on_fit_end(self, trainer, pl_module):
        root = self._root(trainer)
        trained, merged = root / "trained", root / "merged"
        if trainer.is_global_zero:
            pl_module.export_hf(trained, overwrite=True)
            base = self.base or pl_module.model_path
            key_maps = _prefix_maps(Checkpoint(trained), Checkpoint(base))
            self.report = merge(MergeSpec(
                models=[str(trained), str(base)], weights=[self.ratio, 1.0 - self.ratio], output=str(merged),
                method=self.method, dtype=self.dtype, key_maps=key_maps, overwrite=True,
            ))
            rank_zero_info(f"merged the trained model with its base ({self.ratio:g}/{1 - self.ratio:g}): {merged}")
        trainer.strategy.barrier("merge_with_base")


def _prefix_maps(trained: Checkpoint, base: Checkpoint) -> list[dict[str, str] | None] | None:
    """Key maps when a bare decoder (``layers.0...``) meets a causal LM (``model.layers.0...``)."""
    def bare(ckpt):
        return not any(k.startswith("model.") for k in ckpt.keys())

    if bare(trained) and not bare(base):
        return [{"": "model."}, {"model.": "model."}]
    if bare(base) and not bare(trained):
        return [{"model.": "model."}, {"": "model."}]
    return None
