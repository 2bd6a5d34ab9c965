"""Generation and embedding modes of a UBMoE model: attention direction plus the routing used in each.

``generate`` runs causal attention with ``mode_routing["generate"]`` (default ``soft``; ``forced0``
reproduces the original model exactly; ``confident`` stays on expert 0 unless the router is sure); ``embed`` runs bidirectional attention with
``mode_routing["embed"]`` (default ``forced1``: the bidirectionally fine-tuned FFNs).

>>> from bidirlm_pl import moe  # doctest: +SKIP
>>> with moe.mode(model, "embed"):  # doctest: +SKIP
...     hidden = model.model(**batch).last_hidden_state
>>> moe.set_mode_routing(model, "generate", "top1")  # doctest: +SKIP
"""

from __future__ import annotations

from contextlib import contextmanager

from torch import nn

from bidirlm_pl.backbone import attention
from bidirlm_pl.backbone.load import load_backbone, resolve_model_path
from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.moe.convert import (
    ATTENTION_MODES,
    _record,
    load_ubmoe,
    set_confidence,
    set_routing,
    spec_of,
    ubmoe_record,
)
from bidirlm_pl.moe.ffn import ROUTING_MODES, check_confidence, check_routing

CONFIDENT = "confident"


def _check_mode(mode: str) -> str:
    if mode not in ATTENTION_MODES:
        raise BidirLMError(f"UBMoE mode '{mode}' is not one of {list(ATTENTION_MODES)}")
    return mode


def set_mode_routing(model: nn.Module, mode: str, routing: str) -> nn.Module:
    """Choose the routing that ``mode`` (generate or embed) uses from now on (recorded in the config)."""
    spec = spec_of(model)
    spec.mode_routing[_check_mode(mode)] = check_routing(routing)
    _record(model, spec)
    return model


def set_mode(model: nn.Module, mode: str) -> nn.Module:
    """Put the model in ``generate`` (causal) or ``embed`` (bidirectional) mode with that mode's routing."""
    spec = spec_of(model)
    attention.set_bidirectional(model, _check_mode(mode) == "embed")
    return set_routing(model, spec.mode_routing[mode])


def current_mode(model: nn.Module) -> str:
    return "embed" if attention.is_bidirectional(model) else "generate"


@contextmanager
def mode(model: nn.Module, name: str):
    """Run a block in ``name`` mode; restore the attention direction and routing afterwards."""
    spec = spec_of(model)
    was_bidirectional = attention.is_bidirectional(model)
    set_mode(model, name)
    try:
        yield model
    finally:
        attention.set_bidirectional(model, was_bidirectional)
        set_routing(model, spec.routing)


def split_routing(path: str) -> tuple[str, str | None]:
    """``FOLDER@ROUTING`` -> (FOLDER, ROUTING): a UBMoE folder evaluated with one routing in every mode.

    ``FOLDER@confident`` (the folder's recorded threshold) and ``FOLDER@confident=0.95`` set the generate mode's
    routing only: embeddings keep the embed routing. A bad threshold is a one-line error here.
    """
    folder, at, routing = str(path).rpartition("@")
    if at and routing in ROUTING_MODES:
        return folder, routing
    if at and routing.startswith(f"{CONFIDENT}="):
        check_confidence(routing.partition("=")[2])
        return folder, routing
    return str(path), None


def apply_routing(model: nn.Module, routing: str) -> nn.Module:
    """A ``FOLDER@ROUTING`` suffix applied to a loaded UBMoE model (see :func:`split_routing`)."""
    name, _, threshold = routing.partition("=")
    if name == CONFIDENT:
        if threshold:
            set_confidence(model, check_confidence(threshold))
        return set_mode_routing(model, "generate", CONFIDENT)
    for mode_name in ATTENTION_MODES:
        set_mode_routing(model, mode_name, routing)
    return model


def load_any(path: str, *, attn_implementation: str = "sdpa"):
    """A causal LM and tokenizer from a plain folder, an asset name or a UBMoE folder (``@routing`` allowed)."""

    path, routing = split_routing(path)
    folder = resolve_model_path(path)
    if ubmoe_record(folder) is not None:
        model, tokenizer = load_ubmoe(folder, attn_implementation=attn_implementation)
        if routing is not None:  # e.g. @forced1: the naive bidirectional FFN fine-tune, @forced0: the original
            apply_routing(model, routing)
        return model, tokenizer
    if routing is not None:
        raise BidirLMError(f"'{path}@{routing}': a routing applies to UBMoE folders only, and '{path}' is plain")
    return load_backbone(folder, attn_implementation=attn_implementation, head="causal_lm")
