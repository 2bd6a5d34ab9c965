"""LabelledTextDataModule: short texts with class labels, for fine-tuning a classification head.

Sources:

* ``pang_lee_polarity`` (default, offline): the 200 movie-review sentences (Pang & Lee sentence
  polarity, 100 negative, 100 positive, labelled ``__label__neg``/``__label__pos``) that gensim ships
  as ``test_data/pang_lee_polarity.cor``;
* ``jsonl``: a file of ``{"text": ..., "label": ...}`` lines (labels are strings or integers).

Train/validation split: a seeded, per-class (stratified) ``val_fraction`` (``bidirlm_pl.data.splits``
applied to each class). Batches are padded:
``input_ids`` (B, T), ``attention_mask`` (B, T), ``labels`` (B,).

>>> dm = LabelledTextDataModule("tiny-qwen3", batch_size=8)  # doctest: +SKIP
>>> dm.setup("fit"); next(iter(dm.train_dataloader()))["labels"].shape  # doctest: +SKIP
torch.Size([8])
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from bidirlm_pl.core.errors import BidirLMError, require
from bidirlm_pl.data.splits import held_out_size, held_out_split
from bidirlm_pl.data.tokenizer import load_tokenizer
from bidirlm_pl.data.validation import rank_loader

SOURCES = ("pang_lee_polarity", "jsonl")


def pang_lee_polarity() -> list[tuple[str, str]]:
    """(text, label) pairs of gensim's ``pang_lee_polarity.cor`` (label ``neg`` or ``pos``)."""
    utils = require("gensim.test.utils", "demo", "The Pang & Lee polarity sentences")
    path = Path(utils.datapath("pang_lee_polarity.cor"))
    pairs = []
    for line in path.read_bytes().decode("latin1").splitlines():
        label, _, text = line.strip().partition(" ")
        if label.startswith("__label__") and text:
            pairs.append((text, label[len("__label__"):]))
    return pairs


def read_jsonl(path: str | Path) -> list[tuple[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise BidirLMError(f"labelled data file '{path}' does not exist; expected JSONL with 'text' and 'label'")
    pairs = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if "text" not in row or "label" not in row:
            raise BidirLMError(f"line {number} of '{path}' lacks 'text' or 'label'; expected both keys")
        pairs.append((str(row["text"]), str(row["label"])))
    return pairs


def stratified_split(labels: list[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (train, val): ``val_fraction`` of every class, chosen with ``seed``."""
    rng = random.Random(seed)
    train, val = [], []
    for label in sorted(set(labels)):
        members = [i for i, y in enumerate(labels) if y == label]
        rest, held = held_out_split(len(members), held_out_size(len(members), val_fraction), rng)
        val += [members[i] for i in held]
        train += [members[i] for i in rest]
    rng.shuffle(train)
    return train, sorted(val)


class LabelledTextDataModule(L.LightningDataModule):
    """Labelled texts -> padded batches for sequence classification.

    Args:
        tokenizer: model folder or asset name whose tokenizer encodes the texts (linked to the stage's model).
        source: ``pang_lee_polarity`` or ``jsonl``.
        path: the JSONL file when ``source`` is ``jsonl``.
        max_length: truncate texts to this many tokens.
        batch_size: texts per batch.
        val_fraction: held-out fraction of each class.
        seed: shuffling and split seed.
    """

    def __init__(self, tokenizer: str | None = None, source: str = "pang_lee_polarity", path: str | None = None,
                 max_length: int = 64, batch_size: int = 16, val_fraction: float = 0.25, seed: int = 0):
        super().__init__()
        if source not in SOURCES:
            raise BidirLMError(f"labelled source '{source}' is not one of {list(SOURCES)}")
        if source == "jsonl" and path is None:
            raise BidirLMError("labelled source 'jsonl' needs 'path' (a JSONL file with text and label)")
        if not 0.0 <= val_fraction < 1.0:
            raise BidirLMError(f"val_fraction {val_fraction} is not in [0, 1)")
        self.tokenizer_name = tokenizer
        self.sources = [{"name": source, "kind": source, "path": path}]  # one source, for logs and model cards
        self.max_length, self.batch_size = max_length, batch_size
        self.val_fraction, self.seed = val_fraction, seed
        self.tokenizer = None
        self.texts: list[str] = []
        self.labels: list[int] = []
        self.label_names: list[str] = []

    def load(self) -> None:
        source = self.sources[0]
        pairs = pang_lee_polarity() if source["kind"] == "pang_lee_polarity" else read_jsonl(source["path"])
        if not pairs:
            raise BidirLMError(f"labelled source '{source['kind']}' has no examples")
        self.label_names = sorted({label for _, label in pairs})
        index = {name: i for i, name in enumerate(self.label_names)}
        self.texts = [text for text, _ in pairs]
        self.labels = [index[label] for _, label in pairs]

    @property
    def num_labels(self) -> int:
        if not self.label_names:
            self.load()
        return len(self.label_names)

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.tokenizer_name, owner="LabelledTextDataModule")
        if not self.texts:
            self.load()
        self.train_indices, self.val_indices = stratified_split(self.labels, self.val_fraction, self.seed)

    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        batch = self.tokenizer([self.texts[i] for i in indices], padding=True, truncation=True,
                               max_length=self.max_length, return_tensors="pt")
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                "labels": torch.tensor([self.labels[i] for i in indices])}

    def train_dataloader(self):
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_indices, batch_size=self.batch_size, shuffle=True, generator=generator,
                          collate_fn=self.collate, drop_last=len(self.train_indices) >= self.batch_size)

    def val_dataloader(self):
        rows, size = self.val_indices, self.batch_size  # the one-process batches, shared out over the ranks
        return rank_loader([rows[i:i + size] for i in range(0, len(rows), size)], self, collate=self.collate)

    def test_dataloader(self):
        return self.val_dataloader()
