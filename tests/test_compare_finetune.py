"""The fine-tuning axis of ``bidirlm compare``: kinds ``finetune`` (a fresh head per model through ``bidirlm fit``,
a learning-rate grid picked by validation) and ``frozen_token`` (a linear head on frozen token states)."""

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from bidirlm_pl import BidirLMError
from bidirlm_pl.backbone.load import decoder_of
from bidirlm_pl.data.tasks import IGNORE, align_word_labels
from bidirlm_pl.evaluation.compare import compare
from bidirlm_pl.evaluation.suite import (
    ModelSpec,
    TaskSpec,
    evaluate,
    finetune_argv,
    load_suite,
    token_data,
    token_features,
)
from bidirlm_pl.evaluation.task_metrics import entity_f1
from bidirlm_pl.moe.modes import load_any

REPO = Path(__file__).resolve().parents[1]
TINY_SEQUENCE = str(REPO / "configs/finetune/tiny-sequence.yaml")

PEOPLE = ["Anna", "Boris", "Chen", "Dalia", "Emil", "Farah"]
PLACES = [["Paris"], ["Lima"], ["New", "York"], ["Oslo"], ["Cape", "Town"]]
FILLER = ["the", "visit", "from", "went", "to", "said", "today", "and", "with", "quietly"]


def _ner_file(path: Path, sentences: int, seed: int) -> None:
    """CoNLL sentences whose tags follow from the words: a person (B-PER), a place (B-LOC I-LOC), fillers (O)."""
    rng = random.Random(seed)
    lines = []
    for _ in range(sentences):
        words = []
        for _ in range(rng.randint(2, 4)):
            words += [(w, "O") for w in rng.sample(FILLER, rng.randint(1, 2))]
            if rng.random() < 0.5:
                words.append((rng.choice(PEOPLE), "B-PER"))
            else:
                place = rng.choice(PLACES)
                words += [(w, "B-LOC" if i == 0 else "I-LOC") for i, w in enumerate(place)]
        lines += [f"{w} {t}" for w, t in words] + [""]
    path.write_text("\n".join(lines) + "\n")


def test_frozen_token_equals_a_direct_sklearn_probe_on_the_same_features(tiny_qwen3, tmp_path):
    """Features equal an unbatched forward per sentence (the stage's sub-word rule); the scores equal sklearn's
    logistic regression and seqeval-rule entity F1 on them; a tag that follows from the word is learned."""
    _ner_file(tmp_path / "train.conll", 80, seed=0)
    _ner_file(tmp_path / "test.conll", 24, seed=1)
    source = {"kind": "conll", "files": {"train": str(tmp_path / "train.conll"), "test": str(tmp_path / "test.conll")}}
    task = TaskSpec(name="ner", kind="frozen_token", source=source)
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({"max_length": 48, "tasks": [{"name": "ner", "kind": "frozen_token",
                                                                   "source": source}]}))
    model, tokenizer = load_any(str(tiny_qwen3))
    model.eval()
    data = token_data(task)
    assert data.labels == ["B-LOC", "B-PER", "I-LOC", "O"]
    for bidirectional in (True, False):
        features = token_features(model, tokenizer, data, max_length=48, batch_size=8, bidirectional=bidirectional)
        # the same features from one unpadded forward per sentence
        index = {name: i for i, name in enumerate(data.labels)}
        expected_X, expected_y = [], []
        for ex in data.train:
            row = align_word_labels(tokenizer, ex["words"], ex["spaces"], [index[t] for t in ex["tags"]], 48)
            with torch.no_grad():
                hidden = decoder_of(model)(input_ids=torch.tensor([row["input_ids"]]),
                                           is_causal=not bidirectional).last_hidden_state[0]
            for t, y in enumerate(row["labels"]):
                if y != IGNORE:
                    expected_X.append(hidden[t].numpy())
                    expected_y.append(y)
        np.testing.assert_allclose(features.train_X, np.stack(expected_X), atol=1e-4)
        assert features.train_y.tolist() == expected_y
        assert sum(features.test_sizes) == len(features.test_y) == sum(len(ex["words"]) for ex in data.test)

        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        predicted = probe.fit(features.train_X.astype(np.float64), features.train_y).predict(
            features.test_X.astype(np.float64))
        gold, guess, start = [], [], 0
        for size in features.test_sizes:
            gold.append([data.labels[y] for y in features.test_y[start:start + size]])
            guess.append([data.labels[y] for y in predicted[start:start + size]])
            start += size
        attention = "bidirectional" if bidirectional else "causal"
        result = evaluate_one(str(tiny_qwen3), suite, attention)["ner"]
        assert result["accuracy"] == pytest.approx(float(np.mean(predicted == features.test_y)), abs=1e-12)
        assert result["entity_f1"] == pytest.approx(entity_f1(gold, guess), abs=1e-12)
        assert result["metric_name"] == "entity_f1" and result["metric"] == result["entity_f1"]
        assert result["accuracy"] > 0.9 and result["entity_f1"] > 0.8, result


