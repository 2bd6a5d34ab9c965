"""LabelledTaskData: labelled examples -> padded batches for the finetune stage (sequence, pair, regression, token, qa).

Sources are :class:`~bidirlm_pl.data.task_readers.TaskSource` blocks: the hub (``kind: hf``), JSONL, CoNLL,
CoNLL-U, or a built-in offline set (``turkish_pos``, ``japanese_ner``, ``chinese_pos``, ``chinese_sentiment``,
``pang_lee_polarity``, ``japanese_ner_qa``). Splits are train / validation / test: the hub's as named (or
mapped with ``splits:``), a package's own where it has one, otherwise carved from the examples by a seeded
rule (``data/splits.py``, per class for labels through its ``stratified_split``):
``test_fraction`` first, then ``val_fraction``.

Texts are encoded exactly as transformers' pipelines encode them, so an export predicts what was validated:
``tokenizer(text)``, ``tokenizer(text, text_pair)`` for pairs, ``tokenizer(question, context)`` for QA (the
pair template gets a separator where the tokenizer has none: ``models.heads.prepare_tokenizer``).

**Sub-word labels (token tasks), one rule.** The words are joined into the raw text as the source writes them
(a space between words, none after CoNLL-U's ``SpaceAfter=No`` or between Chinese/Japanese words) and the raw
text is tokenized with offsets, as the token-classification pipeline does. A word's first token is the first
token overlapping its characters; a token carries the label of the first word that starts in it (the first
sub-token of each word gets the word's label, as in transformers' examples), every other token -100. Tokenizing
pre-split words (``is_split_into_words``) is avoided on purpose: byte-level BPE then drops the leading-space
tokens that raw text produces. A word that starts inside a token begun by an earlier word (Chinese, Japanese)
has no label of its own in training and is predicted from that token. Evaluation is per word: the prediction at
each word's first token (``word_index``), so accuracy and entity F1 count words, not tokens.

>>> dm = LabelledTaskData({"kind": "turkish_pos"}, tokenizer="tiny-qwen3", task="token")  # doctest: +SKIP
>>> dm.setup("fit"); dm.label_names[:3]  # doctest: +SKIP
['ADJ', 'ADP', 'ADV']
"""

from __future__ import annotations

import random

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.data.splits import stratified_split
from bidirlm_pl.data.task_readers import SPLITS, TaskSource, read_task_source, task_source
from bidirlm_pl.data.tokenizer import load_tokenizer
from bidirlm_pl.data.validation import rank_loader
from bidirlm_pl.models.heads import TASKS, prepare_tokenizer

IGNORE = -100


# ------------------------------------------------------------------ checks

def check_examples(examples: list[dict], task: str, split: str, labels: list[str] | None) -> None:
    """One line for the first bad example: unknown label, tokens vs tags, answer outside its context."""
    if not examples:
        raise BidirLMError(f"split '{split}' has no examples; check the source (or its splits / fractions)")
    known = set(labels) if labels is not None else None
    for ex in examples:
        where = ex["_where"]
        if task == "token":
            if len(ex["words"]) != len(ex["tags"]):
                raise BidirLMError(f"{where}: {len(ex['words'])} tokens but {len(ex['tags'])} tags; expected one tag "
                                   "per token")
            bad = next((t for t in ex["tags"] if known is not None and t not in known), None)
        elif task == "qa":
            bad = None
            if not ex["answers"]:
                raise BidirLMError(f"{where}: no answer; extractive QA needs at least one answer span")
            for answer in ex["answers"]:
                start, text = answer["start"], answer["text"]
                if start < 0 or ex["context"][start:start + len(text)] != text or not text:
                    raise BidirLMError(f"{where}: answer {text[:40]!r} at {start} is not in its context; "
                                       "expected context[answer_start:answer_start + len(text)] == text")
        elif task == "regression":
            bad = None
            try:
                ex["label"] = float(ex["label"])
            except (TypeError, ValueError):
                raise BidirLMError(f"{where}: regression label {str(ex['label'])[:40]!r} is not a number") from None
        else:
            bad = ex["label"] if known is not None and ex["label"] not in known else None
        if bad is not None:
            shown = ", ".join(repr(k) for k in sorted(known))
            shown = shown if len(shown) <= 70 else shown[:66] + " ..."
            raise BidirLMError(f"{where}: label {str(bad)[:30]!r} is not in the label set [{shown}]")


