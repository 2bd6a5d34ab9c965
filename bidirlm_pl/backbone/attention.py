"""Causal or bidirectional attention per model and per call, and leak-free packed sequences.

Semantics (one choice, tested):

* The switch is transformers' own ``config.is_causal`` (per model) or ``is_causal=...`` (per call).
  Bidirectional means every token sees every non-padding token of its own document.
* Sliding-window layers (Gemma3) keep their configured window ``w`` on *both* sides in bidirectional
  mode: a query at ``i`` sees keys ``j`` with ``|i - j| <= w``. This is what ``is_causal=False``
  does in transformers 5 (inclusive bound), so packed and unpacked batches agree; it is **not**
  EmbeddingGemma's ``use_bidirectional_attention`` (which halves the window). Causal mode keeps
  transformers' ``0 <= i - j < w``. The varlen (flash) path uses ``window_size=(w, w)``
  bidirectionally and ``(w - 1, 0)`` causally, so all backends agree token for token.
* Packed rows (several documents per row, ``position_ids`` restarting at 0) get a block-diagonal
  mask that we build ourselves for eager/sdpa/flex, because transformers' bidirectional mask drops
  ``position_ids`` and lets documents see each other. Varlen (flash) backends receive cumulative
  sequence lengths instead and never materialise a mask.
"""

from __future__ import annotations

import torch

from bidirlm_pl.backbone.varlen import VARLEN_PREFIX
from bidirlm_pl.core.errors import BidirLMError

MASKED_BACKENDS = ("eager", "sdpa", "flex_attention")


def set_attention_dropout(model: torch.nn.Module, p: float) -> int:
    """Dropout ``p`` on the attention probabilities of every attention module while training; return the count.

    Training noise only (SimCSE): the config keeps the model's own value, so an exported ``config.json``
    describes the model for inference and for whoever fine-tunes it next, and ``eval()`` runs without it.
    """
    if not 0 <= p < 1:
        raise BidirLMError(f"attention_dropout {p} must be in [0, 1)")
    count = 0
    for module in model.modules():
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = p
            count += 1
    return count


def set_bidirectional(model: torch.nn.Module, bidirectional: bool = True) -> torch.nn.Module:
    """Make a Hugging Face model bidirectional (or causal again) for every later call, in place."""
    configs = [model.config]
    if getattr(model.config, "text_config", None) is not None:
        configs.append(model.config.text_config)
    for config in configs:
        config.is_causal = not bidirectional
    return model


def is_bidirectional(model: torch.nn.Module) -> bool:
    return not getattr(model.config, "is_causal", True)


def layer_windows(config) -> dict[str, int | None]:
    """Map each layer type of a config to its sliding window (None for full attention)."""
    types = set(getattr(config, "layer_types", None) or ["full_attention"])
    window = getattr(config, "sliding_window", None)
    return {t: (window if t == "sliding_attention" else None) for t in types}


def packed_visibility(
    seq_ids_BT: torch.Tensor, *, causal: bool, window: int | None = None
) -> torch.Tensor:
    """Boolean (B, 1, T, T) matrix: may query t see key s? Same document, not padding, causal/window.

    ``seq_ids_BT`` numbers the documents of each row (any integers), with -1 for padding. Padding
    queries see themselves only so that no softmax row is empty (their outputs are ignored).
    """
    T = seq_ids_BT.shape[-1]
    same_doc = (seq_ids_BT[:, :, None] == seq_ids_BT[:, None, :]) & (seq_ids_BT[:, None, :] >= 0)
    pos = torch.arange(T, device=seq_ids_BT.device)
    dist = pos[:, None] - pos[None, :]  # query minus key
    allowed = same_doc
    if causal:
        allowed = allowed & (dist >= 0)
    if window is not None:
        allowed = allowed & (dist.abs() < window if causal else dist.abs() <= window)
    allowed = allowed | torch.eye(T, dtype=torch.bool, device=seq_ids_BT.device)
    return allowed[:, None]