def evaluate_one(path: str, suite: Path, attention: str) -> dict:
    return evaluate(ModelSpec(path, "m", attention), load_suite(suite), progress=False).results


def test_frozen_token_on_turkish_pos_beats_the_majority_tag(tiny_qwen3, tmp_path):
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({"max_length": 64, "tasks": [
        {"name": "pos", "kind": "frozen_token", "source": {"kind": "turkish_pos"}, "limit": 100, "test_limit": 40}]}))
    result = evaluate_one(str(tiny_qwen3), suite, "bidirectional")["pos"]
    task = load_suite(suite).tasks[0]
    data = token_data(task)
    test_tags = [t for ex in data.test for t in ex["tags"]]
    majority = max(test_tags.count(t) for t in set(test_tags)) / len(test_tags)
    assert result["metric_name"] == "accuracy" and "entity_f1" not in result
    assert result["test_sentences"] == 40 and result["train_sentences"] == 100
    assert majority < result["accuracy"] <= 1.0, (result, majority)


def test_finetune_kind_runs_a_learning_rate_grid_and_reports_the_best_validation_run(tiny_qwen3, tmp_path):
    """Two learning rates, two `bidirlm fit` runs on tiny Qwen3; the reported test metric is the one of the run with
    the best validation score, as its export's bidirlm_task.json wrote it."""
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({"tasks": [
        {"name": "polarity", "kind": "finetune", "config": TINY_SEQUENCE, "steps": 6, "val_every": 3,
         "learning_rates": [1.0e-5, 3.0e-3], "seed": 0}]}))
    out = tmp_path / "report"
    (result,) = compare([str(tiny_qwen3)], ["tiny"], config=str(suite), output=str(out), progress=False)
    values = result.results["polarity"]
    runs = values["runs"]
    assert [r["learning_rate"] for r in runs] == [1.0e-5, 3.0e-3]
    assert all(r["monitor"] == "val/accuracy" for r in runs)
    best = max(runs, key=lambda r: r["validation"])  # the first of equals, as max keeps it
    assert values["learning_rate"] == best["learning_rate"]
    assert values["metric"] == best["test_metric"] and values["validation"] == best["validation"]
    for run in runs:  # every run's bidirlm_task.json lies beside the report
        saved = json.loads((out / "finetune" / f"tiny-polarity-lr{run['learning_rate']:g}.json").read_text())
        assert saved["scores"]["test"]["metric"] == run["test_metric"]
        assert saved["scores"]["validation"]["val/accuracy"] == run["validation"]
        assert saved["task"] == "sequence" and saved["labels"] == ["neg", "pos"]
    report = json.loads((out / "report.json").read_text())
    assert report["models"][0]["mean_finetune_score"] == values["metric"]
    assert "polarity: fine-tuned, test" in (out / "report.md").read_text()


def test_finetune_runs_causal_models_causally_with_last_token_pooling():
    task = TaskSpec(name="t", kind="finetune", config=TINY_SEQUENCE, steps=4, val_every=2,
                    learning_rates=[1e-4], args=["--data.init_args.batch_size=4"])
    causal = finetune_argv(task, "/m", "/run", 1e-4, bidirectional=False)
    bidirectional = finetune_argv(task, "/m", "/run", 1e-4, bidirectional=True)
    assert causal[1:4] == ["-m", "bidirlm_pl.cli.main", "fit"]
    assert "--model.init_args.backbone.bidirectional=false" in causal
    assert "--model.init_args.pooling=last" in causal
    assert not any("bidirectional=" in a or "pooling=" in a for a in bidirectional)
    for argv in (causal, bidirectional):
        assert {"--model.init_args.backbone.model=/m", "--trainer.default_root_dir=/run", "--seed_everything=0",
                "--trainer.max_steps=4", "--trainer.val_check_interval=2",
                "--model.init_args.optimizer.init_args.lr=0.0001"} <= set(argv)
        assert argv[-1] == "--data.init_args.batch_size=4"  # the task's own overrides come last


