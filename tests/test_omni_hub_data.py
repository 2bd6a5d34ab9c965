"""Hub image/audio caption sources of the omni pair stream (``hf_image_captions``, ``hf_audio_captions``).

Tiny datasets are written as a hub repo would hold them (parquet under data/, with datasets' Image and Audio
features), served offline from a `hf download`-style snapshot in a temporary hub cache. The hub kinds must give
the same rows and the same batches as the JSONL kinds over the same files; other rates resample to 16 kHz mono;
list captions pick one per row; mistakes are one line.
"""

import json

import datasets
import numpy as np
import pytest
import torch
from huggingface_hub import constants
from scipy.io import wavfile

from bidirlm_pl.cli.compose import OmniSource as ComposeSource
from bidirlm_pl.cli.compose import OmniSpec, compose
from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.data import omni_hub
from bidirlm_pl.data.omni import LENGTHS, PITCHES, OmniPairsData, OmniSource, load_source, shape_image, tone

SHAPES = [("red", "circle"), ("blue", "square"), ("green", "stripe"), ("yellow", "circle"), ("red", "stripe"),
          ("blue", "circle")]
TONES = [(p, n) for p in list(PITCHES)[:3] for n in list(LENGTHS)[:2]]


def _png(path, array):
    from PIL import Image

    Image.fromarray(array).save(path)
    return path.read_bytes()


