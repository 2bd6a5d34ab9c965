import json
from pathlib import Path

import pytest
import yaml

from bidirlm_pl import BidirLMError
from bidirlm_pl.cli.pipeline import load_recipe, run_recipe

REPO = Path(__file__).resolve().parents[1]


def _absolute(recipe: dict) -> dict:
    for stage in recipe["stages"]:
        if "fit" in stage:
            stage["fit"] = str(REPO / stage["fit"])
        if "command" in stage:
            stage["command"] = [str(REPO / a) if str(a).startswith("configs/") else a for a in stage["command"]]
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
    report = json.loads((Path(outputs["compare"]) / "report.json").read_text())["models"]
    assert [r["name"] for r in report] == ["base", "mntp", "merged", "contrastive"]
    assert all(r["results"]["lee-perplexity"]["perplexity"] > 1 for r in report)
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
    from bidirlm_pl import load_backbone
    from bidirlm_pl.evaluation.compare import compare
    from bidirlm_pl.moe.convert import convert_to_ubmoe, save_ubmoe

    model, tok = load_backbone("tiny-qwen3", bidirectional=False)
    convert_to_ubmoe(model)
    save_ubmoe(model, tok, tmp_path / "ubmoe")
    plain, ubmoe = compare(["tiny-qwen3", str(tmp_path / "ubmoe")], config=str(REPO / "configs/compare/tiny.yaml"),
                           output=str(tmp_path / "report"), progress=False)
    # expert 1 starts as a copy of expert 0, so every routing reproduces the plain model
    ppl = plain.results["lee-perplexity"]["perplexity"]
    assert abs(ppl - ubmoe.results["lee-perplexity"]["perplexity"]) <= 1e-3 * ppl
    assert ubmoe.results["lee-sts"]["spearman"] == pytest.approx(plain.results["lee-sts"]["spearman"], abs=1e-4)
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
    report = json.loads((Path(outputs["compare"]) / "report.json").read_text())
    rows = {r["name"]: r["results"] for r in report["models"]}
    assert list(rows) == ["original", "naive-bi-ffn", "ubmoe", "ubmoe-forced0"]
    original, forced0 = rows["original"], rows["ubmoe-forced0"]
    assert forced0["continuation"] == original["continuation"]
    ppl = original["lee-perplexity"]["perplexity"]
    assert forced0["lee-perplexity"]["perplexity"] == pytest.approx(ppl, rel=1e-5)
    assert rows["naive-bi-ffn"]["lee-perplexity"]["perplexity"] != pytest.approx(ppl, rel=1e-5)
    # in / out of domain, beside the first model: forced0 is the original on both sides
    md = (Path(outputs["compare"]) / "report.md").read_text()
    out_ppl = original["wiki-perplexity"]["perplexity"]
    assert f"| original | {ppl:.2f} (x1.000) | {out_ppl:.2f} (x1.000) |" in md
    assert f"| ubmoe-forced0 | {ppl:.2f} (x1.000) | {out_ppl:.2f} (x1.000) |" in md


def test_tiny_ablation_recipe_writes_table_json_and_plot(tmp_path, monkeypatch):
    """Every ablation variant trains, merges or loads; both comparisons write table, JSON and plot."""
    monkeypatch.chdir(tmp_path)
    recipe = _absolute(yaml.safe_load((REPO / "configs/recipes/ablation-tiny.yaml").read_text()))
    recipe["output_dir"] = str(tmp_path / "out")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    outputs = run_recipe(path)
    report_dir = Path(outputs["compare"])
    report = json.loads((report_dir / "report.json").read_text())
    names = [m["name"] for m in report["models"]]
    assert names == ["base", "bi+base", "bi+mntp", "bi+mntp+merge", "bi+con", "bi+mntp+con", "bi+mntp+merge+con"]
    dependence = json.loads((Path(outputs["compare-dependence"]) / "report.json").read_text())
    assert [m["name"] for m in dependence["models"]][-2:] == ["mntp-attn-only", "mntp-ffn-only"]
    rows = {m["name"]: m for m in report["models"]}
    assert rows["base"]["attention"] == "causal"
    # the base weights score the same perplexity whatever their embedding attention; training changes it
    assert rows["bi+base"]["results"]["lee-perplexity"] == rows["base"]["results"]["lee-perplexity"]
    assert rows["bi+mntp"]["results"]["lee-perplexity"] != rows["base"]["results"]["lee-perplexity"]
    assert all(m["mean_embedding_score"] is not None for m in report["models"])
    assert (report_dir / "report.png").stat().st_size > 1000
    assert "| bi+mntp+merge+con | bidirectional |" in (report_dir / "report.md").read_text()
    finetune = json.loads((Path(outputs["compare-finetune"]) / "report.json").read_text())
    assert [m["name"] for m in finetune["models"]] == ["base", "bi+base", "bi+mntp", "bi+con", "bi+mntp+con"]
    assert all(m["mean_finetune_score"] is not None for m in finetune["models"])