def test_finetune_refuses_ubmoe_folders_before_any_run(tiny_qwen3, tmp_path):
    folder = tmp_path / "ubmoe"
    shutil.copytree(tiny_qwen3, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"ubmoe": {"num_experts": 2}}))
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({"tasks": [{"name": "polarity", "kind": "finetune", "config": TINY_SEQUENCE}]}))
    for path in (str(folder), f"{tiny_qwen3}@forced1"):
        with pytest.raises(BidirLMError, match="kind finetune cannot fine-tune the UBMoE folder") as err:
            compare([str(tiny_qwen3), path], ["a", "b"], config=str(suite))
        assert "\n" not in str(err.value)


def test_suite_config_paths_resolve_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    suite = load_suite(REPO / "configs/compare/finetune-tiny.yaml")
    task = next(t for t in suite.tasks if t.kind == "finetune")
    assert task.config == str(REPO / "configs/finetune/tiny-sequence.yaml")


@pytest.mark.parametrize("entry, message", [
    ({"kind": "finetune"}, "kind finetune needs 'config'"),
    ({"kind": "finetune", "config": "nope.yaml"}, "config 'nope.yaml' does not exist"),
    ({"kind": "finetune", "config": str(REPO / "configs/mntp/tiny.yaml")}, "not the finetune stage"),
    ({"kind": "finetune", "config": TINY_SEQUENCE, "learning_rates": []}, "must be distinct positive numbers"),
    ({"kind": "finetune", "config": TINY_SEQUENCE, "learning_rates": ["fast"]}, "must be a list of numbers"),
    ({"kind": "finetune", "config": TINY_SEQUENCE, "learning_rates": [1e-4, -1]}, "distinct positive numbers"),
    ({"kind": "finetune", "config": TINY_SEQUENCE, "steps": 4, "val_every": 10}, "never runs in 4 steps"),
    ({"kind": "finetune", "config": TINY_SEQUENCE, "steps": 0}, "steps 0 must be a whole number of at least 1"),
    ({"kind": "finetune", "config": TINY_SEQUENCE, "seed": -1}, "seed -1 must be a whole number"),
    ({"kind": "finetune", "config": TINY_SEQUENCE, "args": "--trainer.max_steps=3"}, "args must be a list"),
    ({"kind": "finetune", "config": TINY_SEQUENCE, "limit": 10}, "the finetune config decides the data"),
    ({"kind": "finetune", "config": TINY_SEQUENCE, "data": "polarity"}, r"takes 'config'.*\['data'\]"),
    ({"kind": "finetune", "config": TINY_SEQUENCE, "source": {"kind": "turkish_pos"}},
     r"\['source'\] belong to kind frozen_token"),
    ({"kind": "frozen_token"}, "kind frozen_token needs 'source'"),
    ({"kind": "frozen_token", "source": {"kind": "chinese_sentiment"}}, "is a sequence task, not token"),
    ({"kind": "frozen_token", "source": {"kind": "turkish_pos", "colour": "red"}}, "source: .*colour"),
    ({"kind": "frozen_token", "source": {"kind": "conllu", "path": "missing.conllu"}}, "does not exist"),
    ({"kind": "frozen_token", "source": {"kind": "turkish_pos"}, "steps": 5}, r"\['steps'\] belong to kind finetune"),
    ({"kind": "frozen_token", "source": {"kind": "turkish_pos"}, "test_limit": 0}, "test_limit 0 must be at least 1"),
    ({"kind": "sts", "learning_rates": [1e-4]}, r"\['learning_rates'\] belong to kind finetune, not to kind 'sts'"),
])
def test_labelled_task_field_errors_are_one_line(entry, message):
    with pytest.raises(BidirLMError, match=message) as err:
        TaskSpec(name="t", **entry)
    assert "\n" not in str(err.value) and str(err.value).startswith("task 't': ")


def test_finetune_config_without_a_monitored_checkpoint_or_export_is_refused(tmp_path):
    config = yaml.safe_load(Path(TINY_SEQUENCE).read_text())
    callbacks = config["trainer"]["callbacks"]
    config["trainer"]["callbacks"] = callbacks[1:]
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(BidirLMError, match="keeps no best checkpoint"):
        TaskSpec(name="t", kind="finetune", config=str(tmp_path / "a.yaml"))
    config["trainer"]["callbacks"] = callbacks[:1]
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(BidirLMError, match="has no HFExport callback"):
        TaskSpec(name="t", kind="finetune", config=str(tmp_path / "b.yaml"))
