"""RouterStats: per-layer share of tokens routed to each UBMoE expert, logged during training and validation."""

from __future__ import annotations

import lightning as L
import torch

from bidirlm_pl.data.packing import token_mask
from bidirlm_pl.moe.convert import ubmoe_ffns
from bidirlm_pl.moe.ffn import NUM_EXPERTS


def routing_shares(model: torch.nn.Module, mask_BT: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per layer and overall: share of (non-padding) tokens of the last forward sent to each expert.

    Keys: ``layer{i}/expert{e}`` (top-1 choice share) and ``layer{i}/prob1`` (mean router probability
    of expert 1, soft/top-1 routing only), plus ``expert{e}`` averaged over layers. Layers whose last
    forward had another shape than ``mask_BT`` (e.g. only the last batch half) count every token.
    """
    out: dict[str, torch.Tensor] = {}
    totals = torch.zeros(NUM_EXPERTS)
    n_layers = 0
    for i, ffn in enumerate(ubmoe_ffns(model)):
        choice_BT = ffn.last_choice_BT
        if choice_BT is None:
            continue
        keep = mask_BT if mask_BT is not None and mask_BT.shape == choice_BT.shape else torch.ones_like(
            choice_BT, dtype=torch.bool)
        chosen_N = choice_BT[keep.to(choice_BT.device)]
        if chosen_N.numel() == 0:
            continue
        share_E = torch.bincount(chosen_N, minlength=NUM_EXPERTS).float().cpu() / chosen_N.numel()
        for e in range(NUM_EXPERTS):
            out[f"layer{i}/expert{e}"] = share_E[e]
        if ffn.last_probs_BTE is not None:
            out[f"layer{i}/prob1"] = ffn.last_probs_BTE.detach()[..., 1][keep.to(choice_BT.device)].mean().cpu()
        totals += share_E
        n_layers += 1
    if n_layers:
        for e in range(NUM_EXPERTS):
            out[f"expert{e}"] = totals[e] / n_layers
    return out


class RouterStats(L.Callback):
    """Log the routing of every UBMoE layer as ``router/layer{i}/expert{e}`` (share of tokens).

    Training batches are logged every ``every_n_steps`` steps; validation shares are averaged over
    the validation epoch (``router_val/...``). Padding is excluded when the batch carries
    ``seq_ids`` or ``attention_mask``; for contrastive batches (query/positive) the last forward
    (the positives) is what is measured.

    Args:
        every_n_steps: training logging interval in optimizer steps.
        per_layer: also log each layer (otherwise only the layer average ``router/expert{e}``).
    """

    def __init__(self, every_n_steps: int = 10, per_layer: bool = True):
        self.every_n_steps = max(1, every_n_steps)
        self.per_layer = per_layer
        self._val: dict[str, list[torch.Tensor]] = {}

    def _shares(self, pl_module, batch) -> dict[str, torch.Tensor]:
        mask = token_mask(batch)
        if mask is None and isinstance(batch, dict) and isinstance(batch.get("positive"), dict):
            mask = token_mask(batch["positive"])
        shares = routing_shares(pl_module.backbone, mask)
        if not self.per_layer:
            shares = {k: v for k, v in shares.items() if not k.startswith("layer")}
        return shares

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step % self.every_n_steps != 0:
            return
        shares = self._shares(pl_module, batch)
        if shares:
            pl_module.log_dict({f"router/{k}": float(v) for k, v in shares.items()}, on_step=True, on_epoch=False)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        for k, v in self._shares(pl_module, batch).items():
            self._val.setdefault(k, []).append(v)

    def on_validation_epoch_end(self, trainer, pl_module):
        if self._val:
            pl_module.log_dict({f"router_val/{k}": float(torch.stack(v).mean()) for k, v in self._val.items()})
        self._val = {}
