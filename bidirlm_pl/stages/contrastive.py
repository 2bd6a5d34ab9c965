"""ContrastiveStage: InfoNCE on pooled embeddings of (query, positive[, hard negatives]) batches.

Batches come from :class:`bidirlm_pl.data.pairs.PairsDataModule`. The backbone loads without its
output layer (``head: base``); token states are pooled (mean, last token, position-weighted mean
or NV-Embed latent attention; instruction tokens excluded), and the loss is
:class:`bidirlm_pl.losses.contrastive.InfoNCE` (optionally through :class:`~bidirlm_pl.losses.contrastive.GradCache`).
The export is an HF folder that is also a Sentence-Transformers folder (see ``bidirlm_pl.models.encoder``).

    bidirlm fit --config configs/contrastive/tiny.yaml
"""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.cli import OptimizerCallable

from bidirlm_pl.backbone import attention
from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.core.specs import BackboneSpec, Schedule
from bidirlm_pl.losses.contrastive import GradCache, InfoNCE
from bidirlm_pl.models.pooling import Pooling
from bidirlm_pl.stages.base import BackboneStage, default_optimizer


def pack_padded(input_ids_BT: torch.Tensor, mask_BT: torch.Tensor, pool_BT: torch.Tensor) -> dict:
    """One packed row (1, N) of the real tokens of a right-padded batch: ids, positions, seq_ids, pool mask."""
    keep = mask_BT.bool()
    rows_BT = torch.arange(mask_BT.shape[0], device=mask_BT.device)[:, None].expand_as(mask_BT)
    positions_BT = torch.cumsum(mask_BT, dim=1) - 1
    return {"input_ids": input_ids_BT[keep][None], "position_ids": positions_BT[keep][None],
            "seq_ids": rows_BT[keep][None], "pool_mask": pool_BT[keep][None]}