@pytest.mark.parametrize("truncate_newest", [False, True])
def test_run_resumes_a_killed_fit_stage_from_its_last_checkpoint(tmp_path, monkeypatch, capsys, truncate_newest):
    """A stage that died at step 5 (checkpoints every 2 steps) resumes at step 4 and loses at most one step."""
    from bidirlm_pl.stages.mntp import MNTPStage

    monkeypatch.chdir(tmp_path)
    every_2 = ('{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", '
               '"init_args": {"every_n_train_steps": 2, "save_top_k": -1}}')
    recipe = {"output_dir": str(tmp_path / "out"), "stages": [{
        "name": "mntp", "fit": str(REPO / "configs/mntp/tiny.yaml"),
        "args": ["--trainer.max_steps=6", "--trainer.limit_val_batches=0", f"--trainer.callbacks+={every_2}"]}]}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    original, steps = MNTPStage.step, []

    def dies_at_5(self, batch):
        if self.training and self.trainer.global_step == 5:
            raise RuntimeError("killed")
        steps.append(self.trainer.global_step)
        return original(self, batch)

    monkeypatch.setattr(MNTPStage, "step", dies_at_5)
    with pytest.raises(RuntimeError, match="killed"):
        run_recipe(path)
    assert steps == [0, 1, 2, 3, 4]
    if truncate_newest:  # as if the process was killed while writing the step-4 checkpoint
        newest = max((tmp_path / "out").glob("**/*.ckpt"), key=lambda p: p.stat().st_mtime)
        newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    steps.clear()
    monkeypatch.setattr(MNTPStage, "step", lambda self, batch: steps.append(self.trainer.global_step)
                        or original(self, batch))
    outputs = run_recipe(path)
    assert "resuming from" in capsys.readouterr().out
    # steps before the last complete checkpoint were kept; only those after it reran
    assert steps == ([2, 3, 4, 5] if truncate_newest else [4, 5])
    assert (Path(outputs["mntp"]) / "DONE").exists()


@pytest.mark.parametrize("stage", [
    {"name": "m", "command": ["merge", "--models", "tiny-qwen3", "--weights", "1", "--output", "/tmp/elsewhere"]},
    {"name": "f", "fit": "configs/mntp/tiny.yaml", "args": ["--trainer.default_root_dir=../../outside"]},
])
def test_a_recipe_cannot_write_outside_its_output_folder(stage, tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), "stages": [stage]}))
    with pytest.raises(BidirLMError, match=r"writes to '.*' .*outside the recipe's output folder"):
        run_recipe(path)
    assert not Path("/tmp/elsewhere").exists()


@pytest.mark.parametrize("name", ["bidirlm-gemma3-270m-tiny", "ubmoe-qwen3-0.6b-tiny"])
def test_paper_recipe_tiny_twins_run_with_the_harness_suite(name, tmp_path, monkeypatch):
    """The paper-scale recipes' offline twins: same stages, compared through MTEB and lm-eval on local tasks."""
    monkeypatch.chdir(tmp_path)
    recipe = _absolute(yaml.safe_load((REPO / f"configs/recipes/{name}.yaml").read_text()))
    recipe["output_dir"] = str(tmp_path / "out")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    outputs = run_recipe(path)
    report = json.loads((Path(outputs["compare"]) / "report.json").read_text())
    rows = {r["name"]: r["results"] for r in report["models"]}
    for results in rows.values():
        assert results["lm-eval-capitals"]["capitals_cloze"] == results["capitals"]["accuracy"]
        assert abs(results["mteb-lee-sts"]["LeeSTS"] - results["lee-sts"]["spearman"]) < 1e-4  # batching differs: fp32 noise
    if "ubmoe-forced0" in rows:
        assert rows["ubmoe-forced0"]["lm-eval-capitals"] == rows["base"]["lm-eval-capitals"]


def test_paper_recipes_parse_and_name_shipped_configs():
    for name in ("bidirlm-gemma3-270m", "ubmoe-qwen3-0.6b"):
        _, stages = load_recipe(REPO / f"configs/recipes/{name}.yaml")
        assert [s.name for s in stages][-1] == "compare"
        for stage in stages:
            for config in [stage.fit] if isinstance(stage.fit, str) else stage.fit or []:
                assert (REPO / config).is_file(), config
