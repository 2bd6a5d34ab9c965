"""The held-out split: which rows of a source validation keeps out of training, one rule for every data module.

* **How many** (:func:`held_out_size`): ``ceil(fraction * n)`` rows, at least one when ``fraction > 0``,
  none from a source of fewer than 2 rows (a ``holdout`` count is taken as given).
* **Which** (:func:`held_out_split`): the first ``size`` rows of a permutation drawn from the data
  module's own seeded generator; without a generator, the source's last ``size`` rows (its tail: the
  text a later evaluation reads again, e.g. the UBMoE held-out perplexity).

The generator stays each module's own stream (``TextDataModule``: ``numpy.random.default_rng([seed,
7919])``; ``PairsDataModule``: ``random.Random(seed)`` per source; ``LabelledTaskData``: one
``random.Random(seed)`` over its classes, :func:`stratified_split`), so the rows each module holds out are the
rows it held out before this rule was shared (tests/test_data_splits.py compares them on the quickstart's sources).

>>> held_out_split(10, held_out_size(10, 0.2), random.Random(0))
([1, 5, 3, 4, 2, 0, 9, 6], [7, 8])
>>> held_out_split(10, 3)  # no generator: the tail
([0, 1, 2, 3, 4, 5, 6], [7, 8, 9])
"""

from __future__ import annotations

import math
import random

import numpy as np

Generator = random.Random | np.random.Generator


def held_out_size(n: int, fraction: float) -> int:
    """Rows of ``n`` held out for ``fraction``: ``ceil(fraction * n)``, at least 1 when ``fraction > 0``; 0 when ``n < 2``."""
    if fraction <= 0 or n < 2:
        return 0
    return max(1, math.ceil(fraction * n))


def held_out_split(n: int, size: int, rng: Generator | None = None) -> tuple[list[int], list[int]]:
    """``(train, held_out)`` row indices of ``n`` rows with ``size`` held out.

    With ``rng`` (a ``random.Random`` or a ``numpy`` ``Generator``) the held-out rows are the first
    ``size`` of a permutation drawn from it and both lists keep the permutation's order; without, the
    held-out rows are the last ``size`` and both lists keep the source order.
    """
    assert 0 <= size <= n, f"held-out size {size} of {n} rows"
    if rng is None:
        order = list(range(n))
        return order[:n - size], order[n - size:]
    if isinstance(rng, np.random.Generator):
        order = [int(i) for i in rng.permutation(n)]
    else:
        order = list(range(n))
        rng.shuffle(order)
    return order[size:], order[:size]


def stratified_split(labels: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices ``(rest, held_out)`` of ``labels``: ``fraction`` of every class held out, chosen with ``seed``
    (one ``random.Random(seed)`` over the classes in sorted order); ``rest`` shuffled, ``held_out`` sorted."""
    rng = random.Random(seed)
    rest, held = [], []
    for label in sorted(set(labels)):
        members = [i for i, y in enumerate(labels) if y == label]
        kept, out = held_out_split(len(members), held_out_size(len(members), fraction), rng)
        held += [members[i] for i in out]
        rest += [members[i] for i in kept]
    rng.shuffle(rest)
    return rest, sorted(held)
