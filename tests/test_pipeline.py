import json
from pathlib import Path

import pytest
import yaml

from bidirlm_pl import BidirLMError
from bidirlm_pl.pipeline import load_recipe, run_recipe

REPO = Path(__file__).resolve().parents[1]


def _absolute(recipe: dict) -> dict:
    for stage in recipe["stages"]:
        if "fit" in stage:
            stage["fit"] = str(REPO / stage["fit"])
    return recipe


def test_tiny_recipe_runs_end_to_end_and_skips_finished_stages(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    recipe = _absolute(yaml.safe_load((REPO / "configs/recipes/tiny.yaml").read_text()))
    recipe["output_dir"] = str(tmp_path / "out")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    outputs = run_recipe(path)
    assert list(outputs) == ["mntp", "merged", "contrastive", "compare"]
    for name in ("mntp", "merged", "contrastive"):
        config = json.loads((Path(outputs[name]) / "config.json").read_text())
        assert config["is_causal"] is False, name
    report = json.loads((Path(outputs["compare"]) / "report.json").read_text())
    assert [r["name"] for r in report] == ["tiny-qwen3", "mntp", "merged", "contrastive"]
    assert all(r["perplexity"] > 1 for r in report)
    capsys.readouterr()
    run_recipe(path)  # second run: everything finished earlier
    assert capsys.readouterr().out.count("finished earlier") == 4


def test_recipe_errors_are_one_line(tmp_path):
    with pytest.raises(BidirLMError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages:\n  - {name: a, fit: x.yaml, command: [merge]}\n")
    with pytest.raises(BidirLMError, match="exactly one of 'fit' or 'command'"):
        load_recipe(bad)
    ref = tmp_path / "ref.yaml"
    ref.write_text("output_dir: %s\nstages:\n  - {name: a, command: [compare, '${nope}']}\n" % (tmp_path / "o"))
    with pytest.raises(BidirLMError, match="names no earlier stage"):
        run_recipe(ref)


def test_compare_runs_ubmoe_folders_in_each_modes_routing(tmp_path):
    """A UBMoE folder: perplexity under the generate routing, embeddings under the embed routing."""
    from bidirlm_pl.moe.convert import convert_to_ubmoe, save_ubmoe

    from bidirlm_pl import load_backbone
    from bidirlm_pl.evaluation.compare import compare

    model, tok = load_backbone("tiny-qwen3", bidirectional=False)
    convert_to_ubmoe(model)
    save_ubmoe(model, tok, tmp_path / "ubmoe")
    plain, ubmoe = compare(["tiny-qwen3", str(tmp_path / "ubmoe")], output=str(tmp_path / "report"))
    # expert 1 starts as a copy of expert 0, so every routing reproduces the plain model
    assert abs(plain.perplexity - ubmoe.perplexity) <= 1e-3 * plain.perplexity
    assert abs(plain.lee_spearman_bidirectional - ubmoe.lee_spearman_bidirectional) <= 1e-4
    assert (tmp_path / "report" / "report.md").exists()


def test_ubmoe_tiny_recipe_compares_four_variants(tmp_path, monkeypatch):
    """base -> stage 1 -> stage 2 -> compare; forced-0 routing reproduces the original exactly."""
    monkeypatch.chdir(tmp_path)
    recipe = _absolute(yaml.safe_load((REPO / "configs/recipes/ubmoe-tiny.yaml").read_text()))
    recipe["output_dir"] = str(tmp_path / "out")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    outputs = run_recipe(path)
    assert list(outputs) == ["stage1", "stage2", "compare"]
    for name in ("stage1", "stage2"):
        assert "ubmoe" in json.loads((Path(outputs[name]) / "config.json").read_text())
    rows = {r["name"]: r for r in json.loads((Path(outputs["compare"]) / "report.json").read_text())}
    assert list(rows) == ["original", "naive-bi-ffn", "ubmoe", "ubmoe-forced0"]
    original, forced0 = rows["original"], rows["ubmoe-forced0"]
    assert forced0["continuation"] == original["continuation"]
    assert forced0["perplexity"] == pytest.approx(original["perplexity"], rel=1e-5)
    assert rows["naive-bi-ffn"]["perplexity"] != pytest.approx(original["perplexity"], rel=1e-5)
    assert (Path(outputs["compare"]) / "report.md").is_file()
