"""Throughput: tokens/s, samples/s, FLOP/s and estimated MFU of every training batch, logged.

FLOPs of one training batch (forward + backward, the usual 6N rule plus attention and the output layer):

* ``6 * N_body * tokens``: ``N_body`` = parameters outside the embedding and output layers;
* ``12 * L * d_attn * sum(len_doc^2)``: attention scores and values (bidirectional, per packed
  document; ``d_attn = heads * head_dim``);
* ``6 * V * D * outputs``: the output layer; ``outputs`` = positions that reach it (masked
  positions when the batch has ``labels`` with -100, as in MNTP's sparse loss; else every token).

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


def _text_config(model):
    config = model.config
    return getattr(config, "text_config", None) or config


def _body_parameters(model) -> int:
    """Parameters outside the input embedding and the output layer (counted once if tied)."""
    total = sum(p.numel() for p in model.parameters())
    skip = {id(p): p.numel() for m in (model.get_input_embeddings(), model.get_output_embeddings())
            if m is not None for p in m.parameters()}
    return total - sum(skip.values())


def batch_tokens(batch: dict) -> int:
    if batch.get("seq_ids") is not None:
        return int((batch["seq_ids"] >= 0).sum())
    if batch.get("attention_mask") is not None:
        return int(batch["attention_mask"].sum())
    return int(batch["input_ids"].numel())


def _attention_pairs(batch: dict) -> int:
    """Sum over documents of len^2 (query-key pairs each layer computes)."""
    if batch.get("seq_ids") is not None:
        seq_BT = batch["seq_ids"]
        total = 0
        for row in seq_BT:
            row = row[row >= 0]
            if row.numel():
                counts = torch.unique_consecutive(row, return_counts=True)[1]
                total += int((counts.long() ** 2).sum())
        return total
    if batch.get("attention_mask") is not None:
        return int((batch["attention_mask"].sum(1).long() ** 2).sum())
    B, T = batch["input_ids"].shape
    return B * T * T


def training_flops(model, batch: dict) -> float:
    """Estimated forward+backward FLOPs of one batch (see the module docstring)."""
    config = _text_config(model)
    tokens = batch_tokens(batch)
    layers = int(config.num_hidden_layers)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    d_attn = int(config.num_attention_heads) * int(head_dim)
    if batch.get("labels") is not None:
        outputs = int((batch["labels"] != -100).sum())
    else:
        outputs = tokens
    vocab, hidden = int(config.vocab_size), int(config.hidden_size)
    return (6.0 * _body_parameters(model) * tokens + 12.0 * layers * d_attn * _attention_pairs(batch)
            + 6.0 * vocab * hidden * outputs)


class Throughput(L.Callback):
    """Log ``throughput/tokens_per_sec``, ``samples_per_sec``, ``flops_per_sec`` and ``mfu`` per training batch.

    Args:
        peak_flops: peak FLOP/s of one device for the run's precision (e.g. 989e12 for an H100 in
            bf16); ``None`` = Lightning's table on known GPUs, no MFU elsewhere.
        skip_first: batches to leave out of the run summary (warm-up, compilation).
    """

    def __init__(self, peak_flops: float | None = None, skip_first: int = 1):
        self.peak_flops = float(peak_flops) if peak_flops is not None else None
        self.skip_first = skip_first
        self._start: float | None = None
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

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._start is None:
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        seconds = max(time.perf_counter() - self._start, 1e-9)
        self._start = None
        model = getattr(pl_module, "backbone", None) or pl_module
        tokens, samples = batch_tokens(batch), int(batch["input_ids"].shape[0])
        flops = training_flops(model, batch) if hasattr(model, "config") else 0.0
        metrics = {
            "throughput/tokens_per_sec": tokens / seconds,
            "throughput/samples_per_sec": samples / seconds,
            "throughput/flops_per_sec": flops / seconds,
        }
        peak = self._peak(trainer, pl_module)
        if peak:
            metrics["throughput/mfu"] = flops / seconds / peak
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=samples)
        self.totals["batches"] += 1
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
