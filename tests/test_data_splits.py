"""The one held-out split rule (bidirlm_pl/data/splits.py): every data module holds out the rows it held out
before the rule was shared, on the quickstart's own sources (configs/mntp/gemma3-270m.yaml and
configs/contrastive/gemma3-270m.yaml, read here), on the Lee test documents, on UBMoE's tail and on the
labelled classes. The old rules are written out below as they were."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest
import yaml

from bidirlm_pl.core import assets
from bidirlm_pl.data.pairs import PairsDataModule, load_rows
from bidirlm_pl.data.splits import held_out_size, held_out_split, stratified_split
from bidirlm_pl.data.task_readers import pang_lee_polarity
from bidirlm_pl.data.text_module import TextDataModule
from bidirlm_pl.moe.data import split_documents

REPO = Path(__file__).resolve().parents[1]


def _data_args(config: str) -> dict:
    return yaml.safe_load((REPO / config).read_text())["data"]["init_args"]


# ------------------------------------------------------------------ the rules as they were
def old_text_module_split(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    order = np.random.default_rng([seed, 7919]).permutation(n)
    n_val = max(1, math.ceil(fraction * n)) if n > 1 else 0
    return sorted(int(i) for i in order[n_val:]), sorted(int(i) for i in order[:n_val])


def old_pairs_split(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    n_val = int(n * fraction)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order[n_val:], order[:n_val]


def old_stratified_split(labels: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    rng = random.Random(seed)
    train, val = [], []
    for label in sorted(set(labels)):
        members = [i for i, y in enumerate(labels) if y == label]
        rng.shuffle(members)
        cut = max(1, round(fraction * len(members))) if fraction > 0 else 0
        val += members[:cut]
        train += members[cut:]
    rng.shuffle(train)
    return train, sorted(val)


# ------------------------------------------------------------------ the quickstart's data
def test_quickstart_mntp_holds_out_the_lee_articles_it_held_out_before():
    args = _data_args("configs/mntp/gemma3-270m.yaml")
    dm = TextDataModule(tokenizer="tiny-qwen3", sources=args["sources"], max_length=args["max_length"],
                        batch_size=args["batch_size"], val_fraction=args["val_fraction"],
                        val_max_batches=args["val_max_batches"], seed=args["seed"], check_documents=10)
    train, val = dm._train_sources[0].docs, dm._open_sources()[1][0].docs
    old_train, old_val = old_text_module_split(len(assets.lee_background()), args["val_fraction"], args["seed"])
    assert (train.indices, val.indices) == (old_train, old_val) and len(old_val) == 30
    assert [val[i] for i in range(len(val))] == [assets.lee_background()[i] for i in old_val]


def test_quickstart_contrastive_trains_on_the_rows_and_the_order_of_before():
    args = _data_args("configs/contrastive/gemma3-270m.yaml")
    dm = PairsDataModule(tokenizer="tiny-qwen3", sources=args["sources"], batch_size=args["batch_size"],
                         max_length=args["max_length"], val_fraction=args["val_fraction"])
    dm.setup("fit")
    for src, train, val in zip(dm.sources, dm.train_rows, dm.val_rows, strict=True):
        rows = load_rows(src)
        old_train, old_val = old_pairs_split(len(rows), args["val_fraction"], dm.seed)
        assert train == [rows[i] for i in old_train] and val == [rows[i] for i in old_val]
        assert len(val) == 15, src.name


@pytest.mark.parametrize("n", [50, 300])  # len(assets.lee_documents()), len(assets.lee_background())
@pytest.mark.parametrize("fraction", [0.02, 0.05, 0.1, 0.2, 0.25, 0.5])
def test_the_rule_is_each_old_rule_on_the_lee_corpora(n, fraction):
    """50 Lee test documents and 300 background articles: the text module's split always, the pairs split wherever
    fraction x n is a whole number (elsewhere pairs now round up, as the text module always did)."""
    rest, held = held_out_split(n, held_out_size(n, fraction), np.random.default_rng([0, 7919]))
    assert (sorted(rest), sorted(held)) == old_text_module_split(n, fraction, 0)
    if (fraction * n).is_integer():
        assert held_out_split(n, held_out_size(n, fraction), random.Random(0)) == old_pairs_split(n, fraction, 0)


def test_ubmoe_holds_out_the_same_tail_and_labelled_the_same_classes():
    docs = assets.lee_background()
    assert (len(assets.lee_documents()), len(docs)) == (50, 300)
    assert split_documents(None, 30) == (docs[:-30], docs[-30:])
    assert split_documents(None, 0) == (docs, [])
    labels = [int(label == "pos") for _, label in pang_lee_polarity()]
    for fraction in (0.1, 0.25, 0.5):
        assert stratified_split(labels, fraction, seed=3) == old_stratified_split(labels, fraction, 3)


def test_held_out_size_rounds_up_keeps_one_row_and_never_splits_a_single_row():
    assert [held_out_size(n, 0.1) for n in (0, 1, 2, 9, 10, 11, 64, 300)] == [0, 0, 1, 1, 1, 2, 7, 30]
    assert held_out_size(300, 0.0) == 0 and held_out_size(20, 0.25) == 5
    assert held_out_split(5, 2) == ([0, 1, 2], [3, 4])  # no generator: the tail, in source order
