"""FinetuneStage, LabelledTaskData and the task heads: exports that transformers loads natively (or our loader where
it has no class) and that predict what the stage validated; the sub-word rule; BIO entity F1 against seqeval's
rule; SQuAD scores; bad input as one line that writes nothing."""

from __future__ import annotations

import json
import random
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from transformers import (
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    pipeline,
)

from bidirlm_pl.callbacks import HFExport
from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.data.task_readers import BUILTINS
from bidirlm_pl.data.tasks import LabelledTaskData, align_word_labels
from bidirlm_pl.evaluation.task_metrics import entities, entity_f1, squad_exact_match, squad_f1
from bidirlm_pl.models.heads import answer_question, ensure_pair_separator, load_task_model, prepare_tokenizer
from bidirlm_pl.stages.finetune import FinetuneStage

WORDS = ["the", "cat", "dog", "sat", "ran", "on", "a", "mat", "in", "park", "with", "happy", "sad", "big", "small",
         "old", "red"]
NAMES, PLACES = ["Ann", "Bob", "Carla", "Dan", "Eve"], ["Sydney", "Paris", "Lima", "Oslo", "Cairo"]


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _rows(task: str, n: int = 64) -> list[dict]:
    """Small learnable English tasks the tiny models' Lee tokenizer reads."""
    rng = random.Random(0)
    rows = []
    for i in range(n):
        name, place = rng.choice(NAMES), rng.choice(PLACES)
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))
        if task == "sequence":
            rows.append({"text": f"{text} happy" if i % 2 else f"{text} sad", "label": "pos" if i % 2 else "neg"})
        elif task == "pair":
            other = text if i % 2 else " ".join(rng.choice(WORDS) for _ in range(5))
            rows.append({"text": text, "text_pair": other, "label": "same" if i % 2 else "other"})
        elif task == "regression":
            rows.append({"text": text, "label": len(text.split()) / 4})
        elif task == "token":
            tokens = [name, "sat", "in", place, "with", rng.choice(NAMES), "."]
            rows.append({"tokens": tokens, "tags": ["B-PER", "O", "O", "B-LOC", "O", "B-PER", "O"]})
        else:
            context = f"{name} lives in {place} with the {rng.choice(WORDS)}."
            question, answer = ("Who lives there?", name) if i % 2 else ("Where?", place)
            rows.append({"question": question, "context": context,
                         "answers": {"text": [answer], "answer_start": [context.index(answer)]}})
    return rows


_FITS: dict = {}


def fit(tmp_path_factory, task: str, arch: str = "qwen3", pooling: str = "last", steps: int = 8):
    """A short fit (cached per arguments): the stage after the fit, its data module and its export folder."""
    key = (task, arch, pooling)
    if key not in _FITS:
        root = tmp_path_factory.mktemp(f"{task}-{arch}-{pooling}")
        source = {"kind": "jsonl", "path": _write(root / "data.jsonl", _rows(task))}
        stage = FinetuneStage(f"tiny-{arch}", task=task, pooling=pooling,
                              optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3))
        data = LabelledTaskData(source, tokenizer=f"tiny-{arch}", batch_size=8, max_length=48, eval_batch_size=4)
        trainer = L.Trainer(
            accelerator="cpu", max_steps=steps, val_check_interval=4, check_val_every_n_epoch=None,
            num_sanity_val_steps=0, logger=False, enable_progress_bar=False, enable_model_summary=False,
            default_root_dir=root, callbacks=[ModelCheckpoint(dirpath=root / "ckpt", monitor="val/metric", mode="max",
                                                              save_top_k=1, save_weights_only=True),
                                              HFExport(str(root / "hf"))])
        trainer.fit(stage, datamodule=data)
        stage.eval()
        _FITS[key] = (stage, data, root / "hf")
    return _FITS[key]


def _test_batch(data: LabelledTaskData) -> dict:
    return next(iter(data.test_dataloader()))