def _write_repo(root, columns: dict, features: dict, split="train"):
    """A dataset repo folder as push_to_hub lays it out: data/<split>-00000-of-00001.parquet."""
    if all(len(v) == 0 for v in columns.values()):
        ds = datasets.Dataset.from_dict(columns, features=datasets.Features(features))
    else:
        ds = datasets.Dataset.from_dict(columns)
        for name, feature in features.items():
            ds = ds.cast_column(name, feature)
    (root / "data").mkdir(parents=True, exist_ok=True)
    ds.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return root


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A temporary hub cache; ``hub(repo_id, folder, revision)`` files a snapshot as `hf download` does."""
    cache = tmp_path / "hub-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def add(repo_id, folder, revision="main", commit="0" * 39 + "1"):
        storage = cache / f"datasets--{repo_id.replace('/', '--')}"
        (storage / "refs").mkdir(parents=True, exist_ok=True)
        (storage / "refs" / revision).write_text(commit)
        (storage / "snapshots").mkdir(exist_ok=True)
        (folder).rename(storage / "snapshots" / commit)
        return repo_id

    return add


@pytest.fixture
def media(tmp_path):
    """The same shapes and tones as JSONL files (PNG, 16 kHz float WAV) and as hub-shaped parquet repos."""
    files = tmp_path / "files"
    files.mkdir()
    images, audio = [], []
    with open(files / "images.jsonl", "w") as out:
        for i, (colour, shape) in enumerate(SHAPES):
            images.append({"bytes": _png(files / f"{i}.png", shape_image(colour, shape)), "path": None})
            out.write(json.dumps({"image": f"{i}.png", "caption": f"a {colour} {shape}"}) + "\n")
    with open(files / "audio.jsonl", "w") as out:
        for i, (pitch, length) in enumerate(TONES):
            wavfile.write(files / f"{i}.wav", 16000, tone(pitch, length))
            audio.append({"bytes": (files / f"{i}.wav").read_bytes(), "path": None})
            out.write(json.dumps({"audio": f"{i}.wav", "caption": f"a {pitch} {length} tone"}) + "\n")
    image_repo = _write_repo(tmp_path / "image-repo", {"image": images, "caption": [f"a {c} {s}" for c, s in SHAPES]},
                             {"image": datasets.Image()})
    audio_repo = _write_repo(tmp_path / "audio-repo",
                             {"clip": audio, "text": [f"a {p} {n} tone" for p, n in TONES]},
                             {"clip": datasets.Audio()})
    return {"files": files, "image_repo": image_repo, "audio_repo": audio_repo}


def _rows(**fields):
    return load_source(OmniSource(**{"name": "src", "rows": 64, **fields}))


def _same_rows(a, b):
    assert len(a) == len(b)
    for (x, cx), (y, cy) in zip(a, b):
        assert cx == cy and x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y)


def test_hub_rows_equal_the_jsonl_rows_offline_from_a_snapshot(media, hub):
    hub("acme/shapes", media["image_repo"])
    hub("acme/tones", media["audio_repo"], revision="v1", commit="0" * 39 + "2")
    jsonl_images = _rows(kind="image_captions", path=str(media["files"] / "images.jsonl"))
    jsonl_audio = _rows(kind="audio_captions", path=str(media["files"] / "audio.jsonl"))
    hub_images = _rows(kind="hf_image_captions", dataset="acme/shapes")
    hub_audio = _rows(kind="hf_audio_captions", dataset="acme/tones", revision="v1", audio_field="clip",
                      caption_field="text")
    _same_rows(hub_images, jsonl_images)
    _same_rows(hub_audio, jsonl_audio)
    # streamed: the first `rows` rows, the same rows
    _same_rows(_rows(kind="hf_image_captions", dataset="acme/shapes", streaming=True, rows=4), jsonl_images[:4])
    assert len(_rows(kind="hf_image_captions", dataset="acme/shapes", rows=3)) == 3


def test_other_rates_and_stereo_become_16k_mono(tmp_path):
    rate, seconds, pitch = 8000, 0.5, 440.0
    t = np.arange(int(rate * seconds)) / rate
    left = (0.5 * np.sin(2 * np.pi * pitch * t)).astype(np.float32)
    stereo = np.stack([left, left], axis=1)
    wavfile.write(tmp_path / "s.wav", rate, (stereo * 32767).astype(np.int16))
    repo = _write_repo(tmp_path / "repo", {"audio": [{"bytes": (tmp_path / "s.wav").read_bytes(), "path": None}],
                                           "caption": ["a tone"]}, {"audio": datasets.Audio()})
    (clip, caption), = _rows(kind="hf_audio_captions", dataset=str(repo))
    assert caption == "a tone" and clip.dtype == np.float32 and clip.ndim == 1
    assert clip.shape == (int(16000 * seconds),)  # 8 kHz -> 16 kHz: twice the samples
    t16 = np.arange(clip.size) / 16000
    reference = 0.5 * np.sin(2 * np.pi * pitch * t16)
    middle = slice(400, -400)  # away from the filter's edges
    assert np.corrcoef(clip[middle], reference[middle])[0, 1] > 0.999
    assert abs(np.abs(clip[middle]).max() - 0.5) < 0.01


def test_list_captions_first_or_a_fixed_draw_per_row(tmp_path):
    options = [[f"row {i} caption {j}" for j in range(5)] for i in range(6)]
    images = [{"bytes": _png(tmp_path / f"{i}.png", shape_image(c, s)), "path": None} for i, (c, s) in enumerate(SHAPES)]
    repo = _write_repo(tmp_path / "repo", {"image": images, "captions": options}, {"image": datasets.Image()})
    first = [c for _, c in _rows(kind="hf_image_captions", dataset=str(repo), caption_field="captions")]
    assert first == [o[0] for o in options]
    seeded = [c for _, c in _rows(kind="hf_image_captions", dataset=str(repo), caption_field="captions",
                                  caption_choice="seeded")]
    again = [c for _, c in _rows(kind="hf_image_captions", dataset=str(repo), caption_field="captions",
                                 caption_choice="seeded")]
    other = [c for _, c in _rows(kind="hf_image_captions", dataset=str(repo), caption_field="captions",
                                 caption_choice="seeded", caption_seed=1)]
    assert seeded == again and seeded != first and seeded != other
    assert all(c in o for c, o in zip(seeded, options))
    # a save_to_disk folder reads the same rows
    datasets.load_dataset(str(repo)).save_to_disk(str(tmp_path / "saved"))
    _same_rows(_rows(kind="hf_image_captions", dataset=str(tmp_path / "saved"), caption_field="captions"),
               _rows(kind="hf_image_captions", dataset=str(repo), caption_field="captions"))
    # a row's draw depends on the row, not on how many rows are read
    assert [c for _, c in _rows(kind="hf_image_captions", dataset=str(repo), caption_field="captions",
                                caption_choice="seeded", rows=2)] == seeded[:2]


def test_bad_hub_sources_are_one_line(tmp_path, media, monkeypatch):
    repo = str(media["image_repo"])
    cases = [
        ({"caption_field": "text"}, r"no column 'text'; columns are \['caption', 'image'\]"),
        ({"image_field": "caption"}, r"column 'caption' is Value, not an Image feature"),
        ({"caption_field": "image"}, r"caption column 'image' is Image"),
        ({"split": "test"}, r"Unknown split \"test\". Should be one of \['train'\]"),
    ]
    for fields, message in cases:
        with pytest.raises(BidirLMError, match=message):
            _rows(kind="hf_image_captions", dataset=repo, **fields)
    with pytest.raises(BidirLMError, match=r"column 'clip' is Audio, not an Image feature"):
        _rows(kind="hf_image_captions", dataset=str(media["audio_repo"]), image_field="clip", caption_field="text")
    empty = _write_repo(tmp_path / "empty", {"image": [], "caption": []},
                        {"image": datasets.Image(), "caption": datasets.Value("string")})
    with pytest.raises(BidirLMError, match="split 'train' is empty"):
        _rows(kind="hf_image_captions", dataset=str(empty), streaming=True)
    with pytest.raises(BidirLMError, match='"train" corresponds to no data'):  # datasets' own words, one line
        _rows(kind="hf_image_captions", dataset=str(empty))
    no_caption = _write_repo(tmp_path / "nocap", {"image": [{"bytes": _png(tmp_path / "x.png", shape_image("red", "circle")),
                                                             "path": None}], "caption": [["", " "]]},
                             {"image": datasets.Image()})
    with pytest.raises(BidirLMError, match="row 0 has no caption in 'caption'"):
        _rows(kind="hf_image_captions", dataset=str(no_caption))
    flac = _write_repo(tmp_path / "flac", {"audio": [{"bytes": b"fLaC" + bytes(64), "path": "x.flac"}],
                                           "caption": ["x"]}, {"audio": datasets.Audio()})
    broken = _write_repo(tmp_path / "broken", {"audio": [{"bytes": b"RIFF\0\0\0\0WAVEjunk", "path": "x.wav"}],
                                               "caption": ["x"]}, {"audio": datasets.Audio()})
    with pytest.raises(BidirLMError, match=r"row 0 is not readable audio \("):
        _rows(kind="hf_audio_captions", dataset=str(broken))
    monkeypatch.setitem(__import__("sys").modules, "soundfile", None)
    with pytest.raises(BidirLMError, match="row 0 is not WAV audio; install soundfile"):
        _rows(kind="hf_audio_captions", dataset=str(flac))
    with pytest.raises(BidirLMError, match="not in the Hugging Face cache"):
        _rows(kind="hf_image_captions", dataset="acme/not-fetched")
    # config-time checks: OmniPairsData refuses before reading anything
    for fields, message in [({"kind": "hf_image_captions"}, "needs 'dataset'"),
                            ({"kind": "hf_audio_captions", "dataset": "a/b", "image_field": "img"},
                             "sets image_field; a audio source reads audio_field"),
                            ({"kind": "hf_image_captions", "dataset": "a/b@v1", "revision": "v2"}, "give the revision once"),
                            ({"kind": "hf_image_captions", "dataset": "a/b", "caption_choice": "all"},
                             "caption_choice 'all' is not one of"),
                            ({"kind": "shapes", "dataset": "a/b"}, r"sets \['dataset'\]: only hf_image_captions")]:
        with pytest.raises(BidirLMError, match=message):
            OmniPairsData(tokenizer="x", sources=[{"name": "s", **fields}])


@pytest.fixture(scope="module")
def composed(tmp_path_factory):
    towers = {"vision": ["model.visual."], "audio": ["model.audio_tower.", "model.multi_modal_projector."]}
    spec = OmniSpec(output=str(tmp_path_factory.mktemp("omni") / "composed"), sources={
        "text": ComposeSource(model="tiny-omni-text"),
        "vision": ComposeSource(model="tiny-qwen3-vl", key_map={"model.language_model.": "model."},
                                towers=towers["vision"]),
        "audio": ComposeSource(model="tiny-qwen3-asr", key_map={"model.language_model.": "model."},
                               towers=towers["audio"])})
    return compose(spec)


def _batches(composed, sources, n):
    data = OmniPairsData(tokenizer=str(composed), sources=sources, batch_size=4, max_length=16, seed=3)
    data.setup()
    stream = iter(data.train_dataloader())
    return [next(stream) for _ in range(n)]


def test_hub_sources_yield_the_same_batches_as_jsonl(composed, media, hub):
    hub("acme/shapes", media["image_repo"])
    hub("acme/tones", media["audio_repo"])
    jsonl = [{"name": "image", "kind": "image_captions", "path": str(media["files"] / "images.jsonl")},
             {"name": "audio", "kind": "audio_captions", "path": str(media["files"] / "audio.jsonl")}]
    hubbed = [{"name": "image", "kind": "hf_image_captions", "dataset": "acme/shapes"},
              {"name": "audio", "kind": "hf_audio_captions", "dataset": "acme/tones", "audio_field": "clip",
               "caption_field": "text"}]
    want, got = _batches(composed, jsonl, 4), _batches(composed, hubbed, 4)
    assert {b["modality"] for b in want} == {"image", "audio"}
    for a, b in zip(want, got):
        assert a["modality"] == b["modality"]
        for side in ("query", "positive"):
            assert a[side].keys() == b[side].keys()
            assert all(torch.equal(a[side][k], b[side][k]) for k in a[side])


def test_hub_rows_decode_only_when_drawn(media, monkeypatch):
    calls = []
    decode = omni_hub._decode_image
    monkeypatch.setattr(omni_hub, "_decode_image", lambda data: calls.append(1) or decode(data))
    rows = _rows(kind="hf_image_captions", dataset=str(media["image_repo"]))
    assert len(rows) == len(SHAPES) and len(calls) == 1  # row 0, checked at setup
    rows[4]
    assert len(calls) == 2
