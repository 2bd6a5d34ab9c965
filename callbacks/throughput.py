"""Throughput: tokens/s, samples/s, FLOP/s and estimated MFU of every training batch, logged.

FLOPs of one training batch (forward + backward, the usual 6N rule plus attention and the output layer):

* ``6 * N_body * tokens``: ``N_body`` = parameters outside the embedding and output layers;
* ``12 * L * d_attn * sum(len_doc^2)``: attention scores and values (bidirectional, per packed
  document; ``d_attn = heads * head_dim``);
* ``6 * V * D * outputs``: the output layer; ``outputs`` = positions that reach it (masked
  positions when the batch has ``labels`` with -100, as in MNTP's sparse loss; every token of a
  packed causal-LM batch; none for contrastive batches, which pool hidden states).

Contrastive batches (``query`` / ``positive`` / ``negatives`` groups, padded) count every group.
UBMoE models count the FFN experts that run: both under ``soft`` routing, one otherwise.

Counting is vectorised on the batch's device and accumulated there; the callback synchronises
with the host only once per ``window`` batches, when it logs the window's averages.

This assumes every weight trains; frozen weights skip their weight gradients (about 4N instead of
6N), so MFU is an upper estimate for LoRA/partial training. MFU = FLOP/s / peak FLOP/s per device:
``peak_flops`` from the config, else Lightning's table for known GPUs; on CPU without
``peak_flops`` MFU is not logged.

>>> from bidirlm_pl.callbacks.throughput import Throughput
>>> Throughput(peak_flops=1e12).peak_flops
1000000000000.0
"""

from __future__ import annotations

import time

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from bidirlm_pl.core.errors import BidirLMError


def _text_config(model):
    config = model.config
    return getattr(config, "text_config", None) or config


def _idle_expert_parameters(model) -> int:
    """UBMoE: parameters of the experts a token does not run (one expert per layer unless routing is soft)."""
    idle = 0
    for module in model.modules():
        experts = getattr(module, "experts", None)
        if experts is not None and getattr(module, "routing", "soft") != "soft" and len(experts) == 2:
            idle += sum(p.numel() for p in experts[1].parameters())
    return idle


def _body_parameters(model) -> int:
    """Parameters that every token runs through, outside the input embedding and the output layer."""
    total = sum(p.numel() for p in model.parameters())
    skip = {id(p): p.numel() for m in (model.get_input_embeddings(), model.get_output_embeddings())
            if m is not None for p in m.parameters()}
    return total - sum(skip.values()) - _idle_expert_parameters(model)


def _groups(batch: dict) -> list[dict]:
    """The token groups of a batch: itself, or a contrastive batch's query/positive/negatives."""
    if "input_ids" in batch:
        return [batch]
    groups = [batch[k] for k in ("query", "positive", "negatives") if isinstance(batch.get(k), dict)]
    if not groups:
        raise BidirLMError(f"Throughput cannot count tokens of a batch with keys {sorted(batch)}; expected "
                           "input_ids, or query/positive groups of them")
    return groups


def _group_tokens(group: dict) -> torch.Tensor:
    if group.get("seq_ids") is not None:
        return (group["seq_ids"] >= 0).sum()
    if group.get("attention_mask") is not None:
        return group["attention_mask"].sum()
    return torch.tensor(group["input_ids"].numel(), device=group["input_ids"].device)


def _group_pairs(group: dict) -> torch.Tensor:
    """Sum over documents of len^2 (query-key pairs each layer computes), without a host sync."""
    if group.get("seq_ids") is not None:
        seq_BT = group["seq_ids"].long()
        B, T = seq_BT.shape
        rows_BT = torch.arange(B, device=seq_BT.device)[:, None].expand(B, T)
        slot_BT = rows_BT * (T + 1) + seq_BT.clamp(min=-1) + 1  # slot 0 of each row collects padding
        lengths = torch.zeros(B * (T + 1), dtype=torch.long, device=seq_BT.device)
        lengths.scatter_add_(0, slot_BT.reshape(-1), torch.ones_like(slot_BT).reshape(-1))
        lengths = lengths.view(B, T + 1)[:, 1:]
        return (lengths ** 2).sum()
    if group.get("attention_mask") is not None:
        return (group["attention_mask"].sum(1).long() ** 2).sum()
    B, T = group["input_ids"].shape
    return torch.tensor(B * T * T, device=group["input_ids"].device)


def tokens_tensor(batch: dict) -> torch.Tensor:
    """Real (non-padding) tokens of a batch, every group counted, as a tensor on the batch's device (no sync)."""
    return sum(_group_tokens(g) for g in _groups(batch))