def _stage_logits(stage, batch):
    with torch.no_grad():
        return stage.forward_batch(dict(batch))


def _check_native_config(folder: Path, model, labels):
    config = json.loads((folder / "config.json").read_text())
    assert config["is_causal"] is False and model.config.is_causal is False
    if labels is not None:
        assert model.config.id2label == dict(enumerate(labels))
        assert model.config.label2id == {name: i for i, name in enumerate(labels)}


# ------------------------------------------------------------------ exports that load natively

def test_token_export_loads_natively_and_predicts_what_the_stage_validated(tmp_path_factory):
    stage, data, folder = fit(tmp_path_factory, "token")
    model = AutoModelForTokenClassification.from_pretrained(folder).eval()
    _check_native_config(folder, model, stage.label_names)
    assert stage.label_names == ["B-LOC", "B-PER", "O"] and stage.main_metric() == "entity_f1"
    batch = _test_batch(data)
    with torch.no_grad():
        exported = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(exported, _stage_logits(stage, batch).logits, rtol=1e-4, atol=1e-5)
    # pipeline() on the raw sentence: the same tokens, the stage's label at each of them
    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = "Ann sat in Paris with Bob ."
    ids = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        predicted = stage.forward_batch({"input_ids": ids["input_ids"],
                                         "attention_mask": ids["attention_mask"]}).logits[0].argmax(-1)
    tagger = pipeline("token-classification", model=model, tokenizer=tokenizer, ignore_labels=[])
    found = {item["index"]: item["entity"] for item in tagger(text)}
    assert found and found == {i: stage.label_names[int(p)] for i, p in enumerate(predicted) if i in found}
    assert set(found) == set(range(1, len(predicted)))  # every token but <bos>
    info = json.loads((folder / "bidirlm_task.json").read_text())
    assert info["native"] and info["labels"] == stage.label_names and info["metric"] == "entity_f1"
    card = (folder / "README.md").read_text()
    assert "token classification" in card and "`B-LOC`" in card and "entity_f1" in card
    assert "AutoModelForTokenClassification" in card


def test_sequence_export_loads_natively_and_pipeline_predicts_what_the_stage_validated(tmp_path_factory):
    stage, data, folder = fit(tmp_path_factory, "sequence")
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    _check_native_config(folder, model, ["neg", "pos"])
    assert model.config.problem_type == "single_label_classification"
    batch = _test_batch(data)
    with torch.no_grad():
        exported = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(exported, _stage_logits(stage, batch).logits, rtol=1e-4, atol=1e-5)
    # the pipeline on the raw test texts scores what the stage's test loop scored
    classify = pipeline("text-classification", model=model, tokenizer=AutoTokenizer.from_pretrained(folder))
    texts = [ex["text"] for ex in data.examples["test"]]
    gold = [ex["label"] for ex in data.examples["test"]]
    predicted = [out["label"] for out in classify(texts)]
    accuracy = sum(p == g for p, g in zip(predicted, gold)) / len(gold)
    assert accuracy == pytest.approx(stage.scores["test"]["accuracy"])


def test_pair_export_pipeline_takes_text_pairs(tmp_path_factory):
    stage, data, folder = fit(tmp_path_factory, "pair")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    encoded = tokenizer("the cat", "sat on a mat")
    assert None in encoded.sequence_ids()[1:]  # a separator between the two texts survives the export
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    classify = pipeline("text-classification", model=model, tokenizer=tokenizer)
    examples = data.examples["test"]
    predicted = [out["label"] for out in classify([{"text": ex["text"], "text_pair": ex["text_pair"]}
                                                   for ex in examples])]
    accuracy = sum(p == ex["label"] for p, ex in zip(predicted, examples)) / len(examples)
    assert accuracy == pytest.approx(stage.scores["test"]["accuracy"])


