"""Tiny random stand-ins of the Omni sources, built offline in the real checkpoints' layouts.

Each is the real family scaled down (2 text layers of width 64, head_dim 16; small towers) with the
real structure, config nesting, key names and rope settings:

* ``tiny-omni-text``: ``Qwen3ForCausalLM``, rope_theta 1e6 (Qwen3-1.7B's), tied output layer: the
  "MNTP-adapted text encoder" slot (``model.*``).
* ``tiny-qwen3-vl``: ``Qwen3VLForConditionalGeneration`` as ``Qwen/Qwen3-VL-2B-Instruct`` ships it:
  ``model.language_model.*``, ``model.visual.*`` (patch_embed, pos_embed, blocks, merger and three
  ``deepstack_merger_list`` mergers); its config.json keeps the hub's ``text_config.rope_theta`` 5e6 and
  ``rope_scaling {mrope_interleaved: true, mrope_section, rope_type: default}`` (mrope_section [4, 2, 2]:
  [24, 20, 20] scaled to head_dim 16); its image processor (``Qwen2VLImageProcessorPil``).
* ``tiny-qwen3-asr``: transformers' converted layout (``Qwen/Qwen3-ASR-1.7B-hf``): flat config
  (``audio_config``, ``text_config`` a plain Qwen3 of rope_theta 1e6), ``model.language_model.*``,
  ``model.audio_tower.*``, ``model.multi_modal_projector.linear_1/2``; ``Qwen3ASRFeatureExtractor``.
* ``tiny-qwen3-asr-original``: the same weights in the original ``Qwen/Qwen3-ASR-1.7B`` layout (QwenLM/Qwen3-ASR
  ``modeling_qwen3_asr.py``): ``thinker.model.*``, ``thinker.audio_tower.*`` with ``proj1``/``proj2`` inside,
  ``thinker.lm_head.weight``, sharded with an index; config.json nested as ``thinker_config.{audio_config,
  text_config}`` with the text model's MRoPE ``rope_scaling`` and rope_theta 1e6;
  a ``WhisperFeatureExtractor`` (the original processor's class).

All share the Lee BPE tokenizer extended with the multimodal placeholder tokens, so the text backbones
have equal shapes and token ids, like the real families.
"""

from __future__ import annotations

import json
from pathlib import Path

from bidirlm_pl.core.assets.cache import cache_dir, file_lock
from bidirlm_pl.core.assets.tiny import tiny_config, tiny_tokenizer
from bidirlm_pl.core.export import atomic_folder, save_hf_folder

MULTIMODAL_TOKENS = {"vision_start_token": "<|vision_start|>", "image_token": "<|image_pad|>",
                     "vision_end_token": "<|vision_end|>", "video_token": "<|video_pad|>",
                     "audio_bos_token": "<|audio_start|>", "audio_token": "<|audio_pad|>",
                     "audio_eos_token": "<|audio_end|>"}
TINY_OMNI = {"text": "tiny-omni-text", "vision": "tiny-qwen3-vl", "audio": "tiny-qwen3-asr",
             "audio_original": "tiny-qwen3-asr-original"}
VERSION = "2"  # bump when a stand-in changes: cached folders of another version are rebuilt
STAMP = ".tiny-omni-version"
# transformers' convert_qwen3_asr_to_hf.py STATE_DICT_MAPPING_ASR, inverted (original <- converted)
TO_ORIGINAL = (("model.language_model.", "thinker.model."),
               ("model.multi_modal_projector.linear_1.", "thinker.audio_tower.proj1."),
               ("model.multi_modal_projector.linear_2.", "thinker.audio_tower.proj2."),
               ("model.audio_tower.", "thinker.audio_tower."))
MROPE_SECTION = [4, 2, 2]


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


def _edit_config(folder: Path, edit) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _hub_style_vl_rope(config: dict) -> None:
    """The hub's Qwen3-VL config.json spelling (transformers 4.57): rope_theta + rope_scaling in text_config."""
    text = config["text_config"]
    rope = text.pop("rope_parameters")
    text["rope_theta"] = rope.pop("rope_theta")
    text["rope_scaling"] = rope


def _build_vl(tok, text: dict, ids: dict, target: Path) -> None:
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    vl_text = dict(text, rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": MROPE_SECTION,
                                          "mrope_interleaved": True})
    vl = Qwen3VLConfig(
        text_config=vl_text, tie_word_embeddings=True,
        vision_config={"depth": 4, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                       "out_hidden_size": text["hidden_size"], "patch_size": 16, "spatial_merge_size": 2,
                       "temporal_patch_size": 2, "num_position_embeddings": 64, "deepstack_visual_indexes": [1, 2, 3]},
        image_token_id=ids["image_token"], video_token_id=ids["video_token"],
        vision_start_token_id=ids["vision_start_token"], vision_end_token_id=ids["vision_end_token"])
    save_hf_folder(Qwen3VLForConditionalGeneration(vl), tok, target, overwrite=True)
    _edit_config(target, _hub_style_vl_rope)
    Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2,
                             size={"shortest_edge": 32 * 32, "longest_edge": 64 * 64}).save_pretrained(target)


