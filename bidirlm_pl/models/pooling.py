"""Pooling token states into one embedding per text: mean, last token, position-weighted mean, latent attention.

Every pooler takes ``hidden_BTD`` and ``mask_BT`` (1 on tokens that count) and returns ``(B, D)``.
``mask_BT`` is the attention mask with instruction-prefix tokens zeroed (see ``pool_mask``), so a
query's instruction shapes the token states through attention but is left out of the average.
Packed rows (several documents per row) are pooled per document with ``seq_ids_BT`` (document index
per token, -1 on padding): the result then has one row per document, in row-major order.

Semantics match sentence-transformers' ``Pooling`` (``mean``, ``lasttoken``, ``weightedmean`` with
``include_prompt=False``) on right-padded batches, so an exported folder embeds identically there.

>>> h, m = torch.randn(2, 5, 8), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
>>> Pooling("mean")(h, m).shape
torch.Size([2, 8])
"""

from __future__ import annotations

import torch
from torch import nn

from bidirlm_pl.core.errors import BidirLMError

MODES = ("mean", "last", "weighted_mean", "latent_attention")
# our mode -> sentence-transformers Pooling mode (latent attention has no built-in equivalent)
ST_MODES = {"mean": "mean", "last": "lasttoken", "weighted_mean": "weightedmean"}


def pool_mask(attention_mask_BT: torch.Tensor, prefix_lengths_B: torch.Tensor | None = None) -> torch.Tensor:
    """The attention mask with the first ``prefix_lengths_B[i]`` real tokens of row i zeroed (right padding)."""
    mask = attention_mask_BT.clone()
    if prefix_lengths_B is not None:
        positions_BT = torch.arange(mask.shape[1], device=mask.device)[None, :]
        mask = mask * (positions_BT >= prefix_lengths_B[:, None].to(mask.device)).to(mask.dtype)
    return mask


