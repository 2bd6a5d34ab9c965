"""Contrastive losses: InfoNCE with in-batch, hard and cross-device negatives; GradCache for big batches.

``InfoNCE.compute_loss(query_BD, positive_BD, negatives_BND=None)`` works on embeddings only, so
wrappers (GradCache, the stages' ``ContrastiveCore``) and tests reuse it. Scores are cosine
similarities divided by the temperature, as sentence-transformers' ``MultipleNegativesRankingLoss``
with ``scale = 1 / t``: each query's candidates are every positive of the (global) batch plus every
hard negative of the (global) batch, and the matching positive is the target.

Options:

* ``symmetric``: also score each positive against every query (document -> query) and average the
  two directions (sentence-transformers' ``directions=("query_to_doc", "doc_to_query")``,
  ``partition_mode="per_direction"``).
* ``false_negative_margin``: drop from the denominator every negative whose score exceeds the
  positive's score by more than the margin (Qwen3-Embedding uses 0.1 on cosine similarities).
* ``gather_across_devices``: under DDP, candidates from every rank join the denominator, gathered
  with ``torch.distributed.nn.functional.all_gather`` so gradients flow back to their rank.
* ``matryoshka_dims`` / ``matryoshka_weights``: Matryoshka representation learning (Kusupati et al. 2022), as
  sentence-transformers' ``MatryoshkaLoss`` around ``MultipleNegativesRankingLoss``: the loss is
  ``sum_d w_d * InfoNCE(first d dimensions of every embedding, re-normalised)``. The full dimension always
  takes part (weight 1 unless listed); the embeddings are computed (and gathered) once and sliced per
  dimension, so GradCache's cached gradient is the gradient of the whole sum.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bidirlm_pl.core.distributed import gather_with_grad
from bidirlm_pl.core.errors import BidirLMError


def check_matryoshka(dims: Sequence[int] | None, weights: Sequence[float] | None,
                     hidden_size: int | None = None) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Validated Matryoshka dimensions (descending) and their weights (default 1 each); ``()`` when unset.

    >>> check_matryoshka([64, 256, 128], None)
    ((256, 128, 64), (1.0, 1.0, 1.0))
    """
    if dims is None or (isinstance(dims, Sequence) and not isinstance(dims, str) and len(dims) == 0):
        if weights:
            raise BidirLMError(f"matryoshka_weights {list(weights)} need matryoshka_dims; expected a list of sizes")
        return (), ()
    if isinstance(dims, str) or not isinstance(dims, Sequence):
        raise BidirLMError(f"matryoshka_dims {dims!r} must be a list of embedding sizes, e.g. [64, 128, 256]")
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            raise BidirLMError(f"matryoshka_dims entry {d!r} must be a positive whole number of dimensions")
        if hidden_size is not None and d > hidden_size:
            raise BidirLMError(f"matryoshka_dims entry {d} exceeds the embedding size {hidden_size}; "
                               f"expected sizes <= {hidden_size}")
    if len(set(dims)) != len(dims):
        raise BidirLMError(f"matryoshka_dims {list(dims)} repeat a size; expected distinct sizes")
    if weights is None:
        weights = [1.0] * len(dims)
    if isinstance(weights, str) or not isinstance(weights, Sequence) or len(weights) != len(dims):
        raise BidirLMError(f"matryoshka_weights {weights!r} must be a list of {len(dims)} numbers, one per "
                           f"matryoshka_dims entry {list(dims)}")
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, int | float) or not w >= 0 or w == float("inf"):
            raise BidirLMError(f"matryoshka_weights entry {w!r} must be a finite number >= 0")
    pairs = sorted(zip(dims, (float(w) for w in weights)), key=lambda x: -x[0])
    return tuple(d for d, _ in pairs), tuple(w for _, w in pairs)