def batch_samples(batch: dict) -> int:
    return int(_groups(batch)[0]["input_ids"].shape[0])


def flops_tensor(model, batch: dict) -> torch.Tensor:
    """Estimated forward+backward FLOPs of one batch as a 0-d tensor on the batch's device (no sync)."""
    config = _text_config(model)
    layers = int(config.num_hidden_layers)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    d_attn = int(config.num_attention_heads) * int(head_dim)
    vocab, hidden = int(config.vocab_size), int(config.hidden_size)
    body = _body_parameters(model)
    groups = _groups(batch)
    total = 0.0
    for group in groups:
        tokens = _group_tokens(group).double()
        total = total + 6.0 * body * tokens + 12.0 * layers * d_attn * _group_pairs(group).double()
    if "input_ids" in batch and model.get_output_embeddings() is not None:
        if batch.get("labels") is not None:
            outputs = (batch["labels"] != -100).sum().double()
        else:
            outputs = _group_tokens(batch).double()
        total = total + 6.0 * vocab * hidden * outputs
    return total


class Throughput(L.Callback):
    """Log ``throughput/tokens_per_sec``, ``samples_per_sec``, ``flops_per_sec`` and ``mfu``, averaged per window.

    Args:
        peak_flops: peak FLOP/s of one device for the run's precision (e.g. 989e12 for an H100 in
            bf16); ``None`` = Lightning's table on known GPUs, no MFU elsewhere.
        skip_first: batches to leave out of the run summary (warm-up, compilation).
        window: batches per measurement; the host waits for the device once per window.
    """

    def __init__(self, peak_flops: float | None = None, skip_first: int = 1, window: int = 1):
        if window < 1:
            raise BidirLMError(f"Throughput window {window} must be >= 1 batch")
        self.peak_flops = float(peak_flops) if peak_flops is not None else None
        self.skip_first, self.window = skip_first, window
        self._start: float | None = None
        self._pending: list[tuple[torch.Tensor, torch.Tensor, int]] = []
        self.totals = {"tokens": 0, "samples": 0, "flops": 0.0, "seconds": 0.0, "batches": 0}

    def _peak(self, trainer, pl_module) -> float | None:
        if self.peak_flops is not None:
            return self.peak_flops
        if pl_module.device.type != "cuda":
            return None
        from lightning.fabric.utilities.throughput import get_available_flops

        precision = str(trainer.precision)
        dtype = torch.bfloat16 if "bf16" in precision else torch.float16 if "16" in precision else torch.float32
        flops = get_available_flops(pl_module.device, dtype)
        return float(flops) if flops else None

    @staticmethod
    def _sync(pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._start is None:
            self._sync(pl_module)
            self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._start is None:
            return
        model = getattr(pl_module, "backbone", None) or pl_module
        tokens = tokens_tensor(batch)
        flops = flops_tensor(model, batch) if hasattr(model, "config") else torch.zeros(())
        self._pending.append((tokens, flops, batch_samples(batch)))
        if len(self._pending) < self.window:
            return
        self._sync(pl_module)
        seconds = max(time.perf_counter() - self._start, 1e-9)
        self._start = None
        n = len(self._pending)
        tokens = int(sum(int(t) for t, _, _ in self._pending))
        flops = float(sum(float(f) for _, f, _ in self._pending))
        samples = sum(s for _, _, s in self._pending)
        self._pending = []
        metrics = {
            "throughput/tokens_per_sec": tokens / seconds,
            "throughput/samples_per_sec": samples / seconds,
            "throughput/flops_per_sec": flops / seconds,
        }
        peak = self._peak(trainer, pl_module)
        if peak:
            metrics["throughput/mfu"] = flops / seconds / peak
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=max(1, samples // n))
        self.totals["batches"] += n
        if self.totals["batches"] > self.skip_first:
            for key, value in (("tokens", tokens), ("samples", samples), ("flops", flops), ("seconds", seconds)):
                self.totals[key] += value

    def summary(self) -> dict[str, float]:
        """Run averages (after ``skip_first`` batches)."""
        s = max(self.totals["seconds"], 1e-9)
        out = {"tokens_per_sec": self.totals["tokens"] / s, "samples_per_sec": self.totals["samples"] / s,
               "flops_per_sec": self.totals["flops"] / s}
        if self.peak_flops:
            out["mfu"] = out["flops_per_sec"] / self.peak_flops
        return out

    def on_train_end(self, trainer, pl_module):
        if self.totals["seconds"] > 0:
            rank_zero_info("throughput: " + ", ".join(f"{k} {v:.4g}" for k, v in self.summary().items()))
