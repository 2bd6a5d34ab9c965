"""Packing: every token lands once, in order; documents never cross; segments restart positions."""

import random

import pytest
import torch

from bidirlm_pl.data.packing import Packer, collate_rows, pack_batches, pack_documents
from bidirlm_pl.losses.token import prediction_mask


def document_starts(seq_ids_BT: torch.Tensor) -> torch.Tensor:
    """Boolean (B, T): True where a new document (segment) begins, False on padding and continuations."""
    starts = torch.ones_like(seq_ids_BT, dtype=torch.bool)
    starts[:, 1:] = seq_ids_BT[:, 1:] != seq_ids_BT[:, :-1]
    return starts & (seq_ids_BT >= 0)


def _docs(n=40, seed=0, max_len=30):
    """Documents of 2..max_len tokens; every token id is unique and increasing along the stream."""
    rng = random.Random(seed)
    docs, next_id = [], 5
    for _ in range(n):
        length = rng.randrange(2, max_len)
        docs.append(list(range(next_id, next_id + length)))
        next_id += length
    return docs


@pytest.mark.parametrize("split", [True, False])
def test_rows_hold_every_token_once_in_order(split):
    docs = _docs()
    rows = list(pack_documents(docs, max_length=16, split_documents=split))
    assert all(len(r) <= 16 for r in rows)
    doc_of = {t: i for i, d in enumerate(docs) for t in d}
    packed = [t for r in rows for t in r.input_ids]
    assert packed == sorted(packed)  # in order, nothing duplicated
    dropped = set(doc_of) - set(packed)
    # only one-token tails of split documents are dropped (they could not be predicted anyway)
    assert all(t == docs[doc_of[t]][-1] for t in dropped)
    assert len(dropped) <= sum(1 for d in docs if len(d) > 2) and len(packed) > 0.95 * len(doc_of)
    segments = [seg for r in rows for seg in _segments(r)]
    for seg in segments:  # each segment: >= 2 contiguous tokens of a single document
        assert len(seg) >= 2 and len({doc_of[t] for t in seg}) == 1 and seg == list(range(seg[0], seg[-1] + 1))
    if not split:
        # a document that fits in a row is never cut
        starts = {d[0] for d in docs}
        assert sum(seg[0] in starts for seg in segments) == len(docs)
        assert all(len(seg) == len(docs[doc_of[seg[0]]]) for seg in segments if len(docs[doc_of[seg[0]]]) <= 16)


def _segments(row):
    out, start = [], 0
    for n in row.lengths:
        out.append(row.input_ids[start:start + n])
        start += n
    return out


def test_collated_batch_convention():
    rows = list(pack_documents([[1, 5, 6], [1, 7, 8, 9], [1, 4]], max_length=5))
    batch = collate_rows(rows, max_length=5, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 1, 7], [8, 9, 1, 4, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 0]]
    assert batch["seq_ids"].tolist() == [[0, 0, 0, 1, 1], [0, 0, 1, 1, -1]]
    assert document_starts(batch["seq_ids"]).tolist() == [[True, False, False, True, False],
                                                          [True, False, True, False, False]]


def test_first_token_of_a_document_is_never_predicted_from_the_previous_one():
    batch = next(pack_batches(_docs(), max_length=16, batch_size=8, pad_token_id=0))
    labels = batch["input_ids"].clone()  # every token a target
    predicts_BT1 = prediction_mask(labels, batch["seq_ids"])
    starts = document_starts(batch["seq_ids"])
    # hidden state i predicts i+1 only inside one document: never a document start, never padding
    assert not (predicts_BT1 & starts[:, 1:]).any()
    assert not (predicts_BT1 & (batch["seq_ids"][:, 1:] < 0)).any()
    assert int(predicts_BT1.sum()) == int((batch["seq_ids"] >= 0).sum() - starts.sum())


def test_one_token_tails_are_dropped_not_emitted_as_documents():
    rows = list(pack_documents([[1, 2, 3, 4, 5]], max_length=4))
    assert [r.input_ids for r in rows] == [[1, 2, 3, 4]]  # the tail [5] cannot be predicted from anything
    rows = list(pack_documents([[1, 2, 3], [1, 9, 9]], max_length=4))
    assert [r.lengths for r in rows] == [[3], [3]]  # room for one token closes the row instead


def test_packer_state_round_trip():
    docs = _docs(20)
    full = [r.input_ids for r in pack_documents(docs, max_length=16)]
    packer = Packer(16)
    rows = [r.input_ids for d in docs[:7] for r in packer.add(d)]
    other = Packer(16)
    other.load_state_dict(packer.state_dict())
    rows += [r.input_ids for d in docs[7:] for r in other.add(d)] + [r.input_ids for r in other.flush()]
    assert rows == full


def test_pack_batches_shapes():
    batches = list(pack_batches(_docs(), max_length=16, batch_size=4, pad_token_id=0))
    assert all(b["input_ids"].shape[1] == 16 for b in batches)
    assert all(b["input_ids"].shape[0] == 4 for b in batches[:-1])
    assert torch.equal(batches[0]["input_ids"][batches[0]["seq_ids"] < 0],
                       torch.zeros_like(batches[0]["input_ids"][batches[0]["seq_ids"] < 0]))