class InfoNCE(nn.Module):
    """InfoNCE over cosine similarities with in-batch and hard negatives (and Matryoshka dimensions).

    Args:
        temperature: softmax temperature (> 0); 0.05 equals sentence-transformers' ``scale=20``.
        symmetric: add the document -> query direction and average the two.
        false_negative_margin: if set, negatives scoring above ``positive + margin`` are masked out
            (at every Matryoshka dimension, on that dimension's scores).
        gather_across_devices: under DDP, use every rank's candidates (with gradients).
        matryoshka_dims: embedding sizes whose leading slices are trained too (None: the full size only).
        matryoshka_weights: one weight per ``matryoshka_dims`` entry (default 1 each).

    >>> loss = InfoNCE(temperature=0.05)
    >>> q, p, n = torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 2, 8)
    >>> float(loss.compute_loss(q, p, n)) > 0
    True
    >>> float(InfoNCE(matryoshka_dims=[2, 4]).compute_loss(q, p, n)) > float(loss.compute_loss(q, p, n))
    True
    """

    def __init__(
        self,
        temperature: float = 0.05,
        symmetric: bool = False,
        false_negative_margin: float | None = None,
        gather_across_devices: bool = False,
        matryoshka_dims: Sequence[int] | None = None,
        matryoshka_weights: Sequence[float] | None = None,
    ):
        super().__init__()
        if not temperature > 0:
            raise BidirLMError(f"temperature {temperature} must be > 0 (0.05 is the usual InfoNCE value)")
        if false_negative_margin is not None and false_negative_margin < 0:
            raise BidirLMError(f"false_negative_margin {false_negative_margin} must be >= 0 or null")
        self.temperature = float(temperature)
        self.symmetric = symmetric
        self.false_negative_margin = false_negative_margin
        self.gather_across_devices = gather_across_devices
        self.matryoshka_dims, self.matryoshka_weights = check_matryoshka(matryoshka_dims, matryoshka_weights)

    def forward(self, query_BD, positive_BD, negatives_BND=None):
        return self.compute_loss(query_BD, positive_BD, negatives_BND)

    def levels(self, dim: int) -> list[tuple[int, float]]:
        """``(size, weight)`` of every term of the loss for ``dim``-dimensional embeddings, the full size first.

        >>> InfoNCE(matryoshka_dims=[64, 128], matryoshka_weights=[2, 1]).levels(256)
        [(256, 1.0), (128, 1.0), (64, 2.0)]
        """
        check_matryoshka(self.matryoshka_dims or None, self.matryoshka_weights or None, hidden_size=dim)
        weights = dict(zip(self.matryoshka_dims, self.matryoshka_weights))
        return [(dim, weights.pop(dim, 1.0))] + sorted(weights.items(), reverse=True)

    def candidates(self, query_BD, positive_BD, negatives_BND=None) -> dict[str, torch.Tensor]:
        """What the scores need, gathered across processes once (not normalised, so any leading slice works):
        ``query`` (B, D), ``positive`` (B, D), ``docs`` (C, D: the global positives, then the global hard
        negatives column by column), ``queries`` (the global queries; symmetric only) and ``target`` (B,)."""
        if query_BD.ndim != 2 or positive_BD.shape != query_BD.shape:
            raise BidirLMError(
                f"query {tuple(query_BD.shape)} and positive {tuple(positive_BD.shape)} embeddings must both be (B, D)"
            )
        B, D = query_BD.shape
        gather = self.gather_across_devices
        p_all, offset = gather_with_grad(positive_BD) if gather else (positive_BD, 0)
        docs = [p_all]
        if negatives_BND is not None and negatives_BND.shape[1] > 0:
            if negatives_BND.ndim != 3 or negatives_BND.shape[0] != B or negatives_BND.shape[2] != D:
                raise BidirLMError(f"hard negatives {tuple(negatives_BND.shape)} must be (B={B}, N, D={D})")
            # column-major like sentence-transformers: negative k of every row, then negative k+1
            n_cols = negatives_BND.transpose(0, 1).reshape(-1, D)
            if gather:
                # gather per negative column so the layout is [neg0 of all ranks, neg1 of all ranks, ...]
                n_cols = torch.cat([gather_with_grad(negatives_BND[:, k])[0] for k in range(negatives_BND.shape[1])])
            docs.append(n_cols)
        out = {"query": query_BD, "positive": positive_BD, "docs": torch.cat(docs, dim=0),
               "target": torch.arange(offset, offset + B, device=query_BD.device)}
        if self.symmetric:
            out["queries"] = gather_with_grad(query_BD)[0] if gather else query_BD
        return out

    @staticmethod
    def scores_of(candidates: dict[str, torch.Tensor], dim: int | None = None) -> dict[str, torch.Tensor]:
        """Cosine score matrices of :meth:`candidates` on their first ``dim`` dimensions (None: all)."""
        def unit(x):
            return F.normalize(x if dim is None else x[..., :dim], dim=-1)

        out = {"q2d": unit(candidates["query"]) @ unit(candidates["docs"]).T, "target": candidates["target"]}
        if "queries" in candidates:
            out["d2q"] = unit(candidates["positive"]) @ unit(candidates["queries"]).T
        return out

    def scores(self, query_BD, positive_BD, negatives_BND=None, dim: int | None = None) -> dict[str, torch.Tensor]:
        """Cosine score matrices and diagnostics: ``q2d`` (B, C) with C = global positives then negatives."""
        return self.scores_of(self.candidates(query_BD, positive_BD, negatives_BND), dim)

    def _masked_logits(self, sim_BC: torch.Tensor, target_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.arange(sim_BC.shape[0], device=sim_BC.device)
        logits = sim_BC / self.temperature
        dropped = torch.zeros_like(sim_BC, dtype=torch.bool)
        if self.false_negative_margin is not None:
            positive_B1 = sim_BC[rows, target_B][:, None]
            dropped = (sim_BC > positive_B1 + self.false_negative_margin).detach()
            dropped[rows, target_B] = False
            logits = logits.masked_fill(dropped, float("-inf"))
        return logits, dropped

    def loss_of(self, s: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean InfoNCE of one set of score matrices, and how many negatives the margin dropped."""
        target = s["target"]
        logits, dropped = self._masked_logits(s["q2d"], target)
        loss = F.cross_entropy(logits, target)
        masked = dropped.sum()
        if self.symmetric:
            logits_d, dropped_d = self._masked_logits(s["d2q"], target)
            loss = (loss + F.cross_entropy(logits_d, target)) / 2
            masked = masked + dropped_d.sum()
        return loss, masked

    def compute_loss(self, query_BD, positive_BD, negatives_BND=None, *, return_details: bool = False):
        """Mean InfoNCE loss of this rank's queries, summed over the Matryoshka sizes with their weights.

        With ``return_details``: also ``masked_negatives`` (at the full size) and, with Matryoshka sizes,
        ``dim_losses`` (each size's unweighted loss, detached).
        """
        candidates = self.candidates(query_BD, positive_BD, negatives_BND)
        if not self.matryoshka_dims:
            loss, masked = self.loss_of(self.scores_of(candidates))
            return (loss, {"masked_negatives": masked.float()}) if return_details else loss
        total, details, dim_losses = None, {}, {}
        for dim, weight in self.levels(query_BD.shape[1]):
            loss, masked = self.loss_of(self.scores_of(candidates, dim))
            total = weight * loss if total is None else total + weight * loss
            details.setdefault("masked_negatives", masked.float())  # the full size's (the first level)
            dim_losses[dim] = loss.detach()
        if return_details:
            return total, details | {"dim_losses": dim_losses}
        return total


# ---------------------------------------------------------------- GradCache

class RandomState:
    """Snapshot of the CPU (and CUDA) RNG, restored on enter so a replayed forward draws the same dropout."""

    def __init__(self, device: torch.device):
        self.cpu = torch.get_rng_state()
        self.cuda_devices = [device] if device.type == "cuda" else []
        self.cuda = [torch.cuda.get_rng_state(device)] if self.cuda_devices else []

    def __enter__(self):
        self._fork = torch.random.fork_rng(devices=self.cuda_devices)
        self._fork.__enter__()
        torch.set_rng_state(self.cpu)
        for device, state in zip(self.cuda_devices, self.cuda):
            torch.cuda.set_rng_state(state, device)

    def __exit__(self, *exc):
        return self._fork.__exit__(*exc)


EmbedFn = Callable[[dict], torch.Tensor]


def slice_batch(batch: dict, start: int, end: int) -> dict:
    """Rows ``start:end`` of every tensor of a padded batch dict."""
    return {k: (v[start:end] if torch.is_tensor(v) else v) for k, v in batch.items()}


class GradCache(nn.Module):
    """GradCache (Gao et al. 2021): the loss of a batch too large to embed with gradients at once.

    1. embed every chunk of ``chunk_size`` rows without gradients (keeping each chunk's RNG state);
    2. compute the loss on the cached embeddings and its gradient with respect to them;
    3. on ``backward()``, re-embed each chunk with gradients (same RNG) and back-propagate the
       cached gradient into the model, one chunk at a time.

    ``forward(embed, query_batch, positive_batch, negative_batch=None, n_negatives=0)`` returns a
    loss tensor whose ``backward()`` runs step 3, so it fits Lightning's automatic optimization;
    ``last_details`` and ``last_embeddings`` (the cached query and positive embeddings) describe it.
    Negative batches hold B*N rows ordered row by row (row i's N negatives are contiguous).
    Across processes, set ``sync`` once (a :class:`bidirlm_pl.losses.grad_sync.ReplaySync`, or anything with
    ``before_backward(output, last=...)``) so that every step's gradients are reduced once, by the last chunk.

    >>> enc = torch.nn.Linear(4, 3)
    >>> gc = GradCache(InfoNCE(), chunk_size=2)
    >>> loss = gc(lambda b: enc(b["x"]), {"x": torch.randn(5, 4)}, {"x": torch.randn(5, 4)})
    >>> loss.backward()
    """

    def __init__(self, loss: InfoNCE, chunk_size: int = 32):
        super().__init__()
        if chunk_size < 1:
            raise BidirLMError(f"GradCache chunk_size {chunk_size} must be >= 1")
        self.loss = loss
        self.chunk_size = chunk_size
        self.last_details: dict[str, torch.Tensor] = {}
        self.last_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None
        self.sync = None

    def _ranges(self, batch: dict) -> list[tuple[int, int]]:
        n = next(v for v in batch.values() if torch.is_tensor(v)).shape[0]
        return [(i, min(i + self.chunk_size, n)) for i in range(0, n, self.chunk_size)]

    def forward(self, embed: EmbedFn, query_batch: dict, positive_batch: dict,
                negative_batch: dict | None = None, n_negatives: int = 0) -> torch.Tensor:
        batches = [query_batch, positive_batch] + ([negative_batch] if negative_batch is not None else [])
        grad_enabled = torch.is_grad_enabled()
        cached: list[torch.Tensor] = []
        states: list[list[RandomState]] = []
        for batch in batches:
            parts, column_states = [], []
            for start, end in self._ranges(batch):
                chunk = slice_batch(batch, start, end)
                device = chunk["input_ids"].device if "input_ids" in chunk else torch.device("cpu")
                column_states.append(RandomState(device))
                with torch.no_grad():
                    parts.append(embed(chunk))
            cached.append(torch.cat(parts).detach().requires_grad_(grad_enabled))
            states.append(column_states)
        self.last_embeddings = (cached[0].detach(), cached[1].detach())
        negatives = None
        if negative_batch is not None:
            B = cached[0].shape[0]
            negatives = cached[2].view(B, n_negatives, -1)
        if not grad_enabled:
            loss, self.last_details = self.loss.compute_loss(cached[0], cached[1], negatives, return_details=True)
            return loss
        with torch.enable_grad():
            loss, self.last_details = self.loss.compute_loss(cached[0], cached[1], negatives, return_details=True)
            grads = torch.autograd.grad(loss, cached, allow_unused=True)
        grads = [g if g is not None else torch.zeros_like(c) for g, c in zip(grads, cached)]
        out = loss.detach().requires_grad_()
        out.register_hook(lambda grad_out: self._replay(embed, batches, states, grads, grad_out))
        return out

    def _replay(self, embed: EmbedFn, batches: Sequence[dict], states, grads, grad_out):
        chunks = [(batch, rows, state, grad_ND) for batch, column_states, grad_ND in zip(batches, states, grads)
                  for rows, state in zip(self._ranges(batch), column_states)]
        with torch.enable_grad():
            for i, (batch, (start, end), state, grad_ND) in enumerate(chunks):
                with state:
                    emb = embed(slice_batch(batch, start, end))
                if self.sync is not None:
                    self.sync.before_backward(emb, last=i == len(chunks) - 1)
                # surrogate whose gradient w.r.t. the embeddings is the cached one
                (emb * (grad_ND[start:end] * grad_out)).sum().backward()