def document_index(mask_BT: torch.Tensor, seq_ids_BT: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Flat document index per token (-1 where ``mask_BT`` is 0) and the number of documents.

    Padded batches: one document per row. Packed batches: documents numbered row by row by ``seq_ids_BT``.
    """
    B, T = mask_BT.shape
    if seq_ids_BT is None:
        doc_BT = torch.arange(B, device=mask_BT.device)[:, None].expand(B, T)
        n_docs = B
    else:
        per_row_B = seq_ids_BT.max(dim=1).values.clamp(min=-1) + 1
        offsets_B = torch.cumsum(per_row_B, 0) - per_row_B
        doc_BT = seq_ids_BT + offsets_B[:, None]
        n_docs = int(per_row_B.sum())
        mask_BT = mask_BT * (seq_ids_BT >= 0)
    return torch.where(mask_BT.bool(), doc_BT, torch.full_like(doc_BT, -1)), n_docs


def _positions_in_document(seq_ids_BT: torch.Tensor | None, shape) -> torch.Tensor:
    """1-based position of each token inside its document (row position for padded batches)."""
    B, T = shape
    if seq_ids_BT is None:
        return torch.arange(1, T + 1).expand(B, T)
    starts = torch.ones_like(seq_ids_BT, dtype=torch.bool)
    starts[:, 1:] = seq_ids_BT[:, 1:] != seq_ids_BT[:, :-1]
    idx = torch.arange(T, device=seq_ids_BT.device).expand(B, T)
    last_start = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=1).values
    return idx - last_start + 1


def weighted_sum(hidden_BTD, weight_BT, doc_BT, n_docs: int) -> torch.Tensor:
    """Per-document weighted average of token states; tokens with ``doc_BT < 0`` are ignored."""
    D = hidden_BTD.shape[-1]
    keep = doc_BT.reshape(-1) >= 0
    h_ND = hidden_BTD.reshape(-1, D)[keep]
    w_N = weight_BT.reshape(-1)[keep].to(hidden_BTD.dtype)
    idx_N = doc_BT.reshape(-1)[keep]
    total = hidden_BTD.new_zeros(n_docs, D).index_add(0, idx_N, h_ND * w_N[:, None])
    norm = hidden_BTD.new_zeros(n_docs).index_add(0, idx_N, w_N)
    return total / norm.clamp(min=1e-9)[:, None]


def mean_pool(hidden_BTD, mask_BT, seq_ids_BT=None) -> torch.Tensor:
    """Average of the states of the tokens with ``mask_BT == 1`` (per document if packed)."""
    doc_BT, n = document_index(mask_BT, seq_ids_BT)
    return weighted_sum(hidden_BTD, torch.ones_like(doc_BT), doc_BT, n)


def weighted_mean_pool(hidden_BTD, mask_BT, seq_ids_BT=None) -> torch.Tensor:
    """Position-weighted mean (SGPT): token at 1-based position i of its document weighs i."""
    doc_BT, n = document_index(mask_BT, seq_ids_BT)
    weights = _positions_in_document(seq_ids_BT, mask_BT.shape).to(hidden_BTD.device)
    return weighted_sum(hidden_BTD, weights, doc_BT, n)


def last_token_pool(hidden_BTD, mask_BT, seq_ids_BT=None) -> torch.Tensor:
    """State of the last token with ``mask_BT == 1`` of each document (left or right padding)."""
    doc_BT, n = document_index(mask_BT, seq_ids_BT)
    D = hidden_BTD.shape[-1]
    flat_pos = torch.arange(doc_BT.numel(), device=doc_BT.device)
    keep = doc_BT.reshape(-1) >= 0
    last_N = torch.full((n,), -1, dtype=torch.long, device=doc_BT.device)
    last_N = last_N.scatter_reduce(0, doc_BT.reshape(-1)[keep], flat_pos[keep], reduce="amax")
    assert bool((last_N >= 0).all()), "a document has no token to pool"
    return hidden_BTD.reshape(-1, D)[last_N]


class LatentAttentionPooling(nn.Module):
    """NV-Embed's latent-attention pooling: tokens cross-attend to a trainable latent array, MLP, then mean.

    Each token state is a query over ``num_latents`` trainable key/value vectors (multi-head), the
    result goes through a GELU MLP, and the outputs are mean-pooled over the masked tokens. We add the
    token state back (residual) so that, at initialisation, the pooler starts close to mean pooling.
    """

    def __init__(self, hidden_size: int, num_latents: int = 512, num_heads: int = 8, mlp_ratio: int = 4):
        super().__init__()
        if hidden_size % num_heads:
            raise BidirLMError(f"latent attention num_heads {num_heads} must divide hidden size {hidden_size}")
        self.latents_LD = nn.Parameter(torch.randn(num_latents, hidden_size) * hidden_size ** -0.5)
        self.attention = nn.MultiheadAttention(hidden_size, num_heads, batch_first=True)
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, mlp_ratio * hidden_size), nn.GELU(), nn.Linear(mlp_ratio * hidden_size, hidden_size)
        )
        self.config = {"hidden_size": hidden_size, "num_latents": num_latents, "num_heads": num_heads,
                       "mlp_ratio": mlp_ratio}

    def forward(self, hidden_BTD, mask_BT, seq_ids_BT=None) -> torch.Tensor:
        B = hidden_BTD.shape[0]
        latents_BLD = self.latents_LD.to(hidden_BTD.dtype)[None].expand(B, -1, -1)
        attended_BTD = self.attention(hidden_BTD, latents_BLD, latents_BLD, need_weights=False)[0]
        out_BTD = hidden_BTD + self.mlp(attended_BTD)
        return mean_pool(out_BTD, mask_BT, seq_ids_BT)


_FUNCTIONS = {"mean": mean_pool, "last": last_token_pool, "weighted_mean": weighted_mean_pool}


class Pooling(nn.Module):
    """One pooling mode as a module (trainable for ``latent_attention``, which needs ``hidden_size``).

    >>> Pooling("last")(torch.randn(1, 3, 4), torch.tensor([[1, 1, 0]])).shape
    torch.Size([1, 4])
    """

    def __init__(self, mode: str = "mean", hidden_size: int | None = None, num_latents: int = 512,
                 num_heads: int = 8):
        super().__init__()
        if mode not in MODES:
            raise BidirLMError(f"pooling '{mode}' is not one of {list(MODES)}")
        self.mode = mode
        self.latent = None
        if mode == "latent_attention":
            if hidden_size is None:
                raise BidirLMError("pooling 'latent_attention' needs hidden_size (the backbone's hidden size)")
            self.latent = LatentAttentionPooling(hidden_size, num_latents=num_latents, num_heads=num_heads)

    def forward(self, hidden_BTD, mask_BT, seq_ids_BT=None) -> torch.Tensor:
        if self.latent is not None:
            return self.latent(hidden_BTD, mask_BT, seq_ids_BT)
        return _FUNCTIONS[self.mode](hidden_BTD, mask_BT, seq_ids_BT)
