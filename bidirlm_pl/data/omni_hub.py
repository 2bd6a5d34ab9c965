"""Hub image+caption and audio+caption rows for the omni pair stream (``hf_image_captions``, ``hf_audio_captions``).

A source names a ``datasets`` dataset (a hub id, optionally pinned with ``revision``, or a local folder),
its ``config`` and ``split``, the media column (``image_field``, an ``Image`` feature; ``audio_field``, an
``Audio`` feature) and the ``caption_field`` (a string, or a list of strings of which one is taken per row:
``caption_choice: first`` or ``seeded``, a fixed draw per row from ``caption_seed``).

Rows stay encoded until a batch needs them: a downloaded split is read row by row from its memory-mapped
cache (random access, no RAM cost), a ``streaming`` split keeps its first ``rows`` encoded rows in memory.
Decoding gives exactly what the JSONL kinds give: images as ``HxWx3`` uint8 RGB arrays (PIL), audio as a
mono float32 waveform at 16 kHz (WAV through scipy, as the JSONL kind reads it; other formats through
soundfile (the `audio` extra); other rates resampled with scipy's polyphase filter). Hub ids
resolve as everywhere (``bidirlm_pl.core.hub.load_dataset``): downloaded or streamed online, read from the
cache or a `hf download` snapshot with ``HF_HUB_OFFLINE=1``. Mistakes are one line: a missing column, a
column of the wrong feature type, an empty split, a row without a caption or an audio format no installed
decoder reads.
"""

from __future__ import annotations

import io
import random
from collections.abc import Sequence
from itertools import islice
from math import gcd
from pathlib import Path

import numpy as np

from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.core.hub import first_line, load_dataset
from bidirlm_pl.models.omni.inputs import AUDIO_RATE

HUB_KINDS = {"hf_image_captions": "image", "hf_audio_captions": "audio"}
CAPTION_CHOICES = ("first", "seeded")
HUB_FIELDS = ("dataset", "config", "revision", "image_field", "audio_field")


def check_hub_source(src) -> None:
    """Config-time checks of an :class:`bidirlm_pl.data.omni.OmniSource`'s hub fields (no data read)."""
    where = f"source '{src.name}' ({src.kind})"
    if src.kind not in HUB_KINDS:
        given = [f for f in HUB_FIELDS if getattr(src, f) is not None]
        if given:
            raise BidirLMError(f"{where} sets {given}: only hf_image_captions / hf_audio_captions read them")
        return
    if not src.dataset:
        raise BidirLMError(f"{where} needs 'dataset' (a hub id such as org/name, or a local dataset folder)")
    if src.revision and "@" in src.dataset:
        raise BidirLMError(f"{where}: give the revision once, in 'revision' or as '{src.dataset}', not both")
    other = "audio_field" if HUB_KINDS[src.kind] == "image" else "image_field"
    if getattr(src, other) is not None:
        raise BidirLMError(f"{where} sets {other}; a {HUB_KINDS[src.kind]} source reads "
                           f"{HUB_KINDS[src.kind]}_field")
    if src.caption_choice not in CAPTION_CHOICES:
        raise BidirLMError(f"{where}: caption_choice '{src.caption_choice}' is not one of {list(CAPTION_CHOICES)}")
    if src.rows < 1:
        raise BidirLMError(f"{where}: rows {src.rows} must be >= 1")


