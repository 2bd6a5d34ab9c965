import pytest

from bidirlm_pl import BidirLMError, LoraSpec, load_backbone
from bidirlm_pl.backbone.trainable import apply_trainable, parameter_group


def test_groups_select_the_named_modules(tiny_qwen3):
    model, _ = load_backbone(tiny_qwen3)
    counts = apply_trainable(model, ["ffn"])
    assert set(counts) == {"ffn"}
    assert all(p.requires_grad == (".mlp." in n) for n, p in model.named_parameters())
    counts = apply_trainable(model, ["attention", "norms"])
    assert set(counts) == {"attention", "norms"}


def test_lora_adapters_are_their_own_group(tiny_qwen3):
    model, _ = load_backbone(tiny_qwen3, lora=LoraSpec(r=2, alpha=4))
    assert parameter_group("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight") == "lora"
    counts = apply_trainable(model, ["lora"])
    assert set(counts) == {"lora"}
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())


def test_bad_groups_are_one_line_errors(tiny_qwen3):
    model, _ = load_backbone(tiny_qwen3)
    with pytest.raises(BidirLMError, match=r"\['mlp'\] are not a non-empty subset"):
        apply_trainable(model, ["mlp"])
    with pytest.raises(BidirLMError, match="select no parameter"):
        apply_trainable(model, ["lora"])