def test_regression_native_and_mean_pooled_exports(tmp_path_factory):
    stage, data, folder = fit(tmp_path_factory, "regression")
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    assert model.config.problem_type == "regression" and model.config.num_labels == 1
    batch = _test_batch(data)
    classify = pipeline("text-classification", model=model, tokenizer=AutoTokenizer.from_pretrained(folder),
                        function_to_apply="none")
    text = data.examples["test"][0]["text"]
    ids = AutoTokenizer.from_pretrained(folder)(text, return_tensors="pt")
    expected = float(_stage_logits(stage, ids).logits[0, 0])
    assert classify(text)[0]["score"] == pytest.approx(expected, rel=1e-4, abs=1e-5)
    # mean pooling: our head, our loader; a native class does not mistake the folder for its own
    stage, data, folder = fit(tmp_path_factory, "regression", pooling="mean")
    assert (folder / "task_head.safetensors").is_file()
    loaded = load_task_model(folder)
    batch = _test_batch(data)
    with torch.no_grad():
        out = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(out, _stage_logits(stage, batch).logits, rtol=1e-4, atol=1e-5)
    _, info = AutoModelForSequenceClassification.from_pretrained(folder, output_loading_info=True)
    assert "score.weight" in info["missing_keys"]  # reported as a new head, never silently ours
    assert "load_task_model" in (folder / "README.md").read_text()


def test_qa_export_loads_as_question_answering_and_answers_like_the_stage(tmp_path_factory):
    stage, data, folder = fit(tmp_path_factory, "qa", steps=12)
    model, info = AutoModelForQuestionAnswering.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]  # the decoder under `transformer.` too
    model.eval()
    _check_native_config(folder, model, None)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    examples = data.examples["test"]
    answers = [answer_question(model, tokenizer, ex["question"], ex["context"]) for ex in examples]
    for answer, ex in zip(answers, examples):
        assert ex["context"][answer["start"]:answer["end"]] == answer["answer"]
    exact = sum(squad_exact_match(a["answer"], [g["text"] for g in ex["answers"]])
                for a, ex in zip(answers, examples)) / len(examples)
    assert exact == pytest.approx(stage.scores["test"]["exact_match"])


def test_gemma3_sequence_loads_natively_and_token_through_our_loader(tmp_path_factory):
    stage, data, folder = fit(tmp_path_factory, "sequence", arch="gemma3", steps=4)
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    assert type(model).__name__ == "Gemma3TextForSequenceClassification"
    _check_native_config(folder, model, ["neg", "pos"])
    text = data.examples["test"][0]["text"]
    ids = AutoTokenizer.from_pretrained(folder)(text, return_tensors="pt")
    label = pipeline("text-classification", model=model, tokenizer=AutoTokenizer.from_pretrained(folder))(text)[0]
    assert label["label"] == stage.label_names[int(_stage_logits(stage, ids).logits[0].argmax())]
    # transformers has no Gemma3 token classifier: our loader, no remote code
    stage, data, folder = fit(tmp_path_factory, "token", arch="gemma3", steps=4)
    with pytest.raises(ValueError):
        AutoModelForTokenClassification.from_pretrained(folder)
    loaded = load_task_model(folder)
    assert loaded.config.is_causal is False and loaded.config.id2label == dict(enumerate(stage.label_names))
    batch = _test_batch(data)
    with torch.no_grad():
        out = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(out, _stage_logits(stage, batch).logits, rtol=1e-4, atol=1e-5)
    assert json.loads((folder / "config.json").read_text()).get("id2label") is None  # labels: bidirlm_task.json