def resolve_labels(splits: dict[str, list[dict]], task: str, explicit: list[str] | None,
                   class_names: list[str] | None) -> list[str] | None:
    """The label list: given explicitly, else the dataset's ClassLabel names, else the sorted labels of all splits."""
    if task in ("qa", "regression"):
        if explicit is not None and task == "qa":
            raise BidirLMError("task 'qa' takes no labels (answers are spans of the context)")
        return list(explicit) if explicit else None
    if explicit is not None:
        if len(set(explicit)) != len(explicit) or len(explicit) < 2:
            raise BidirLMError(f"labels {list(explicit)} must be at least 2 distinct names")
        return list(explicit)
    if class_names is not None:
        return list(class_names)
    found = {t for examples in splits.values() for ex in examples
             for t in (ex["tags"] if task == "token" else [ex["label"]])}
    return sorted(found)


# ------------------------------------------------------------------ encoding

def join_words(words: list[str], spaces: list[bool]) -> tuple[str, list[tuple[int, int]]]:
    """The raw text of a word sequence and each word's character span."""
    text, spans = "", []
    for i, word in enumerate(words):
        spans.append((len(text), len(text) + len(word)))
        text += word
        if spaces[i] and i + 1 < len(words):
            text += " "
    return text, spans


def align_word_labels(tokenizer, words: list[str], spaces: list[bool], label_ids: list[int],
                      max_length: int) -> dict:
    """The sub-word rule (module docstring): ``input_ids``, token ``labels`` (-100 but on first sub-tokens) and
    ``word_index`` (each word's first token, -1 for a word truncated away)."""
    text, spans = join_words(words, spaces)
    enc = tokenizer(text, truncation=True, max_length=max_length, return_offsets_mapping=True,
                    return_special_tokens_mask=True)
    char_word = [-1] * len(text)
    for w, (s, e) in enumerate(spans):
        char_word[s:e] = [w] * (e - s)
    first_token = [-1] * len(words)
    labels = [IGNORE] * len(enc["input_ids"])
    for t, ((s, e), special) in enumerate(zip(enc["offset_mapping"], enc["special_tokens_mask"])):
        if special or s == e:
            continue
        starting = []
        for w in dict.fromkeys(char_word[c] for c in range(s, min(e, len(text))) if char_word[c] >= 0):
            if first_token[w] < 0:
                first_token[w] = t
                starting.append(w)
        if starting:
            labels[t] = label_ids[starting[0]]
    return {"input_ids": list(enc["input_ids"]), "labels": labels, "word_index": first_token,
            "word_labels": list(label_ids)}


def encode_qa(tokenizer, ex: dict, max_length: int) -> dict:
    """Question first, context second (truncated); start/end tokens of the first answer (-100 when cut off)."""
    enc = tokenizer(ex["question"], ex["context"], truncation="only_second", max_length=max_length,
                    return_offsets_mapping=True)
    sequence = enc.sequence_ids()
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    context = [i for i, s in enumerate(sequence) if s == 1]
    answer = ex["answers"][0]
    a_start, a_end = answer["start"], answer["start"] + len(answer["text"])
    starts = [t for t in context if offsets[t][1] > a_start and offsets[t][0] < a_end]
    start, end = (starts[0], starts[-1]) if starts and offsets[starts[-1]][1] >= a_end else (IGNORE, IGNORE)
    return {"input_ids": list(enc["input_ids"]), "start": start, "end": end,
            "context_mask": [int(s == 1) for s in sequence], "offsets": offsets, "context": ex["context"],
            "answers": [a["text"] for a in ex["answers"]]}


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


