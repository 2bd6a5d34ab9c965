"""TextDataModule: weighted text mixture -> tokenize -> pack -> MNTP mask, deterministic and resumable.

Training batches come from an endless stream (bound the run with ``trainer.max_steps``); each batch
is a packed dict (``input_ids``, ``position_ids``, ``seq_ids``, ``labels``; see
``bidirlm_pl.data.packing``). Every batch is a pure function of ``seed`` and the stream state, and
the state *after* the batch the trainer actually consumed is what :meth:`TextDataModule.state_dict`
returns (Lightning stores it in checkpoints), so resuming mid-epoch continues with exactly the next
batches of the uninterrupted run, whatever the loader prefetched. With several processes the stream
is produced in global batches (rounds) that are collated and masked whole, and rank ``r`` trains on
its slice of each round (``bidirlm_pl.data.global_batches``), so W processes x B rows see exactly the
rows and masks of 1 process x W*B rows.
With ``split_documents`` (the default) every training row is full (no padding): a document that does
not fit is continued in the next row as its own segment, and a one-token remainder of a row holds a
one-token segment (never masked, never a target), so ``flash_attention_2`` (varlen, batch size 1,
no padding) can train on it.

Validation uses ``val_sources`` if given, else a seeded ``val_fraction`` of every random-access
source (held out of training), packed and masked once with a fixed seed.

>>> dm = TextDataModule("tiny-qwen3", sources=[SourceSpec("lee", kind="lee")], max_length=64,
...                     batch_size=2)  # doctest: +SKIP
>>> dm.setup("fit"); batch = next(iter(dm.train_dataloader()))  # doctest: +SKIP
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, IterableDataset
from transformers import AutoConfig

from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.data.global_batches import (
    STATE_KEY,
    ResumableStream,
    rank_rows,
    world_of,
)
from bidirlm_pl.data.masking import Masker, MaskSpec, replacement_ids, resolve_mask_token, special_token_ids
from bidirlm_pl.data.mixture import Mixture, normalised_weights
from bidirlm_pl.data.packing import PackedRow, Packer, collate_rows
from bidirlm_pl.data.sources import (
    SourceSpec,
    TextSource,
    describe_source,
    first_documents,
    open_source,
    resolve_kind,
)
from bidirlm_pl.data.splits import held_out_size, held_out_split
from bidirlm_pl.data.tokenizer import load_tokenizer
from bidirlm_pl.data.validation import rank_loader

SHORT_DOCUMENT_POLICIES = ("error", "skip")


class _Subset:
    """Random access to chosen indices of a sequence."""

    def __init__(self, docs, indices):
        self.docs, self.indices = docs, [int(i) for i in indices]

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.docs[self.indices[i]]


class _Stream(IterableDataset):
    def __init__(self, make_iterator):
        self.make_iterator = make_iterator

    def __iter__(self):
        return self.make_iterator()


def _identity(batch):
    return batch


def _row_to_dict(row: PackedRow) -> dict:
    return {"input_ids": row.input_ids, "lengths": row.lengths, "sources": row.sources}


class TextDataModule(ResumableStream, L.LightningDataModule):
    """Text for MNTP (and any packed-text stage): sources, mixture, packing, masking.

    Args:
        tokenizer: model folder or asset name whose tokenizer to use (linked from ``model.init_args.backbone.model``).
        sources: weighted named sources (:class:`SourceSpec`).
        max_length: tokens per packed row (at most the model's ``max_position_embeddings``).
        batch_size: rows per batch (per process).
        global_batch_size: rows per step over all processes (then ``batch_size`` = this / world size).
        val_sources: held-out sources; when empty, ``val_fraction`` of each random-access source.
        val_fraction: share of each random-access source held out for validation (0 = none).
        val_max_batches: cap on validation batches.
        seed: seeds the mixture, the held-out split and the masks.
        mask: the :class:`MaskSpec` (ratio, replacement, mask token, schedule); ``None`` = defaults.
        split_documents: split a document across rows (else move it to the next row).
        append_eos: append the EOS token to every document.
        short_documents: ``error`` (default) or ``skip`` for documents under 2 tokens.
        check_documents: documents per source tokenized before training to catch bad input.
        resume_stream: on resume, continue the checkpoint's stream exactly (its data config must be
            unchanged); ``false`` keeps the trained weights and starts a fresh stream.
    """

    def __init__(
        self,
        tokenizer: str | None = None,
        sources: list[SourceSpec] | None = None,
        max_length: int = 512,
        batch_size: int = 8,
        val_sources: list[SourceSpec] | None = None,
        val_fraction: float = 0.05,
        val_max_batches: int = 50,
        seed: int = 0,
        mask: MaskSpec | None = None,
        split_documents: bool = True,
        append_eos: bool = False,
        short_documents: str = "error",
        check_documents: int = 1000,
        global_batch_size: int | None = None,
        resume_stream: bool = True,
    ):
        super().__init__()
        self.tokenizer_name = tokenizer
        self.sources = [SourceSpec(**s) if isinstance(s, dict) else s for s in (sources or [])]
        self.val_sources = [SourceSpec(**s) if isinstance(s, dict) else s for s in (val_sources or [])]
        for spec in self.sources + self.val_sources:
            resolve_kind(spec)  # contradictory fields fail here, before any model or data loads
        self.max_length = int(max_length)
        self.batch_size = int(batch_size)
        self.global_batch_size = global_batch_size
        self.init_stream(resume_stream)
        self.val_fraction = float(val_fraction)
        self.val_max_batches = int(val_max_batches)
        self.seed = int(seed)
        self.mask_spec = mask if mask is not None else MaskSpec()
        if isinstance(self.mask_spec, dict):
            self.mask_spec = MaskSpec(**self.mask_spec)
        self.split_documents = split_documents
        self.append_eos = append_eos
        self.short_documents = short_documents
        self.check_documents = int(check_documents)
        self.tokenizer = None
        self.masker: Masker | None = None
        self._train_sources: list[TextSource] = []
        self._val_batches: list[dict] = []
        self.realised_proportions: dict = {}
        self._check_arguments()
        if tokenizer is not None:
            self.prepare()

    # ------------------------------------------------------------------ checks (before training)
    def _check_arguments(self) -> None:
        if not self.sources:
            raise BidirLMError("data 'sources' is empty; add at least one source (e.g. {name: lee, kind: lee})")
        if self.max_length < 2:
            raise BidirLMError(f"max_length {self.max_length} is below 2; MNTP needs at least 2 tokens per row")
        if self.batch_size < 1:
            raise BidirLMError(f"batch_size {self.batch_size} must be at least 1")
        if not 0.0 <= self.val_fraction < 1.0:
            raise BidirLMError(f"val_fraction {self.val_fraction} is outside [0, 1)")
        if self.short_documents not in SHORT_DOCUMENT_POLICIES:
            raise BidirLMError(
                f"short_documents '{self.short_documents}' is not one of {list(SHORT_DOCUMENT_POLICIES)}"
            )
        self.mask_spec.validate()
        normalised_weights([s.name for s in self.sources], [float(s.weight) for s in self.sources])

    def prepare(self) -> None:
        """Load the tokenizer, open every source and check it; raise a one-line error on bad input."""
        if self.masker is not None:
            return
        self.tokenizer = load_tokenizer(self.tokenizer_name, owner="TextDataModule")
        config = AutoConfig.from_pretrained(self.tokenizer.name_or_path)
        config = getattr(config, "text_config", None) or config
        limit = getattr(config, "max_position_embeddings", None)
        if limit is not None and self.max_length > limit:
            raise BidirLMError(
                f"max_length {self.max_length} exceeds the model's limit {limit} (max_position_embeddings of "
                f"'{self.tokenizer_name}')"
            )
        vocab_size = int(getattr(config, "vocab_size", len(self.tokenizer)))
        mask_id = resolve_mask_token(self.tokenizer, self.mask_spec.mask_token, vocab_size=vocab_size,
                                     model=f"'{self.tokenizer_name}'")
        specials = special_token_ids(self.tokenizer)
        self.pad_token_id = self.tokenizer.pad_token_id
        if self.pad_token_id is None:
            self.pad_token_id = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        self.masker = Masker(self.mask_spec, mask_token_id=mask_id, special_ids=specials, vocab_size=vocab_size,
                             candidates=replacement_ids(self.tokenizer, specials, vocab_size))
        train, val = self._open_sources()
        self._train_sources = train
        self._val_batches = self._build_val_batches(val)

    def _open_sources(self) -> tuple[list[TextSource], list[TextSource]]:
        train, val = [], []
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise BidirLMError(f"source names {names} are not unique; give each source its own name")
        for spec in self.sources:
            source = open_source(spec, self.tokenizer)
            self._check_source(source)
            if self.val_fraction > 0 and not self.val_sources and source.random_access:
                n = len(source.docs)
                rest, held = held_out_split(n, held_out_size(n, self.val_fraction),
                                            np.random.default_rng([self.seed, 7919]))
                # both parts are views of the source in its own order
                val.append(TextSource(spec, docs=_Subset(source.docs, sorted(held))))
                source = TextSource(spec, docs=_Subset(source.docs, sorted(rest)))
            train.append(source)
        for spec in self.val_sources:
            source = open_source(spec, self.tokenizer)
            self._check_source(source)
            val.append(source)
        for role, sources in (("train", train), ("validation", val)):
            for source in sources:
                rank_zero_info(f"data: {role} {describe_source(source)}")
        return train, val

    def _check_source(self, source: TextSource) -> None:
        docs = first_documents(source, self.check_documents)
        if not docs:
            raise BidirLMError(f"source '{source.name}' has no documents (empty dataset)")
        if self.short_documents == "error":
            for i, doc in enumerate(docs):
                n = len(self.tokenize(doc))
                if n < 2:
                    raise BidirLMError(
                        f"source '{source.name}': document {i} ({doc[:40]!r}) has {n} token(s); MNTP needs at "
                        "least 2 per document (remove it or set short_documents: skip)"
                    )

    def tokenize(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"]
        if self.append_eos and self.tokenizer.eos_token_id is not None and (not ids or ids[-1] != self.tokenizer.eos_token_id):
            ids = ids + [self.tokenizer.eos_token_id]
        return ids

    def _usable(self, source_name: str, ids: list[int], text: str) -> bool:
        if len(ids) >= 2:
            return True
        if self.short_documents == "error":
            raise BidirLMError(f"source '{source_name}': a document ({text[:40]!r}) has {len(ids)} token(s); "
                               "MNTP needs at least 2 (set short_documents: skip)")
        return False

    # ------------------------------------------------------------------ streams
    def _world(self) -> tuple[int, int]:
        return world_of(self)

    def stream_sources(self) -> list[tuple[str, float]]:
        self.prepare()
        return [(s.name, s.spec.weight) for s in self._train_sources]

    def stream_details(self) -> dict:
        return {"max_length": self.max_length}

    def _mask_generator(self, stream: int, index: int) -> torch.Generator:
        return torch.Generator().manual_seed(int(self.seed) * 1_000_003 + stream * 7_777_777 + index)

    def train_batches(self, state: dict | None = None) -> Iterator[dict]:
        """The endless training stream from ``state`` (None = the start); each batch carries its state.

        The state after a batch is under ``batch["_stream_state"]``; pass it back to resume.
        """
        self.prepare()
        world, rank = self._world()
        per_rank = self.per_rank_batch_size()
        signature = self.stream_signature()
        mixture = Mixture(self._train_sources, seed=self.seed)
        # min_segment=1: a row never ends with padding when documents split (flash varlen needs full rows)
        packer = Packer(self.max_length, split_documents=self.split_documents, min_segment=1)
        pending: list[PackedRow] = []
        rounds = 0
        if state is not None:
            mixture.load_state_dict(state["mixture"])
            packer.load_state_dict(state["packer"])
            pending = [PackedRow(list(r["input_ids"]), list(r["lengths"]), list(r["sources"]))
                       for r in state["pending"]]
            rounds = int(state["rounds"])
        while True:
            need = per_rank * world
            while len(pending) < need:
                index, text = mixture.next()
                ids = self.tokenize(text)
                if not self._usable(mixture.names[index], ids, text):
                    continue
                mixture.count_tokens(index, len(ids))
                pending.extend(packer.add(ids, source=index))
            rows, pending = pending[:need], pending[need:]
            # collate and mask the whole global batch, then keep this rank's rows: masks do not depend on W
            batch = collate_rows(rows, max_length=self.max_length, pad_token_id=self.pad_token_id)
            batch = self.masker(batch, generator=self._mask_generator(0, rounds), ratio=self.mask_spec.ratio_at(rounds))
            mine = rank_rows(need, rank, world, per_rank)
            batch = {k: (v[mine] if torch.is_tensor(v) else v) for k, v in batch.items()}
            rounds += 1
            batch[STATE_KEY] = {
                "split": "train", "rounds": rounds, "mixture": copy.deepcopy(mixture.state_dict()),
                "packer": packer.state_dict(), "pending": [_row_to_dict(r) for r in pending],
                "proportions": mixture.proportions(), "signature": signature,
            }
            yield batch

    def _build_val_batches(self, sources: list[TextSource]) -> list[dict]:
        if not sources:
            return []
        rows: list[PackedRow] = []
        limit = self.val_max_batches * self.batch_size
        packer = Packer(self.max_length, split_documents=self.split_documents, min_segment=1)
        for source in sources:
            for doc in source:
                if len(rows) >= limit:
                    break
                ids = self.tokenize(doc) if doc.strip() else []
                if len(ids) >= 2:
                    rows.extend(packer.add(ids))
        if not rows:  # keep a partial row only when it is all there is (varlen backends want full rows)
            rows.extend(packer.flush())
        rows = rows[:limit]
        batches = []
        for i in range(0, len(rows), self.batch_size):
            batch = collate_rows(rows[i:i + self.batch_size], max_length=self.max_length,
                                 pad_token_id=self.pad_token_id)
            batches.append(self.masker(batch, generator=self._mask_generator(1, i)))
        return batches

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, stage: str | None = None) -> None:
        self.prepare()
        trainer = getattr(self, "trainer", None)
        if stage == "fit" and trainer is not None and trainer.max_steps in (None, -1):
            raise BidirLMError("the text stream is endless: set trainer.max_steps (e.g. --trainer.max_steps 1000)")

    def train_dataloader(self):
        return DataLoader(_Stream(lambda: self.train_batches(self.stream_start())),
                          batch_size=None,
                          collate_fn=_identity)

    def val_dataloader(self):
        return rank_loader(self._val_batches, self)

    def test_dataloader(self):
        return self.val_dataloader()

    stream_name = "text stream"

    def on_stream_state(self, state: dict) -> None:
        self.realised_proportions = state["proportions"]
        self._log_proportions(state)

    def _log_proportions(self, state: dict) -> None:
        trainer = getattr(self, "trainer", None)
        if trainer is None or not trainer.loggers or not trainer.is_global_zero:
            return
        every = max(1, int(getattr(trainer, "log_every_n_steps", 50)))
        if (state["rounds"] - 1) % every:
            return
        metrics = {}
        for name, shares in state["proportions"].items():
            metrics[f"data/{name}/documents"] = shares["documents"]
            metrics[f"data/{name}/tokens"] = shares["tokens"]
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