def _open(src, where: str):
    """The source's split as a ``datasets`` Dataset (downloaded) or IterableDataset (``streaming``)."""
    import datasets

    path = Path(src.dataset).expanduser()
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        try:
            loaded = datasets.load_from_disk(str(path))  # a save_to_disk folder
        except Exception as err:
            raise BidirLMError(f"{where}: cannot read the saved dataset: {first_line(err)}") from err
        if src.streaming:
            loaded = loaded.to_iterable_dataset() if isinstance(loaded, datasets.Dataset) else \
                datasets.IterableDatasetDict({k: v.to_iterable_dataset() for k, v in loaded.items()})
    else:
        ref = f"{src.dataset}@{src.revision}" if src.revision else src.dataset
        # only the split asked for is downloaded and prepared
        loaded = load_dataset(ref, name=src.config, split=src.split, streaming=src.streaming, what=where)
    if isinstance(loaded, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if src.split not in loaded:
            raise BidirLMError(f"{where}: split '{src.split}' is not one of {sorted(loaded)}")
        loaded = loaded[src.split]
    return loaded


def _is_string(feature) -> bool:
    import datasets

    return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")


def _check_columns(ds, src, media: str, media_field: str, where: str) -> bool:
    """Check the two columns' features; True when the caption column holds lists of captions."""
    import datasets

    features = ds.features
    if features is None:  # a streamed split whose files carry no feature metadata
        raise BidirLMError(f"{where}: the split declares no features; save it with datasets' Image/Audio features")
    for column in (media_field, src.caption_field):
        if column not in features:
            raise BidirLMError(f"{where}: no column '{column}'; columns are {sorted(features)}")
    feature = features[media_field]
    wanted = datasets.Image if media == "image" else datasets.Audio
    if not isinstance(feature, wanted):
        raise BidirLMError(f"{where}: column '{media_field}' is {type(feature).__name__}, "
                           f"not an {wanted.__name__} feature")
    caption = features[src.caption_field]
    if _is_string(caption):
        return False
    lists = (list, *(getattr(datasets, name) for name in ("Sequence", "List", "LargeList") if hasattr(datasets, name)))
    inner = caption[0] if isinstance(caption, list) and len(caption) == 1 else getattr(caption, "feature", None)
    if isinstance(caption, lists) and _is_string(inner):
        return True
    raise BidirLMError(f"{where}: caption column '{src.caption_field}' is {caption}; "
                       "expected strings or lists of strings")


def _bytes_of(value: dict, where: str, row: int) -> bytes:
    """The encoded file of an Image/Audio cell read with ``decode=False``: embedded bytes or the file."""
    if value is None:
        raise BidirLMError(f"{where}: row {row} has no media")
    if value.get("bytes") is not None:
        return value["bytes"]
    from datasets.utils.file_utils import xopen

    with xopen(value["path"], "rb") as handle:
        return handle.read()


def wav_samples(file) -> tuple[np.ndarray, int]:
    """A WAV file (path or file object) as float32 samples in [-1, 1] (channels last) and its rate."""
    from scipy.io import wavfile

    rate, data = wavfile.read(file)
    scale = np.iinfo(data.dtype).max if np.issubdtype(data.dtype, np.integer) else 1.0
    return data.astype(np.float32) / scale, int(rate)


def _decode_audio(data: bytes, where: str, row: int) -> tuple[np.ndarray, int]:
    try:
        return _decoded(data, where, row)
    except BidirLMError:
        raise
    except Exception as err:
        raise BidirLMError(f"{where}: row {row} is not readable audio ({first_line(err)})") from err


def _decoded(data: bytes, where: str, row: int) -> tuple[np.ndarray, int]:
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return wav_samples(io.BytesIO(data))
    try:
        import soundfile  # FLAC / OGG / MP3 (libsndfile >= 1.1): the `audio` extra
    except ImportError:
        raise BidirLMError(f"{where}: row {row} is not WAV audio; install soundfile "
                           "(pip install 'bidirlm-pl[audio]') to decode FLAC/MP3/OGG") from None
    samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    return samples, int(rate)


def to_mono_16k(samples: np.ndarray, rate: int) -> np.ndarray:
    """Average the channels (channels last), then resample to 16 kHz with a polyphase filter."""
    if samples.ndim == 2:
        samples = samples.mean(1)
    if rate != AUDIO_RATE:
        from scipy.signal import resample_poly

        g = gcd(AUDIO_RATE, rate)
        samples = resample_poly(samples, AUDIO_RATE // g, rate // g)
    return np.ascontiguousarray(samples, dtype=np.float32)


def _decode_image(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


class HubRows(Sequence):
    """``(media array, caption)`` rows of a hub split, decoded when indexed (``random.sample`` draws from it)."""

    def __init__(self, records, src, media: str, media_field: str, listed: bool, where: str):
        self.records, self.src, self.media, self.media_field = records, src, media, media_field
        self.listed, self.where = listed, where

    def __len__(self) -> int:
        return len(self.records)

    def caption(self, value, row: int) -> str:
        if self.listed:
            options = [c for c in (value or []) if isinstance(c, str) and c.strip()]
            if not options:
                raise BidirLMError(f"{self.where}: row {row} has no caption in '{self.src.caption_field}'")
            if self.src.caption_choice == "first":
                return options[0]
            return options[random.Random(self.src.caption_seed * 1_000_003 + row).randrange(len(options))]
        if not isinstance(value, str) or not value.strip():
            raise BidirLMError(f"{self.where}: row {row} has no caption in '{self.src.caption_field}'")
        return value

    def __getitem__(self, row: int) -> tuple:
        if isinstance(row, slice):
            return [self[i] for i in range(*row.indices(len(self)))]
        record = self.records[row]
        data = _bytes_of(record[self.media_field], self.where, row)
        if self.media == "image":
            try:
                array = _decode_image(data)
            except OSError as err:
                raise BidirLMError(f"{self.where}: row {row} is not a readable image ({err})") from err
        else:
            array = to_mono_16k(*_decode_audio(data, self.where, row))
            if array.size == 0:
                raise BidirLMError(f"{self.where}: row {row} is an empty audio clip")
        return array, self.caption(record[self.src.caption_field], row)


def hub_caption_rows(src) -> HubRows:
    """The first ``src.rows`` rows of a hub image/audio caption split, decoded lazily; row 0 is decoded now."""
    import datasets

    media = HUB_KINDS[src.kind]
    media_field = (src.image_field if media == "image" else src.audio_field) or media
    where = f"source '{src.name}' ({src.dataset})"
    ds = _open(src, where)
    listed = _check_columns(ds, src, media, media_field, where)
    ds = ds.select_columns([media_field, src.caption_field])
    feature = datasets.Image(decode=False) if media == "image" else datasets.Audio(decode=False)
    ds = ds.cast_column(media_field, feature)  # keep the encoded file; decoded per drawn row
    if isinstance(ds, datasets.Dataset):
        records = ds.select(range(min(src.rows, len(ds))))
    else:
        records = list(islice(ds, src.rows))
    if len(records) == 0:
        raise BidirLMError(f"{where}: split '{src.split}' is empty")
    rows = HubRows(records, src, media, media_field, listed, where)
    rows[0]  # fail at setup, not at the first batch of this modality, when the data cannot be decoded
    return rows
