"""Pack tokenized documents into rows of ``max_length`` (padding-free batches) with document boundaries kept.

A packed row concatenates several documents. The batch convention of the whole project
(see ``bidirlm_pl.backbone.attention``):

* ``input_ids`` (B, T): tokens, ``pad_token_id`` after the last document of a row;
* ``position_ids`` (B, T): restart at 0 at every document (0 on padding);
* ``seq_ids`` (B, T): document index within the row (0, 1, ...), -1 on padding.

``BackboneStage.model_kwargs`` turns ``seq_ids`` into a block-diagonal mask (or varlen lengths), so a
token never attends across documents. A document longer than the room left in a row is split: the
part that fits closes the row and the rest starts the next row as its own segment (position 0), so
every segment is self-contained and the first token of a segment is never a prediction target of the
previous one (losses check ``seq_ids``). Segments shorter than ``min_segment`` tokens are not
emitted (the row is padded instead).

>>> from bidirlm_pl.data.packing import pack_documents
>>> rows = list(pack_documents([[1, 5, 6], [1, 7, 8, 9], [1, 4]], max_length=5))
>>> [r.input_ids for r in rows]
[[1, 5, 6, 1, 7], [8, 9, 1, 4]]
>>> collate_rows(rows, max_length=5, pad_token_id=0)["seq_ids"].tolist()
[[0, 0, 0, 1, 1], [0, 0, 1, 1, -1]]
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch


@dataclass
class PackedRow:
    """One row: concatenated segments; ``lengths`` are the segment lengths in order."""

    input_ids: list[int] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    sources: list[int] = field(default_factory=list)  # source index per segment (mixture bookkeeping)

    def __len__(self) -> int:
        return len(self.input_ids)


class Packer:
    """Streaming greedy packer. ``add(tokens)`` returns the rows completed by that document.

    ``split_documents=False`` moves a document that does not fit to the next row (documents longer
    than ``max_length`` are still cut into ``max_length`` pieces). Its state (the open row) is a small
    JSON-able dict, so a data pipeline can save and restore it mid-stream.
    """

    def __init__(self, max_length: int, *, split_documents: bool = True, min_segment: int = 2):
        assert max_length >= min_segment >= 1
        self.max_length = max_length
        self.split_documents = split_documents
        self.min_segment = min_segment
        self.row = PackedRow()

    def add(self, tokens: list[int], source: int = 0) -> list[PackedRow]:
        done: list[PackedRow] = []
        tokens = list(tokens)
        while len(tokens) >= self.min_segment:
            room = self.max_length - len(self.row)
            if room < self.min_segment or (not self.split_documents and len(tokens) > room
                                           and len(self.row) > 0):
                done.append(self._close())
                continue
            piece, tokens = tokens[:room], tokens[room:]
            self.row.input_ids.extend(piece)
            self.row.lengths.append(len(piece))
            self.row.sources.append(source)
            if len(self.row) == self.max_length:
                done.append(self._close())
        return done

    def flush(self) -> list[PackedRow]:
        """The open row, if any (end of a finite stream)."""
        return [self._close()] if len(self.row) else []

    def _close(self) -> PackedRow:
        row, self.row = self.row, PackedRow()
        return row

    def state_dict(self) -> dict:
        return {"input_ids": list(self.row.input_ids), "lengths": list(self.row.lengths),
                "sources": list(self.row.sources)}

    def load_state_dict(self, state: dict) -> None:
        self.row = PackedRow(list(state["input_ids"]), list(state["lengths"]), list(state["sources"]))


def pack_documents(
    token_lists: Iterable[list[int]], max_length: int, *, split_documents: bool = True, min_segment: int = 2
) -> Iterator[PackedRow]:
    """Greedily pack token lists into :class:`PackedRow` s of at most ``max_length`` tokens (last row partial).

    Use :func:`collate_rows` (or :func:`pack_batches`) to get tensors.
    """
    packer = Packer(max_length, split_documents=split_documents, min_segment=min_segment)
    for tokens in token_lists:
        yield from packer.add(tokens)
    yield from packer.flush()


def collate_rows(rows: list[PackedRow], *, max_length: int, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Rows -> ``{"input_ids", "position_ids", "seq_ids"}`` tensors of shape (B, max_length)."""
    B = len(rows)
    input_ids_BT = torch.full((B, max_length), pad_token_id, dtype=torch.long)
    position_ids_BT = torch.zeros((B, max_length), dtype=torch.long)
    seq_ids_BT = torch.full((B, max_length), -1, dtype=torch.long)
    for b, row in enumerate(rows):
        assert len(row) <= max_length and sum(row.lengths) == len(row)
        input_ids_BT[b, : len(row)] = torch.tensor(row.input_ids, dtype=torch.long)
        start = 0
        for k, n in enumerate(row.lengths):
            position_ids_BT[b, start:start + n] = torch.arange(n)
            seq_ids_BT[b, start:start + n] = k
            start += n
    return {"input_ids": input_ids_BT, "position_ids": position_ids_BT, "seq_ids": seq_ids_BT}


def pack_batches(
    token_lists: Iterable[list[int]], max_length: int, batch_size: int, *, pad_token_id: int,
    split_documents: bool = True, drop_last: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """Pack token lists and collate every ``batch_size`` rows into a packed batch dict.

    >>> batch = next(pack_batches([[1, 2, 3]] * 10, max_length=8, batch_size=2, pad_token_id=0))
    >>> batch["input_ids"].shape
    torch.Size([2, 8])
    """
    rows: list[PackedRow] = []
    for row in pack_documents(token_lists, max_length, split_documents=split_documents):
        rows.append(row)
        if len(rows) == batch_size:
            yield collate_rows(rows, max_length=max_length, pad_token_id=pad_token_id)
            rows = []
    if rows and not drop_last:
        yield collate_rows(rows, max_length=max_length, pad_token_id=pad_token_id)


def tokenize_documents(tokenizer, docs: list[str]) -> list[list[int]]:
    """Token ids per document, with the tokenizer's special tokens and an end-of-sequence token."""
    out = []
    for ids in tokenizer(docs, add_special_tokens=True)["input_ids"]:
        if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids = ids + [tokenizer.eos_token_id]
        out.append(ids)
    return out


def token_mask(batch) -> torch.Tensor | None:
    """(B, T) True on the real tokens (not padding) of a packed or padded batch; None when it says neither."""
    if not isinstance(batch, dict):
        return None
    if batch.get("seq_ids") is not None:
        return batch["seq_ids"] >= 0
    if batch.get("attention_mask") is not None:
        return batch["attention_mask"].bool()
    return None
