"""FlashAttention varlen kernels as transformers attention backends: packed rows, causal or bidirectional.

Three kernels share one glue (:func:`varlen_attention`), chosen by ``attn_implementation``:

* ``torch_varlen`` — torch's own ``torch.nn.attention.varlen.varlen_attn`` (torch >= 2.10, CUDA):
  FlashAttention's varlen kernel with no extra dependency; the suggested CUDA backend.
* ``flash_attention_2`` — ``flash_attn.flash_attn_varlen_func`` (``pip install 'bidirlm-pl[flash]'``).
* ``flash_attention_4`` — ``flash_attn.cute.flash_attn_varlen_func`` (the ``flash-attn-4`` wheels,
  Hopper/Blackwell).

Every FlashAttention kernel computes in fp16/bf16 only. Under ``bf16-mixed`` with fp32 weights,
projections and norms can hand fp32 queries to attention (Qwen3's q/k norms do), so the glue casts
q/k/v to the compute dtype — autocast's when autocast is on, else the weights' — and casts the output
back to the dtype the layer gave it. An fp32 compute dtype is refused with one line.

On CPU the plumbing is tested with :func:`reference_varlen`, an SDPA stand-in with
``flash_attn_varlen_func``'s signature that refuses fp32 as the kernels do, and
:func:`reference_varlen_fp32`, the same without that rule, for exact comparisons in fp32.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

from bidirlm_pl.core.errors import BidirLMError, require

VARLEN_PREFIX = "bidirlm_varlen"
HALF_DTYPES = (torch.float16, torch.bfloat16)
# attn_implementation name -> (our registered backend suffix, what it needs)
KERNELS = {
    "torch_varlen": ("torch", "torch >= 2.10 with CUDA (torch.nn.attention.varlen)"),
    "flash_attention_2": ("flash", "flash-attn 2 (pip install 'bidirlm-pl[flash]') and CUDA"),
    "flash_attention_4": ("flash4", "flash-attn-4 (CuTe DSL, Hopper/Blackwell) and CUDA"),
}

VarlenFn = Callable[..., torch.Tensor]


def compute_dtype(query: torch.Tensor, module: torch.nn.Module) -> torch.dtype:
    """The dtype the kernel computes in: autocast's when it is on for the query's device, else the weights'."""
    device_type = query.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    weight = next((p for p in module.parameters(recurse=True) if p.is_floating_point()), None)
    return weight.dtype if weight is not None else query.dtype


def varlen_attention(varlen_fn: VarlenFn, *, half_only: bool = True):
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
                raise BidirLMError("varlen attention takes packed rows, not padding masks; pack the batch (data.init_args.pack)")
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
        out_dtype = query_BHTD.dtype
        dtype = compute_dtype(query_BHTD, module)
        if half_only and dtype not in HALF_DTYPES:
            raise BidirLMError(
                f"FlashAttention varlen kernels compute in float16/bfloat16, not {dtype}: train with "
                f"trainer.precision bf16-mixed or load with backbone.dtype bfloat16 (or use attn_implementation sdpa)"
            )
        q = query_BHTD.transpose(1, 2).reshape(B * T, H, D).to(dtype)
        k = key_BHSD.transpose(1, 2).reshape(B * S, key_BHSD.shape[1], D).to(dtype)
        v = value_BHSD.transpose(1, 2).reshape(B * S, value_BHSD.shape[1], value_BHSD.shape[-1]).to(dtype)
        out = varlen_fn(
            q, k, v, cu_seqlens_q=cu_q.to(torch.int32), cu_seqlens_k=cu_k.to(torch.int32),
            max_seqlen_q=max_q, max_seqlen_k=max_k,
            dropout_p=dropout if module.training else 0.0, softmax_scale=scaling,
            causal=bool(is_causal), window_size=window, softcap=softcap or 0.0,
        )
        return out.reshape(B, T, H, -1).to(out_dtype), None

    return attention


