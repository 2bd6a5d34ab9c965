"""OmniEncoder: one bidirectional backbone embedding text, images and audio into one space.

Loaded from a ``bidirlm compose`` folder: the merged text backbone (bidirectional attention, no
output layer), the frozen towers copied from their sources (Qwen3-VL's vision tower and merger,
Qwen3-ASR's audio tower and projector), and each source's own processor (Qwen3-VL's image
processor, Qwen3-ASR's feature extractor).

An input is a text, an image (optionally with text), or an audio clip (optionally with text). Its
sequence is ``[<|vision_start|> <|image_pad|> x n <|vision_end|>]`` or
``[<|audio_start|> <|audio_pad|> x n <|audio_end|>]`` followed by the text tokens; the placeholders'
embeddings are replaced by the tower's outputs (n = what the tower emits for that input), the whole
sequence is attended bidirectionally, and the embedding is the mean of the final states.

Positions follow BidirLM-Omni's published code and Qwen3-VL (:mod:`bidirlm_pl.models.omni.positions`):
interleaved MRoPE with the rotary base ``omni_config.json`` records, 3-D (t, h, w) positions for image
placeholders, 1-D positions (all three axes equal: plain RoPE) for text and audio. Qwen3-VL's DeepStack
features (added to early decoder layers in Qwen3-VL and in BidirLM-Omni) are not used yet.

>>> enc = OmniEncoder.from_folder("runs/omni-tiny/composed")  # doctest: +SKIP
>>> enc.encode(["a sentence"]).shape, enc.encode_images([img]).shape, enc.encode_audio([wave]).shape  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from bidirlm_pl.backbone import attention
from bidirlm_pl.backbone.load import load_backbone, resolve_model_path
from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.models.merging.safetensors_io import Checkpoint
from bidirlm_pl.models.omni.inputs import OmniInputs, load_record
from bidirlm_pl.models.omni.positions import OmniRotary, image_positions


def _load_prefixed(module: nn.Module, folder: Path, prefix: str, what: str) -> None:

    ckpt = Checkpoint(folder)
    state = {key[len(prefix):]: ckpt.read(key) for key in ckpt.keys() if key.startswith(prefix)}
    ckpt.close()
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise BidirLMError(f"{what} weights under '{prefix}' in {folder} do not fit its config: "
                           f"missing {missing[:3]}, unexpected {unexpected[:3]}")


def install_rotary(backbone, positions: dict | None) -> OmniRotary | None:
    """Replace the backbone's rotary embedding by interleaved MRoPE when the folder records that scheme.

    Folders composed before positions were recorded (no ``positions``) keep the backbone's own 1-D RoPE.
    """
    if not positions or positions.get("scheme") != "mrope_interleaved":
        return None
    config = backbone.config
    if not hasattr(backbone, "rotary_emb"):
        raise BidirLMError(f"the {config.model_type} backbone has no rotary_emb to replace with MRoPE")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    old = next(iter(backbone.rotary_emb.buffers()), None)
    rotary = OmniRotary(head_dim, positions["rope_theta"], positions["mrope_section"])
    backbone.rotary_emb = rotary.to(old.device if old is not None else "cpu")
    return rotary


class OmniEncoder(nn.Module):
    """Backbone + frozen towers + processors; ``forward(batch)`` gives (B, D) embeddings with gradients."""

    def __init__(self, backbone, inputs: OmniInputs, record: dict, visual=None, audio_tower=None,
                 audio_projector=None):
        super().__init__()
        self.backbone, self.inputs, self.record = backbone, inputs, record
        self.tokenizer, self.ids = inputs.tokenizer, inputs.ids
        self.visual, self.audio_tower, self.audio_projector = visual, audio_tower, audio_projector
        self.rotary = install_rotary(backbone, record.get("positions"))
        for tower in self.towers():
            tower.requires_grad_(False)
            tower.eval()

    def towers(self) -> list[nn.Module]:
        return [m for m in (self.visual, self.audio_tower, self.audio_projector) if m is not None]

    def train(self, mode: bool = True):
        super().train(mode)
        for tower in self.towers():  # frozen towers always run in eval mode (no dropout)
            tower.eval()
        return self

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_folder(cls, folder: str | Path, *, dtype: str = "float32", attn_implementation: str = "sdpa"):
        from transformers.utils import logging as hf_logging


        folder = resolve_model_path(str(folder))
        record = load_record(folder)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the towers' keys are "unexpected" for the text backbone: loaded below
        try:
            backbone, _ = load_backbone(folder, bidirectional=True, head="base", dtype=dtype,
                                                attn_implementation=attn_implementation)
        finally:
            hf_logging.set_verbosity(verbosity)
        parts = {}
        if "vision" in record:
            from transformers import Qwen3VLConfig
            from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

            config = Qwen3VLConfig(**record["vision"]["config"])
            parts["visual"] = Qwen3VLVisionModel._from_config(config.vision_config)
            _load_prefixed(parts["visual"], folder, record["vision"]["towers"][0], "vision tower")
        if "audio" in record:
            from transformers import Qwen3ASRConfig
            from transformers.models.qwen3_asr.modeling_qwen3_asr import (
                Qwen3ASREncoder,
                Qwen3ASRMultiModalProjector,
            )

            config = Qwen3ASRConfig(**record["audio"]["config"])
            parts["audio_tower"] = Qwen3ASREncoder._from_config(config.audio_config)
            parts["audio_projector"] = Qwen3ASRMultiModalProjector(config)
            tower_prefix, projector_prefix = record["audio"]["towers"][:2]
            _load_prefixed(parts["audio_tower"], folder, tower_prefix, "audio tower")
            _load_prefixed(parts["audio_projector"], folder, projector_prefix, "audio projector")
        dtype_t = next(backbone.parameters()).dtype
        for name in ("visual", "audio_tower", "audio_projector"):
            if name in parts:
                parts[name].to(dtype_t)
        return cls(backbone, OmniInputs.from_folder(folder), record, **parts)

    def prepare(self, texts=None, images=None, audio=None, max_length: int = 512) -> dict:
        """Model inputs of one batch (see :class:`bidirlm_pl.models.omni.inputs.OmniInputs.prepare`)."""
        return self.inputs.prepare(texts, images=images, audio=audio, max_length=max_length)

    # ------------------------------------------------------------------ forward
    def _scatter(self, embeds_BTD, input_ids_BT, token_id: int, features_ND: torch.Tensor, what: str):
        positions = input_ids_BT == token_id
        if int(positions.sum()) != features_ND.shape[0]:
            raise BidirLMError(f"{what}: {int(positions.sum())} placeholder tokens but the tower gave "
                               f"{features_ND.shape[0]} features")
        return embeds_BTD.masked_scatter(positions[..., None], features_ND.to(embeds_BTD.dtype))

    def position_ids(self, batch: dict) -> torch.Tensor | None:
        """(3, B, T) rotary positions of a batch with images; None (1-D positions) for text and audio."""
        if self.rotary is None or batch.get("image_grid_thw") is None:
            return None
        merge = int(self.record["vision"]["config"]["vision_config"]["spatial_merge_size"])
        return image_positions(batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"],
                               self.ids["image"], merge)

    def forward(self, batch: dict) -> torch.Tensor:
        device = next(self.backbone.parameters()).device
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        ids_BT, mask_BT = batch["input_ids"], batch["attention_mask"]
        embeds_BTD = self.backbone.get_input_embeddings()(ids_BT)
        if batch.get("pixel_values") is not None:
            with torch.no_grad():
                feats = self.visual(batch["pixel_values"].to(embeds_BTD.dtype), grid_thw=batch["image_grid_thw"],
                                    return_dict=True).pooler_output
            embeds_BTD = self._scatter(embeds_BTD, ids_BT, self.ids["image"], feats, "images")
        if batch.get("input_features") is not None:
            with torch.no_grad():
                hidden = self.audio_tower(batch["input_features"].to(embeds_BTD.dtype),
                                          batch["input_features_mask"]).last_hidden_state
                feats = self.audio_projector(hidden)
            embeds_BTD = self._scatter(embeds_BTD, ids_BT, self.ids["audio"], feats, "audio")
        kwargs = attention.model_inputs(self.backbone.config, attention_mask_BT=mask_BT, bidirectional=True,
                                        dtype=embeds_BTD.dtype)
        ids_3BT = self.position_ids(batch)
        if ids_3BT is None:
            hidden_BTD = self.backbone(inputs_embeds=embeds_BTD, **kwargs).last_hidden_state
        else:
            with self.rotary.positions(ids_3BT):
                hidden_BTD = self.backbone(inputs_embeds=embeds_BTD, **kwargs).last_hidden_state
        weights_BT1 = mask_BT[..., None].to(hidden_BTD.dtype)
        return ((hidden_BTD * weights_BT1).sum(1) / weights_BT1.sum(1).clamp(min=1)).float()

    # ------------------------------------------------------------------ encode API
    @torch.no_grad()
    def _encode(self, n: int, batch_size: int, normalize: bool, make) -> torch.Tensor:
        was = self.training
        self.eval()
        try:
            out = [self(make(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
        finally:
            self.train(was)
        emb = torch.cat(out) if out else torch.zeros(0, self.backbone.config.hidden_size)
        return torch.nn.functional.normalize(emb, dim=-1) if normalize else emb

    def encode(self, texts: list[str], batch_size: int = 16, normalize: bool = True) -> torch.Tensor:
        return self._encode(len(texts), batch_size, normalize, lambda a, b: self.prepare(texts[a:b]))

    def encode_images(self, images: list, texts: list[str | None] | None = None, batch_size: int = 8,
                      normalize: bool = True) -> torch.Tensor:
        return self._encode(len(images), batch_size, normalize, lambda a, b: self.prepare(
            texts[a:b] if texts else None, images=images[a:b]))

    def encode_audio(self, clips: list, texts: list[str | None] | None = None, batch_size: int = 8,
                     normalize: bool = True) -> torch.Tensor:
        return self._encode(len(clips), batch_size, normalize, lambda a, b: self.prepare(
            texts[a:b] if texts else None, audio=clips[a:b]))
