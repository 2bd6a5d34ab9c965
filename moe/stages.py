"""UBMoE training stages (LightningModules for ``bidirlm fit``).

* :class:`UBMoEStage1` — only expert 1 (the FFN copies) trains, bidirectional attention, InfoNCE
  (temperature 0.05) on mean-pooled states through the contrastive stages' shared core
  (:class:`bidirlm_pl.stages.contrastive.ContrastiveCore`): unsupervised SimCSE (each text twice,
  attention dropout as noise; :class:`bidirlm_pl.moe.UBMoEPairsData`) or supervised pairs with optional
  hard negatives (the contrastive stage's :class:`bidirlm_pl.data.pairs.PairsDataModule`: same batch
  format). Expert 1 is used for every token (routing ``forced1``), so the stage-1 model is exactly the
  original model with its FFNs fine-tuned.
* :class:`UBMoEStage2` — only the routers train, causal attention, next-token loss on text, with
  ``soft`` or ``top1`` routing (both pass a gradient to the router), plus an optional
  load-balancing loss; ``generate_routing`` / ``confidence`` choose what the exported folder generates with
  (e.g. ``confident`` at 0.9: expert 0 unless the router is sure).

Both export a UBMoE folder (``config.json`` records the MoE; reload with ``bidirlm_pl.moe.load_ubmoe``).

>>> stage = UBMoEStage1(backbone={"model": "tiny-qwen3"})  # doctest: +SKIP
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable

from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.core.specs import BackboneSpec, Schedule
from bidirlm_pl.data.packing import token_mask
from bidirlm_pl.losses.token import causal_lm_loss, final_logit_softcap
from bidirlm_pl.models.pooling import Pooling
from bidirlm_pl.moe.convert import (
    UBMoESpec,
    convert_to_ubmoe,
    load_ubmoe,
    set_confidence,
    set_routing,
    ubmoe_ffns,
    ubmoe_record,
)
from bidirlm_pl.moe.ffn import check_confidence, check_routing, load_balancing_loss
from bidirlm_pl.moe.modes import set_mode_routing
from bidirlm_pl.stages.base import BackboneStage, default_optimizer
from bidirlm_pl.stages.contrastive import ContrastiveCore, ContrastiveOutput

# trainable groups of a UBMoE model; expert 0 (the original FFN) never trains
MOE_GROUP_PATTERNS = {
    "expert1": r"\.mlp\.experts\.1\.",
    "router": r"\.mlp\.router\.",
    "attention": r"self_attn\.",
    "embeddings": r"embed_tokens",
    "norms": r"norm[^.]*\.weight$|norm[^.]*\.bias$",
    "lm_head": r"(^|\.)lm_head\.",
}
EXPERT0 = r"\.mlp\.experts\.0\."


def apply_moe_trainable(model: torch.nn.Module, groups: list[str]) -> dict[str, int]:
    """Freeze everything except the named UBMoE groups; return trainable parameter counts per group."""
    unknown = [g for g in groups if g not in MOE_GROUP_PATTERNS]
    if unknown or not groups:
        raise BidirLMError(
            f"UBMoE trainable groups {list(groups)} are not a non-empty subset of {list(MOE_GROUP_PATTERNS)} "
            f"(expert 0, the original FFN, always stays frozen)"
        )
    counts: dict[str, int] = {}
    for name, param in model.named_parameters():
        group = None if re.search(EXPERT0, name) else next(
            (g for g in groups if re.search(MOE_GROUP_PATTERNS[g], name)), None)
        param.requires_grad_(group is not None)
        if group is not None:
            counts[group] = counts.get(group, 0) + param.numel()
    if not counts:
        raise BidirLMError(f"UBMoE trainable groups {list(groups)} select no parameter; nothing would train")
    return counts


class _UBMoEStage(BackboneStage):
    """Shared plumbing: build or reload the UBMoE model, set routing and trainable groups."""

    train_routing: str

    fixed_head = "causal_lm"  # stage 2's loss and generation need the output layer

    card_loader = "ubmoe"

    def default_trainable(self) -> list[str]:
        return list(self.default_groups)

    def __init__(self, backbone: BackboneSpec, *, ubmoe: UBMoESpec | None, routing: str, **kwargs):
        super().__init__(backbone, **kwargs)
        trainable = self.trainable
        if self.backbone_spec.trainable is not None and not list(self.backbone_spec.trainable):
            raise BidirLMError("UBMoE 'trainable' is empty; nothing would train")
        if self.lora is not None:
            raise BidirLMError("UBMoE stages train expert 1 or the routers directly; backbone.lora must be null")
        for g in trainable:
            if g not in MOE_GROUP_PATTERNS:
                raise BidirLMError(f"UBMoE trainable group '{g}' is not one of {list(MOE_GROUP_PATTERNS)} "
                                   f"(expert 0, the original FFN, always stays frozen)")
        self.train_routing = check_routing(routing)
        # forced routing gives the router no gradient, and forced0 never runs expert 1
        idle = {"router"} if routing.startswith("forced") else set()
        if routing == "forced0":
            idle.add("expert1")
        if set(trainable) <= idle:
            raise BidirLMError(f"routing '{routing}' gives no gradient to trainable groups {list(trainable)}: "
                               f"nothing would train")
        self.spec = (ubmoe or UBMoESpec()).validate()
        self.folder_spec = ubmoe_record(self.model_path)

    def build_model(self):
        if self.folder_spec is not None:
            model, tokenizer = load_ubmoe(self.model_path, dtype=self.dtype_name,
                                          attn_implementation=self.attn_implementation,
                                          bidirectional=self.bidirectional)
        else:
            model, tokenizer = self.load()
            convert_to_ubmoe(model, self.spec)
        set_routing(model, self.train_routing)
        return model, tokenizer

    def apply_groups(self) -> dict[str, int]:
        return apply_moe_trainable(self.backbone, self.trainable)


class UBMoEStage1(ContrastiveCore, _UBMoEStage):
    """UBMoE stage 1: contrastive fine-tuning of the FFN copies (expert 1) with bidirectional attention.

    Args:
        backbone: ``model`` is a plain Qwen3/Gemma3/Llama folder or asset (converted here), an exported
            stage output (MNTP, merged...) or a UBMoE folder; ``trainable`` defaults to ``[expert1]``.
        ubmoe: how to convert a plain model (router init, per-mode routing; see ``UBMoESpec``).
        temperature: InfoNCE temperature (0.05 as the UBMoE code).
        attention_dropout: dropout on attention probabilities while training (the SimCSE noise).
        routing: routing while training (``forced1``: every token through expert 1).
        gather_across_devices: under DDP/FSDP, every rank's embeddings join the InfoNCE candidates
            (N processes x B pairs then train as 1 process x N*B pairs).
        symmetric, false_negative_margin, gradcache_chunk_size, matryoshka_dims, matryoshka_weights: as the
            contrastive stage's (:class:`bidirlm_pl.stages.contrastive.ContrastiveCore`).
        Other arguments as :class:`BackboneStage`.

    Embeddings are mean-pooled (instruction tokens excluded); each step also logs ``accuracy``, the share
    of queries whose own positive scores highest among this rank's positives.
    """

    default_groups = ("expert1",)
    fixed_bidirectional = True

    def __init__(
        self,
        backbone: BackboneSpec,
        ubmoe: UBMoESpec | None = None,
        temperature: float = 0.05,
        attention_dropout: float = 0.1,
        routing: str = "forced1",
        gather_across_devices: bool = True,
        optimizer: OptimizerCallable = default_optimizer,
        schedule: Schedule | None = None,
        symmetric: bool = False,
        false_negative_margin: float | None = None,
        gradcache_chunk_size: int | None = None,
        matryoshka_dims: list[int] | None = None,
        matryoshka_weights: list[float] | None = None,
    ):
        super().__init__(backbone, ubmoe=ubmoe, routing=routing, optimizer=optimizer, schedule=schedule)
        self.init_contrastive(temperature=temperature, symmetric=symmetric, false_negative_margin=false_negative_margin,
                              gather_across_devices=gather_across_devices, gradcache_chunk_size=gradcache_chunk_size,
                              attention_dropout=attention_dropout, matryoshka_dims=matryoshka_dims,
                              matryoshka_weights=matryoshka_weights)
        self.pooler = Pooling("mean")

    def step_metrics(self, batch: dict, result: ContrastiveOutput) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            sim_BB = F.normalize(result.query_BD, dim=-1) @ F.normalize(result.positive_BD, dim=-1).T
            accuracy = (sim_BB.argmax(-1) == torch.arange(len(sim_BB), device=sim_BB.device)).float().mean()
        return {"accuracy": accuracy}


class UBMoEStage2(_UBMoEStage):
    """UBMoE stage 2: train only the routers with the causal next-token loss.

    Args:
        backbone: ``model`` is a UBMoE folder written by stage 1 (a plain model has identical experts:
            nothing to learn); ``trainable`` defaults to ``[router]``.
        routing: ``soft`` or ``top1`` while training (both give the router a gradient).
        load_balance: weight of the Switch load-balancing loss (0 = off).
        kl_to_base: weight of the mean KL from the base model's next-token distribution to the routed
            model's (0 = off). Expert 0 everywhere *is* the base, so the reference is one extra forward of
            this model with routing ``forced0`` under ``no_grad``: no second model in memory. It keeps
            the routers from trading the base's behaviour on text unlike the training data for gains on it.
        expert1_penalty: weight of the mean expert-1 router probability over real tokens and layers
            (0 = off): a prior pulling every router toward expert 0, the original FFN.
        loss_chunk_size: positions projected through the output layer at once (logits recomputed in
            backward): the loss never holds full-vocabulary logits for the whole batch.
        generate_routing: the routing the exported folder generates with (``mode_routing["generate"]``; null
            keeps the stage-1 folder's, ``soft``). ``confident``: expert 0 unless expert 1's probability exceeds
            ``confidence``, where the token takes the soft mixture.
        confidence: the ``confident`` threshold recorded in the folder (null keeps the folder's, 0.9).
        Other arguments as :class:`BackboneStage`.
    """

    default_groups = ("router",)
    fixed_bidirectional = False

    def __init__(
        self,
        backbone: BackboneSpec,
        routing: str = "soft",
        load_balance: float = 0.0,
        kl_to_base: float = 0.0,
        expert1_penalty: float = 0.0,
        loss_chunk_size: int | None = 1024,
        optimizer: OptimizerCallable = default_optimizer,
        schedule: Schedule | None = None,
        generate_routing: str | None = None,
        confidence: float | None = None,
    ):
        if routing == "confident":
            raise BidirLMError("routing 'confident' is a generation rule over trained routers; train stage 2 with "
                               "soft or top1 and set generate_routing: confident for the exported folder")
        super().__init__(backbone, ubmoe=None, routing=routing, optimizer=optimizer, schedule=schedule)
        self.generate_routing = None if generate_routing is None else check_routing(generate_routing)
        self.confidence = None if confidence is None else check_confidence(confidence)
        if self.folder_spec is None:
            raise BidirLMError(
                f"stage 2 model '{self.model_path}' is not a UBMoE folder (run stage 1 first): with identical experts "
                f"the router would learn nothing"
            )
        for option, value in (("load_balance", load_balance), ("kl_to_base", kl_to_base),
                              ("expert1_penalty", expert1_penalty)):
            if not value >= 0:
                raise BidirLMError(f"{option} {value} must be a weight >= 0")
        if loss_chunk_size is not None and loss_chunk_size < 1:
            raise BidirLMError(f"loss_chunk_size {loss_chunk_size} must be a positive number of positions or null")
        self.load_balance = load_balance
        self.kl_to_base = kl_to_base
        self.expert1_penalty = expert1_penalty
        self.loss_chunk_size = loss_chunk_size

    def build_model(self):
        model, tokenizer = super().build_model()
        if self.confidence is not None:
            set_confidence(model, self.confidence)
        if self.generate_routing is not None:
            set_mode_routing(model, "generate", self.generate_routing)
        return model, tokenizer

    def base_hidden_states(self, batch: dict) -> torch.Tensor:
        """Hidden states of the base model (expert 0 in every layer), without gradient."""
        ffns = ubmoe_ffns(self.backbone)
        routings = [f.routing for f in ffns]
        try:
            for f in ffns:
                f.routing = "forced0"
            with torch.no_grad():
                return self.hidden_states(batch, bidirectional=False)
        finally:
            for f, routing in zip(ffns, routings):
                f.routing = routing

    def step(self, batch: dict) -> dict[str, torch.Tensor]:
        base_BTD = self.base_hidden_states(batch) if self.kl_to_base > 0 else None
        hidden_BTD = self.hidden_states(batch, bidirectional=False)
        lm = causal_lm_loss(hidden_BTD, batch, self.backbone.get_output_embeddings(),
                            chunk_size=self.loss_chunk_size, softcap=final_logit_softcap(self.backbone),
                            reference_BTD=base_BTD)
        lm_loss = self.global_token_mean(lm.loss, lm.count)
        out = {"lm_loss": lm_loss.detach(), "perplexity": lm_loss.detach().exp()}
        loss = lm_loss
        if lm.kl is not None:
            kl = self.global_token_mean(lm.kl, lm.count)
            out["kl_to_base"] = kl.detach()
            loss = loss + self.kl_to_base * kl
        ffns = [f for f in ubmoe_ffns(self.backbone) if f.last_probs_BTE is not None]
        if ffns:
            mask_BT = token_mask(batch)
            balance = torch.stack([load_balancing_loss(f.last_probs_BTE, f.last_choice_BT, mask_BT)
                                   for f in ffns]).mean()
            out["balance_loss"] = balance.detach()
            if self.load_balance > 0:
                loss = loss + self.load_balance * balance
            expert1 = torch.stack([_mean_over_tokens(f.last_probs_BTE[..., 1], mask_BT) for f in ffns]).mean()
            out["expert1_prob"] = expert1.detach()
            if self.expert1_penalty > 0:
                loss = loss + self.expert1_penalty * expert1
        out["loss"] = loss
        return out


def _mean_over_tokens(values_BT: torch.Tensor, mask_BT: torch.Tensor | None) -> torch.Tensor:
    if mask_BT is None:
        return values_BT.mean()
    mask = mask_BT.to(values_BT.dtype)
    return (values_BT * mask).sum() / mask.sum().clamp(min=1)
