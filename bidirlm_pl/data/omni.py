"""Multimodal contrastive pairs for the omni stage: text-text, image-text and audio-text, one modality per batch.

Each batch's modality is drawn by weight (the BidirLM-Omni mix is 65% text, 17.5% audio, 17.5%
image), then a global batch of pairs of that source, of which each process takes its slice
(``bidirlm_pl.data.global_batches``); the loss takes in-batch negatives (gathered over processes).
The stream is endless and resumable (its position is saved in checkpoints). A batch is
``{"modality", "query": inputs, "positive": inputs}`` prepared with the composed model's own
processors (:class:`bidirlm_pl.models.omni.inputs.OmniInputs`).

Sources (``kind``):

* ``text``: any contrastive :class:`bidirlm_pl.data.pairs.PairSource` (``pair`` holds its fields),
  e.g. Lee first/second halves;
* ``image_captions`` / ``audio_captions``: JSONL rows ``{"image": path, "caption": text}`` or
  ``{"audio": path.wav, "caption": text}`` (paths relative to the file; WAV read with scipy, mono, 16 kHz);
* ``hf_image_captions`` / ``hf_audio_captions``: a ``datasets`` split (hub id or local folder) with an
  ``Image`` / ``Audio`` column and a caption column (one string, or a list of which one is taken per row),
  decoded lazily into the same rows as the JSONL kinds (audio resampled to 16 kHz mono):
  :mod:`bidirlm_pl.data.omni_hub`;
* ``shapes`` / ``tones``: generated offline, every combination once (12 shapes: 4 colours x square,
  circle, stripe; 15 tones: 5 pitches x 3 lengths): a coloured shape on a grey background captioned
  "a red circle"; a sine tone captioned "a high short tone". For smoke runs and tests, not for quality.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
from torch.utils.data import DataLoader, IterableDataset

from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.data.global_batches import (
    STATE_KEY,
    ResumableStream,
    rank_rows,
    world_of,
)
from bidirlm_pl.data.omni_hub import HUB_KINDS, check_hub_source, hub_caption_rows, wav_samples
from bidirlm_pl.data.pairs import PairSource, load_rows
from bidirlm_pl.models.omni.inputs import AUDIO_RATE, OmniInputs

KINDS = ("text", "image_captions", "audio_captions", "shapes", "tones", *HUB_KINDS)
MODALITY = {"text": "text", "image_captions": "image", "shapes": "image", "audio_captions": "audio", "tones": "audio",
            **HUB_KINDS}
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}
SHAPES = ("square", "circle", "stripe")
PITCHES = {"very low": 110.0, "low": 220.0, "middle": 440.0, "high": 880.0, "very high": 1760.0}
LENGTHS = {"short": 0.5, "medium": 1.0, "long": 1.5}


@dataclass
class OmniSource:
    """One source of the omni pair stream; the ``hf_*`` fields are read by the hub kinds only.

    Args:
        dataset: hub id (``org/name``) or local dataset folder; ``revision`` pins a branch, tag or commit.
        config: the dataset's configuration (subset); ``split`` its split.
        image_field / audio_field: the ``Image`` / ``Audio`` column (default ``image`` / ``audio``).
        caption_field: the caption column: a string, or a list of strings of which one is used per row,
            the first (``caption_choice: first``) or a fixed draw per row from ``caption_seed`` (``seeded``).
        streaming: stream the split and keep its first ``rows`` encoded rows in memory (else download it
            and read rows from the memory-mapped cache).
    """

    name: str
    kind: str
    weight: float = 1.0
    path: str | None = None
    rows: int = 64
    pair: dict = field(default_factory=dict)
    dataset: str | None = None
    config: str | None = None
    split: str = "train"
    revision: str | None = None
    image_field: str | None = None
    audio_field: str | None = None
    caption_field: str = "caption"
    caption_choice: str = "first"
    caption_seed: int = 0
    streaming: bool = False


def shape_image(colour: str, shape: str, size: int = 64) -> np.ndarray:
    """A ``size x size`` RGB image: a coloured shape on a grey background."""
    img = np.full((size, size, 3), 128, dtype=np.uint8)
    yy, xx = np.mgrid[:size, :size]
    c = size / 2
    mask = {"square": (abs(yy - c) < size / 4) & (abs(xx - c) < size / 4),
            "circle": (yy - c) ** 2 + (xx - c) ** 2 < (size / 3) ** 2,
            "stripe": abs(yy - c) < size / 8}[shape]
    img[mask] = COLOURS[colour]
    return img


def tone(pitch: str, length: str) -> np.ndarray:
    t = np.arange(int(LENGTHS[length] * AUDIO_RATE)) / AUDIO_RATE
    return (0.5 * np.sin(2 * np.pi * PITCHES[pitch] * t)).astype(np.float32)


def _read_wav(path: Path) -> np.ndarray:
    data, rate = wav_samples(path)
    if data.ndim == 2:
        data = data.mean(1)
    if rate != AUDIO_RATE:
        raise BidirLMError(f"audio file '{path}' is {rate} Hz; expected {AUDIO_RATE} Hz (resample it first)")
    return data


def _caption_rows(src: OmniSource, media: str) -> list[tuple]:
    path = Path(src.path or "")
    if not path.is_file():
        raise BidirLMError(f"source '{src.name}' ({src.kind}) path '{src.path}' is not a JSONL file")
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            file, caption = path.parent / row[media], row["caption"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise BidirLMError(f"{path}:{i}: expected {{\"{media}\": path, \"caption\": text}}") from err
        if media == "image":
            from PIL import Image

            rows.append((np.asarray(Image.open(file).convert("RGB")), caption))
        else:
            rows.append((_read_wav(file), caption))
        if len(rows) >= src.rows:
            break
    return rows


def load_source(src: OmniSource) -> Sequence[tuple]:
    """(query, caption/positive) rows of one source; media queries are arrays (hub rows decode when indexed)."""
    if src.kind not in KINDS:
        raise BidirLMError(f"source '{src.name}' kind '{src.kind}' is not one of {list(KINDS)}")
    if src.kind == "text":
        pair = PairSource(**{"name": src.name, "mode": "halves", "kind": "lee", "max_rows": src.rows, **src.pair})
        return [(r["anchor"], r["positive"]) for r in load_rows(pair)]
    # generated sources: every combination once, so a batch never holds two rows with one caption
    if src.kind == "shapes":
        return [(shape_image(c, s), f"a {c} {s}") for c in COLOURS for s in SHAPES][:src.rows]
    if src.kind == "tones":
        return [(tone(p, n), f"a {p} {n} tone") for p in PITCHES for n in LENGTHS][:src.rows]
    if src.kind in HUB_KINDS:
        return hub_caption_rows(src)  # decoded when drawn
    return _caption_rows(src, "image" if src.kind == "image_captions" else "audio")


class _Batches(IterableDataset):
    """The endless batch stream from draw ``start`` on: global batches, this rank's slice of each."""

    def __init__(self, module: OmniPairsData, start: int):
        self.module, self.start = module, start

    def __iter__(self):
        m = self.module
        world, rank = world_of(m)
        per_rank = m.per_rank_batch_size()
        rng = random.Random(m.seed)
        weights = [s.weight for s in m.sources]
        signature = m.stream_signature()
        index = 0
        while True:
            i = rng.choices(range(len(m.sources)), weights=weights)[0]
            # the same draw as rng.sample(m.rows[i], k), but only this rank's rows are read (hub rows decode
            # when indexed), and none for the draws a resumed stream skips
            picked = rng.sample(range(len(m.rows[i])), min(per_rank * world, len(m.rows[i])))
            index += 1
            if index <= self.start:
                continue  # resumed: these draws were trained on before the checkpoint
            rows = [m.rows[i][j] for j in picked[rank_rows(len(picked), rank, world, per_rank)]]
            batch = m.collate(MODALITY[m.sources[i].kind], rows)
            batch[STATE_KEY] = {"index": index, "signature": signature}
            yield batch


