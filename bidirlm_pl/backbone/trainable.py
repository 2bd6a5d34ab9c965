"""Which module groups of a decoder train: embeddings, attention, ffn, norms, lm_head, or all."""

from __future__ import annotations

import re

import torch

from bidirlm_pl.core.errors import BidirLMError

GROUP_PATTERNS = {  # first match wins: LoRA adapters live inside attention/ffn modules
    "lora": r"lora_",
    "embeddings": r"embed_tokens",
    "attention": r"self_attn\.",
    "ffn": r"\.mlp\.",
    "norms": r"norm[^.]*\.weight$|norm[^.]*\.bias$",
    "lm_head": r"(^|\.)lm_head\.",
}
GROUPS = ("all", *GROUP_PATTERNS)


def parameter_group(name: str) -> str | None:
    """The group a parameter name belongs to (the first pattern that matches), or None."""
    for group, pattern in GROUP_PATTERNS.items():
        if re.search(pattern, name):
            return group
    return None


def apply_trainable(model: torch.nn.Module, groups: list[str] | tuple[str, ...]) -> dict[str, int]:
    """Freeze everything except the named groups; return trainable parameter counts per group.

    With LoRA adapters present, ``["lora"]`` trains only the adapters. Tied output layers train
    with the embeddings (they are one tensor).
    """
    unknown = [g for g in groups if g not in GROUPS]
    if unknown or not groups:
        raise BidirLMError(f"trainable groups {list(groups)} are not a non-empty subset of {list(GROUPS)}")
    counts: dict[str, int] = {}
    for name, param in model.named_parameters():
        group = parameter_group(name)
        train = "all" in groups or group in groups
        param.requires_grad_(bool(train))
        if train:
            counts[group or "other"] = counts.get(group or "other", 0) + param.numel()
    if not counts:
        raise BidirLMError(f"trainable groups {list(groups)} select no parameter of this model; nothing would train")
    return counts
