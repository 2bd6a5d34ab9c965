"""EmbeddingEval: log the Lee similarity Spearman (the shared "STS score") of the model being trained.

Works with any stage that has ``backbone`` and ``tokenizer``. The model embeds through
:class:`~bidirlm_pl.models.encoder.Encoder`, the one embedding path of evaluation (``compare`` and MTEB
use it too), with the pooling and normalisation the stage exports (the contrastive stage's ``pooler`` and
``normalize``; mean pooling for other stages) and no prompt: an STS pair holds no query, as in
``compare``'s ``sts`` task. Logged as ``val/lee_spearman`` at every validation end,
and once before training (``before_fit``) so one run shows the score before and after.

    callbacks:
      - class_path: bidirlm_pl.callbacks.EmbeddingEval
        init_args: {n_docs: 50, before_fit: true}
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from bidirlm_pl.evaluation.embedding import lee_spearman
from bidirlm_pl.models.encoder import Encoder


class EmbeddingEval(L.Callback):
    """Lee et al. (2005) document-similarity Spearman of the current model (rank 0 computes, all log).

    Args:
        n_docs: how many of the 50 Lee documents to embed (their upper-triangle pairs are scored).
        batch_size: encode batch size.
        max_length: token limit per document.
        before_fit: also score the model before the first optimizer step (logged at step 0).
    """

    def __init__(self, n_docs: int = 50, batch_size: int = 8, max_length: int = 512, before_fit: bool = True):
        self.n_docs, self.batch_size, self.max_length, self.before_fit = n_docs, batch_size, max_length, before_fit
        self.history: list[tuple[int, float]] = []

    def score(self, pl_module) -> float:
        pooler = getattr(pl_module, "pooler", None) or "mean"
        encoder = Encoder(pl_module.backbone, pl_module.tokenizer, pooler,
                          normalize=getattr(pl_module, "normalize", True), max_length=self.max_length)
        return lee_spearman(encoder, batch_size=self.batch_size, n_docs=self.n_docs)

    def _log(self, trainer, pl_module, when: str) -> None:
        if trainer.sanity_checking:
            return
        value = self.score(pl_module)
        self.history.append((trainer.global_step, value))
        rank_zero_info(f"Lee Spearman {when} (step {trainer.global_step}): {value:.4f}")
        for logger in trainer.loggers:
            logger.log_metrics({"val/lee_spearman": value}, step=trainer.global_step)

    def on_fit_start(self, trainer, pl_module):
        if self.before_fit:
            self._log(trainer, pl_module, "before training")

    def on_validation_end(self, trainer, pl_module):
        self._log(trainer, pl_module, "at validation")
