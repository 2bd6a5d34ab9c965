"""Contrastive data: (anchor, positive[, hard negatives]) rows, SimCSE from raw text, weighted mixtures.

Each :class:`PairSource` yields rows ``{"anchor", "positive", "negatives"}``:

* ``mode: pairs`` reads JSONL, parquet, a saved ``datasets`` folder or ``datasets.load_dataset``
  (local builders, or hub ids such as ``sentence-transformers/all-nli``, online or cached); fields are named by ``anchor_field``, ``positive_field``
  and ``negatives_field`` (a list of strings, or one string per row).
* ``mode: simcse`` reads raw documents (any kind of :mod:`bidirlm_pl.data.sources`: txt, JSONL,
  parquet, datasets, Lee) and uses each text as its own positive; dropout is the only noise, so set
  the stage's ``attention_dropout`` (LLM2Vec uses 0.3).
* ``mode: halves`` (raw documents too) pairs the first half of each document's sentences with the
  second half: a weak supervised signal derived from any corpus.

Every row is checked before training: a missing or empty anchor/positive, or a hard-negative count
other than ``num_negatives`` when ``fixed_negatives`` is set, is a one-line error naming source and row.

Batches come from one source at a time; the source of each batch is drawn with probability
proportional to its ``weight``. A batch is a dict of three padded (right-padded) groups ``query``,
``positive`` and ``negatives`` (B*N rows, row i's negatives contiguous), each with ``input_ids``,
``attention_mask`` and ``pool_mask`` (attention mask with the instruction prefix zeroed).

>>> dm = PairsDataModule(tokenizer="tiny-qwen3", sources=[PairSource(name="lee", kind="lee", mode="simcse")],
...                      batch_size=4)
>>> dm.setup("fit"); batch = next(iter(dm.train_dataloader()))  # doctest: +SKIP
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from functools import partial

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.core.hub import load_dataset
from bidirlm_pl.data import sources as text_sources
from bidirlm_pl.data.global_batches import (
    STATE_KEY,
    ResumableStream,
    rank_rows,
    world_of,
)
from bidirlm_pl.data.splits import held_out_size, held_out_split
from bidirlm_pl.data.tokenizer import load_tokenizer
from bidirlm_pl.data.validation import global_batch_shares, rank_loader
from bidirlm_pl.models.encoder import prompt_length

MODES = ("pairs", "simcse", "halves")


@dataclass
class PairSource:
    """One contrastive dataset of a mixture.

    Args:
        name: short name used in errors and logs.
        mode: ``pairs`` (anchor/positive/negatives columns), ``simcse`` or ``halves`` (raw text).
        kind, path, dataset, config, split, data_files, text_field, text_unit: where rows come from,
            as in :class:`bidirlm_pl.data.sources.SourceSpec` (``text_field`` for raw-text modes).
        weight: probability weight of drawing a batch from this source (> 0).
        anchor_field, positive_field, negatives_field: column names in ``pairs`` mode.
        num_negatives: hard negatives per row used in training (0 = in-batch negatives only).
        fixed_negatives: every row must carry exactly ``num_negatives`` negatives; otherwise rows may
            carry more (the first ``num_negatives`` are used) but never fewer.
        query_instruction: text prepended to every anchor, excluded from pooling (e.g. ``"Instruct: ...\\nQuery: "``).
        max_rows: use only the first rows (smoke runs).
    """

    name: str
    mode: str = "pairs"
    kind: str = "auto"
    path: str | None = None
    dataset: str | None = None
    config: str | None = None
    split: str = "train"
    data_files: list[str] | None = None
    text_field: str = "text"
    text_unit: str = "line"
    weight: float = 1.0
    anchor_field: str = "anchor"
    positive_field: str = "positive"
    negatives_field: str = "negatives"
    num_negatives: int = 0
    fixed_negatives: bool = True
    query_instruction: str | None = None
    max_rows: int | None = None


def _text_spec(src: PairSource) -> text_sources.SourceSpec:
    return text_sources.SourceSpec(
        name=src.name, kind=src.kind, path=src.path, dataset=src.dataset, config=src.config,
        data_files=src.data_files, text_field=src.text_field, split=src.split, text_unit=src.text_unit,
    )


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


def _halves(text: str) -> tuple[str, str] | None:
    sentences = _sentences(text)
    if len(sentences) < 2:
        return None
    mid = len(sentences) // 2
    return " ".join(sentences[:mid]), " ".join(sentences[mid:])


def _pair_table(src: PairSource):
    """The rows of a ``pairs`` source as a ``datasets.Dataset`` (or a list of dicts)."""
    import datasets

    spec = _text_spec(src)
    kind = text_sources.resolve_kind(spec)
    try:
        if kind in ("jsonl", "parquet"):
            files = text_sources._files(spec, kind)
            if kind == "jsonl":
                for f in files:
                    text_sources.scan_jsonl(f, None)
            table = datasets.load_dataset("json" if kind == "jsonl" else "parquet", data_files=files, split="train")
        elif kind == "disk":
            table = datasets.load_from_disk(str(src.path))
        elif kind == "hf":
            table = load_dataset(src.dataset, name=src.config, split=src.split, data_files=src.data_files,
                                 what=f"source '{src.name}': dataset '{src.dataset}'")
        else:
            raise BidirLMError(f"source '{src.name}': mode 'pairs' reads jsonl, parquet, disk or hf, not '{kind}'")
    except BidirLMError:
        raise
    except Exception as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise BidirLMError(f"source '{src.name}': cannot read pairs from {src.path or src.dataset}: {first}") from err
    if isinstance(table, datasets.DatasetDict):
        if src.split not in table:
            raise BidirLMError(f"source '{src.name}': split '{src.split}' is not one of {sorted(table)}")
        table = table[src.split]
    return table


def check_row(src: PairSource, index: int, row: dict) -> dict:
    """Validate one ``pairs`` row and return ``{"anchor", "positive", "negatives"}``, or raise naming the row."""
    where = f"source '{src.name}' row {index}"
    out = {}
    for key, field in (("anchor", src.anchor_field), ("positive", src.positive_field)):
        value = row.get(field)
        if value is None:
            raise BidirLMError(f"{where} has no '{field}' (the {key}); columns are {sorted(row)}")
        if not isinstance(value, str) or not value.strip():
            raise BidirLMError(f"{where} has an empty '{field}' (the {key}); expected a non-empty string")
        out[key] = value
    negatives = row.get(src.negatives_field)
    if negatives is None:
        negatives = []
    elif isinstance(negatives, str):
        negatives = [negatives]
    for k, neg in enumerate(negatives):
        if not isinstance(neg, str) or not neg.strip():
            raise BidirLMError(f"{where} has an empty hard negative at '{src.negatives_field}'[{k}]")
    if src.num_negatives:
        if src.fixed_negatives and len(negatives) != src.num_negatives:
            raise BidirLMError(
                f"{where} has {len(negatives)} hard negatives; num_negatives is fixed at {src.num_negatives} "
                "(set fixed_negatives: false to allow more per row)"
            )
        if len(negatives) < src.num_negatives:
            raise BidirLMError(f"{where} has {len(negatives)} hard negatives, fewer than num_negatives "
                               f"{src.num_negatives}")
    out["negatives"] = list(negatives[: src.num_negatives])
    return out


RAW_TEXT_ONLY = {"text_field", "text_unit"}
PAIRS_ONLY = {"anchor_field", "positive_field", "negatives_field", "num_negatives", "fixed_negatives"}


def check_mode_fields(src: PairSource) -> None:
    """A one-line error when a source sets fields its ``mode`` does not read."""
    given = text_sources.given_fields(src)
    wrong = sorted((RAW_TEXT_ONLY if src.mode == "pairs" else PAIRS_ONLY) & set(given))
    if wrong:
        reads = "anchor/positive/negatives columns" if src.mode == "pairs" else "raw text (text_field, text_unit)"
        shown = ", ".join(f"{k}={given[k]!r}" for k in wrong)
        raise BidirLMError(f"source '{src.name}': mode '{src.mode}' reads {reads} and takes no {wrong} "
                           f"(given {shown}); on the command line give each source's 'mode' too")


def load_rows(src: PairSource) -> list[dict]:
    """All rows of a source, validated: ``[{"anchor", "positive", "negatives"}]``."""
    if src.mode not in MODES:
        raise BidirLMError(f"source '{src.name}': mode '{src.mode}' is not one of {list(MODES)}")
    if not src.weight > 0:
        raise BidirLMError(f"source '{src.name}': weight {src.weight} must be > 0")
    if src.num_negatives < 0:
        raise BidirLMError(f"source '{src.name}': num_negatives {src.num_negatives} must be >= 0")
    check_mode_fields(src)
    rows: list[dict] = []
    if src.mode == "pairs":
        table = _pair_table(src)
        n = len(table) if src.max_rows is None else min(len(table), src.max_rows)
        for i in range(n):
            rows.append(check_row(src, i, dict(table[i])))
    else:
        if src.num_negatives:
            raise BidirLMError(f"source '{src.name}': mode '{src.mode}' has no hard negatives; set num_negatives: 0")
        for text in text_sources.load_texts(_text_spec(src)):
            if src.max_rows is not None and len(rows) >= src.max_rows:
                break
            if src.mode == "simcse":
                rows.append({"anchor": text, "positive": text, "negatives": []})
            else:
                pair = _halves(text)
                if pair is not None:
                    rows.append({"anchor": pair[0], "positive": pair[1], "negatives": []})
    if not rows:
        raise BidirLMError(f"source '{src.name}' has no usable rows")
    return rows


# ---------------------------------------------------------------- tokenization

class PairCollator:
    """Tokenize rows into right-padded query/positive/negative groups with pooling masks."""

    def __init__(self, tokenizer, max_length: int = 128):
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "right"
        self.max_length = max_length
        self._prefix_cache: dict[str, int] = {}

    def prefix_length(self, instruction: str | None) -> int:
        """Tokens of the instruction alone (with special tokens, as sentence-transformers counts a prompt)."""

        if instruction not in self._prefix_cache:
            self._prefix_cache[instruction] = prompt_length(self.tokenizer, instruction)
        return self._prefix_cache[instruction]

    def encode(self, texts: list[str], instruction: str | None = None) -> dict[str, torch.Tensor]:
        full = [(instruction or "") + t for t in texts]
        enc = self.tokenizer(full, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        prefix = self.prefix_length(instruction)
        mask = enc["attention_mask"].clone()
        if prefix:
            lengths = mask.sum(1)
            # never pool zero tokens: keep at least the last token of a truncated text
            cut = torch.clamp(torch.full_like(lengths, prefix), max=lengths - 1)
            mask[torch.arange(mask.shape[1])[None] < cut[:, None]] = 0
        out["pool_mask"] = mask
        return out

    def __call__(self, rows: list[dict], instruction: str | None = None) -> dict:
        batch = {
            "query": self.encode([r["anchor"] for r in rows], instruction),
            "positive": self.encode([r["positive"] for r in rows]),
        }
        n = len(rows[0]["negatives"])
        assert all(len(r["negatives"]) == n for r in rows), "rows of one source carry one negative count"
        if n:
            batch["negatives"] = self.encode([neg for r in rows for neg in r["negatives"]])
        batch["n_negatives"] = n
        return batch


# ---------------------------------------------------------------- mixture of sources, one source per batch

class SourceBatches(IterableDataset):
    """Training batches, each drawn from one source chosen with probability proportional to its weight.

    The plan is made of *global* batches (``batch_size * world_size`` rows of one source) and rank
    ``r`` collates its contiguous slice of each (``bidirlm_pl.data.global_batches``). An epoch has
    ``sum(len(rows_i) // global_batch)`` batches (at least one per source); each source is reshuffled
    when exhausted. Dataloader workers take every ``num_workers``-th batch. Each batch carries the
    stream position after it (``epoch``, ``index``) for exact resumption: iteration starts at
    ``start`` and later epochs at their beginning. (Validation batches: ``PairsDataModule.val_dataloader``.)
    """

    def __init__(self, sources: list[PairSource], rows: list[list[dict]], collator: PairCollator,
                 batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 start: tuple[int, int] = (0, 0), signature: dict | None = None):
        self.sources, self.rows, self.collator = sources, rows, collator
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.global_batch = batch_size * world_size
        self.epoch, self.start_index = start
        self.signature = signature
        self.total = sum(max(1, len(r) // self.global_batch) for r in rows)

    def __len__(self) -> int:
        return max(1, self.total)

    def plan(self, epoch: int) -> list[tuple[int, list[int]]]:
        """(source index, row indices) of every global batch of an epoch, identical on every rank: the
        source of each batch drawn by weight, the rows of each source shuffled."""
        size = self.global_batch
        rng = random.Random(self.seed * 1_000_003 + epoch)
        weights = [s.weight for s in self.sources]
        orders: list[list[int]] = [[] for _ in self.rows]
        plan = []
        for _ in range(self.total):
            s = rng.choices(range(len(self.sources)), weights=weights)[0]
            n = len(self.rows[s])
            take = min(size, n)
            if len(orders[s]) < take:
                fresh = list(range(n))
                rng.shuffle(fresh)
                orders[s].extend(fresh)
            plan.append((s, orders[s][:take]))
            del orders[s][:take]
        return plan

    def __iter__(self) -> Iterator[dict]:
        epoch, first = self.epoch, self.start_index
        self.epoch, self.start_index = epoch + 1, 0
        plan = self.plan(epoch)
        worker = get_worker_info()
        shards, shard = (worker.num_workers, worker.id) if worker is not None else (1, 0)
        for k in range(first, len(plan)):
            if (k - first) % shards != shard:
                continue
            s, idx = plan[k]
            full = len(idx) == self.global_batch
            mine = idx[rank_rows(len(idx), self.rank, self.world_size, self.batch_size if full else None)]
            if not mine:
                continue  # a source smaller than the world: no rank gets a row
            batch = self.collator([self.rows[s][i] for i in mine], self.sources[s].query_instruction)
            batch["source"] = s
            after = (epoch, k + 1) if k + 1 < len(plan) else (epoch + 1, 0)
            batch[STATE_KEY] = {"epoch": after[0], "index": after[1], "signature": self.signature}
            yield batch


class PairsDataModule(ResumableStream, L.LightningDataModule):
    """Contrastive pairs for ``ContrastiveStage``: a weighted mixture of pair/SimCSE sources.

    Args:
        tokenizer: model folder or asset name whose tokenizer to use (linked to the model by the CLI).
        sources: the training sources (see :class:`PairSource`).
        val_sources: optional held-out sources; otherwise ``val_fraction`` of each source's rows
            (``bidirlm_pl.data.splits``: at least one row of every source of two rows or more).
        batch_size: rows per batch (per device); the global batch (every device's rows, drawn from one
            source) is what the loss sees when it gathers across devices.
        global_batch_size: rows per step over all devices (then ``batch_size`` = this / world size).
        max_length: token limit per text (truncation).
        val_fraction: share of each training source held out for validation (0 disables validation).
        num_workers: dataloader workers.
        seed: shuffling seed.
        resume_stream: on resume, continue the checkpoint's batch stream exactly (its data config must
            be unchanged); ``false`` keeps the trained weights and starts a fresh stream.
    """

    def __init__(self, tokenizer: str | None = None, sources: list[PairSource] | None = None,
                 val_sources: list[PairSource] | None = None, batch_size: int = 32, max_length: int = 128,
                 val_fraction: float = 0.0, num_workers: int = 0, seed: int = 0,
                 global_batch_size: int | None = None, resume_stream: bool = True):
        super().__init__()
        if not sources:
            raise BidirLMError("PairsDataModule needs at least one source in 'sources'")
        if batch_size < 1:
            raise BidirLMError(f"batch_size {batch_size} must be >= 1")
        if not 0 <= val_fraction < 1:
            raise BidirLMError(f"val_fraction {val_fraction} must be in [0, 1)")
        self.tokenizer_name = tokenizer
        self.sources = [PairSource(**s) if isinstance(s, dict) else s for s in sources]
        self.val_sources = [PairSource(**s) if isinstance(s, dict) else s for s in (val_sources or [])]
        for src in self.sources + self.val_sources:  # contradictory fields fail before any model or data loads
            check_mode_fields(src)
            text_sources.resolve_kind(_text_spec(src))
        self.batch_size, self.max_length = batch_size, max_length
        self.val_fraction, self.num_workers, self.seed = val_fraction, num_workers, seed
        self.global_batch_size = global_batch_size
        self.init_stream(resume_stream)
        self.train_rows = self.val_rows = None
        self.val_row_sources: list[PairSource] = []  # the source of each list in val_rows
        self.save_hyperparameters({"sources": [asdict(s) for s in self.sources]})

    def setup(self, stage: str | None = None):
        if self.train_rows is not None:
            return
        self.collator = PairCollator(load_tokenizer(self.tokenizer_name, owner=type(self).__name__), self.max_length)
        self.train_rows, self.val_rows, self.val_row_sources = [], [], []
        for src in self.sources:
            rows = load_rows(src)
            size = 0 if self.val_sources else held_out_size(len(rows), self.val_fraction)
            if size:  # a source of one row holds none out: val_row_sources says whose rows val_rows holds
                rest, held = held_out_split(len(rows), size, random.Random(self.seed))
                self.val_rows.append([rows[i] for i in held])
                self.val_row_sources.append(src)
                rows = [rows[i] for i in rest]
            self.train_rows.append(rows)
        if self.val_sources:
            self.val_rows = [load_rows(src) for src in self.val_sources]
            self.val_row_sources = list(self.val_sources)
        self._report_sources()

    def _report_sources(self) -> None:
        """One line per source at start: its mode, resolved kind, where rows come from and how many."""
        for role, specs, tables in (("train", self.sources, self.train_rows),
                                    ("validation", self.val_row_sources, self.val_rows)):
            for src, rows in zip(specs, tables):
                kind = text_sources.resolve_kind(_text_spec(src))
                where = src.path or src.dataset or ("gensim lee_background.cor" if kind == "lee" else "gensim lee.cor")
                rank_zero_info(f"data: {role} source '{src.name}': mode {src.mode}, kind {kind}, {where}, "
                               f"{len(rows)} rows")

    stream_name = "pair batch stream"

    def stream_sources(self) -> list[tuple[str, float]]:
        self.setup("fit")
        return [(s.name, s.weight) for s in self.sources]

    def stream_details(self) -> dict:
        return {"rows": [len(r) for r in self.train_rows] if self.train_rows is not None else None}

    def _loader(self, dataset):
        return DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self):
        world, rank = world_of(self)
        per_rank = self.per_rank_batch_size()
        start = self.stream_start() or {"epoch": 0, "index": 0}
        self._train = SourceBatches(self.sources, self.train_rows, self.collator, per_rank, self.seed,
                                    rank=rank, world_size=world,
                                    start=(int(start["epoch"]), int(start["index"])),
                                    signature=self.stream_signature())
        return self._loader(self._train)

    def val_dataloader(self):
        """Each validation source in order, rows in order, in global batches that every rank takes its slice of
        (InfoNCE gathers them: data/validation.py), each with its own source's ``query_instruction``."""
        sets = [(src, rows) for src, rows in zip(self.val_row_sources, self.val_rows or []) if rows]
        world = world_of(self)[0]
        per_rank = self.per_rank_batch_size()
        items = [(s, part) for s, (_, rows) in enumerate(sets)
                 for part in global_batch_shares(len(rows), per_rank, world)]
        return rank_loader(items, self, collate=partial(_collate_validation, self.collator, sets))


def _collate_validation(collator: PairCollator, sets: list[tuple[PairSource, list[dict]]], item) -> dict:
    s, part = item
    source, rows = sets[s]
    batch = collator([rows[i] for i in part], source.query_instruction)
    batch["source"] = s
    return batch