def document_mask_mod(seq_ids_BT: torch.Tensor, *, causal: bool, window: int | None = None):
    """flex_attention's ``mask_mod`` for packed rows: the rule of :func:`packed_visibility`, from document ids.

    Evaluated per block by flex_attention, so no (T, T) table is ever built: memory grows as T, not T².
    """

    def mask_mod(b, h, q_idx, kv_idx):
        q_doc, kv_doc = seq_ids_BT[b, q_idx], seq_ids_BT[b, kv_idx]
        allowed = (q_doc == kv_doc) & (kv_doc >= 0)
        if causal:
            allowed = allowed & (q_idx >= kv_idx)
        if window is not None:
            dist = (q_idx - kv_idx).abs()
            allowed = allowed & (dist < window if causal else dist <= window)
        return allowed | (q_idx == kv_idx)

    return mask_mod


def flex_block_mask(seq_ids_BT: torch.Tensor, *, causal: bool, window: int | None = None):
    """The BlockMask of packed rows for flex_attention (built from :func:`document_mask_mod`)."""
    from torch.nn.attention.flex_attention import create_block_mask

    B, T = seq_ids_BT.shape
    return create_block_mask(document_mask_mod(seq_ids_BT, causal=causal, window=window), B, None, T, T,
                             device=seq_ids_BT.device)


def _dense_mask(seq_ids_BT: torch.Tensor, backend: str, *, causal: bool, window: int | None, dtype: torch.dtype):
    visible = packed_visibility(seq_ids_BT, causal=causal, window=window)
    if backend == "sdpa":
        return visible
    # eager adds the mask to the scores
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill(
        ~visible, torch.finfo(dtype).min
    )


def packed_attention_mask(
    config, seq_ids_BT: torch.Tensor, *, causal: bool, dtype: torch.dtype = torch.float32
) -> torch.Tensor | dict[str, torch.Tensor]:
    """The ``attention_mask`` argument that keeps packed documents apart on eager/sdpa/flex.

    Returns a 4D mask, or a per-layer-type dict for models with sliding-window layers.
    """
    backend = config._attn_implementation
    if backend not in MASKED_BACKENDS:
        raise BidirLMError(f"attention backend '{backend}' takes cumulative lengths, not a mask; expected one of "
                           f"{list(MASKED_BACKENDS)}")
    windows = layer_windows(config)
    if backend == "flex_attention":
        masks = {t: flex_block_mask(seq_ids_BT, causal=causal, window=w) for t, w in windows.items()}
    else:
        masks = {t: _dense_mask(seq_ids_BT, backend, causal=causal, window=w, dtype=dtype) for t, w in windows.items()}
    if set(masks) == {"full_attention"}:
        return masks["full_attention"]
    return masks


def uses_varlen(config) -> bool:
    return str(config._attn_implementation).startswith(VARLEN_PREFIX)


def varlen_segments(seq_ids_BT: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cumulative lengths over the flattened (B*T) tokens: a segment per document per row.

    Runs of padding (-1) become segments of their own, so they never mix with real tokens; their
    outputs are ignored downstream.
    """
    B, T = seq_ids_BT.shape
    flat = seq_ids_BT.reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    starts[::T] = True  # every row starts a segment
    begin = torch.nonzero(starts).flatten()
    cu = torch.cat([begin, begin.new_tensor([B * T])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def model_inputs(
    config, *, seq_ids_BT: torch.Tensor | None = None, attention_mask_BT: torch.Tensor | None = None,
    bidirectional: bool, dtype: torch.dtype = torch.float32,
) -> dict:
    """Keyword arguments for a transformers forward call, for packed or padded batches.

    Packed batches give ``seq_ids_BT`` (document index per token, -1 for padding); padded batches
    give the usual 2D ``attention_mask_BT``. The result includes ``is_causal`` for the call.
    Varlen (flash) backends get cumulative sequence lengths for both, never a mask.
    """
    kwargs: dict = {"is_causal": not bidirectional}
    if uses_varlen(config):
        if seq_ids_BT is None and attention_mask_BT is not None:
            seq_ids_BT = torch.where(attention_mask_BT.bool(), 0, -1)
        if seq_ids_BT is not None:
            cu, longest = varlen_segments(seq_ids_BT)
            kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
        return kwargs
    if seq_ids_BT is None:
        kwargs["attention_mask"] = attention_mask_BT
        return kwargs
    kwargs["attention_mask"] = packed_attention_mask(config, seq_ids_BT, causal=not bidirectional, dtype=dtype)
    return kwargs
