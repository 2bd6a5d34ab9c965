"""Where each omni source keeps its text backbone and its towers: the checkpoint layouts ``bidirlm compose`` reads.

A layout names, for one kind of checkpoint, the key prefixes of its text backbone (renamed onto the
composed text model's ``model.``), of its towers (renamed onto the composed folder's tower names, which
are transformers' own: ``model.visual.``, ``model.audio_tower.``, ``model.multi_modal_projector.``), and
the prefixes it leaves out on purpose, each with its reason. Every tensor of a source is merged, attached
or listed as left out with a reason (:func:`account`); a tensor none of them covers is an error.

* ``qwen3``: a Qwen3 causal LM (``model.*``, ``lm_head``), e.g. the MNTP-adapted Qwen3-1.7B.
* ``qwen3-vl``: ``Qwen/Qwen3-VL-*`` (``model.language_model.*``, ``model.visual.*`` with its merger and
  DeepStack mergers; transformers ``models/qwen3_vl/modeling_qwen3_vl.py``, ``Qwen3VLModel``).
* ``qwen3-asr-hf``: transformers' converted Qwen3-ASR (``Qwen/Qwen3-ASR-1.7B-hf``: ``model.language_model.*``,
  ``model.audio_tower.*``, ``model.multi_modal_projector.linear_1/2``, ``lm_head``).
* ``qwen3-asr-original``: the original ``Qwen/Qwen3-ASR-1.7B`` / ``-0.6B`` repos (``thinker.model.*``,
  ``thinker.audio_tower.*`` holding ``proj1``/``proj2``, ``thinker.lm_head``; QwenLM/Qwen3-ASR
  ``qwen_asr/core/transformers_backend/modeling_qwen3_asr.py``). Its renames and its config conversion are
  those of transformers' converter (``models/qwen3_asr/convert_qwen3_asr_to_hf.py``:
  ``STATE_DICT_MAPPING_ASR`` and ``clean_config``), so the composed folder is the same from either repo.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from bidirlm_pl.core.errors import BidirLMError

LM_HEAD_REASON = ("the causal LM's output layer (tied to the token embeddings, which are merged): the omni "
                  "encoder pools hidden states and has no output layer")
# the composed folder's tower prefixes, per role: what OmniEncoder loads with transformers' classes
TOWER_PREFIXES = {"vision": ["model.visual."], "audio": ["model.audio_tower.", "model.multi_modal_projector."]}


@dataclass(frozen=True)
class Layout:
    """Key prefixes of one checkpoint layout (longest prefix wins) and how its config and processor are read."""

    backbone: dict[str, str]
    towers: dict[str, str] = field(default_factory=dict)
    unused: dict[str, str] = field(default_factory=lambda: {"lm_head.": LM_HEAD_REASON})
    config: str = "auto"        # "auto": AutoConfig; "qwen3_asr_original": transformers' converter rules
    processor: str = "copy"     # "copy": the source's preprocessor_config.json; "qwen3_asr": transformers' default


LAYOUTS = {
    "qwen3": Layout(backbone={"model.": "model."}),
    "qwen3-vl": Layout(backbone={"model.language_model.": "model."}, towers={"model.visual.": "model.visual."}),
    "qwen3-asr-hf": Layout(backbone={"model.language_model.": "model."},
                           towers={"model.audio_tower.": "model.audio_tower.",
                                   "model.multi_modal_projector.": "model.multi_modal_projector."}),
    "qwen3-asr-original": Layout(
        backbone={"thinker.model.": "model."},
        towers={"thinker.audio_tower.proj1.": "model.multi_modal_projector.linear_1.",
                "thinker.audio_tower.proj2.": "model.multi_modal_projector.linear_2.",
                "thinker.audio_tower.": "model.audio_tower."},
        unused={"thinker.lm_head.": LM_HEAD_REASON}, config="qwen3_asr_original", processor="qwen3_asr"),
}


def resolve_layout(role: str, layout: str | None, key_map: dict | None, towers, unused) -> Layout:
    """A source's layout: the named preset, with any explicit ``key_map`` / ``towers`` / ``unused`` over it.

    ``towers`` is a list of prefixes (kept under their own names) or a mapping of renames.
    """
    if layout is not None and layout not in LAYOUTS:
        raise BidirLMError(f"compose source '{role}' layout '{layout}' is not one of {sorted(LAYOUTS)}")
    base = LAYOUTS[layout] if layout is not None else Layout(backbone={"model.": "model."})
    if isinstance(towers, list):
        towers = {prefix: prefix for prefix in towers}
    if isinstance(unused, list):
        unused = {prefix: "declared unused in the compose config" for prefix in unused}
    resolved = Layout(backbone=dict(key_map or base.backbone), towers=dict(towers or base.towers),
                      unused=dict(unused or base.unused), config=base.config, processor=base.processor)
    if role == "text" and resolved.towers:
        raise BidirLMError("compose source 'text' declares towers; only 'vision' and 'audio' sources bring towers")
    if role != "text" and not resolved.towers:
        raise BidirLMError(f"compose source '{role}' declares no 'towers' (key prefixes of its tower and "
                           f"projector, e.g. [model.visual.]) and no layout ({sorted(LAYOUTS)})")
    return resolved


def suggest_layout(keys: list[str]) -> str | None:
    """The preset whose backbone and tower prefixes all occur in ``keys`` (the most specific one)."""
    fits = [name for name, lay in LAYOUTS.items()
            if all(any(k.startswith(p) for k in keys) for p in [*lay.backbone, *lay.towers])]
    return max(fits, key=lambda name: len(LAYOUTS[name].towers), default=None)


def check_prefixes(role: str, model: str, layout: Layout, keys: list[str]) -> dict[str, int]:
    """Tensors under each backbone and tower prefix; a one-line error (with the layout that fits) for an empty one."""
    counts = {prefix: sum(k.startswith(prefix) for k in keys) for prefix in [*layout.backbone, *layout.towers]}
    empty = [prefix for prefix, n in counts.items() if n == 0]
    if empty:
        hint = suggest_layout(keys)
        heads = sorted({".".join(k.split(".")[:2]) + "." for k in keys})[:4]
        raise BidirLMError(f"source '{role}' ({model}) has no tensor under '{empty[0]}'; "
                           + (f"it fits layout '{hint}'" if hint else f"its keys start with {heads}"))
    return counts


def check_tower_targets(role: str, layout: Layout) -> None:
    """A source's towers must land under the composed folder's names for its role (what the encoder loads)."""
    allowed = TOWER_PREFIXES.get(role, [])
    odd = [t for t in layout.towers.values() if not t.startswith(tuple(allowed))]
    if odd:
        raise BidirLMError(f"compose source '{role}' renames a tower onto '{odd[0]}'; {role} towers go under "
                           f"{allowed} (the names the omni encoder loads)")


def account(role: str, model: str, layout: Layout, keys: list[str], used: set[str]) -> dict[str, str]:
    """Every key the composition does not use, with its reason; an error for one without a declared reason."""
    left = {}
    for key in keys:
        if key in used:
            continue
        reason = next((layout.unused[p] for p in sorted(layout.unused, key=len, reverse=True)
                       if key.startswith(p)), None)
        if reason is None:
            raise BidirLMError(f"source '{role}' ({model}): tensor '{key}' is neither merged, attached nor declared "
                               f"unused; is this the right layout? ({sorted(LAYOUTS)})")
        left[key] = reason
    return left


# ---------------------------------------------------------------------------------------------- configs
AUDIO_DROP = ("_name_or_path", "architectures", "dtype", "model_type", "use_bfloat16", "max_source_positions",
              "add_cross_attention", "chunk_size_feed_forward", "cross_attention_hidden_size",
              "decoder_start_token_id", "finetuning_task", "id2label", "label2id", "is_decoder",
              "is_encoder_decoder", "output_attentions", "output_hidden_states", "pad_token_id", "bos_token_id",
              "eos_token_id", "prefix", "problem_type", "pruned_heads", "return_dict", "sep_token_id",
              "task_specific_params", "tf_legacy_loss", "tie_encoder_decoder", "tie_word_embeddings",
              "tokenizer_class", "torchscript", "conv_chunksize", "torch_dtype")
TEXT_DROP = ("_name_or_path", "architectures", "dtype", "model_type", "use_bfloat16", "torch_dtype",
             "decoder_sparse_step", "moe_intermediate_size", "num_experts_per_tok", "num_experts", "norm_topk_prob",
             "output_router_logits", "router_aux_loss_coef", "mlp_only_layers")


def convert_qwen3_asr_config(raw: dict) -> dict:
    """The original Qwen3-ASR config.json (``thinker_config`` nesting) as transformers' flat ``Qwen3ASRConfig``.

    transformers' ``convert_qwen3_asr_to_hf.py::clean_config``: flatten the thinker, rename
    ``encoder_attention_heads``, 13 post-CNN positions per chunk, text config a plain Qwen3 (the MRoPE keys
    dropped: the original positions audio and text 1-D on all three axes, see ``get_rope_index`` there).
    """
    thinker = raw.get("thinker_config")
    if not isinstance(thinker, dict) or "audio_config" not in thinker or "text_config" not in thinker:
        raise BidirLMError("an original Qwen3-ASR config.json has thinker_config.audio_config and "
                           "thinker_config.text_config; this one does not (use layout qwen3-asr-hf?)")
    audio = {k: v for k, v in thinker["audio_config"].items() if k not in AUDIO_DROP}
    if "encoder_attention_heads" in audio:
        audio.setdefault("num_key_value_heads", audio["encoder_attention_heads"])
    audio["max_position_embeddings"] = 13
    text = {k: v for k, v in thinker["text_config"].items() if k not in TEXT_DROP}
    rope = dict(text.pop("rope_scaling", None) or {})
    for key in ("mrope_interleaved", "interleaved", "mrope_section", "type"):
        rope.pop(key, None)
    text["rope_parameters"] = {"rope_type": rope.get("rope_type", "default"),
                               "rope_theta": float(text.pop("rope_theta", 1e6))}
    out = {"model_type": "qwen3_asr", "audio_config": audio, "text_config": text,
           "tie_word_embeddings": bool(text.get("tie_word_embeddings", True))}
    for key in ("audio_token_id", "initializer_range"):
        if key in thinker:
            out[key] = thinker[key]
    return out


def source_config(layout: Layout, folder: Path) -> dict:
    """The source's config as transformers' class of its towers reads it (a plain dict)."""
    from transformers import AutoConfig, Qwen3ASRConfig

    if layout.config == "qwen3_asr_original":
        return Qwen3ASRConfig(**convert_qwen3_asr_config(json.loads((folder / "config.json").read_text()))).to_dict()
    return AutoConfig.from_pretrained(folder).to_dict()


def text_rope(config: dict) -> dict:
    """``rope_theta`` (and MRoPE's ``mrope_section`` / ``mrope_interleaved`` if any) of a config's text model."""
    text = config.get("text_config") or config
    rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
    theta = rope.get("rope_theta", text.get("rope_theta"))
    if theta is None:
        raise BidirLMError(f"the {text.get('model_type')} text config names no rope_theta")
    out = {"rope_theta": float(theta), "rope_type": rope.get("rope_type", "default")}
    if "mrope_section" in rope:
        out.update(mrope_section=list(rope["mrope_section"]), mrope_interleaved=bool(rope.get("mrope_interleaved")))
    return out
