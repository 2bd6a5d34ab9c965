"""DataModules of the UBMoE stages: contrastive pairs (stage 1) and packed causal-LM text (stage 2).

Both read documents through ``bidirlm_pl.data.sources`` (Lee corpus, text/JSONL/parquet files,
saved or cached ``datasets``) and hold out the last ``holdout`` documents of the source for
validation (``bidirlm_pl.data.splits`` without a generator), so a later evaluation can use exactly
the same held-out text (:func:`split_documents`).

Stage 1 batches: ``{"query": {input_ids, attention_mask}, "positive": {...}}`` (right padding).
Unsupervised SimCSE uses each document as its own positive: the two forward passes differ by
dropout noise only. For supervised pairs (JSONL, parquet, datasets; hard negatives; mixtures) stage 1
takes the contrastive stage's ``bidirlm_pl.data.pairs.PairsDataModule`` unchanged (same batches).

Stage 2 batches: packed rows ``{input_ids, position_ids, seq_ids}`` (see ``bidirlm_pl.data.packing``). Stage 2
reads one source, or a weighted mixture of several (``sources``, drawn by MNTP's
:class:`bidirlm_pl.data.mixture.Mixture`), e.g. Lee news beside the training passages of the built-in text
families (``kind: family``).

>>> dm = UBMoETextData(tokenizer="tiny-qwen3", max_length=64, batch_size=2)  # doctest: +SKIP
>>> dm.setup("fit"); next(iter(dm.train_dataloader()))["input_ids"].shape  # doctest: +SKIP
torch.Size([2, 64])
"""

from __future__ import annotations

import random

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.data.mixture import Mixture
from bidirlm_pl.data.packing import collate_rows, pack_documents, tokenize_documents
from bidirlm_pl.data.pairs import PairCollator, PairsDataModule, PairSource
from bidirlm_pl.data.sources import SourceSpec, TextSource, load_texts
from bidirlm_pl.data.splits import held_out_split
from bidirlm_pl.data.tokenizer import load_tokenizer
from bidirlm_pl.data.validation import rank_loader


def _lee() -> SourceSpec:
    return SourceSpec(name="lee", kind="lee")


def _spec(source: SourceSpec | dict | None) -> SourceSpec:
    return SourceSpec(**source) if isinstance(source, dict) else source or _lee()


def split_documents(source: SourceSpec | dict | None, holdout: int, tokenizer=None) -> tuple[list[str], list[str]]:
    """All documents of ``source`` split into (train, held-out = the last ``holdout`` documents).

    ``tokenizer`` renders a chat source's turns (``messages_field``) with its chat template.
    """
    docs = list(load_texts(_spec(source), tokenizer))
    if holdout < 0 or holdout >= len(docs):
        raise BidirLMError(f"holdout {holdout} must be >= 0 and below the source's {len(docs)} documents")
    train, held = held_out_split(len(docs), holdout)
    return [docs[i] for i in train], [docs[i] for i in held]


def _simcse_source(spec: SourceSpec) -> PairSource:
    """The stage-1 SimCSE source reading ``spec``'s documents (named ``simcse``, as the batch stream knows it)."""
    return PairSource(name="simcse", mode="simcse", kind=spec.kind, path=spec.path, dataset=spec.dataset,
                      config=spec.config, split=spec.split, data_files=spec.data_files, text_field=spec.text_field,
                      text_unit=spec.text_unit)


class UBMoEPairsData(PairsDataModule):
    """Stage-1 contrastive data: unsupervised SimCSE on documents, with a held-out tail for validation.

    The batches, their split over processes (global batches) and their exact resumption are those
    of :class:`bidirlm_pl.data.pairs.PairsDataModule` with one SimCSE source.

    Args:
        tokenizer: model folder or asset (linked to the model by the CLI).
        source: documents (default: the Lee background corpus).
        holdout: last documents of ``source`` kept for validation.
        max_length: truncation length; batch_size: pairs per batch (per process); seed: shuffling seed.
        global_batch_size: pairs per step over all processes (then ``batch_size`` = this / world size).
        resume_stream: see :class:`~bidirlm_pl.data.pairs.PairsDataModule`.
    """

    def __init__(
        self,
        tokenizer: str | None = None,
        source: SourceSpec | None = None,
        holdout: int = 30,
        max_length: int = 128,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        global_batch_size: int | None = None,
        resume_stream: bool = True,
    ):
        if batch_size < 2:
            raise BidirLMError(f"batch_size {batch_size} must be >= 2: InfoNCE needs in-batch negatives")
        self._documents = _spec(source)  # read whole by split_documents; `sources` names it for logs and cards
        super().__init__(tokenizer=tokenizer, sources=[_simcse_source(self._documents)],
                         batch_size=batch_size, max_length=max_length, num_workers=num_workers, seed=seed,
                         global_batch_size=global_batch_size, resume_stream=resume_stream)
        self.holdout = holdout

    def setup(self, stage: str | None = None) -> None:
        if self.train_rows is not None:
            return
        self.collator = PairCollator(load_tokenizer(self.tokenizer_name, owner=type(self).__name__), self.max_length)
        train_docs, val_docs = split_documents(self._documents, self.holdout)
        pairs = lambda docs: [{"anchor": d, "positive": d, "negatives": []} for d in docs]
        self.train_rows, self.val_rows = [pairs(train_docs)], [pairs(val_docs)] if len(val_docs) >= 2 else []
        self.val_row_sources = self.sources[:len(self.val_rows)]
        if len(train_docs) < self.batch_size:
            raise BidirLMError(f"{len(train_docs)} training pairs are fewer than batch_size {self.batch_size}")