class LabelledTaskData(L.LightningDataModule):
    """Labelled examples of one task -> right-padded batches.

    Batches hold ``input_ids`` and ``attention_mask`` (B, T), and per task: ``labels`` (B,) class ids or floats
    (sequence, pair, regression); ``labels`` (B, T) with -100, ``word_index`` and ``word_labels`` (B, W) (token);
    ``start_positions``, ``end_positions`` (B,), ``context_mask`` (B, T) and the lists ``contexts``, ``offsets``,
    ``answers`` (qa).

    Args:
        source: where the examples come from (:class:`~bidirlm_pl.data.task_readers.TaskSource`).
        tokenizer: the model whose tokenizer encodes the texts (linked to the stage's ``backbone.model``).
        task: ``sequence``, ``pair``, ``regression``, ``token`` or ``qa``; default the stage's ``task``.
        labels: the label list (ids in this order); default the stage's ``labels``, else the dataset's ClassLabel
            names, else the sorted labels found. A label outside an explicit list is an error.
        max_length: tokens per example (longer ones are truncated; QA truncates the context).
        batch_size: examples per training batch (per process); ``eval_batch_size`` for validation and test.
        val_fraction, test_fraction: carved from train (seeded) for splits the source does not have.
        seed: split and shuffle seed.
        max_train_examples, max_eval_examples: use a seeded sample of N examples of train / of validation and test
            (of each test set, with the source's ``test_configs``).
        balance_train: keep as many training examples of each class as the rarest class has (a seeded sample per
            class, in the split's order; before ``max_train_examples``): MathShepherd's balanced training set.

    With the source's ``test_configs``, ``test_groups`` names the test sets: test batches never mix two, and each
    carries ``group`` (its index) so the stage scores every set on its own and reports their mean.
    """

    def __init__(self, source: TaskSource | dict, tokenizer: str | None = None, task: str | None = None,
                 labels: list[str] | None = None, max_length: int = 128, batch_size: int = 32,
                 eval_batch_size: int | None = None, val_fraction: float = 0.1, test_fraction: float = 0.1,
                 seed: int = 0, max_train_examples: int | None = None, max_eval_examples: int | None = None,
                 balance_train: bool = False):
        super().__init__()
        self.source = task_source(source)
        self.sources = [self.source]  # what every data module names (logs, model cards)
        if task is not None and task not in TASKS:
            raise BidirLMError(f"task '{task}' is not one of {list(TASKS)}")
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 <= value < 1.0:
                raise BidirLMError(f"{name} {value} is not in [0, 1)")
        if val_fraction + test_fraction >= 1.0:
            raise BidirLMError(f"val_fraction + test_fraction = {val_fraction + test_fraction} leaves no training data")
        for name, value in (("batch_size", batch_size), ("max_length", max_length)):
            if value < 1:
                raise BidirLMError(f"{name} {value} must be at least 1")
        self.tokenizer_name, self.task, self.labels = tokenizer, task, labels
        self.max_length, self.batch_size = max_length, batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.val_fraction, self.test_fraction, self.seed = val_fraction, test_fraction, seed
        self.max_train_examples, self.max_eval_examples = max_train_examples, max_eval_examples
        self.balance_train = balance_train
        self.tokenizer = None
        self.label_names: list[str] | None = None
        self.test_groups: list[str] | None = None
        self.examples: dict[str, list[dict]] = {}
        self.encoded: dict[str, list[dict]] = {}

    # ------------------------------------------------------------------ reading
    def _from_stage(self, name: str):
        """The attached stage's ``task`` / ``labels`` (so a config states them once, on the model)."""
        stage = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        return getattr(stage, name, None)

    def resolve_task(self) -> str:
        stage_task = self._from_stage("task")
        if self.task is not None and stage_task is not None and self.task != stage_task:
            raise BidirLMError(f"data task '{self.task}' differs from the model's task '{stage_task}'; set one")
        task = self.task or stage_task
        if task is None:
            raise BidirLMError("LabelledTaskData needs a task (data.init_args.task or the stage's task)")
        return task

    def _carve(self, examples: list[dict], fraction: float, task: str) -> tuple[list[dict], list[dict]]:
        keys = [ex["label"] if task in ("sequence", "pair") else "" for ex in examples]
        index = {k: i for i, k in enumerate(sorted(set(keys)))}
        rest, carved = stratified_split([index[k] for k in keys], fraction, self.seed)
        return [examples[i] for i in rest], [examples[i] for i in carved]

    def _sample(self, examples: list[dict], limit: int | None) -> list[dict]:
        """A seeded sample of ``limit`` examples, in their split's order (all of them without a limit); of each test
        set's when the examples name their ``_group``."""
        groups = list(dict.fromkeys(ex.get("_group") for ex in examples))
        if len(groups) > 1:
            return [ex for g in groups for ex in self._sample([e for e in examples if e.get("_group") == g], limit)]
        if not limit or len(examples) <= limit:
            return examples
        return [examples[i] for i in sorted(random.Random(self.seed).sample(range(len(examples)), limit))]

    def _balance(self, examples: list[dict], task: str) -> list[dict]:
        """As many examples of each class as the rarest class has (a seeded sample per class, in their order)."""
        if task not in ("sequence", "pair"):
            raise BidirLMError(f"balance_train balances classes; task '{task}' has none")
        by_label: dict[str, list[int]] = {}
        for i, ex in enumerate(examples):
            by_label.setdefault(ex["label"], []).append(i)
        if len(by_label) < 2:
            raise BidirLMError(f"balance_train: the training split has one class only ({sorted(by_label)})")
        n, rng = min(len(v) for v in by_label.values()), random.Random(self.seed)
        kept = sorted(i for label in sorted(by_label) for i in rng.sample(by_label[label], n))
        rank_zero_info(f"balance_train: {n} training examples of each of {len(by_label)} classes "
                       f"(of {len(examples)})")
        return [examples[i] for i in kept]

    def read(self) -> dict[str, list[dict]]:
        """Every split's examples, checked (one line for the first bad one), and ``label_names`` resolved."""
        task = self.resolve_task()
        result = read_task_source(self.source, task)
        splits = dict(result.splits)
        if "all" in splits:
            everything = splits.pop("all")
            rest, splits["test"] = self._carve(everything, self.test_fraction, task) if self.test_fraction else (
                everything, [])
            fraction = self.val_fraction / (1.0 - self.test_fraction)
            splits["train"], splits["validation"] = self._carve(rest, fraction, task)
        for split in ("validation", "test"):
            if split not in splits and "train" in splits:
                fraction = self.val_fraction if split == "validation" else self.test_fraction
                splits["train"], splits[split] = self._carve(splits["train"], fraction, task)
        if self.balance_train and splits.get("train"):
            splits["train"] = self._balance(splits["train"], task)
        limits = {"train": self.max_train_examples, "validation": self.max_eval_examples, "test": self.max_eval_examples}
        splits = {s: self._sample(splits.get(s, []), limits[s]) for s in SPLITS}
        self.test_groups = result.test_groups
        explicit = self.labels if self.labels is not None else self._from_stage("labels")
        self.label_names = resolve_labels(splits, task, explicit, result.label_names)
        for split in SPLITS:
            check_examples(splits[split], task, split, self.label_names)
        self.examples = splits
        return splits

    @property
    def num_labels(self) -> int | None:
        if self.label_names is None and not self.examples:
            self.read()
        return len(self.label_names) if self.label_names is not None else None

    # ------------------------------------------------------------------ setup
    def load_tokenizer(self):
        tokenizer = load_tokenizer(self.tokenizer_name, owner="LabelledTaskData")
        return prepare_tokenizer(tokenizer, self.resolve_task(), self.max_length)

    def prepare_data(self) -> None:
        """Read and check every example before anything is written: Lightning calls this before the loggers
        create their folders (``setup`` comes after), so bad data stops a fit with one line and no run folder."""
        if not self.examples:
            self.read()

    def setup(self, stage: str | None = None) -> None:
        if self.encoded:
            return
        if not self.examples:
            self.read()
        self.tokenizer = self.tokenizer or self.load_tokenizer()
        task = self.resolve_task()
        self.encoded = {split: self.encode(examples, task, split) for split, examples in self.examples.items()}
        if self.test_groups:
            index = {name: i for i, name in enumerate(self.test_groups)}
            for row, ex in zip(self.encoded["test"], self.examples["test"]):
                row["group"] = index[ex["_group"]]
        sizes = ", ".join(f"{split} {len(rows)}" for split, rows in self.encoded.items())
        sizes += f" ({len(self.test_groups)} test sets)" if self.test_groups else ""
        labels = f", {len(self.label_names)} labels" if self.label_names else ""
        rank_zero_info(f"labelled task data: {task} from {self.source.kind} '{self.source.describe()}': {sizes}"
                       f" examples{labels}")

    def encode(self, examples: list[dict], task: str, split: str) -> list[dict]:
        tok, n = self.tokenizer, self.max_length
        if task == "token":
            index = {name: i for i, name in enumerate(self.label_names)}
            return [align_word_labels(tok, ex["words"], ex["spaces"], [index[t] for t in ex["tags"]], n)
                    for ex in examples]
        if task == "qa":
            rows = [encode_qa(tok, ex, n) for ex in examples]
            if split == "train":
                kept = [r for r in rows if r["start"] != IGNORE]
                if len(kept) < len(rows):
                    rank_zero_info(f"{len(rows) - len(kept)} training answers lie beyond max_length {n}: "
                                   "those examples are skipped")
                if not kept:
                    raise BidirLMError(f"every training answer lies beyond max_length {n}; raise max_length")
                rows = kept
            return rows
        index = {name: i for i, name in enumerate(self.label_names or [])}
        rows = []
        for ex in examples:
            pair = (ex["text"], ex["text_pair"]) if "text_pair" in ex else (ex["text"],)
            ids = tok(*pair, truncation=True, max_length=n)["input_ids"]
            rows.append({"input_ids": list(ids), "label": ex["label"] if task == "regression" else index[ex["label"]]})
        return rows

    # ------------------------------------------------------------------ batches
    def collate(self, rows: list[dict]) -> dict:
        pad = self.tokenizer.pad_token_id
        ids = _pad([r["input_ids"] for r in rows], pad)
        mask = _pad([[1] * len(r["input_ids"]) for r in rows], 0)
        batch = {"input_ids": ids, "attention_mask": mask}
        first = rows[0]
        if "word_index" in first:
            batch["labels"] = _pad([r["labels"] for r in rows], IGNORE)
            batch["word_index"] = _pad([r["word_index"] for r in rows], -1)
            batch["word_labels"] = _pad([[y if i >= 0 else IGNORE for y, i in zip(r["word_labels"], r["word_index"])]
                                         for r in rows], IGNORE)
        elif "start" in first:
            batch["start_positions"] = torch.tensor([r["start"] for r in rows])
            batch["end_positions"] = torch.tensor([r["end"] for r in rows])
            batch["context_mask"] = _pad([r["context_mask"] for r in rows], 0)
            batch.update(contexts=[r["context"] for r in rows], offsets=[r["offsets"] for r in rows],
                         answers=[r["answers"] for r in rows])
        else:
            dtype = torch.float32 if isinstance(first["label"], float) else torch.long
            batch["labels"] = torch.tensor([r["label"] for r in rows], dtype=dtype)
        if "group" in first:
            batch["group"] = first["group"]  # one test set per batch (_eval_loader)
        return batch

    def train_dataloader(self):
        generator = torch.Generator().manual_seed(self.seed)
        rows = self.encoded["train"]
        return DataLoader(rows, batch_size=self.batch_size, shuffle=True, generator=generator, collate_fn=self.collate)

    def _eval_loader(self, split: str):
        """Batches by length (less padding, same scores), one test set at a time."""
        rows = self.encoded[split]
        groups: dict[int, list[dict]] = {}
        for i in sorted(range(len(rows)), key=lambda i: (rows[i].get("group", 0), len(rows[i]["input_ids"]))):
            groups.setdefault(rows[i].get("group", 0), []).append(rows[i])
        size = self.eval_batch_size
        batches = [items[k:k + size] for items in groups.values() for k in range(0, len(items), size)]
        return rank_loader(batches, self, collate=self.collate)

    def val_dataloader(self):
        return self._eval_loader("validation")

    def test_dataloader(self):
        return self._eval_loader("test")
