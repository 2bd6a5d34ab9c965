"""The contrastive core that three stages share, and ContrastiveStage: InfoNCE on pooled embeddings.

:class:`ContrastiveCore` is everything the contrastive stages (this module's :class:`ContrastiveStage`,
:class:`bidirlm_pl.moe.UBMoEStage1`, :class:`bidirlm_pl.stages.omni.OmniContrastiveStage`) do alike: embed
the groups of a ``{"query", "positive"[, "negatives", "n_negatives"]}`` batch, take
:class:`bidirlm_pl.losses.contrastive.InfoNCE` on them (hard and cross-device negatives; in chunks through
:class:`~bidirlm_pl.losses.contrastive.GradCache` when asked, with one gradient reduction per step set up
once per fit), attention dropout as SimCSE noise. The stages differ by their data and by what trains.

ContrastiveStage trains a plain decoder: batches come from :class:`bidirlm_pl.data.pairs.PairsDataModule`,
the backbone loads without its output layer (``head: base``), token states are pooled (mean, last token,
position-weighted mean or NV-Embed latent attention; instruction tokens excluded). The export is an HF
folder that is also a Sentence-Transformers folder (see ``bidirlm_pl.models.encoder``).

    bidirlm fit --config configs/contrastive/tiny.yaml
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
from lightning.pytorch.cli import OptimizerCallable

from bidirlm_pl.backbone import attention
from bidirlm_pl.core.distributed import full_state_dict
from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.core.specs import BackboneSpec, Schedule
from bidirlm_pl.losses.contrastive import GradCache, InfoNCE
from bidirlm_pl.losses.grad_sync import ReplaySync
from bidirlm_pl.models.encoder import write_encoder_files
from bidirlm_pl.models.pooling import Pooling
from bidirlm_pl.stages.base import BackboneStage, default_optimizer


def pack_padded(input_ids_BT: torch.Tensor, mask_BT: torch.Tensor, pool_BT: torch.Tensor) -> dict:
    """One packed row (1, N) of the real tokens of a right-padded batch: ids, positions, seq_ids, pool mask."""
    keep = mask_BT.bool()
    rows_BT = torch.arange(mask_BT.shape[0], device=mask_BT.device)[:, None].expand_as(mask_BT)
    positions_BT = torch.cumsum(mask_BT, dim=1) - 1
    return {"input_ids": input_ids_BT[keep][None], "position_ids": positions_BT[keep][None],
            "seq_ids": rows_BT[keep][None], "pool_mask": pool_BT[keep][None]}


class ContrastiveOutput(NamedTuple):
    """One batch's InfoNCE: the loss, its masked false-negative count, and this rank's embeddings."""

    loss: torch.Tensor
    masked_negatives: torch.Tensor
    query_BD: torch.Tensor  # detached under GradCache
    positive_BD: torch.Tensor
    dim_losses: dict | None = None  # Matryoshka: each size's unweighted loss (detached)


class ContrastiveCore:
    """Mixin for a :class:`BackboneStage` trained with InfoNCE on (query, positive[, hard negatives]) batches.

    A stage calls :meth:`init_contrastive` in its ``__init__`` (after ``BackboneStage.__init__``) and has a
    ``pooler`` (the default :meth:`embed` pools the backbone's last hidden states) or its own ``embed``.
    :meth:`step_metrics` adds a stage's own logged values. Options, as the stages take them:

    * ``temperature``, ``symmetric``, ``false_negative_margin``: :class:`InfoNCE`'s.
    * ``gather_across_devices``: under DDP/FSDP every rank's candidates join the denominator (with
      gradients), so N processes x B rows train as one process x N*B rows.
    * ``gradcache_chunk_size``: embed in chunks of this many rows (GradCache); None embeds a group at once.
      Several processes: chunk replays reduce gradients once per step, by the last chunk
      (:class:`bidirlm_pl.losses.grad_sync.ReplaySync`, attached once per fit). The preflight
      (``bidirlm_pl.cli.preflight``) refuses a chunk larger than the per-process batch.
    * ``attention_dropout``: dropout on attention weights while training (SimCSE noise; None keeps the
      model's). The model's config keeps its own value, so an export describes the model for inference.
    * ``matryoshka_dims``, ``matryoshka_weights``: also train the leading slices of every embedding (InfoNCE on
      the first d dimensions, re-normalised, summed with the weights; the full size always takes part). Each
      size's loss is logged as ``loss_dim{d}``; a size above the embedding size fails in ``configure_model``.
    """

    def init_contrastive(self, *, temperature: float, gather_across_devices: bool, symmetric: bool = False,
                         false_negative_margin: float | None = None, gradcache_chunk_size: int | None = None,
                         attention_dropout: float | None = None, matryoshka_dims: list[int] | None = None,
                         matryoshka_weights: list[float] | None = None) -> None:
        self.loss_fn = InfoNCE(temperature, symmetric=symmetric, false_negative_margin=false_negative_margin,
                               gather_across_devices=gather_across_devices, matryoshka_dims=matryoshka_dims,
                               matryoshka_weights=matryoshka_weights)
        self.gradcache = GradCache(self.loss_fn, gradcache_chunk_size) if gradcache_chunk_size else None
        if attention_dropout is not None and not 0 <= attention_dropout < 1:
            raise BidirLMError(f"attention_dropout {attention_dropout} must be in [0, 1)")
        self.attention_dropout = attention_dropout
        self.pooler = None  # what the default embed() pools with; a stage sets it (ContrastiveStage: configure_model)

    def configure_model(self):
        if self.backbone is not None:
            return
        super().configure_model()
        if self.attention_dropout is not None:
            attention.set_attention_dropout(self.backbone, self.attention_dropout)
        if self.loss_fn.matryoshka_dims:  # a size above the embedding size fails now, not at the first step
            self.loss_fn.levels(self.embedding_size())

    def embedding_size(self) -> int:
        """The size of :meth:`embed`'s embeddings: the backbone's (text) hidden size."""
        config = getattr(self.backbone, "config", None) or self.backbone.backbone.config
        return int(config.get_text_config().hidden_size)

    def trained_dims(self) -> list[int] | None:
        """The embedding sizes the loss trains, ascending (the full size included); None without Matryoshka."""
        if not self.loss_fn.matryoshka_dims:
            return None
        return sorted(dim for dim, _ in self.loss_fn.levels(self.embedding_size()))

    # ------------------------------------------------------------------ embeddings and loss
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

    def contrastive_loss(self, batch: dict) -> ContrastiveOutput:
        """InfoNCE of one batch: query, positive, then hard-negative groups embedded in that order."""
        n = int(batch.get("n_negatives", 0))
        negatives = batch.get("negatives") if n else None
        if self.gradcache is not None:
            loss = self.gradcache(self.embed, batch["query"], batch["positive"], negatives, n_negatives=n)
            query_BD, positive_BD = self.gradcache.last_embeddings
            details = self.gradcache.last_details
            return ContrastiveOutput(loss, details["masked_negatives"], query_BD, positive_BD, details.get("dim_losses"))
        query_BD, positive_BD = self.embed(batch["query"]), self.embed(batch["positive"])
        negatives_BND = self.embed(negatives).view(query_BD.shape[0], n, -1) if negatives is not None else None
        loss, details = self.loss_fn.compute_loss(query_BD, positive_BD, negatives_BND, return_details=True)
        return ContrastiveOutput(loss, details["masked_negatives"], query_BD, positive_BD, details.get("dim_losses"))

    def step_metrics(self, batch: dict, result: ContrastiveOutput) -> dict[str, torch.Tensor]:
        """Hook: a stage's own logged values besides the loss."""
        return {}

    def step(self, batch: dict) -> dict[str, torch.Tensor]:
        result = self.contrastive_loss(batch)
        out = {"loss": result.loss}
        if self.loss_fn.false_negative_margin is not None:
            out["masked_negatives"] = result.masked_negatives
        for dim, loss in (result.dim_losses or {}).items():
            out[f"loss_dim{dim}"] = loss
        return out | self.step_metrics(batch, result)

    def batch_size_of(self, batch: dict) -> int:
        return int(batch["query"]["input_ids"].shape[0])

    # ------------------------------------------------------------------ one gradient reduction per step
    def on_fit_start(self):
        super().on_fit_start()
        if self.gradcache is not None and self.world_size > 1:
            self.gradcache.sync = ReplaySync([self.backbone, self.pooler], self.trainer.strategy.model)

    def on_fit_end(self):
        super().on_fit_end()
        if self.gradcache is not None:
            self.gradcache.sync = None

    def training_step(self, batch, batch_idx):
        if self.gradcache is not None and self.gradcache.sync is not None:
            self.gradcache.sync.begin()  # inside DDP's forward, before the step's loss is built
        return super().training_step(batch, batch_idx)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        super().on_train_batch_end(outputs, batch, batch_idx)
        if self.gradcache is not None and self.gradcache.sync is not None:
            self.gradcache.sync.end()


class ContrastiveStage(ContrastiveCore, BackboneStage):
    """Contrastive training of a (bidirectional) decoder into an embedding model.

    Args (besides :class:`BackboneStage`'s; the loss options are :class:`ContrastiveCore`'s):
        pooling: ``mean``, ``last``, ``weighted_mean`` or ``latent_attention``.
        normalize: L2-normalise exported embeddings (the loss uses cosine scores either way).
        temperature, symmetric, false_negative_margin, gather_across_devices, gradcache_chunk_size,
            attention_dropout, matryoshka_dims, matryoshka_weights: see :class:`ContrastiveCore`; the export
            records the trained sizes (``matryoshka_dims`` of ``bidirlm_encoder.json``).
        latent_num_latents, latent_num_heads: size of the latent-attention pooler.
        export_max_length: the token limit of the exported encoder (Sentence-Transformers'
            ``max_seq_length``); training truncation is the data's ``max_length``.
        query_instruction: the ``query`` prompt of the exported model (excluded from pooling); None records
            the one query instruction of the training sources (``data.init_args.sources[*].query_instruction``).
        max_length: the former name of ``export_max_length`` (read from older configs and checkpoints).
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
        export_max_length: int = 512,
        query_instruction: str | None = None,
        max_length: int | None = None,
        matryoshka_dims: list[int] | None = None,
        matryoshka_weights: list[float] | None = None,
    ):
        super().__init__(backbone, optimizer=optimizer, schedule=schedule)
        Pooling(pooling, hidden_size=8, num_latents=1, num_heads=1)  # validate the mode now
        self.pooling_mode = pooling
        self.normalize = normalize
        self.init_contrastive(temperature=temperature, symmetric=symmetric, false_negative_margin=false_negative_margin,
                              gather_across_devices=gather_across_devices, gradcache_chunk_size=gradcache_chunk_size,
                              attention_dropout=attention_dropout, matryoshka_dims=matryoshka_dims,
                              matryoshka_weights=matryoshka_weights)
        self.latent_num_latents, self.latent_num_heads = latent_num_latents, latent_num_heads
        if max_length is not None and export_max_length not in (512, max_length):
            raise BidirLMError(f"max_length {max_length} is the former name of export_max_length "
                               f"{export_max_length}; set only export_max_length")
        self.export_max_length = max_length if max_length is not None else export_max_length
        self.query_instruction = query_instruction

    # ------------------------------------------------------------------ model
    def configure_model(self):
        if self.backbone is not None:
            return
        super().configure_model()
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
        if stage == "fit":
            self.export_query_instruction()  # several different instructions fail now, not at the export

    def export_query_instruction(self) -> str | None:
        """The exported ``query`` prompt: ``query_instruction``, else the training sources' one instruction."""
        if self.query_instruction is not None:
            return self.query_instruction
        if self._trainer is not None:
            sources = getattr(getattr(self.trainer, "datamodule", None), "sources", None)
        else:  # exported from a checkpoint: bidirlm export sets the sources the checkpoint recorded
            sources = getattr(self, "card_sources", None)
        found = []
        for src in sources or []:
            text = src.get("query_instruction") if isinstance(src, dict) else getattr(src, "query_instruction", None)
            if text is not None and text not in found:
                found.append(text)
        if len(found) > 1:
            raise BidirLMError(f"the training sources prepend {len(found)} different query instructions "
                               f"{found}; set model.init_args.query_instruction to the one the export records")
        return found[0] if found else None

    # ------------------------------------------------------------------ export
    def export_hf(self, target: str | Path, *, overwrite: bool = True) -> Path:
        self._latent_state = None
        if self.pooler is not None and self.pooler.latent is not None and self.device_mesh is not None:
            # FSDP2 shards the latent pooler too: gather its full weights on every rank (collective)

            full = full_state_dict(self.pooler)
            self._latent_state = {k[len("latent."):]: v for k, v in full.items() if k.startswith("latent.")}
        return super().export_hf(target, overwrite=overwrite)

    def export_extra(self, folder: Path) -> None:
        """Sentence-Transformers modules (Transformer, Pooling, Normalize) and our encoder config."""

        hidden = self.backbone.config.get_text_config().hidden_size
        write_encoder_files(
            folder, hidden_size=hidden, pooling=self.pooling_mode, normalize=self.normalize,
            max_length=self.export_max_length, query_instruction=self.export_query_instruction(),
            latent_state=(getattr(self, "_latent_state", None) or self.pooler.latent.state_dict())
            if self.pooler.latent is not None else None,
            latent_config=self.pooler.latent.config if self.pooler.latent is not None else None,
            matryoshka_dims=self.trained_dims(),
        )