class UBMoETextData(L.LightningDataModule):
    """Stage-2 causal-LM text, packed into rows of ``max_length`` tokens (documents never attend across).

    Args:
        tokenizer: model folder or asset (linked to the model by the CLI).
        source: documents (default: the Lee background corpus); chat data (``messages_field``) is rendered by
            this tokenizer's chat template, one document per conversation.
        sources: instead of ``source``, a weighted mixture (each source's ``weight``): the training documents are
            ``mixture_documents`` draws of the seeded mixture, each draw a source picked by weight, then its next
            document (a source read through wraps around), packed once and shuffled.
        mixture_documents: draws from the mixture (default: all training documents of the sources together).
        holdout: last documents of each source kept for validation (the held-out perplexity text).
        max_length: packed row length; batch_size: rows per batch; seed: row shuffling and mixture seed.
    """

    def __init__(
        self,
        tokenizer: str | None = None,
        source: SourceSpec | None = None,
        holdout: int = 30,
        max_length: int = 256,
        batch_size: int = 4,
        num_workers: int = 0,
        seed: int = 0,
        sources: list[SourceSpec] | None = None,
        mixture_documents: int | None = None,
    ):
        super().__init__()
        if source is not None and sources:
            raise BidirLMError("give 'source' (one source) or 'sources' (a weighted mixture), not both")
        specs = [_spec(s) for s in sources] if sources else [_spec(source)]
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise BidirLMError(f"source names {names} are not unique; give each source its own name")
        if mixture_documents is not None and mixture_documents < 1:
            raise BidirLMError(f"mixture_documents {mixture_documents} must be a positive number of documents")
        self.mixture_documents = mixture_documents
        self.mixture_counts: dict[str, int] = {}
        self.tokenizer_name, self.sources, self.holdout = tokenizer, specs, holdout
        self.max_length, self.batch_size, self.num_workers, self.seed = max_length, batch_size, num_workers, seed
        self.tokenizer = None

    def _rows(self, docs: list[str]):
        return list(pack_documents(tokenize_documents(self.tokenizer, docs), self.max_length))

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is not None:
            return
        self.tokenizer = load_tokenizer(self.tokenizer_name, owner=type(self).__name__)
        splits = [split_documents(spec, self.holdout, self.tokenizer) for spec in self.sources]
        train_docs = splits[0][0] if len(splits) == 1 else self._mixture([train for train, _ in splits])
        val_docs = [doc for _, held in splits for doc in held]
        self.train_rows = self._rows(train_docs)
        random.Random(self.seed).shuffle(self.train_rows)
        self.val_rows = self._rows(val_docs)
        if not self.train_rows:
            raise BidirLMError("the stage-2 text source yields no training rows")

    def _mixture(self, trains: list[list[str]]) -> list[str]:
        """The training documents drawn from the weighted mixture of the sources' training documents."""
        mixture = Mixture([TextSource(spec, docs=docs) for spec, docs in zip(self.sources, trains)], seed=self.seed)
        drawn = [mixture.next()[1] for _ in range(self.mixture_documents or sum(len(t) for t in trains))]
        self.mixture_counts = dict(zip(mixture.names, mixture.documents))
        rank_zero_info(f"stage-2 mixture: documents drawn per source {self.mixture_counts}")
        return drawn

    def collate(self, rows) -> dict[str, torch.Tensor]:
        return collate_rows(rows, max_length=self.max_length, pad_token_id=self.tokenizer.pad_token_id)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_rows, batch_size=self.batch_size, shuffle=True, generator=g,
                          collate_fn=self.collate, num_workers=self.num_workers)

    def val_dataloader(self):
        rows, size = self.val_rows or [], self.batch_size  # the one-process batches, shared out over the ranks
        return rank_loader([rows[i:i + size] for i in range(0, len(rows), size)], self, collate=self.collate)