class OmniPairsData(ResumableStream, L.LightningDataModule):
    """Multimodal pairs, one modality per batch drawn by weight; endless (bound the run with ``max_steps``).

    Args:
        tokenizer: the composed folder (its tokenizer and processors; the CLI links it to the model).
        sources: :class:`OmniSource` entries.
        batch_size: pairs per batch per process; ``global_batch_size`` fixes it over all processes.
        max_length: token limit of each text.
        seed: seeds the modality and row draws.
        resume_stream: on resume, continue the checkpoint's stream (``false``: a fresh stream).
    """

    def __init__(self, tokenizer: str | None = None, sources: list[OmniSource] | None = None, batch_size: int = 8,
                 max_length: int = 64, seed: int = 0, global_batch_size: int | None = None,
                 resume_stream: bool = True):
        super().__init__()
        if not sources:
            raise BidirLMError("OmniPairsData needs at least one source")
        self.sources = [OmniSource(**s) if isinstance(s, dict) else s for s in sources]
        for src in self.sources:
            if src.kind not in KINDS:
                raise BidirLMError(f"source '{src.name}' kind '{src.kind}' is not one of {list(KINDS)}")
            if not src.weight > 0:
                raise BidirLMError(f"source '{src.name}' weight {src.weight} must be > 0")
            check_hub_source(src)
        if batch_size < 2:
            raise BidirLMError(f"batch_size {batch_size} must be >= 2: InfoNCE needs in-batch negatives")
        self.tokenizer_name, self.batch_size, self.max_length, self.seed = tokenizer, batch_size, max_length, seed
        self.global_batch_size = global_batch_size
        self.init_stream(resume_stream)
        self.inputs = None

    stream_name = "omni pair stream"

    def stream_sources(self) -> list[tuple[str, float]]:
        return [(s.name, s.weight) for s in self.sources]

    def setup(self, stage: str | None = None) -> None:
        if self.inputs is not None:
            return
        if self.tokenizer_name is None:
            raise BidirLMError("OmniPairsData needs 'tokenizer' (the composed folder; the CLI links it to the model)")
        trainer = getattr(self, "trainer", None)
        if stage == "fit" and trainer is not None and trainer.max_steps in (None, -1):
            raise BidirLMError("the omni pair stream is endless: set trainer.max_steps (e.g. --trainer.max_steps 1000)")
        self.inputs = OmniInputs.from_folder(self.tokenizer_name)
        self.rows = [load_source(src) for src in self.sources]

    def collate(self, modality: str, rows: list[tuple]) -> dict:
        queries, positives = [r[0] for r in rows], [r[1] for r in rows]
        media = {"image": {"images": queries}, "audio": {"audio": queries}}.get(modality)
        query = self.inputs.prepare(None, max_length=self.max_length, **media) if media else \
            self.inputs.prepare(queries, max_length=self.max_length)
        return {"modality": modality, "query": query,
                "positive": self.inputs.prepare(positives, max_length=self.max_length)}

    def train_dataloader(self):
        state = self.stream_start() or {"index": 0}
        return DataLoader(_Batches(self, int(state["index"])), batch_size=None)
