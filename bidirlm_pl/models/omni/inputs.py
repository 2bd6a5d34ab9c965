"""OmniInputs: text, image(+text) and audio(+text) batches for an omni model, with the sources' own processors.

Images go through Qwen3-VL's image processor (patches and ``image_grid_thw``; the tower emits
``prod(grid) / merge_size**2`` features per image), audio through Qwen3-ASR's feature extractor
(log-mel frames, padded to whole ``n_window * 2`` windows; the tower emits, per window, what its
three stride-2 convolutions leave). Each media input becomes start token, one placeholder per
tower feature, end token, then the optional text. No model weights are needed: the data module
prepares batches with this class, the encoder consumes them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from bidirlm_pl.backbone.load import resolve_model_path
from bidirlm_pl.core.errors import BidirLMError

AUDIO_RATE = 16000
OMNI_CONFIG = "omni_config.json"
TOKENS = (("vision_start", "<|vision_start|>"), ("image", "<|image_pad|>"), ("vision_end", "<|vision_end|>"),
          ("audio_start", "<|audio_start|>"), ("audio", "<|audio_pad|>"), ("audio_end", "<|audio_end|>"))


def load_record(folder: Path) -> dict:
    path = Path(folder) / OMNI_CONFIG
    if not path.is_file():
        raise BidirLMError(f"'{folder}' has no {OMNI_CONFIG}; expected a folder written by `bidirlm compose`")
    return json.loads(path.read_text())


def post_cnn_length(frames: torch.Tensor) -> torch.Tensor:
    """Frames left after Qwen3-ASR's three (k=3, s=2, p=1) convolutions (0 stays 0)."""
    for _ in range(3):
        frames = torch.where(frames > 0, (frames - 1) // 2 + 1, torch.zeros_like(frames))
    return frames


class OmniInputs:
    def __init__(self, tokenizer, image_processor=None, feature_extractor=None, n_window: int | None = None):
        self.tokenizer, self.image_processor, self.feature_extractor = tokenizer, image_processor, feature_extractor
        self.n_window = n_window
        self.ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in TOKENS}

    @classmethod
    def from_folder(cls, folder: str | Path) -> OmniInputs:
        from transformers import AutoTokenizer


        folder = resolve_model_path(str(folder))
        record = load_record(folder)
        image_processor = feature_extractor = n_window = None
        if "vision" in record:
            from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

            image_processor = Qwen2VLImageProcessorPil.from_pretrained(folder / record["vision"]["processor"])
        if "audio" in record:
            from transformers import Qwen3ASRFeatureExtractor

            feature_extractor = Qwen3ASRFeatureExtractor.from_pretrained(folder / record["audio"]["processor"])
            n_window = int(record["audio"]["config"]["audio_config"].get("n_window", 50))
        tokenizer = AutoTokenizer.from_pretrained(folder)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return cls(tokenizer, image_processor, feature_extractor, n_window)

    def images(self, images: list) -> tuple[dict, list[int]]:
        if self.image_processor is None:
            raise BidirLMError("this omni model has no vision tower; compose it with a 'vision' source")
        try:
            out = self.image_processor(images=images, return_tensors="pt")
        except Exception as err:
            raise BidirLMError(f"the vision processor rejected an image: {str(err).strip().splitlines()[0]} "
                               "(expected PIL images or HxWx3 uint8 arrays)") from err
        merge = self.image_processor.merge_size ** 2
        counts = [int(g.prod()) // merge for g in out["image_grid_thw"]]
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}, counts

    def audio(self, clips: list) -> tuple[dict, list[int]]:
        if self.feature_extractor is None:
            raise BidirLMError("this omni model has no audio tower; compose it with an 'audio' source")
        for i, clip in enumerate(clips):
            array = np.asarray(clip)
            if array.ndim != 1 or array.size == 0 or not np.issubdtype(array.dtype, np.floating):
                raise BidirLMError(f"audio clip {i} has shape {array.shape} and dtype {array.dtype}; expected a "
                                   f"non-empty 1-D float waveform at {AUDIO_RATE} Hz")
        chunk = self.n_window * 2
        try:
            out = self.feature_extractor([np.asarray(c, dtype=np.float32) for c in clips], sampling_rate=AUDIO_RATE,
                                         padding=True, return_attention_mask=True, return_tensors="pt")
        except Exception as err:
            raise BidirLMError(f"the audio feature extractor rejected a clip: {str(err).strip().splitlines()[0]}") \
                from err
        features, mask = out["input_features"], out["attention_mask"]
        pad = (-features.shape[-1]) % chunk  # the tower reads whole windows of n_window * 2 frames
        if pad:
            features = torch.nn.functional.pad(features, (0, pad))
            mask = torch.nn.functional.pad(mask, (0, pad))
        counts = post_cnn_length(mask.view(mask.shape[0], -1, chunk).sum(-1)).sum(-1).tolist()
        return {"input_features": features, "input_features_mask": mask}, [int(c) for c in counts]

    def prepare(self, texts: list[str | None] | None = None, images: list | None = None, audio: list | None = None,
                max_length: int = 512) -> dict:
        """One batch: all text, all image(+text) or all audio(+text); rows right-padded."""
        if images is not None and audio is not None:
            raise BidirLMError("a batch holds images or audio clips, not both")
        n = len(images if images is not None else audio if audio is not None else texts or [])
        texts = list(texts) if texts is not None else [None] * n
        if len(texts) != n:
            raise BidirLMError(f"{len(texts)} texts for {n} media inputs; give one (or None) per input")
        extra, counts, start, end, pad_id = {}, [0] * n, [], [], None
        if images is not None:
            extra, counts = self.images(images)
            start, end, pad_id = [self.ids["vision_start"]], [self.ids["vision_end"]], self.ids["image"]
        elif audio is not None:
            extra, counts = self.audio(audio)
            start, end, pad_id = [self.ids["audio_start"]], [self.ids["audio_end"]], self.ids["audio"]
        rows = []
        for text, count in zip(texts, counts):
            ids = self.tokenizer(text, truncation=True, max_length=max_length)["input_ids"] if text else []
            media = start + [pad_id] * count + end if count else []
            rows.append(media + ids or [self.tokenizer.pad_token_id])
        width = max(len(r) for r in rows)
        input_ids = torch.full((n, width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, :len(row)] = torch.tensor(row)
            mask[i, :len(row)] = 1
        return {"input_ids": input_ids, "attention_mask": mask, **extra}
