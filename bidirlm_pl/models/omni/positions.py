"""Rotary positions of the omni backbone: interleaved MRoPE, 3-D (t, h, w) for image tokens, 1-D for the rest.

The scheme BidirLM-Omni's published code uses (``modeling_bidirlm_omni.py``: ``BidirLMOmniTextRotaryEmbedding``
and ``get_rope_index``) and Qwen3-VL's own (transformers ``models/qwen3_vl/modeling_qwen3_vl.py``:
``Qwen3VLTextRotaryEmbedding``, ``Qwen3VLModel.get_rope_index``):

* every token has three position ids (t, h, w); each rotary frequency reads one of them, interleaved
  ``T H W T H W ...`` over the first ``3 * mrope_section[1|2]`` frequencies, the rest read T;
* text and audio tokens get the same 1-D position on all three axes (Qwen3-ASR's ``get_rope_index`` does
  the same for audio), so for them the rotation is plain 1-D RoPE with the same ``rope_theta``: a text-only
  input embeds exactly as the composed text model (a Qwen3 of that theta) embeds it;
* the ``h x w`` merged patches of an image get ``t = start``, ``h = start + row``, ``w = start + col``;
  the text after it resumes at ``start + max(h, w)``.

:class:`OmniRotary` replaces the backbone's ``rotary_emb``; :func:`image_positions` gives the (3, B, T)
position ids of a batch with images, which the encoder hands to the rotary for one forward call
(``with rotary.positions(ids): backbone(...)``): the backbone itself (its masks, its attention kernels)
only ever sees ordinary 1-D positions.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from bidirlm_pl.core.errors import BidirLMError


class OmniRotary(nn.Module):
    """Interleaved multimodal RoPE: ``forward(x, position_ids)`` gives (cos, sin) of shape (B, T, head_dim).

    ``position_ids`` (B, T) are read as 1-D positions (the three axes equal); inside
    ``with self.positions(ids_3BT)`` the stored 3-D positions are used instead.
    """

    def __init__(self, head_dim: int, rope_theta: float, mrope_section: list[int]):
        super().__init__()
        if sum(mrope_section) != head_dim // 2 or len(mrope_section) != 3:
            raise BidirLMError(f"mrope_section {mrope_section} must have 3 parts summing to head_dim/2 "
                               f"= {head_dim // 2}")
        inv_freq = 1.0 / (rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.rope_theta, self.mrope_section = float(rope_theta), list(mrope_section)
        axis = torch.zeros(head_dim // 2, dtype=torch.long)  # which of t, h, w each frequency reads
        for dim, offset in ((1, 1), (2, 2)):
            axis[offset:mrope_section[dim] * 3:3] = dim
        self.register_buffer("axis", axis, persistent=False)
        self._thw: torch.Tensor | None = None

    @contextmanager
    def positions(self, ids_3BT: torch.Tensor | None):
        """Use these (3, B, T) position ids for the forward calls inside the block (None: 1-D positions)."""
        self._thw = ids_3BT
        try:
            yield self
        finally:
            self._thw = None

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        ids_3BT = self._thw if self._thw is not None else position_ids.expand(3, *position_ids.shape[-2:])
        with torch.autocast(device_type=x.device.type, enabled=False):
            freqs_3BTF = ids_3BT[..., None].float() * self.inv_freq.float().to(x.device)
            index = self.axis.to(x.device).view(1, 1, 1, -1).expand(1, *freqs_3BTF.shape[1:])
            freqs_BTF = freqs_3BTF.gather(0, index)[0]
            emb = torch.cat((freqs_BTF, freqs_BTF), dim=-1)
            return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def image_positions(input_ids_BT: torch.Tensor, mask_BT: torch.Tensor, image_grid_thw: torch.Tensor,
                    image_token_id: int, merge_size: int) -> torch.Tensor:
    """(3, B, T) position ids of a right- or left-padded batch with images, as Qwen3-VL's ``get_rope_index``.

    Each run of image placeholders takes the next row of ``image_grid_thw`` (in batch order); padding
    positions are 0.
    """
    out = torch.zeros(3, *input_ids_BT.shape, dtype=torch.long, device=input_ids_BT.device)
    grids = iter(image_grid_thw.tolist())
    for b in range(input_ids_BT.shape[0]):
        valid = mask_BT[b].bool()
        is_image = (input_ids_BT[b][valid] == image_token_id).tolist()
        pieces, pos, i = [], 0, 0
        while i < len(is_image):
            j = i
            while j < len(is_image) and is_image[j] == is_image[i]:
                j += 1
            if not is_image[i]:
                pieces.append(torch.arange(pos, pos + j - i).expand(3, -1))
                pos += j - i
            else:
                piece, pos = _grid_positions(next(grids, None), pos, merge_size, j - i)
                pieces.append(piece)
            i = j
        if pieces:
            out[:, b, valid] = torch.cat(pieces, dim=1).to(out.device)
    if next(grids, None) is not None:
        raise BidirLMError(f"{len(image_grid_thw)} image grids but fewer runs of image tokens in the batch")
    return out


def _grid_positions(grid: list[int] | None, start: int, merge_size: int, run: int) -> tuple[torch.Tensor, int]:
    if grid is None:
        raise BidirLMError("more runs of image tokens than image grids in the batch")
    t, h, w = grid[0], grid[1] // merge_size, grid[2] // merge_size
    if t * h * w != run:
        raise BidirLMError(f"an image of grid {grid} (merge {merge_size}) needs {t * h * w} placeholder tokens, "
                           f"the batch has {run}")
    tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
    piece = torch.stack([tt, hh, ww]).reshape(3, -1) + start
    return piece, start + max(h, w)
