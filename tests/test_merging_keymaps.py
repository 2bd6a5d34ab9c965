"""Backbone isolation through key maps, component copying, the similarity report, and the CLI/YAML front end."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_merging_helpers import perturbed, state, write_copy

from bidirlm_pl.cli import main as cli
from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.models.merging import MergeSpec, merge
from bidirlm_pl.models.merging.similarity import similarity, tensor_group


@pytest.fixture()
def fake_vlm(tiny_qwen3, tmp_path):
    """A vision-language wrapper: the text model under model.language_model., plus a tower and a projector."""
    generator = torch.Generator().manual_seed(7)
    tensors = {k.replace("model.", "model.language_model.", 1): v + 0.05 * torch.randn(v.shape, generator=generator)
               for k, v in state(tiny_qwen3).items()}
    tensors["model.vision_tower.patch_embed.weight"] = torch.randn(16, 12, generator=generator)
    tensors["model.multi_modal_projector.linear.weight"] = torch.randn(64, 16, generator=generator)
    return write_copy(tiny_qwen3, tmp_path / "vlm", tensors, config_update={"model_type": "fake_vlm"})


def test_vlm_backbone_merged_with_text_model_towers_copied(fake_vlm, tiny_qwen3, tmp_path):
    report = merge(MergeSpec(models=[str(fake_vlm), str(tiny_qwen3)], weights=[0.5, 0.5], output=str(tmp_path / "o"),
                             key_maps=[{"model.language_model.": "model."}, None]))
    vlm, text, merged = state(fake_vlm), state(tiny_qwen3), state(tmp_path / "o")
    assert set(merged) == set(vlm)  # the source's layout
    for key, tensor in merged.items():
        if key.startswith("model.language_model."):
            expected = 0.5 * vlm[key] + 0.5 * text[key.replace("model.language_model.", "model.", 1)]
            torch.testing.assert_close(tensor, expected, rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(tensor, vlm[key])  # tower and projector unchanged
    assert sorted(report.copied_components) == ["model.multi_modal_projector.linear.weight",
                                                "model.vision_tower.patch_embed.weight"]
    assert json.loads((tmp_path / "o" / "config.json").read_text())["model_type"] == "fake_vlm"


def test_keys_that_match_nothing_are_reported(fake_vlm, tiny_qwen3, tmp_path):
    extra = state(tiny_qwen3)
    extra["model.adapter.weight"] = torch.ones(3)
    text = write_copy(tiny_qwen3, tmp_path / "text-extra", extra)
    spec = {"models": [str(fake_vlm), str(text)], "weights": [0.5, 0.5],
            "key_maps": [{"model.language_model.": "model."}, None]}
    with pytest.raises(BidirLMError, match=r"tensor 'model.adapter.weight' of .* has no counterpart"):
        merge(MergeSpec(output=str(tmp_path / "refused"), **spec))
    assert not (tmp_path / "refused").exists()
    report = merge(MergeSpec(output=str(tmp_path / "reported"), unmatched="report", **spec))
    assert len(report.unmatched) == 1 and "model.adapter.weight" in report.unmatched[0]
    assert "model.adapter.weight" not in state(tmp_path / "reported")


def test_similarity_report(tiny_qwen3, tmp_path):
    same = similarity(str(tiny_qwen3), str(tiny_qwen3))
    assert same.overall.cosine == pytest.approx(1.0, abs=1e-12)
    assert set(same.groups) == {"embeddings", "attention", "ffn", "norms"} and set(same.layers) == {0, 1}
    other = perturbed(tiny_qwen3, tmp_path / "b", seed=3, scale=0.2)
    report = similarity(str(tiny_qwen3), str(other))
    a, b = state(tiny_qwen3), state(other)
    by_group: dict[str, list[float]] = {}
    for key in a:
        x, y = a[key].double().flatten(), b[key].double().flatten()
        sums = by_group.setdefault(tensor_group(key), [0.0, 0.0, 0.0])
        sums[0] += float(x @ y)
        sums[1] += float(x @ x)
        sums[2] += float(y @ y)
    for group, (dot, xx, yy) in by_group.items():
        assert report.groups[group].cosine == pytest.approx(dot / math.sqrt(xx * yy), rel=1e-9)
    layer0 = [k for k in a if ".layers.0." in k]
    dot = sum(float(a[k].double().flatten() @ b[k].double().flatten()) for k in layer0)
    xx = sum(float(a[k].double().norm() ** 2) for k in layer0)
    yy = sum(float(b[k].double().norm() ** 2) for k in layer0)
    assert report.layers[0].cosine == pytest.approx(dot / math.sqrt(xx * yy), rel=1e-9)
    assert report.overall.cosine < 1.0


def test_similarity_through_key_maps(fake_vlm, tiny_qwen3, capsys):
    code = cli.main(["similarity", str(fake_vlm), str(tiny_qwen3), "--key-map-a", "model.language_model.=model."])
    out = capsys.readouterr().out
    assert code == 0 and "overall" in out and "layer 1" in out
    report = similarity(str(fake_vlm), str(tiny_qwen3), key_map_a="model.language_model.=model.")
    assert 0.5 < report.overall.cosine < 1.0 and report.overall.count == sum(v.numel() for v in state(tiny_qwen3).values())


def test_yaml_config_and_flags_give_the_same_merge(tiny_qwen3, tmp_path, capsys):
    other = perturbed(tiny_qwen3, tmp_path / "b", seed=9)
    config = tmp_path / "merge.yaml"
    config.write_text(f"models: [{tiny_qwen3}, {other}]\nweights: [0.3, 0.7]\nmethod: linear\ndtype: bfloat16\n")
    assert cli.main(["merge", "--config", str(config), "--output", str(tmp_path / "from-yaml")]) == 0
    assert cli.main(["merge", "--models", str(tiny_qwen3), str(other), "--weights", "0.3", "0.7", "--dtype",
                     "bfloat16", "--output", str(tmp_path / "from-flags")]) == 0
    yaml_state, flag_state = state(tmp_path / "from-yaml"), state(tmp_path / "from-flags")
    assert all(torch.equal(yaml_state[k], flag_state[k]) and flag_state[k].dtype == torch.bfloat16 for k in yaml_state)
    config.write_text("models: [a, b]\nweigths: [1, 1]\n")
    assert cli.main(["merge", "--config", str(config), "--output", str(tmp_path / "x")]) == 2
    assert "has unknown key 'weigths'" in capsys.readouterr().err


def test_attach_components_of_another_model(fake_vlm, tiny_qwen3, tmp_path):
    """The text encoder gives the layout; the VLM's tower and projector are attached unchanged."""
    report = merge(MergeSpec(models=[str(tiny_qwen3), str(fake_vlm)], weights=[0.5, 0.5], output=str(tmp_path / "o"),
                             key_maps=[None, {"model.language_model.": "model."}], attach=[str(fake_vlm)]))
    text, vlm, merged = state(tiny_qwen3), state(fake_vlm), state(tmp_path / "o")
    towers = {k for k in vlm if not k.startswith("model.language_model.")}
    assert set(merged) == set(text) | towers and len(report.copied_components) == len(towers)
    for key in towers:
        assert torch.equal(merged[key], vlm[key])
    key = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(merged[key], 0.5 * text[key] + 0.5 * vlm["model.language_model.layers.0.mlp.up_proj.weight"])
    with pytest.raises(BidirLMError, match="attach: model .* must be another model with a key map"):
        merge(MergeSpec(models=[str(tiny_qwen3), str(fake_vlm)], weights=[0.5, 0.5], output=str(tmp_path / "x"),
                        key_maps=[None, {"model.language_model.": "model."}], attach=["0"]))
