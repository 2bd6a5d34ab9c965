"""Tiny random sources of the Omni composition, built offline from the real classes.

Three models that share one text backbone architecture (as Qwen3, Qwen3-VL and Qwen3-ASR do):

* ``tiny-omni-text``: ``Qwen3ForCausalLM`` (the "MNTP-adapted text encoder" slot);
* ``tiny-qwen3-vl``: ``Qwen3VLForConditionalGeneration`` (vision tower + merger, text under
  ``model.language_model.``), with its image processor (``Qwen2VLImageProcessorPil``);
* ``tiny-qwen3-asr``: ``Qwen3ASRForConditionalGeneration`` (audio tower + projector, text under
  ``model.language_model.``), with its feature extractor.

They share the Lee BPE tokenizer extended with the multimodal placeholder tokens, so the three
text backbones have equal shapes and token ids, like the real families.
"""

from __future__ import annotations

from pathlib import Path

from bidirlm_pl.core.assets.cache import cache_dir, file_lock
from bidirlm_pl.core.assets.tiny import tiny_config, tiny_tokenizer
from bidirlm_pl.core.export import save_hf_folder

MULTIMODAL_TOKENS = {"vision_start_token": "<|vision_start|>", "image_token": "<|image_pad|>",
                     "vision_end_token": "<|vision_end|>", "video_token": "<|video_pad|>",
                     "audio_bos_token": "<|audio_start|>", "audio_token": "<|audio_pad|>",
                     "audio_eos_token": "<|audio_end|>"}
TINY_OMNI = {"text": "tiny-omni-text", "vision": "tiny-qwen3-vl", "audio": "tiny-qwen3-asr"}


def omni_tokenizer():
    """The Lee BPE tokenizer plus the multimodal placeholder tokens as special tokens."""
    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": list(MULTIMODAL_TOKENS.values())})
    return tok


def _text_kwargs(tok) -> dict:
    cfg = tiny_config("qwen3", len(tok), tok).to_dict()
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "max_position_embeddings", "pad_token_id", "bos_token_id",
            "eos_token_id")
    return {k: cfg[k] for k in keep}


def _ids(tok) -> dict[str, int]:
    return {name: tok.convert_tokens_to_ids(token) for name, token in MULTIMODAL_TOKENS.items()}


def build_tiny_omni_sources(root: Path | None = None, seed: int = 0) -> dict[str, Path]:
    """Build (once) the three tiny sources; return ``{"text": path, "vision": path, "audio": path}``."""
    import torch
    from transformers import (
        Qwen3ASRConfig,
        Qwen3ASRFeatureExtractor,
        Qwen3ASRForConditionalGeneration,
        Qwen3ForCausalLM,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
    )
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    root = Path(root) if root is not None else cache_dir()
    paths = {role: root / name for role, name in TINY_OMNI.items()}
    if all((p / "model.safetensors").exists() for p in paths.values()):
        return paths
    with file_lock(cache_dir() / ".tiny-omni.lock"):
        if all((p / "model.safetensors").exists() for p in paths.values()):
            return paths
        tok = omni_tokenizer()
        text, ids = _text_kwargs(tok), _ids(tok)
        torch.manual_seed(seed)
        from transformers import Qwen3Config

        save_hf_folder(Qwen3ForCausalLM(Qwen3Config(**text, tie_word_embeddings=True)), tok, paths["text"],
                       overwrite=True)
        vl_text = dict(text, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                              "mrope_section": [2, 3, 3], "mrope_interleaved": True})
        vl = Qwen3VLConfig(
            text_config=vl_text, tie_word_embeddings=True,
            vision_config={"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                               "out_hidden_size": text["hidden_size"], "patch_size": 16, "spatial_merge_size": 2,
                               "temporal_patch_size": 2, "num_position_embeddings": 64, "deepstack_visual_indexes": [0]},
            image_token_id=ids["image_token"], video_token_id=ids["video_token"],
            vision_start_token_id=ids["vision_start_token"], vision_end_token_id=ids["vision_end_token"])
        save_hf_folder(Qwen3VLForConditionalGeneration(vl), tok, paths["vision"], overwrite=True)
        Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2,
                                 size={"shortest_edge": 32 * 32, "longest_edge": 64 * 64}
                                 ).save_pretrained(paths["vision"])
        asr = Qwen3ASRConfig(
            text_config=text, audio_token_id=ids["audio_token"], tie_word_embeddings=True,
            audio_config={"num_mel_bins": 128, "encoder_layers": 1, "encoder_attention_heads": 2, "encoder_ffn_dim": 64,
                              "d_model": 32, "output_dim": text["hidden_size"], "downsample_hidden_size": 16})
        save_hf_folder(Qwen3ASRForConditionalGeneration(asr), tok, paths["audio"], overwrite=True)
        Qwen3ASRFeatureExtractor().save_pretrained(paths["audio"])
    return paths