def register_varlen_backend(name: str, varlen_fn: VarlenFn, *, half_only: bool = True) -> str:
    """Register a flash-style ``varlen_fn`` as attention backend ``bidirlm_varlen_<name>``; return it.

    ``varlen_fn`` has the signature of ``flash_attn.flash_attn_varlen_func``. ``half_only`` applies
    the kernels' dtype rule in the glue (compute in fp16/bf16, refuse fp32).
    """
    from transformers import AttentionInterface

    backend = f"{VARLEN_PREFIX}_{name}"
    AttentionInterface.register(backend, varlen_attention(varlen_fn, half_only=half_only))
    return backend


# ---------------------------------------------------------------- the kernels behind one signature

def torch_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                 softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, **_):
    """torch's ``varlen_attn`` behind ``flash_attn_varlen_func``'s signature (no dropout, no softcap).

    torch has no ``causal`` argument: causal is a window with no right context, ``(left, 0)``.
    """
    from torch.nn.attention.varlen import varlen_attn

    if dropout_p:
        raise BidirLMError(f"attn_implementation 'torch_varlen' has no attention dropout (got {dropout_p}); "
                           f"set attention_dropout to 0 or use flash_attention_2 / sdpa")
    if softcap:
        raise BidirLMError("attn_implementation 'torch_varlen' has no logit soft-capping; use flash_attention_2")
    left, right = window_size
    if causal:
        right = 0
    kwargs = {"scale": softmax_scale, "window_size": (left, right)}
    if q.shape[1] != k.shape[1] and "enable_gqa" in inspect.signature(varlen_attn).parameters:
        kwargs["enable_gqa"] = True
    return varlen_attn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **kwargs)


def flash4_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                  softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, **_):
    """flash-attn-4's ``flash_attn.cute.flash_attn_varlen_func`` behind the flash-attn 2 signature.

    FlashAttention 4 writes an unbounded side of the window as ``None`` and returns ``(out, lse)``.
    """
    from flash_attn.cute import flash_attn_varlen_func

    if dropout_p:
        raise BidirLMError(f"attn_implementation 'flash_attention_4' has no attention dropout (got {dropout_p})")
    left, right = (None if w < 0 else w for w in window_size)
    out = flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                                 max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, softmax_scale=softmax_scale,
                                 causal=causal, window_size=(left, right), softcap=softcap)
    return out[0] if isinstance(out, tuple) else out


def kernel_backend(attn_implementation: str) -> str:
    """Register the kernel behind a varlen ``attn_implementation`` and return the backend name to load with."""

    suffix, needs = KERNELS[attn_implementation]
    if not torch.cuda.is_available():
        raise BidirLMError(f"attn_implementation '{attn_implementation}' runs on CUDA GPUs only (needs {needs}); "
                           f"on this machine use 'sdpa', 'flex_attention' or 'eager'")
    if attn_implementation == "torch_varlen":
        try:
            from torch.nn.attention import varlen  # noqa: F401
        except ImportError as err:
            raise BidirLMError(f"attn_implementation 'torch_varlen' needs torch >= 2.10 (this is "
                               f"{torch.__version__}); use flash_attention_2 or sdpa") from err
        fn = torch_varlen
    elif attn_implementation == "flash_attention_2":
        fn = require("flash_attn", "flash", "attn_implementation 'flash_attention_2'").flash_attn_varlen_func
    else:
        require("flash_attn.cute", "flash4", "attn_implementation 'flash_attention_4'")
        fn = flash4_varlen
    return register_varlen_backend(suffix, fn)


# ---------------------------------------------------------------- CPU stand-ins

def reference_varlen_fp32(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                          softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, **_):
    """``flash_attn_varlen_func``'s semantics in SDPA per segment, any dtype (for exact fp32 comparisons).

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


def reference_varlen(q, k, v, *args, **kwargs):
    """A CPU stand-in for ``flash_attn_varlen_func`` that, as every FlashAttention kernel, refuses fp32."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in HALF_DTYPES:
            raise RuntimeError(f"FlashAttention only support fp16 and bf16 data type (got {name} {t.dtype})")
    return reference_varlen_fp32(q, k, v, *args, **kwargs)