def test_lora_adapters_merge_into_both_kinds_of_export(tmp_path):
    from bidirlm_pl.core.specs import BackboneSpec, LoraSpec

    data = LabelledTaskData({"kind": "jsonl", "path": _write(tmp_path / "d.jsonl", _rows("sequence", 32))},
                            tokenizer="tiny-qwen3", batch_size=8, max_length=32)
    for pooling in ("last", "mean"):
        stage = FinetuneStage(BackboneSpec(model="tiny-qwen3", lora=LoraSpec(r=4)), task="sequence", pooling=pooling,
                              optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3))
        L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                  enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0,
                  default_root_dir=tmp_path).fit(stage, datamodule=data)
        assert set(stage.trainable_counts) == {"lora", "head"}
        stage.eval()
        folder = stage.export_hf(tmp_path / pooling)
        batch = _test_batch(data)
        with torch.no_grad():
            out = load_task_model(folder)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        torch.testing.assert_close(out, _stage_logits(stage, batch).logits, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ the sub-word rule

def test_first_sub_token_of_each_word_carries_its_label(tiny_qwen3):
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen3)
    words, spaces = ["Ann", "lives", "in", "Sydney", "."], [True, True, True, False, False]
    out = align_word_labels(tokenizer, words, spaces, [0, 1, 2, 3, 4], max_length=64)
    tokens = tokenizer.convert_ids_to_tokens(out["input_ids"])
    assert tokens == ["<bos>", "A", "n", "n", "Ġl", "iv", "es", "Ġin", "ĠS", "y", "d", "ne", "y", "."]
    assert out["word_index"] == [1, 4, 7, 8, 13]
    assert out["labels"] == [-100, 0, -100, -100, 1, -100, -100, 2, 3, -100, -100, -100, -100, 4]
    # a word that starts inside a token begun by an earlier word: predicted from that token, no label of its own
    out = align_word_labels(tokenizer, ["Hello", "the", "re"], [True, False, False], [0, 1, 2], max_length=64)
    tokens = tokenizer.convert_ids_to_tokens(out["input_ids"])
    there = tokens.index("Ġthere")
    assert out["word_index"][1:] == [there, there] and out["labels"][there] == 1
    assert 2 not in out["labels"]
    # truncated words have no first token
    out = align_word_labels(tokenizer, words, spaces, [0, 1, 2, 3, 4], max_length=5)
    assert out["word_index"] == [1, 4, -1, -1, -1]


def test_pair_tokenizer_gets_a_separator_that_survives_saving(tiny_qwen3, tmp_path):
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(tiny_qwen3), "pair", max_length=40)
    encoded = tokenizer("the cat", "sat")
    tokens = tokenizer.convert_ids_to_tokens(encoded["input_ids"])
    assert tokens[0] == "<bos>" and "<eos>" in tokens and encoded.sequence_ids()[tokens.index("<eos>")] is None
    assert tokenizer.convert_ids_to_tokens(tokenizer("the cat")["input_ids"])[0] == "<bos>"  # single unchanged
    tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again("the cat", "sat")["input_ids"] == encoded["input_ids"] and again.model_max_length == 40
    assert not ensure_pair_separator(again)  # idempotent: a separator is there, nothing changes
    assert again("the cat", "sat")["input_ids"] == encoded["input_ids"]


# ------------------------------------------------------------------ metrics

SEQEVAL_CASES = [  # (tags, seqeval's default-mode entities, its strict IOB2 entities), checked with seqeval 1.2.2
    (["I-PER", "I-PER", "O"], [("PER", 0, 1)], []),
    (["B-PER", "I-LOC"], [("PER", 0, 0), ("LOC", 1, 1)], [("PER", 0, 0)]),
    (["O", "I-PER", "B-PER", "I-PER"], [("PER", 1, 1), ("PER", 2, 3)], [("PER", 2, 3)]),
    (["B-PER", "B-PER"], [("PER", 0, 0), ("PER", 1, 1)], [("PER", 0, 0), ("PER", 1, 1)]),
    (["B-ORG", "I-ORG", "I-ORG", "O", "B-LOC"], [("ORG", 0, 2), ("LOC", 4, 4)], [("ORG", 0, 2), ("LOC", 4, 4)]),
]


