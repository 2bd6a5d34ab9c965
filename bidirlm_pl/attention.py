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

from collections.abc import Callable

import torch
from transformers import AttentionInterface

MASKED_BACKENDS = ("eager", "sdpa", "flex_attention")
FLASH_BACKEND = "flash_attention_2"
VARLEN_PREFIX = "bidirlm_varlen"


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


def _as_backend_mask(visible: torch.Tensor, backend: str, dtype: torch.dtype):
    if backend == "sdpa":
        return visible
    if backend == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        table_BTT = visible[:, 0]

        def mask_mod(b, h, q_idx, kv_idx):
            return table_BTT[b, q_idx, kv_idx]

        B, T = table_BTT.shape[0], table_BTT.shape[-1]
        return create_block_mask(mask_mod, B, None, T, T, device=visible.device)
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
        raise ValueError(f"attention backend '{backend}' takes cumulative lengths, not a mask")
    windows = layer_windows(config)
    masks = {
        layer_type: _as_backend_mask(packed_visibility(seq_ids_BT, causal=causal, window=w), backend, dtype)
        for layer_type, w in windows.items()
    }
    if set(masks) == {"full_attention"}:
        return masks["full_attention"]
    return masks


# ---------------------------------------------------------------- varlen (flash) backends

VarlenFn = Callable[..., torch.Tensor]


def _varlen_attention(varlen_fn: VarlenFn):
    """An attention function for transformers' AttentionInterface that calls a flash-style varlen kernel.

    It reads ``cu_seq_lens_q/k`` and ``max_length_q/k`` (packed rows) from the call's kwargs; without
    them each row is one sequence. ``is_causal`` comes per call (transformers forwards it).
    """

    def attention(module, query_BHTD, key_BHSD, value_BHSD, attention_mask, scaling=None,
                  dropout=0.0, sliding_window=None, softcap=None, **kwargs):
        B, H, T, D = query_BHTD.shape
        S = key_BHSD.shape[2]
        is_causal = kwargs.get("is_causal")
        if is_causal is None:
            is_causal = getattr(module, "is_causal", True)
        cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
        if cu_q is None:
            if attention_mask is not None and not bool(attention_mask.all()):
                raise ValueError("varlen attention takes packed rows, not padding masks; pack the batch")
            cu_q = torch.arange(B + 1, dtype=torch.int32, device=query_BHTD.device) * T
            cu_k = torch.arange(B + 1, dtype=torch.int32, device=query_BHTD.device) * S
            max_q, max_k = T, S
        else:
            if cu_k is None:
                cu_k = cu_q
            max_q = int(kwargs.get("max_length_q") or (cu_q[1:] - cu_q[:-1]).max())
            max_k = int(kwargs.get("max_length_k") or (cu_k[1:] - cu_k[:-1]).max())
        window = (-1, -1)
        if sliding_window is not None:
            window = (sliding_window - 1, 0) if is_causal else (sliding_window, sliding_window)
        q = query_BHTD.transpose(1, 2).reshape(B * T, H, D)
        k = key_BHSD.transpose(1, 2).reshape(B * S, key_BHSD.shape[1], D)
        v = value_BHSD.transpose(1, 2).reshape(B * S, value_BHSD.shape[1], value_BHSD.shape[-1])
        out = varlen_fn(
            q, k, v, cu_seqlens_q=cu_q.to(torch.int32), cu_seqlens_k=cu_k.to(torch.int32),
            max_seqlen_q=max_q, max_seqlen_k=max_k,
            dropout_p=dropout if module.training else 0.0, softmax_scale=scaling,
            causal=bool(is_causal), window_size=window, softcap=softcap or 0.0,
        )
        return out.reshape(B, T, H, -1), None

    return attention


def register_varlen_backend(name: str, varlen_fn: VarlenFn) -> str:
    """Register a flash-style ``varlen_fn`` as attention backend ``bidirlm_varlen_<name>``; return it.

    ``varlen_fn`` has the signature of ``flash_attn.flash_attn_varlen_func``. Tests pass
    :func:`reference_varlen` so that the plumbing runs on CPU.
    """
    backend = f"{VARLEN_PREFIX}_{name}"
    AttentionInterface.register(backend, _varlen_attention(varlen_fn))
    return backend


def reference_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                     softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, **_):
    """A CPU stand-in for ``flash_attn_varlen_func``: same signature and semantics, SDPA per segment.

    Causal masks align bottom-right (as flash-attn >= 2.1); a window ``(l, r)`` lets query ``i``
    see keys ``j`` with ``i - l <= j <= i + r`` (-1 = unbounded).
    """
    assert softcap == 0.0, "the reference varlen stand-in does not implement softcap"
    outs = []
    n_rep = q.shape[1] // k.shape[1]
    for i in range(len(cu_seqlens_q) - 1):
        qs, qe = int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1])
        ks, ke = int(cu_seqlens_k[i]), int(cu_seqlens_k[i + 1])
        q_HTD = q[qs:qe].transpose(0, 1)
        k_HSD = k[ks:ke].transpose(0, 1).repeat_interleave(n_rep, dim=0)
        v_HSD = v[ks:ke].transpose(0, 1).repeat_interleave(n_rep, dim=0)
        Tq, Tk = qe - qs, ke - ks
        qpos = torch.arange(Tq, device=q.device)[:, None] + (Tk - Tq)
        kpos = torch.arange(Tk, device=q.device)[None, :]
        allowed = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device)
        left, right = window_size
        if causal:
            right = 0 if right < 0 else min(right, 0)
        if left >= 0:
            allowed &= kpos >= qpos - left
        if right >= 0:
            allowed &= kpos <= qpos + right
        out = torch.nn.functional.scaled_dot_product_attention(
            q_HTD, k_HSD, v_HSD, attn_mask=allowed, dropout_p=dropout_p, scale=softmax_scale
        )
        outs.append(out.transpose(0, 1))
    return torch.cat(outs, dim=0)


def flash_backend() -> str:
    """Register flash-attn's varlen kernel (CUDA) as our packed, causal-or-bidirectional backend."""
    from bidirlm_pl.errors import require

    flash_attn = require("flash_attn", "flash", "attn_implementation 'flash_attention_2'")
    return register_varlen_backend("flash", flash_attn.flash_attn_varlen_func)


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
