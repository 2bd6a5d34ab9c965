"""MTEB and lm-evaluation-harness inside `bidirlm compare`, offline on local task definitions, through the real
libraries; each cross-checked against our built-in task on the same data, and UBMoE folders in the right modes."""

import json
from pathlib import Path

import pytest
import torch

from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.evaluation.compare import compare
from bidirlm_pl.evaluation.embedding import lee_sts_task
from bidirlm_pl.evaluation.harness import compare_mteb_model, mteb_model
from bidirlm_pl.evaluation.suite import load_suite, model_embedder
from bidirlm_pl.models.encoder import Encoder
from bidirlm_pl.moe.modes import load_any
from bidirlm_pl.stages.contrastive import ContrastiveStage

ROOT = Path(__file__).resolve().parents[1]
HARNESS_TINY = str(ROOT / "configs" / "compare" / "harness-tiny.yaml")


def test_harness_tiny_writes_an_mteb_row_and_an_lm_eval_row_equal_to_ours(tmp_path):
    out = tmp_path / "report"
    [result] = compare(["tiny-qwen3"], config=HARNESS_TINY, output=str(out), progress=False)
    r = result.results
    # MTEB's evaluator on the local Lee task == our STS task on the same 1225 pairs (both cosine Spearman)
    assert r["mteb-lee-sts"]["tasks"] == ["LeeSTS"]
    assert abs(r["mteb-lee-sts"]["LeeSTS"] - r["lee-sts"]["spearman"]) < 1e-6
    # lm-eval's acc on the local YAML task == our cloze accuracy on the same 116 records
    assert r["lm-eval-capitals"]["capitals_cloze"] == r["capitals"]["accuracy"]
    report = json.loads((out / "report.json").read_text())
    [model] = report["models"]
    assert {"mteb-lee-sts", "lm-eval-capitals"} <= set(model["results"])
    table = (out / "report.md").read_text()
    assert "mteb-lee-sts: MTEB main score (mean)" in table and "lm-eval-capitals: lm-eval headline (mean)" in table
    theirs = json.loads((out / "lm_eval" / "tiny-qwen3-lm-eval-capitals.json").read_text())
    assert theirs["results"]["capitals_cloze"]["acc,none"] == r["capitals"]["accuracy"]


def test_ubmoe_runs_mteb_in_embed_mode_and_lm_eval_in_generate_mode(tmp_path):
    from bidirlm_pl import load_backbone, moe

    model, tok = load_backbone("tiny-qwen3", bidirectional=False)
    moe.convert_to_ubmoe(model)
    with torch.no_grad():  # expert 1 drifts from expert 0, as after stage 1
        for ffn in moe.ubmoe_ffns(model):
            for p in ffn.experts[1].parameters():
                p.add_(0.05 * torch.randn_like(p))
            ffn.router.bias.copy_(torch.tensor([2.0, -2.0]))  # the learned routing prefers expert 0
    folder = tmp_path / "ubmoe"
    moe.save_ubmoe(model, tok, folder)
    base, routed, forced0 = compare(["tiny-qwen3", str(folder), f"{folder}@forced0"], names=["base", "ubmoe", "f0"],
                                    config=HARNESS_TINY, progress=False)
    # generate mode with expert 0 only is the base model exactly, on lm-eval's own scoring
    assert forced0.results["lm-eval-capitals"]["capitals_cloze"] == base.results["lm-eval-capitals"]["capitals_cloze"]
    # each harness ran in the mode of our built-in task of its kind
    for r in (base, routed, forced0):
        assert r.results["lm-eval-capitals"]["capitals_cloze"] == r.results["capitals"]["accuracy"]
        assert abs(r.results["mteb-lee-sts"]["LeeSTS"] - r.results["lee-sts"]["spearman"]) < 1e-4
    # embed mode routes through the drifted expert 1: MTEB sees a different encoder than the base
    assert abs(routed.results["mteb-lee-sts"]["LeeSTS"] - base.results["mteb-lee-sts"]["LeeSTS"]) > 1e-4


