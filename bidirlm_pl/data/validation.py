"""Validation and test batches split over the ranks so that N processes measure what one process does.

Lightning's default puts a ``DistributedSampler`` in front of a map-style loader: each rank takes every
N-th item and the last ranks are padded with *repeats* of the first items, so whenever the number of
batches is not a multiple of N some are counted twice and the logged means differ from one process's.
Here every rank walks its share of the one-process batch list (``rank::world``), and ranks with fewer
batches evaluate a copy of batch 0 marked with :data:`PADDING`: it keeps the collective calls of the
forward (FSDP2 all-gathers) in step across ranks, and the stages log it with weight 0. With
``sync_dist`` Lightning reduces sums and weights separately, so the epoch values are exactly the
one-process ones.

This is the one validation sharding of every data module. A loss that gathers across ranks
(InfoNCE's candidates) needs the W batches of one step to form a global batch of equal shapes: such a
module lists its rows with :func:`global_batch_shares` (every global batch as W consecutive rank
slices), so each rank walks its slice of every global batch and no filler is needed.
"""

from __future__ import annotations

import math

from torch.utils.data import DataLoader, IterableDataset

from bidirlm_pl.data.global_batches import rank_rows, world_of

PADDING = "padding_batch"


class RankShare(IterableDataset):
    """The batches of one rank (an iterable dataset: Lightning adds no sampler of its own).

    ``collate`` (optional) turns an item into a batch when it is reached, so a rank builds only its share.
    """

    def __init__(self, batches: list, rank: int = 0, world: int = 1, collate=None):
        self.batches, self.rank, self.world = batches, rank, world
        self.collate = collate or _identity

    def __len__(self) -> int:
        return math.ceil(len(self.batches) / self.world)

    def __iter__(self):
        mine = self.batches[self.rank::self.world]
        yield from (self.collate(item) for item in mine)
        for _ in range(len(self) - len(mine)):
            yield {**self.collate(self.batches[0]), PADDING: True}


def _identity(batch):
    return batch


def rank_loader(batches: list, module, collate=None) -> DataLoader | list:
    """A loader over this rank's share of ``batches`` (the one-process list, or its items before ``collate``);
    ``[]`` when there are none."""
    if not batches:
        return []
    world, rank = world_of(module)
    return DataLoader(RankShare(batches, rank, world, collate), batch_size=None, collate_fn=_identity)


def is_padding(batch) -> bool:
    """True for a rank's filler batch (log it with weight 0); removes the mark from the batch."""
    return isinstance(batch, dict) and bool(batch.pop(PADDING, False))


def global_batch_shares(n_rows: int, per_rank: int, world: int) -> list[range]:
    """Rows ``0..n_rows-1`` as the validation list of a loss that gathers across ranks (InfoNCE).

    Global batches of ``per_rank * world`` consecutive rows, each listed as its ``world`` rank slices
    (:func:`~bidirlm_pl.data.global_batches.rank_rows`): :class:`RankShare` then deals rank ``r`` its
    slice of every global batch. A last, partial global batch gives every rank ``n // world`` rows (the
    remainder is dropped, so gathered shapes agree), or nothing when it holds fewer rows than ranks.
    One process gets batches of ``per_rank`` rows, the last one partial.

    >>> global_batch_shares(7, 2, 2)
    [range(0, 2), range(2, 4), range(4, 5), range(5, 6)]
    """
    global_batch = per_rank * world
    shares = []
    for start in range(0, n_rows, global_batch):
        n = min(global_batch, n_rows - start)
        parts = [rank_rows(n, rank, world, per_rank if n == global_batch else None) for rank in range(world)]
        if parts[0].stop > parts[0].start:
            shares.extend(range(start + p.start, start + p.stop) for p in parts)
    return shares