@pytest.mark.parametrize("tags, default, strict", SEQEVAL_CASES)
def test_entities_follow_seqeval(tags, default, strict):
    assert entities(tags) == default
    assert entities(tags, "strict") == strict


def test_entity_f1_matches_seqeval():
    gold, predicted = [["B-PER", "I-PER", "O", "B-LOC"]], [["I-PER", "I-PER", "O", "B-LOC"]]
    assert entity_f1(gold, predicted) == 1.0
    assert entity_f1(gold, predicted, "strict") == pytest.approx(2 / 3)
    assert entity_f1([["O", "O"]], [["O", "O"]]) == 0.0  # nothing to find: seqeval's zero_division
    seqeval = pytest.importorskip("seqeval.metrics")
    from seqeval.scheme import IOB2

    rng = random.Random(0)
    tags = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    for _ in range(300):
        gold = [[rng.choice(tags) for _ in range(rng.randint(1, 6))] for _ in range(rng.randint(1, 5))]
        predicted = [[rng.choice(tags) for _ in sentence] for sentence in gold]
        assert entity_f1(gold, predicted) == pytest.approx(seqeval.f1_score(gold, predicted))
        assert entity_f1(gold, predicted, "strict") == pytest.approx(
            seqeval.f1_score(gold, predicted, mode="strict", scheme=IOB2))


def test_squad_scores():
    assert squad_exact_match("The Eiffel Tower!", ["eiffel tower"]) == 1.0
    assert squad_f1("in Paris France", ["Paris"]) == pytest.approx(2 * (1 / 3) * 1 / (1 / 3 + 1))
    assert squad_f1("Lima", ["Oslo", "Lima"]) == 1.0 and squad_f1("", ["x"]) == 0.0
    assert squad_f1("知床半島", ["知床"]) == pytest.approx(2 * 0.5 * 1 / 1.5)  # CJK: characters


# ------------------------------------------------------------------ data

def test_builtin_sets_read_offline():
    turkish = BUILTINS["turkish_pos"]().splits
    assert [len(turkish[s]) for s in ("train", "validation", "test")] == [3881, 485, 485]
    first = turkish["train"][0]
    assert first["words"][:3] == ["Burda", "da", "öylemi"] and first["tags"][:3] == ["PRON", "PRT", "VERB"]
    assert BUILTINS["japanese_ner"]().splits["test"][0]["tags"][0] in ("O", "B-DAT", "B-LOC", "B-ORG", "B-PSN",
                                                                         "B-ART", "B-TIM", "B-MON", "B-PER")
    qa = BUILTINS["japanese_ner_qa"]().splits["train"][0]
    answer = qa["answers"][0]
    assert qa["context"][answer["start"]:answer["start"] + len(answer["text"])] == answer["text"]
    sentiment = BUILTINS["chinese_sentiment"]().splits["all"]
    assert len({ex["text"] for ex in sentiment}) == len(sentiment) == 17363


def test_hub_kind_reads_splits_fields_and_classlabel_names(tmp_path):
    import datasets

    names = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]  # the dataset's order, not sorted
    features = datasets.Features({"words": datasets.List(datasets.Value("string")),
                                  "ner": datasets.List(datasets.ClassLabel(names=names))})
    for split, n in (("train", 6), ("validation", 2), ("test", 2)):
        datasets.Dataset.from_dict({"words": [["Ann", "lives", "in", "Paris"]] * n, "ner": [[1, 0, 0, 3]] * n},
                                   features=features).to_parquet(str(tmp_path / f"{split}.parquet"))
    source = {"kind": "hf", "dataset": str(tmp_path), "fields": {"tokens": "words", "tags": "ner"}}
    data = LabelledTaskData(source, task="token")
    splits = data.read()
    assert data.label_names == names and [len(splits[s]) for s in ("train", "validation", "test")] == [6, 2, 2]
    assert splits["test"][0]["tags"] == ["B-PER", "O", "O", "B-LOC"]
    with pytest.raises(BidirLMError, match=r"no field 'tags' \(fields.tags\); it has \['ner', 'words'\]"):
        LabelledTaskData({**source, "fields": {"tokens": "words"}}, task="token").read()


