"""MNTPStage: masked next-token prediction with bidirectional attention (the BidirLM / LLM2Vec adaptation).

Feed it packed, masked batches from :class:`bidirlm_pl.data.TextDataModule`; the loss is
:func:`bidirlm_pl.losses.token.mntp_loss` (only masked positions reach the output layer). Validation
and test log ``val/loss`` and ``val/accuracy`` averaged over masked tokens (not over batches).

Run it::

    bidirlm fit --config configs/mntp/tiny.yaml
"""

from __future__ import annotations

import torch
from lightning.pytorch.cli import OptimizerCallable

from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.core.specs import BackboneSpec, Schedule
from bidirlm_pl.data.validation import is_padding
from bidirlm_pl.losses.token import final_logit_softcap, mntp_loss
from bidirlm_pl.stages.base import BackboneStage, default_optimizer


class MNTPStage(BackboneStage):
    """Masked next-token prediction on a bidirectional backbone.

    Args (besides :class:`BackboneStage`'s):
        loss_chunk_size: project masked positions through the output layer at most this many at a
            time, recomputing their logits in backward (lower peak memory; ``None`` = one chunk).
    """

    fixed_head = "causal_lm"  # tokens are predicted with the model's own output layer

    def __init__(
        self,
        backbone: BackboneSpec,
        optimizer: OptimizerCallable = default_optimizer,
        schedule: Schedule | None = None,
        loss_chunk_size: int | None = None,
    ):
        if loss_chunk_size is not None and loss_chunk_size < 1:
            raise BidirLMError(f"loss_chunk_size {loss_chunk_size} must be a positive number of positions or null")
        super().__init__(backbone, optimizer=optimizer, schedule=schedule)
        self.loss_chunk_size = loss_chunk_size

    def mntp(self, batch: dict):
        """The :class:`~bidirlm_pl.losses.token.MNTPOutput` of a masked batch."""
        if "labels" not in batch:
            raise BidirLMError("MNTP batches need 'labels' (use bidirlm_pl.data.TextDataModule with a mask spec)")
        hidden_BTD = self.hidden_states(batch)
        return mntp_loss(hidden_BTD, batch["labels"], self.backbone.get_output_embeddings(),
                         seq_ids_BT=batch.get("seq_ids"), chunk_size=self.loss_chunk_size, softcap=final_logit_softcap(self.backbone))

    def step(self, batch: dict) -> dict[str, torch.Tensor]:
        out = self.mntp(batch)
        # several processes: the mean over every rank's masked tokens, not the mean of per-rank means
        return {"loss": self.global_token_mean(out.loss, out.count),
                "accuracy": self.global_token_mean(out.accuracy, out.count)}

    def _evaluate(self, batch: dict, prefix: str) -> torch.Tensor:

        padding = is_padding(batch)
        out = self.mntp(batch)
        # weight each batch by its masked-token count: epoch values are token-level means
        n = 0 if padding else max(1, int(out.count))
        self.log(f"{prefix}/loss", out.loss, batch_size=n, sync_dist=True, prog_bar=prefix == "val")
        self.log(f"{prefix}/accuracy", out.accuracy, batch_size=n, sync_dist=True, prog_bar=prefix == "val")
        return out.loss

    def validation_step(self, batch, batch_idx):
        return self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx):
        return self._evaluate(batch, "test")
