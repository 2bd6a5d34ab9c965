"""The data layer of BidirLM App. D's last fine-tuning tasks, on tiny offline datasets shaped like the hub's:
UD POS trained on one configuration and tested zero-shot on others (``test_configs``: per-set scores and their
mean, in the stage and the compare report), Seahorse (a regression label, the mean of several rating columns, over
a text pair) and MathShepherd (a row filter, a label derived from step tags, a balanced training set); bad options
and data as one line."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import yaml
from transformers import AutoTokenizer

from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.data.tasks import IGNORE, LabelledTaskData
from bidirlm_pl.evaluation.compare import finetune_groups_table
from bidirlm_pl.evaluation.suite import load_suite
from bidirlm_pl.models.heads import prepare_tokenizer
from bidirlm_pl.stages.finetune import FinetuneStage

REPO = Path(__file__).resolve().parents[1]
UPOS = ["ADP", "DET", "NOUN", "VERB"]
TAG = {"the": "DET", "a": "DET", "cat": "NOUN", "dog": "NOUN", "mat": "NOUN", "park": "NOUN", "sat": "VERB",
       "ran": "VERB", "on": "ADP", "in": "ADP"}


def _parquet_dataset(root: Path, configs: dict[str, dict[str, dict]], features=None) -> str:
    """A local dataset folder with one parquet file per config and split, declared in its README as the hub's
    cards declare configurations (what ``load_dataset(folder, name=..., split=...)`` reads)."""
    import datasets

    card = []
    for config, splits in configs.items():
        card.append({"config_name": config, "data_files": [{"split": s, "path": f"{config}/{s}.parquet"}
                                                           for s in splits]})
        for split, columns in splits.items():
            (root / config).mkdir(parents=True, exist_ok=True)
            datasets.Dataset.from_dict(columns, features=features).to_parquet(str(root / config / f"{split}.parquet"))
    (root / "README.md").write_text("---\n" + yaml.safe_dump({"configs": card}) + "---\n")
    return str(root)


def _sentences(seed: int, n: int) -> dict:
    """n sentences of the tagged words (the seed varies their order), tags as ClassLabel ids."""
    words = list(TAG)
    rows = [[words[(seed + i * (k + 1)) % len(words)] for k in range(4)] for i in range(n)]
    return {"tokens": rows, "pos_tags": [[UPOS.index(TAG[w]) for w in row] for row in rows]}


@pytest.fixture(scope="module")
def udpos(tmp_path_factory) -> str:
    """An xtreme-shaped UD POS stand-in: ``udpos.English`` with three splits, two languages with a test split only."""
    import datasets

    features = datasets.Features({"tokens": datasets.List(datasets.Value("string")),
                                  "pos_tags": datasets.List(datasets.ClassLabel(names=UPOS))})
    configs = {"udpos.English": {"train": _sentences(0, 24), "validation": _sentences(1, 4), "test": _sentences(2, 4)},
               "udpos.German": {"test": _sentences(3, 6)}, "udpos.French": {"test": _sentences(5, 3)}}
    return _parquet_dataset(tmp_path_factory.mktemp("xtreme"), configs, features)


def _zero_shot(udpos: str, **extra) -> dict:
    return {"kind": "hf", "dataset": udpos, "config": "udpos.English", "test_configs": ["udpos.German", "udpos.French"],
            "fields": {"tokens": "tokens", "tags": "pos_tags"}, **extra}


# ------------------------------------------------------------------ UD POS: train on one config, test on others

def test_test_configs_read_train_and_validation_from_config_and_each_test_set_from_its_own(udpos):
    data = LabelledTaskData(_zero_shot(udpos), task="token")
    splits = data.read()
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [24, 4, 9]
    assert data.test_groups == ["udpos.German", "udpos.French"] and data.label_names == UPOS
    assert [ex["_group"] for ex in splits["test"]] == ["udpos.German"] * 6 + ["udpos.French"] * 3
    assert splits["test"][0]["words"] == _sentences(3, 6)["tokens"][0]  # German's rows, not English's test
    assert splits["test"][0]["tags"] == [TAG[w] for w in splits["test"][0]["words"]]
    assert all("config 'udpos.English'" in ex["_where"] for ex in splits["train"])
    # max_eval_examples samples each test set, not the concatenation
    sampled = LabelledTaskData(_zero_shot(udpos), task="token", max_eval_examples=2).read()["test"]
    assert [ex["_group"] for ex in sampled] == ["udpos.German"] * 2 + ["udpos.French"] * 2


def test_test_batches_never_mix_two_test_sets(udpos, tiny_qwen3):
    data = LabelledTaskData(_zero_shot(udpos), tokenizer=tiny_qwen3, task="token", eval_batch_size=4)
    data.setup("fit")
    groups = [(batch["group"], len(batch["input_ids"])) for batch in data.test_dataloader()]
    assert groups == [(0, 4), (0, 2), (1, 3)]
    assert "group" not in next(iter(data.val_dataloader()))


def test_the_stage_scores_each_test_set_and_reports_their_mean(udpos, tiny_qwen3, tmp_path):
    stage = FinetuneStage(str(tiny_qwen3), task="token", optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3))
    data = LabelledTaskData(_zero_shot(udpos), tokenizer=tiny_qwen3, task="token", batch_size=8, eval_batch_size=4)
    trainer = L.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                        limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(stage, datamodule=data)
    stage.eval()
    scores = stage.scores["test"]
    correct, total = {}, {}
    with torch.no_grad():
        for batch in data.test_dataloader():
            group = data.test_groups[batch.pop("group")]
            logits = stage.forward_batch(batch).logits
            predicted = logits.argmax(-1).gather(1, batch["word_index"].clamp(min=0))
            known = batch["word_labels"] != IGNORE
            correct[group] = correct.get(group, 0) + int((predicted == batch["word_labels"])[known].sum())
            total[group] = total.get(group, 0) + int(known.sum())
    for group in data.test_groups:
        assert scores[f"{group}/accuracy"] == pytest.approx(correct[group] / total[group])
        assert scores[f"{group}/metric"] == scores[f"{group}/accuracy"]
    mean = sum(scores[f"{g}/accuracy"] for g in data.test_groups) / 2
    assert scores["accuracy"] == pytest.approx(mean) and scores["metric"] == pytest.approx(mean)


def test_the_compare_report_lists_each_test_set_beside_the_mean():
    suite = SimpleNamespace(finetune_tasks=[SimpleNamespace(name="udpos"), SimpleNamespace(name="mnli")])
    test = {"metric": 0.7, "accuracy": 0.7, "de/metric": 0.8, "de/accuracy": 0.8, "fr/metric": 0.6, "fr/accuracy": 0.6}
    results = [SimpleNamespace(name="bi", results={"udpos": {"test": test}, "mnli": {"test": {"metric": 0.5}}}),
               SimpleNamespace(name="base", results={})]
    lines = finetune_groups_table(results, suite)
    assert lines[3:] == ["| model | de | fr | mean |", "|---|---:|---:|---:|", "| bi | 0.8000 | 0.6000 | 0.7000 |",
                         "| base | - | - | - |"]
    assert "udpos" in lines[1] and not any("mnli" in line for line in lines)


# ------------------------------------------------------------------ Seahorse: a regression pair, the mean of columns

RATINGS = ["comprehensible", "repetition", "grammar", "attribution", "main_ideas", "conciseness"]


def test_a_regression_label_is_the_mean_of_its_columns_over_a_text_pair(tmp_path, tiny_qwen3):
    rows = {"text": ["the cat sat on the mat", "a dog ran in the park"], "summary": ["a cat sat", "the park"],
            "lang": ["en", "de"], "comprehensible": [1, 1], "repetition": [1.0, 0.0], "grammar": ["No", "yes"],
            "attribution": [True, False], "main_ideas": ["1", "0"], "conciseness": ["Yes", "no"]}
    folder = _parquet_dataset(tmp_path, {"default": {s: rows for s in ("train", "validation", "test")}})
    source = {"kind": "hf", "dataset": folder, "fields": {"text": "text", "text_pair": "summary"},
              "label_fields": RATINGS, "label_reduce": "mean"}
    data = LabelledTaskData(source, tokenizer=tiny_qwen3, task="regression", batch_size=2)
    train = data.read()["train"]
    assert [ex["label"] for ex in train] == pytest.approx([5 / 6, 2 / 6])
    assert train[0]["text_pair"] == "a cat sat" and data.label_names is None
    data.setup("fit")
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(tiny_qwen3), "regression")
    assert data.encoded["train"][1]["input_ids"] == tokenizer("a dog ran in the park", "the park")["input_ids"]
    raw = AutoTokenizer.from_pretrained(tiny_qwen3)
    (a,), (b,) = raw("a", add_special_tokens=False)["input_ids"], raw("b", add_special_tokens=False)["input_ids"]
    assert raw("a", "b")["input_ids"] == [a, b]  # the tiny template joins a pair with nothing between
    pair = tokenizer("a", "b")["input_ids"]
    assert pair.index(b) - pair.index(a) == 2  # the regression pair gets a separator
    assert tokenizer("a")["input_ids"] == raw("a")["input_ids"]  # one text encodes as before
    batch = next(iter(data.train_dataloader()))
    assert batch["labels"].dtype == torch.float32
    # filters apply to any source: one language only
    only = LabelledTaskData({**source, "filters": {"lang": ["de"]}}, task="regression").read()["test"]
    assert [ex["label"] for ex in only] == pytest.approx([2 / 6])


# ------------------------------------------------------------------ MathShepherd: filter, derive, balance

def _steps(n: int, correct: list[bool]) -> dict:
    return {"prompt": f"what is {n} plus {n}", "completions": [f"Step {i + 1}: step {n}" for i in range(len(correct))],
            "labels": correct}


def _shepherd(tmp_path: Path) -> str:
    train = [_steps(i, [True] * 3) for i in range(3)] + [_steps(i, [True, False, True]) for i in range(3, 10)]
    train += [_steps(10, [True, True]), _steps(11, [False] * 4)]  # not 3 steps: filtered out
    test = [_steps(20, [True] * 3), _steps(21, [True, True, False]), _steps(22, [True] * 2),
            _steps(23, [False] * 3)]
    columns = {split: {k: [row[k] for row in rows] for k in rows[0]} for split, rows in
               (("train", train), ("test", test))}
    return _parquet_dataset(tmp_path, {"default": columns})


def _math_source(folder: str, **extra) -> dict:
    return {"kind": "hf", "dataset": folder, "splits": {"train": "train", "validation": "test[:50%]",
                                                        "test": "test[50%:]"},
            "fields": {"text": "prompt", "text_pair": "completions"}, "filters": {"labels": {"length": 3}},
            "label_fields": ["labels"], "label_reduce": "all", **extra}


def test_math_shepherd_keeps_three_step_items_labels_all_correct_and_balances_training(tmp_path):
    folder = _shepherd(tmp_path)
    data = LabelledTaskData(_math_source(folder), task="pair", balance_train=True)
    splits = data.read()
    assert sorted(ex["label"] for ex in splits["train"]) == ["0", "0", "0", "1", "1", "1"]  # 3 of the 7 incorrect
    assert all(ex["text"] != "what is 10 plus 10" for ex in splits["train"])
    first = splits["train"][0]
    assert first["text"] == "what is 0 plus 0" and first["text_pair"] == "Step 1: step 0 Step 2: step 0 Step 3: step 0"
    assert [(ex["text"], ex["label"]) for ex in splits["validation"]] == [("what is 20 plus 20", "1"),
                                                                           ("what is 21 plus 21", "0")]
    assert [(ex["text"], ex["label"]) for ex in splits["test"]] == [("what is 23 plus 23", "0")]
    assert data.label_names == ["0", "1"]
    again = LabelledTaskData(_math_source(folder), task="pair", balance_train=True).read()["train"]
    assert [ex["_where"] for ex in again] == [ex["_where"] for ex in splits["train"]]  # seeded
    unbalanced = LabelledTaskData(_math_source(folder), task="pair").read()["train"]
    assert sorted(ex["label"] for ex in unbalanced).count("0") == 7


# ------------------------------------------------------------------ bad options and data: one line

def _one_line(make, expected: str):
    with pytest.raises(BidirLMError) as error:
        make()
    assert expected in str(error.value) and "\n" not in str(error.value), str(error.value)


def test_bad_sources_are_one_line(tmp_path, udpos):
    folder = _shepherd(tmp_path / "shepherd")
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text(json.dumps({"text": "a", "summary": "b", "grammar": 1}) + "\n")
    one_class = tmp_path / "one.jsonl"
    one_class.write_text("".join(json.dumps({"text": f"t{i}", "label": "pos"}) + "\n" for i in range(10)))
    cases = [
        (lambda: LabelledTaskData({**_zero_shot(udpos), "test_config": ["udpos.German"]}, task="token"),
         "source key 'test_config' is unknown (did you mean 'test_configs'?)"),
        (lambda: LabelledTaskData(_zero_shot(udpos, test_configs=["udpos.Klingon"]), task="token").read(),
         "udpos.Klingon"),
        (lambda: LabelledTaskData({"kind": "jsonl", "path": str(jsonl), "test_configs": ["x"]}, task="sequence").read(),
         "test_configs reads dataset configurations; source kind 'jsonl' has none"),
        (lambda: LabelledTaskData(_zero_shot(udpos, splits={"test": None}), task="token").read(),
         "splits.test cannot be null"),
        (lambda: LabelledTaskData({"kind": "jsonl", "path": str(jsonl), "fields": {"text_pair": "summary"},
                                   "label_fields": ["grammar", "fluency"]}, task="regression").read(),
         "no field 'fluency' (label_fields)"),
        (lambda: LabelledTaskData(_math_source(folder, label_fields=["steps"]), task="pair").read(),
         "split 'train': no field 'steps' (label_fields)"),
        (lambda: LabelledTaskData(_math_source(folder, filters={"labels": {"length": 9}}), task="pair").read(),
         "split 'train': no row passes filters {'labels': {'length': 9}}"),
        (lambda: LabelledTaskData(_math_source(folder, filters={"labels": {"size": 3}}), task="pair").read(),
         "filters.labels: {'size': 3} is not a value, a list of values or {length: N}"),
        (lambda: LabelledTaskData(_math_source(folder), task="regression").read(),
         "label_reduce 'all' labels sequence or pair tasks, not regression"),
        (lambda: LabelledTaskData(_math_source(folder, fields={"text": "prompt", "label": "labels"}), task="pair").read(),
         "the label comes from fields.label or from label_fields, not both"),
        (lambda: LabelledTaskData(_math_source(folder, filters={}, label_fields=["completions"]), task="pair").read(),
         "label_fields column 'completions' holds 'Step 1: step 0'; expected a number, a boolean or yes/no"),
        (lambda: LabelledTaskData({"kind": "jsonl", "path": str(one_class)}, task="sequence", balance_train=True).read(),
         "balance_train: the training split has one class only (['pos'])"),
    ]
    for make, expected in cases:
        _one_line(make, expected)


def test_the_paper_suite_runs_the_new_tasks_at_the_papers_budget():
    suite = load_suite(str(REPO / "configs/compare/finetune-paper.yaml"))
    tasks = {t.name: t for t in suite.tasks}
    assert {"udpos-zero-shot", "seahorse", "math-shepherd"} <= set(tasks) and "udpos" not in tasks
    assert tasks["seahorse"].steps == 5000 and tasks["math-shepherd"].steps == 10000
    assert all(len(t.learning_rates) == 10 for t in suite.tasks)
    zero_shot = yaml.safe_load((REPO / "configs/finetune/paper/udpos-zero-shot.yaml").read_text())
    source = zero_shot["data"]["init_args"]["source"]
    assert source["config"] == "udpos.English" and "udpos.English" not in source["test_configs"]


def _seahorse(root: Path) -> str:
    rows = {"text": ["the cat sat on the mat", "a dog ran in the park"] * 4, "summary": ["a cat sat", "the park"] * 4,
            **{name: [1, 0] * 4 for name in RATINGS}}
    return _parquet_dataset(root, {"default": {s: rows for s in ("train", "validation", "test")}})


@pytest.mark.parametrize("config", ["udpos-zero-shot", "seahorse", "math-shepherd"])
def test_the_paper_configs_run_as_given_on_stand_ins(config, udpos, tmp_path, monkeypatch):
    """Each new paper config through `bidirlm fit`, only the dataset (a local stand-in of the hub's), the model and
    the budget replaced: its source options parse, read, train, test and export."""
    from bidirlm_pl.cli.main import main

    if config == "udpos-zero-shot":  # the config's 13 test languages, each a small test split
        import datasets

        data = yaml.safe_load((REPO / f"configs/finetune/paper/{config}.yaml").read_text())["data"]["init_args"]

        features = datasets.Features({"tokens": datasets.List(datasets.Value("string")),
                                      "pos_tags": datasets.List(datasets.ClassLabel(names=UPOS))})
        configs = {"udpos.English": {"train": _sentences(0, 8), "validation": _sentences(1, 4),
                                     "test": _sentences(2, 2)}}
        configs |= {name: {"test": _sentences(i + 3, 2)} for i, name in enumerate(data["source"]["test_configs"])}
        dataset = _parquet_dataset(tmp_path / "xtreme", configs, features)
    else:
        dataset = _seahorse(tmp_path / "data") if config == "seahorse" else _shepherd(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    rc = main(["fit", "--config", str(REPO / f"configs/finetune/paper/{config}.yaml"),
               f"--data.init_args.source.dataset={dataset}", "--model.init_args.backbone.model=tiny-qwen3",
               "--trainer.accelerator=cpu", "--trainer.precision=32", "--trainer.max_steps=2",
               "--trainer.val_check_interval=2", "--trainer.enable_progress_bar=false",
               "--data.init_args.batch_size=4", "--trainer.default_root_dir=run"])
    assert rc == 0
    scores = json.loads((tmp_path / "run/hf/bidirlm_task.json").read_text())["scores"]["test"]
    if config == "udpos-zero-shot":
        assert len([k for k in scores if k.endswith("/accuracy")]) == 13
        assert scores["metric"] == pytest.approx(sum(v for k, v in scores.items() if k.endswith("/metric")) / 13)
    else:
        assert {"seahorse": "spearman", "math-shepherd": "accuracy"}[config] in scores