def _asr_config(text: dict, ids: dict):
    from transformers import Qwen3ASRConfig

    return Qwen3ASRConfig(
        text_config=dict(text, tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
        audio_token_id=ids["audio_token"], tie_word_embeddings=True,
        audio_config={"num_mel_bins": 128, "encoder_layers": 2, "encoder_attention_heads": 2, "encoder_ffn_dim": 64,
                      "d_model": 32, "output_dim": text["hidden_size"], "downsample_hidden_size": 16,
                      "n_window": 50, "n_window_infer": 800})


def _original_asr_config(config, ids: dict) -> dict:
    """The converted config back in the original nesting (QwenLM/Qwen3-ASR configuration_qwen3_asr.py)."""
    audio = {k: v for k, v in config.audio_config.to_dict().items()
             if k in ("num_mel_bins", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim", "d_model",
                      "dropout", "attention_dropout", "activation_function", "activation_dropout",
                      "scale_embedding", "initializer_range", "n_window", "output_dim", "n_window_infer",
                      "downsample_hidden_size")}
    audio.update(model_type="qwen3_asr_audio_encoder", max_source_positions=1500, conv_chunksize=500)
    text = {k: v for k, v in config.text_config.to_dict().items()
            if k not in ("rope_parameters", "layer_types", "model_type", "architectures", "transformers_version",
                         "sliding_window", "use_sliding_window", "max_window_layers", "dtype")}
    text.update(model_type="qwen3_asr_text", rope_theta=1e6,
                rope_scaling={"rope_type": "default", "mrope_section": MROPE_SECTION, "mrope_interleaved": True,
                              "interleaved": True})
    thinker = {"model_type": "qwen3_asr_thinker", "audio_config": audio, "text_config": text,
               "audio_token_id": ids["audio_token"], "audio_start_token_id": ids["audio_bos_token"],
               "audio_end_token_id": ids["audio_eos_token"], "user_token_id": 1, "initializer_range": 0.02}
    return {"architectures": ["Qwen3ASRForConditionalGeneration"], "model_type": "qwen3_asr",
            "support_languages": ["English"], "thinker_config": thinker, "transformers_version": "4.57.6"}


def _save_original_asr(model, tok, ids: dict, target: Path) -> None:
    """The converted model's weights under the original key names, in two shards with an index."""
    from safetensors.torch import save_file
    from transformers import WhisperFeatureExtractor

    state = {}
    for key, value in model.state_dict().items():
        if key == "lm_head.weight":
            state["thinker.lm_head.weight"] = value.clone()  # the original repos store the tied copy
            continue
        for converted, original in TO_ORIGINAL:
            if key.startswith(converted):
                key = original + key[len(converted):]
                break
        state[key] = value.contiguous()
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": [k for k in keys if k.startswith("thinker.audio_tower.")]}
    shards["model-00002-of-00002.safetensors"] = [k for k in keys if k not in shards["model-00001-of-00002.safetensors"]]
    with atomic_folder(target, overwrite=True) as staging:
        for name, names in shards.items():
            save_file({k: state[k] for k in names}, staging / name, metadata={"format": "pt"})
        index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
                 "weight_map": {k: name for name, names in shards.items() for k in names}}
        (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (staging / "config.json").write_text(json.dumps(_original_asr_config(model.config, ids), indent=2))
        tok.save_pretrained(staging)
        WhisperFeatureExtractor(feature_size=128).save_pretrained(staging)


def _build(paths: dict[str, Path], seed: int) -> None:
    import torch
    from transformers import (
        Qwen3ASRFeatureExtractor,
        Qwen3ASRForConditionalGeneration,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    tok = omni_tokenizer()
    text, ids = _text_kwargs(tok), _ids(tok)
    torch.manual_seed(seed)
    save_hf_folder(Qwen3ForCausalLM(Qwen3Config(**text, tie_word_embeddings=True,
                                                rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
                   tok, paths["text"], overwrite=True)
    _build_vl(tok, text, ids, paths["vision"])
    asr = Qwen3ASRForConditionalGeneration(_asr_config(text, ids))
    save_hf_folder(asr, tok, paths["audio"], overwrite=True)
    Qwen3ASRFeatureExtractor().save_pretrained(paths["audio"])
    _save_original_asr(asr, tok, ids, paths["audio_original"])
    for path in paths.values():
        (path / STAMP).write_text(VERSION)


def build_tiny_omni_sources(root: Path | None = None, seed: int = 0) -> dict[str, Path]:
    """Build (once per VERSION) the stand-ins; return ``{"text", "vision", "audio", "audio_original": path}``."""
    root = Path(root) if root is not None else cache_dir()
    paths = {role: root / name for role, name in TINY_OMNI.items()}

    def current() -> bool:
        return all((p / STAMP).is_file() and (p / STAMP).read_text() == VERSION for p in paths.values())

    if current():
        return paths
    with file_lock(cache_dir() / ".tiny-omni.lock"):
        if not current():
            _build(paths, seed)
    return paths
