"""Omni sources in the real checkpoints' layouts: tiny stand-ins carry the real key names and config nesting,
both Qwen3-ASR layouts (the original repos' ``thinker.*`` and transformers' converted one) compose the same
folder through the shipped layouts, every source tensor is merged, attached or listed with its reason, and
``bidirlm compose --print-plan`` shows what the full-size configs/omni/qwen3.yaml produces."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from bidirlm_pl.cli import main as cli
from bidirlm_pl.cli.compose import OmniSource, OmniSpec, build_plan, compose
from bidirlm_pl.core import assets
from bidirlm_pl.core.assets.tiny import tiny_tokenizer
from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.models.merging.safetensors_io import Checkpoint
from bidirlm_pl.models.omni.layouts import LM_HEAD_REASON

# transformers models/qwen3_asr/convert_qwen3_asr_to_hf.py STATE_DICT_MAPPING_ASR, applied in order with str.replace
CONVERTER = {"thinker.model.": "model.language_model.", "thinker.lm_head.": "lm_head.", "thinker.": "model.",
             "model.audio_tower.proj1.": "model.multi_modal_projector.linear_1.",
             "model.audio_tower.proj2.": "model.multi_modal_projector.linear_2."}
STANDINS = "configs/omni/qwen3-standins.yaml"


def _keys(name):
    return set(Checkpoint(assets.ASSETS[name]()).keys())


def _config(name):
    return json.loads((assets.ASSETS[name]() / "config.json").read_text())


def _spec(output, **sources):
    return OmniSpec(output=str(output), sources={r: OmniSource(**s) for r, s in sources.items()},
                    tokenizer_from="audio")


STANDIN_SOURCES = {"text": {"model": "tiny-omni-text", "layout": "qwen3"},
                   "vision": {"model": "tiny-qwen3-vl", "layout": "qwen3-vl"},
                   "audio": {"model": "tiny-qwen3-asr-original", "layout": "qwen3-asr-original"}}


@pytest.fixture(scope="module")
def composed(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    original = compose(_spec(root / "original", **STANDIN_SOURCES))
    converted = compose(_spec(root / "converted", **{**STANDIN_SOURCES, "audio": {
        "model": "tiny-qwen3-asr", "layout": "qwen3-asr-hf"}}))
    return original, converted


def test_standins_carry_the_real_key_names_and_configs():
    vl = _keys("tiny-qwen3-vl")
    for key in ("model.visual.patch_embed.proj.weight", "model.visual.pos_embed.weight",
                "model.visual.blocks.0.attn.qkv.weight", "model.visual.merger.linear_fc1.weight",
                "model.visual.deepstack_merger_list.2.linear_fc2.weight", "model.language_model.embed_tokens.weight",
                "model.language_model.layers.1.self_attn.q_norm.weight"):
        assert key in vl, key
    assert not any(k.startswith("lm_head") for k in vl)  # tied: not stored
    text = _config("tiny-qwen3-vl")["text_config"]  # the hub's spelling of Qwen3-VL-2B's rotary
    assert text["rope_theta"] == 5e6 and text["rope_scaling"]["mrope_interleaved"] is True
    original = _keys("tiny-qwen3-asr-original")
    tower = {k.split(".")[2] for k in original if k.startswith("thinker.audio_tower.")}
    assert tower == {"conv2d1", "conv2d2", "conv2d3", "conv_out", "layers", "ln_post", "proj1", "proj2"}
    assert "thinker.lm_head.weight" in original and "thinker.model.norm.weight" in original
    assert {k.split(".")[0] for k in original} == {"thinker"}
    thinker = _config("tiny-qwen3-asr-original")["thinker_config"]
    assert thinker["text_config"]["rope_theta"] == 1e6 and thinker["text_config"]["rope_scaling"]["mrope_section"]
    assert thinker["audio_config"]["max_source_positions"] == 1500
    assert (assets.ASSETS["tiny-qwen3-asr-original"]() / "model.safetensors.index.json").is_file()
    # transformers' converter turns the original key names into the converted stand-in's (plus the tied lm_head)
    renamed = set()
    for key in original:
        for old, new in CONVERTER.items():
            key = key.replace(old, new)
        renamed.add(key)
    assert renamed == _keys("tiny-qwen3-asr") | {"lm_head.weight"}


def test_both_asr_layouts_compose_the_same_folder(composed):
    original, converted = composed
    a, b = load_file(original / "model.safetensors"), load_file(converted / "model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.loads((f / "omni_config.json").read_text()) for f in composed)
    for part in ("audio_config", "text_config"):
        ignore = {"_name_or_path", "architectures", "dtype", "num_key_value_heads"}
        assert {k: v for k, v in ra["audio"]["config"][part].items() if k not in ignore} == \
            {k: v for k, v in rb["audio"]["config"][part].items() if k not in ignore}, part
    assert ra["audio"]["config"]["audio_config"]["max_position_embeddings"] == 13  # the converter's value
    assert ra["audio"]["towers"] == rb["audio"]["towers"] == ["model.audio_tower.", "model.multi_modal_projector."]
    assert ra["audio"]["audio_token_id"] == rb["audio"]["audio_token_id"]
    assert ra["provenance"]["towers"]["audio"]["tensors"]["thinker.audio_tower.proj1."] == 2
    # the original stores its tied output layer: listed, with the reason; the converted stores none
    assert ra["provenance"]["left_out"] == {"text": {}, "vision": {}, "audio": {"thinker.lm_head.weight": LM_HEAD_REASON}}
    assert rb["provenance"]["left_out"] == {"text": {}, "vision": {}, "audio": {}}


def test_every_source_tensor_is_merged_attached_or_listed(composed):
    original, _ = composed
    plan = build_plan(_spec(original.parent / "unused", **STANDIN_SOURCES))
    for i, role in enumerate(plan.roles):
        keys = _keys(plan.spec.sources[role].model)
        merged = {e.keys[i] for e in plan.entries if e.action == "merge"}
        attached = {e.keys[i] for e in plan.entries if e.action == "copy" and e.keys[i] is not None}
        left = set(plan.left_out[role])
        assert merged | attached | left == keys and not (merged & attached or merged & left or attached & left), role
    out = set(load_file(original / "model.safetensors"))
    assert out == {e.name for e in plan.entries}
    assert all(k.startswith(("model.visual.", "model.audio_tower.", "model.multi_modal_projector.", "model.layers.",
                             "model.embed_tokens.", "model.norm.")) for k in out)


def test_a_tensor_without_a_place_or_a_reason_is_an_error(tmp_path):
    odd = tmp_path / "vl-extra"
    shutil.copytree(assets.ASSETS["tiny-qwen3-vl"](), odd)
    state = load_file(odd / "model.safetensors")
    save_file({**state, "mtp.proj.weight": torch.zeros(2, 2)}, odd / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(BidirLMError, match=r"tensor 'mtp.proj.weight' is neither merged, attached nor declared unused"):
        build_plan(_spec(tmp_path / "x", **{**STANDIN_SOURCES, "vision": {"model": str(odd), "layout": "qwen3-vl"}}))
    plan = build_plan(_spec(tmp_path / "x", **{**STANDIN_SOURCES, "vision": {
        "model": str(odd), "layout": "qwen3-vl", "unused": {"mtp.": "multi-token prediction head", "lm_head.": "x"}}}))
    assert plan.left_out["vision"] == {"mtp.proj.weight": "multi-token prediction head"}


def test_wrong_layout_or_tokenizer_is_one_line(tmp_path):
    with pytest.raises(BidirLMError, match=r"has no tensor under 'model.language_model.'; it fits layout "
                                           r"'qwen3-asr-original'"):
        build_plan(_spec(tmp_path / "x", **{**STANDIN_SOURCES, "audio": {"model": "tiny-qwen3-asr-original",
                                                                         "layout": "qwen3-asr-hf"}}))
    with pytest.raises(BidirLMError, match=r"renames a tower onto 'model.vision.'"):
        build_plan(_spec(tmp_path / "x", **{**STANDIN_SOURCES, "vision": {
            "model": "tiny-qwen3-vl", "layout": "qwen3-vl", "towers": {"model.visual.": "model.vision."}}}))
    # a text model whose tokenizer lacks the audio placeholders (as Qwen3-1.7B's does) must not give the tokenizer
    text = tmp_path / "text"
    shutil.copytree(assets.ASSETS["tiny-omni-text"](), text)
    for item in text.glob("tokenizer*"):
        item.unlink()
    tiny_tokenizer().save_pretrained(text)
    spec = _spec(tmp_path / "x", **{**STANDIN_SOURCES, "text": {"model": str(text), "layout": "qwen3"}})
    spec.tokenizer_from = "text"
    with pytest.raises(BidirLMError, match=r"tokenizer \(from 'text'\) has no <\|vision_start\|>.*tokenizer_from"):
        build_plan(spec)


def test_print_plan_shows_what_the_full_size_run_produces(tmp_path, capsys):
    out = tmp_path / "never"
    assert cli.main(["compose", "--config", STANDINS, "--print-plan", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert not out.exists()
    lines = [
        ("merged backbone (24 tensors, weighted average): model.embed_tokens (1), model.layers.{0..1} (22), "
         "model.norm (1)"),
        ("vision model.visual. <- model.visual. (75 tensors): blocks.{0..3} (48), deepstack_merger_list.{0..2} "
         "(18), merger (6), patch_embed (2), pos_embed (1)"),
        "audio  model.multi_modal_projector.linear_1. <- thinker.audio_tower.proj1. (2 tensors)",
        ("audio  model.audio_tower. <- thinker.audio_tower. (41 tensors): conv2d1 (2), conv2d2 (2), conv2d3 (2), "
         "conv_out (1), layers.{0..1} (32), ln_post (2)"),
        "left out (1 tensors):",
        f"audio  thinker.lm_head.weight: {LM_HEAD_REASON}",
        ("positions: interleaved MRoPE, rope_theta 5000000 (from vision; sources: text 1000000, vision 5000000, "
         "audio 1000000)"),
    ]
    for line in lines:
        assert line in text, (line, text)


def test_the_full_size_config_and_its_standin_twin_agree():
    """configs/omni/qwen3.yaml names the real repos in their real layouts; the stand-in twin differs only in models."""
    real, twin = (yaml.safe_load(Path(p).read_text()) for p in ("configs/omni/qwen3.yaml", STANDINS))
    models = {"text": "runs/mntp-qwen3-1.7b/hf", "vision": "Qwen/Qwen3-VL-2B-Instruct", "audio": "Qwen/Qwen3-ASR-1.7B"}
    assert {r: s["model"] for r, s in real["sources"].items()} == models
    def strip(config):
        sources = {r: {k: v for k, v in s.items() if k != "model"} for r, s in config["sources"].items()}
        return {**{k: v for k, v in config.items() if k not in ("sources", "output")}, "sources": sources}

    assert strip(real) == strip(twin)
    spec = OmniSpec.load("configs/omni/qwen3.yaml")
    assert spec.sources["audio"].towers["thinker.audio_tower.proj2."] == "model.multi_modal_projector.linear_2."
    assert spec.rope_from == "vision" and spec.tokenizer_from == "audio"