class ContrastiveStage(BackboneStage):
    """Contrastive training of a (bidirectional) decoder into an embedding model.

    Args (besides :class:`BackboneStage`'s):
        pooling: ``mean``, ``last``, ``weighted_mean`` or ``latent_attention``.
        normalize: L2-normalise exported embeddings (the loss uses cosine scores either way).
        temperature: InfoNCE temperature (> 0).
        symmetric: add the positive -> query direction.
        false_negative_margin: mask negatives scoring above the positive by more than this (None = off).
        gather_across_devices: under DDP/FSDP, every rank's candidates join the denominator (with gradients), so
            N processes x B rows train as one process x N*B (the default; false keeps per-process negatives,
            which changes the result with the process count).
        gradcache_chunk_size: embed in chunks of this many rows (GradCache); None embeds the batch at once.
        attention_dropout: dropout on attention weights during training (SimCSE noise; None keeps the model's).
        latent_num_latents, latent_num_heads: size of the latent-attention pooler.
        max_length: the sequence limit recorded in the exported Sentence-Transformers config.
        query_instruction: recorded as the ``query`` prompt of the exported model (excluded from pooling).
    """

    default_head = "base"  # embeddings need no output layer

    def __init__(
        self,
        backbone: BackboneSpec,
        optimizer: OptimizerCallable = default_optimizer,
        schedule: Schedule | None = None,
        pooling: str = "mean",
        normalize: bool = True,
        temperature: float = 0.05,
        symmetric: bool = False,
        false_negative_margin: float | None = None,
        gather_across_devices: bool = True,
        gradcache_chunk_size: int | None = None,
        attention_dropout: float | None = None,
        latent_num_latents: int = 512,
        latent_num_heads: int = 8,
        max_length: int = 512,
        query_instruction: str | None = None,
    ):
        super().__init__(backbone, optimizer=optimizer, schedule=schedule)
        Pooling(pooling, hidden_size=8, num_latents=1, num_heads=1)  # validate the mode now
        self.pooling_mode = pooling
        self.normalize = normalize
        self.loss_fn = InfoNCE(temperature, symmetric=symmetric, false_negative_margin=false_negative_margin,
                               gather_across_devices=gather_across_devices)
        self.gradcache = GradCache(self.loss_fn, gradcache_chunk_size) if gradcache_chunk_size else None
        if attention_dropout is not None and not 0 <= attention_dropout < 1:
            raise BidirLMError(f"attention_dropout {attention_dropout} must be in [0, 1)")
        self.attention_dropout = attention_dropout
        self.latent_num_latents, self.latent_num_heads = latent_num_latents, latent_num_heads
        self.max_length = max_length
        self.query_instruction = query_instruction
        self.pooler = None

    # ------------------------------------------------------------------ model
    def configure_model(self):
        if self.backbone is not None:
            return
        super().configure_model()
        if self.attention_dropout is not None:
            attention.set_attention_dropout(self.backbone, self.attention_dropout)
        hidden = self.backbone.config.get_text_config().hidden_size
        # a fixed seed: every process (FSDP2 shards without broadcasting) and every run start from one pooler
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.pooler = Pooling(self.pooling_mode, hidden_size=hidden, num_latents=self.latent_num_latents,
                                  num_heads=self.latent_num_heads)
        if self.pooler.latent is not None:
            self.pooler.to(next(self.backbone.parameters()).device)
            if self.device_mesh is not None:  # FSDP2: the pooler's gradients are reduced like the backbone's
                from torch.distributed.fsdp import fully_shard

                fully_shard(self.pooler, mesh=self.data_parallel_mesh(self.device_mesh))

    def setup(self, stage: str) -> None:
        if self.gradcache is None or self._trainer is None:
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        if stage == "fit" and hasattr(datamodule, "per_rank_batch_size"):
            per_rank = datamodule.per_rank_batch_size()
            if self.gradcache.chunk_size > per_rank:
                raise BidirLMError(
                    f"gradcache_chunk_size {self.gradcache.chunk_size} is larger than the per-device batch {per_rank} "
                    f"(global batch {per_rank * self.world_size} over {self.world_size} processes); set it to at most "
                    f"{per_rank}, or null to embed each batch at once"
                )

    def training_step(self, batch, batch_idx):
        if self.gradcache is None or self.world_size == 1:
            return super().training_step(batch, batch_idx)
        # chunk replays reduce gradients once, on the last chunk (bidirlm_pl.losses.grad_sync)
        from bidirlm_pl.losses.grad_sync import ReplaySync

        self.gradcache.sync = ReplaySync([self.backbone, self.pooler], self.trainer.strategy.model)
        self.gradcache.sync.begin()
        return super().training_step(batch, batch_idx)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.gradcache is not None and self.gradcache.sync is not None:
            self.gradcache.sync.end()
            self.gradcache.sync = None

    def embed(self, group: dict) -> torch.Tensor:
        """Pooled embeddings (B, D) of one padded group (``input_ids``, ``attention_mask``, ``pool_mask``).

        On varlen (flash) backends the padded rows are first packed into one row without padding.
        """
        mask_BT = group["attention_mask"]
        pool_BT = group.get("pool_mask", mask_BT)
        if attention.uses_varlen(self.backbone.config):
            packed = pack_padded(group["input_ids"], mask_BT, pool_BT)
            hidden_1ND = self.hidden_states(packed)
            return self.pooler(hidden_1ND, packed["pool_mask"], packed["seq_ids"]).float()
        hidden_BTD = self.hidden_states({"input_ids": group["input_ids"], "attention_mask": mask_BT})
        return self.pooler(hidden_BTD, pool_BT).float()

    # ------------------------------------------------------------------ steps
    def batch_size_of(self, batch: dict) -> int:
        return int(batch["query"]["input_ids"].shape[0])

    def step(self, batch: dict) -> dict[str, torch.Tensor]:
        n = int(batch.get("n_negatives", 0))
        negatives = batch.get("negatives") if n else None
        if self.gradcache is not None:
            loss = self.gradcache(self.embed, batch["query"], batch["positive"], negatives, n_negatives=n)
            details = self.gradcache.last_details
        else:
            q, p = self.embed(batch["query"]), self.embed(batch["positive"])
            neg = self.embed(negatives).view(q.shape[0], n, -1) if negatives is not None else None
            loss, details = self.loss_fn.compute_loss(q, p, neg, return_details=True)
        out = {"loss": loss}
        if self.loss_fn.false_negative_margin is not None:
            out["masked_negatives"] = details["masked_negatives"]
        return out

    # ------------------------------------------------------------------ export
    def export_hf(self, target: str | Path, *, overwrite: bool = True) -> Path:
        self._latent_state = None
        if self.pooler is not None and self.pooler.latent is not None and self.device_mesh is not None:
            # FSDP2 shards the latent pooler too: gather its full weights on every rank (collective)
            from bidirlm_pl.core.distributed import full_state_dict

            full = full_state_dict(self.pooler)
            self._latent_state = {k[len("latent."):]: v for k, v in full.items() if k.startswith("latent.")}
        return super().export_hf(target, overwrite=overwrite)

    def export_extra(self, folder: Path) -> None:
        """Sentence-Transformers modules (Transformer, Pooling, Normalize) and our encoder config."""
        from bidirlm_pl.models.encoder import write_encoder_files

        hidden = self.backbone.config.get_text_config().hidden_size
        write_encoder_files(
            folder, hidden_size=hidden, pooling=self.pooling_mode, normalize=self.normalize,
            max_length=self.max_length, query_instruction=self.query_instruction,
            latent_state=(getattr(self, "_latent_state", None) or self.pooler.latent.state_dict())
            if self.pooler.latent is not None else None,
            latent_config=self.pooler.latent.config if self.pooler.latent is not None else None,
        )
