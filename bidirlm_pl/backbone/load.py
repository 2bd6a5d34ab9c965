"""load_backbone: a Hugging Face model and tokenizer (hub id, local folder or asset), in the attention mode asked for."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from bidirlm_pl.backbone import attention
from bidirlm_pl.backbone.model_files import check_config, check_tokenizer, check_weights
from bidirlm_pl.backbone.varlen import KERNELS, VARLEN_PREFIX, kernel_backend
from bidirlm_pl.core.errors import BidirLMError, require
from bidirlm_pl.core.hub import resolve_model_folder
from bidirlm_pl.core.specs import SUPPORTED_MODEL_TYPES, LoraSpec

BACKENDS = ("eager", "sdpa", "flex_attention", "torch_varlen", "flash_attention_2", "flash_attention_4")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HEADS = ("base", "causal_lm")


def resolve_model_path(name_or_path: str | Path) -> Path:
    """A checked local model folder for an offline asset name, a local folder or a hub id (``org/name[@rev]``;
    resolved once per process, see ``bidirlm_pl.core.hub``)."""
    path = resolve_model_folder(name_or_path)
    check_config(path)
    check_weights(path)
    return path


def check_backend(attn_implementation: str) -> str:
    """Validate a backend name (any machine): one of BACKENDS or a registered varlen backend."""
    if not attn_implementation.startswith(VARLEN_PREFIX) and attn_implementation not in BACKENDS:
        raise BidirLMError(f"attn_implementation '{attn_implementation}' is not one of {list(BACKENDS)}")
    return attn_implementation


def resolve_backend(attn_implementation: str) -> str:
    """The backend name to load with: varlen kernels (CUDA) are registered as our packed varlen backends."""
    check_backend(attn_implementation)
    if attn_implementation in KERNELS:
        return kernel_backend(attn_implementation)
    return attn_implementation


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise BidirLMError(f"dtype '{dtype}' is not one of {list(DTYPES)}")
    return DTYPES[dtype]


def load_backbone(
    name_or_path: str | Path,
    *,
    attn_implementation: str = "sdpa",
    dtype: str | torch.dtype = "float32",
    bidirectional: bool = True,
    head: str = "causal_lm",
    lora: LoraSpec | None = None,
    trust_remote_code: bool = False,
):
    """Load a Qwen3, Gemma3 or Llama checkpoint (hub id, folder or asset); return ``(model, tokenizer)``.

    ``head="causal_lm"`` keeps the output layer (MNTP, generation); ``"base"`` loads the bare
    decoder (embeddings). ``bidirectional`` sets the default attention mode; any call can still
    override it with ``model(..., is_causal=...)``.

    >>> model, tok = load_backbone("gemma3-270m", bidirectional=True)  # doctest: +SKIP
    """
    path = resolve_model_path(name_or_path)
    if head not in HEADS:
        raise BidirLMError(f"head '{head}' is not one of {list(HEADS)}")
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise BidirLMError(
            f"architecture '{config.model_type}' in '{path}' is not supported; expected one of "
            f"{list(SUPPORTED_MODEL_TYPES)}"
        )
    backend = resolve_backend(attn_implementation)
    auto = AutoModelForCausalLM if head == "causal_lm" else AutoModel
    model = auto.from_pretrained(
        path, dtype=resolve_dtype(dtype), attn_implementation=backend, trust_remote_code=trust_remote_code
    )
    attention.set_bidirectional(model, bidirectional)
    check_tokenizer(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if lora is not None:
        model = apply_lora(model, lora)
    return model, tokenizer


def apply_lora(model, lora: LoraSpec):
    peft = require("peft", "dev", "LoRA")
    config = peft.LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules)
    )
    return peft.get_peft_model(model, config)


def decoder_of(model):
    """The bare decoder (``...Model``) of a causal LM or of itself."""
    return model.get_decoder() if hasattr(model, "get_decoder") else model
