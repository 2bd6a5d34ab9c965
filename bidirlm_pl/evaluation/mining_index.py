"""An exact cosine top-k index: a torch matmul of the queries against each corpus shard, merged shard by shard.

Why not FAISS: the search is exact (every query meets every corpus entry, so the mined negatives do not depend
on an approximate index's recall, and a test compares them with a brute-force reference), it needs no extra
dependency (PyPI's faiss wheels are CPU-only; the GPU builds come from conda), and it is fast enough for
mining: the work is 2 * Q * C * D flops, so a million queries against a million 1024-dimensional documents is
2e15 flops, about a minute on a GPU at tens of TFLOP/s (an estimate from the flop count, not measured
here). The corpus streams from disk shard by shard, so only the queries (Q x D) and the running top-k
(Q x k) stay in memory. Far beyond that (billions of query-document pairs per second of patience) an
approximate index is worth its recall loss.

>>> index = ExactTopK(queries_QD, k=50)  # doctest: +SKIP
>>> for offset, shard_CD in shards: index.add(shard_CD, offset)  # doctest: +SKIP
>>> scores_QK, ids_QK = index.scores, index.ids  # doctest: +SKIP
"""

from __future__ import annotations

import torch


class ExactTopK:
    """The ``k`` best corpus entries of every query by cosine (inner product of unit rows), exact.

    ``scores`` (Q, k) sorted descending and ``ids`` (Q, k) corpus indices; while fewer than ``k`` entries are
    candidates a row ends in ``-inf`` scores (ids meaningless there). Excluded (query, entry) pairs never become
    candidates; :meth:`add` returns their scores (e.g. each row's positive score comes from the same matmul).

    Args:
        queries_QD: unit-norm query embeddings, on the device the search runs on.
        k: neighbours kept per query.
        block: queries per matmul (bounds the (block x shard) score matrix).
    """

    def __init__(self, queries_QD: torch.Tensor, k: int, *, block: int = 4096):
        assert k >= 1 and block >= 1, (k, block)
        self.queries = queries_QD
        self.k, self.block = k, block
        num = queries_QD.shape[0]
        self.scores = torch.full((num, k), float("-inf"), device=queries_QD.device)
        self.ids = torch.full((num, k), -1, dtype=torch.long, device=queries_QD.device)

    def add(self, corpus_CD: torch.Tensor, offset: int, exclude_q: torch.Tensor | None = None,
            exclude_c: torch.Tensor | None = None) -> torch.Tensor:
        """Merge a shard (corpus entries ``offset .. offset + C``) into every query's top-k.

        ``exclude_q[i]`` never gets entry ``exclude_c[i]`` (global index, inside this shard); returns the
        scores of those excluded pairs (E,), on the CPU.
        """
        device = self.queries.device
        corpus_CD = corpus_CD.to(device=device, dtype=self.queries.dtype)
        if exclude_q is None:
            exclude_q = exclude_c = torch.zeros(0, dtype=torch.long)
        exclude_q, exclude_c = exclude_q.to(device), exclude_c.to(device) - offset
        excluded = torch.empty(exclude_q.shape[0], device=device)
        take = min(self.k, corpus_CD.shape[0])
        for start in range(0, self.queries.shape[0], self.block):
            stop = min(start + self.block, self.queries.shape[0])
            scores_BC = (self.queries[start:stop] @ corpus_CD.T).float()
            here = (exclude_q >= start) & (exclude_q < stop)
            rows, cols = exclude_q[here] - start, exclude_c[here]
            excluded[here] = scores_BC[rows, cols]
            scores_BC[rows, cols] = float("-inf")
            top_scores, top_ids = scores_BC.topk(take, dim=1)
            merged_scores = torch.cat([self.scores[start:stop], top_scores], dim=1)
            merged_ids = torch.cat([self.ids[start:stop], top_ids + offset], dim=1)
            best, order = merged_scores.topk(self.k, dim=1)
            self.scores[start:stop] = best
            self.ids[start:stop] = merged_ids.gather(1, order)
        return excluded.cpu()