def test_paper_suite_parses():
    suite = load_suite(ROOT / "configs" / "compare" / "paper.yaml")
    kinds = {t.name: t.kind for t in suite.tasks}
    assert kinds["mmlu"] == "lm_eval" and "mteb" in kinds.values()
    mmlu = next(t for t in suite.tasks if t.name == "mmlu")
    assert mmlu.tasks == ["mmlu"] and mmlu.num_fewshot == 5


@pytest.mark.parametrize("entry, message", [
    ({"name": "m", "kind": "mteb"}, "kind mteb takes 'tasks'"),
    ({"name": "m", "kind": "mteb", "tasks": ["STS12"], "benchmark": "MTEB(eng, v2)"}, "one of the two"),
    ({"name": "l", "kind": "lm_eval", "tasks": ["mmlu"], "path": "x.jsonl"}, "not data, path or prompts"),
    ({"name": "l", "kind": "lm_eval", "tasks": ["x"], "include_path": "/nonexistent"}, "is not a folder"),
    ({"name": "s", "kind": "sts", "num_fewshot": 5}, "['num_fewshot'] belong to kinds mteb / lm_eval"),
])
def test_harness_task_mistakes_are_one_line(tmp_path, entry, message):
    import yaml

    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump({"tasks": [entry]}))
    with pytest.raises(BidirLMError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")) as err:
        load_suite(path)
    assert "\n" not in str(err.value)


def test_unknown_harness_tasks_are_one_line_naming_the_task(tmp_path):
    import yaml

    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump({"tasks": [
        {"name": "nope", "kind": "lm_eval", "tasks": ["no_such_task_xyz"]}]}))
    with pytest.raises(BidirLMError, match=r"task 'nope': lm-eval knows no task \['no_such_task_xyz'\]"):
        compare(["tiny-qwen3"], config=str(path), progress=False)
    path.write_text(yaml.safe_dump({"tasks": [{"name": "m", "kind": "mteb", "tasks": ["local:nothing"]}]}))
    with pytest.raises(BidirLMError, match="task 'm': local MTEB task 'local:nothing' is not one of"):
        compare(["tiny-qwen3"], config=str(path), progress=False)


@pytest.mark.parametrize("path", ["encoder", "compare"])
def test_mteb_gives_an_instructed_export_the_prompts_sentence_transformers_gets(path, tmp_path):
    """Through MTEB, an export embeds as in mteb's own SentenceTransformer wrapper of the same folder (the query
    prompt on queries, none on documents nor on the texts of a symmetric task), as an Encoder and in compare."""
    import numpy as np
    from datasets import Dataset
    from mteb.models.sentence_transformer_wrapper import SentenceTransformerEncoderWrapper
    from mteb.types import PromptType
    from sentence_transformers import SentenceTransformer
    from torch.utils.data import DataLoader

    torch.manual_seed(0)
    stage = ContrastiveStage("tiny-qwen3", export_max_length=96, query_instruction="Represent the news article: ")
    stage.configure_model()
    stage.export_hf(tmp_path / "hf")
    if path == "encoder":
        ours = mteb_model(Encoder.from_pretrained(tmp_path / "hf"))
    else:  # compare's: the model as compare loads it, its cached embedder
        model, tok = load_any(str(tmp_path / "hf"))
        embed = model_embedder(str(tmp_path / "hf"), model, tok, bidirectional=True, batch_size=2)
        ours = compare_mteb_model(embed, max_length=256)
    theirs = SentenceTransformerEncoderWrapper(SentenceTransformer(str(tmp_path / "hf"), device="cpu"))
    texts = ["what burned near Sydney?", "Rates rose again on Tuesday.", "x y z"]
    metadata = lee_sts_task(n_docs=3).metadata
    embedded = {}
    for prompt_type in (PromptType.query, PromptType.document, None):
        loader = DataLoader(Dataset.from_dict({"text": texts}), batch_size=2)
        kwargs = {"task_metadata": metadata, "hf_split": "test", "hf_subset": "default", "prompt_type": prompt_type}
        embedded[prompt_type] = ours.encode(loader, **kwargs)
        assert np.abs(embedded[prompt_type] - theirs.encode(loader, **kwargs)).max() <= 1e-5
    assert np.abs(embedded[PromptType.query] - embedded[PromptType.document]).max() > 1e-3
    assert np.abs(embedded[None] - embedded[PromptType.document]).max() <= 1e-6
