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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bidirlm_pl.core.distributed import gather_with_grad
from bidirlm_pl.core.errors import BidirLMError


class InfoNCE(nn.Module):
    """InfoNCE over cosine similarities with in-batch and hard negatives.

    Args:
        temperature: softmax temperature (> 0); 0.05 equals sentence-transformers' ``scale=20``.
        symmetric: add the document -> query direction and average the two.
        false_negative_margin: if set, negatives scoring above ``positive + margin`` are masked out.
        gather_across_devices: under DDP, use every rank's candidates (with gradients).

    >>> loss = InfoNCE(temperature=0.05)
    >>> q, p, n = torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 2, 8)
    >>> float(loss.compute_loss(q, p, n)) > 0
    True
    """

    def __init__(
        self,
        temperature: float = 0.05,
        symmetric: bool = False,
        false_negative_margin: float | None = None,
        gather_across_devices: bool = False,
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

    def forward(self, query_BD, positive_BD, negatives_BND=None):
        return self.compute_loss(query_BD, positive_BD, negatives_BND)

    def scores(self, query_BD, positive_BD, negatives_BND=None) -> dict[str, torch.Tensor]:
        """Cosine score matrices and diagnostics: ``q2d`` (B, C) with C = global positives then negatives."""
        if query_BD.ndim != 2 or positive_BD.shape != query_BD.shape:
            raise BidirLMError(
                f"query {tuple(query_BD.shape)} and positive {tuple(positive_BD.shape)} embeddings must both be (B, D)"
            )
        B = query_BD.shape[0]
        q_BD, p_BD = F.normalize(query_BD, dim=-1), F.normalize(positive_BD, dim=-1)
        gather = self.gather_across_devices
        p_all, offset = gather_with_grad(p_BD) if gather else (p_BD, 0)
        candidates = [p_all]
        if negatives_BND is not None and negatives_BND.shape[1] > 0:
            if negatives_BND.ndim != 3 or negatives_BND.shape[0] != B or negatives_BND.shape[2] != q_BD.shape[1]:
                raise BidirLMError(
                    f"hard negatives {tuple(negatives_BND.shape)} must be (B={B}, N, D={q_BD.shape[1]})"
                )
            n_BND = F.normalize(negatives_BND, dim=-1)
            # column-major like sentence-transformers: negative k of every row, then negative k+1
            n_cols = n_BND.transpose(0, 1).reshape(-1, n_BND.shape[-1])
            if gather:
                # gather per negative column so the layout is [neg0 of all ranks, neg1 of all ranks, ...]
                n_cols = torch.cat([gather_with_grad(n_BND[:, k])[0] for k in range(n_BND.shape[1])])
            candidates.append(n_cols)
        docs_CD = torch.cat(candidates, dim=0)
        target_B = torch.arange(offset, offset + B, device=q_BD.device)
        out = {"q2d": q_BD @ docs_CD.T, "target": target_B}
        if self.symmetric:
            q_all = gather_with_grad(q_BD)[0] if gather else q_BD
            out["d2q"] = p_BD @ q_all.T
        return out

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

    def compute_loss(self, query_BD, positive_BD, negatives_BND=None, *, return_details: bool = False):
        """Mean InfoNCE loss of this rank's queries (with ``return_details``: also masked counts)."""
        s = self.scores(query_BD, positive_BD, negatives_BND)
        target = s["target"]
        logits, dropped = self._masked_logits(s["q2d"], target)
        loss = F.cross_entropy(logits, target)
        masked = dropped.sum()
        if self.symmetric:
            logits_d, dropped_d = self._masked_logits(s["d2q"], target)
            loss = (loss + F.cross_entropy(logits_d, target)) / 2
            masked = masked + dropped_d.sum()
        if return_details:
            return loss, {"masked_negatives": masked.float()}
        return loss


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