def test_splits_are_seeded_and_disjoint(tiny_qwen3, tmp_path):
    path = _write(tmp_path / "seq.jsonl", _rows("sequence", 50))
    splits = [LabelledTaskData({"kind": "jsonl", "path": path}, task="sequence", seed=seed).read()
              for seed in (0, 0, 1)]
    texts = [{s: [ex["_where"] for ex in split[s]] for s in split} for split in splits]
    assert texts[0] == texts[1] != texts[2]
    assert [len(texts[0][s]) for s in ("train", "validation", "test")] == [38, 6, 6]  # per class: ceil(fraction * n) (data/splits.py)
    assert not set(texts[0]["train"]) & (set(texts[0]["validation"]) | set(texts[0]["test"]))


# ------------------------------------------------------------------ bad input

BAD = [
    ("sequence", [{"text": "a", "label": "pos"}, {"text": "b", "label": "meh"}] * 5, {"labels": ["neg", "pos"]},
     "label 'meh' is not in the label set ['neg', 'pos']"),
    ("token", [{"tokens": ["a", "b", "c"], "tags": ["O", "O"]}] * 10, {}, "3 tokens but 2 tags"),
    ("qa", [{"question": "q", "context": "Ann lives here.", "answers": {"text": ["Ann"], "answer_start": [40]}}] * 10,
     {}, "answer 'Ann' at 40 is not in its context"),
    ("sequence", [{"text": "a", "category": "pos"}] * 10, {}, "no field 'label' (fields.label)"),
    ("sequence", [{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}] * 5, {"test_fraction": 0.0},
     "split 'test' has no examples"),
]


@pytest.mark.parametrize("task, rows, options, expected", BAD, ids=["label", "lengths", "answer", "field", "empty"])
def test_bad_examples_are_one_line(tmp_path, task, rows, options, expected):
    path = _write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(BidirLMError, match="") as error:
        LabelledTaskData({"kind": "jsonl", "path": path}, task=task, **options).read()
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_bad_data_through_the_cli_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    from bidirlm_pl.cli.main import main

    config = Path(__file__).resolve().parents[1] / "configs" / "finetune" / "tiny-sequence.yaml"
    _write(tmp_path / "bad.jsonl", [{"text": "a", "label": "pos"}, {"text": "b", "label": "meh"}] * 5)
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    rc = main(["fit", "--config", str(config), "--data.init_args.source", "{kind: jsonl, path: bad.jsonl}",
               "--model.init_args.labels", "[neg, pos]"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("bidirlm: error: ") and "label 'meh' is not in the label set" in err[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_stage_options_are_checked():
    with pytest.raises(BidirLMError, match="task 'ner' is not one of"):
        FinetuneStage("tiny-qwen3", task="ner")
    with pytest.raises(BidirLMError, match="pooling 'mean' applies to sequence tasks"):
        FinetuneStage("tiny-qwen3", task="token", pooling="mean")
    with pytest.raises(BidirLMError, match="metric 'spearman' is not one of"):
        FinetuneStage("tiny-qwen3", task="sequence", metric="spearman")


def test_labelled_mean_is_cross_entropys_mean_and_zero_in_the_graph_without_labels():
    from bidirlm_pl.stages.finetune import IGNORE, labelled_mean

    logits = torch.randn(6, 5, requires_grad=True)
    labels = torch.tensor([1, IGNORE, 3, 0, IGNORE, 4])
    torch.testing.assert_close(labelled_mean(logits, labels), F.cross_entropy(logits, labels, ignore_index=IGNORE))
    none = labelled_mean(logits, torch.full((6,), IGNORE))
    none.backward()
    assert none.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))
