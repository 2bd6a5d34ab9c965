"""Published BidirLM checkpoints as native transformers folders: no remote code, once per checkpoint.

``BidirLM/BidirLM-*-Embedding`` and the MNTP ``-Base`` checkpoints ship their own modeling code
(``config.json``: ``model_type: bidirlm``, ``auto_map`` to ``modeling_bidirlm.py``); the older
Decoder2Encoder uploads are ``biqwen3`` / ``bigemma3_text``. Their networks are Qwen3 and Gemma3 decoders
run bidirectionally (Decoder2Encoder ``optimus/tools/huggingface/{biqwen,bigemma}``): each padded text
attends to all of its own tokens, and a Gemma3 sliding layer sees ``|i - j| <= sliding_window // 2``
(the config halves the window when ``use_bidirectional_attention`` is set, its default).

:func:`native_folder` writes, once, a plain folder transformers loads with its own ``Qwen3ForCausalLM`` /
``Gemma3ForCausalLM`` classes: ``config.json`` with ``is_causal: false`` (Gemma3: the halved window under
our inclusive bidirectional semantics, ``use_bidirectional_attention: false``), the weights under the
standard ``model.`` names (classification heads dropped; the weight files are linked when already
standard), and every other file (tokenizer, ``modules.json``, ``1_Pooling``...) copied; their ``*.py`` never.
``core.hub.resolve_model_folder`` calls it for every folder and hub id, so ``fit``, ``compare``, ``merge``
and :class:`~bidirlm_pl.models.encoder.Encoder` all see the native folder.

>>> native_folder(Path("~/.cache/huggingface/hub/models--BidirLM--BidirLM-1B-Embedding/snapshots/13c9..."))
... # doctest: +SKIP
PosixPath('~/.cache/bidirlm-pl/published/models--BidirLM--BidirLM-1B-Embedding-3f0c...')
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from bidirlm_pl.core.assets.cache import cache_dir, file_lock
from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.core.export import atomic_folder

PUBLISHED_TYPES = ("bidirlm", "biqwen3", "bigemma3_text")
RECORD = "bidirlm_published.json"  # what was converted, from where: written last, so its presence means complete
CONVERTER_VERSION = 1
INDEX = "model.safetensors.index.json"
CAUSAL_LM = {"qwen3": "Qwen3ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
TIED_DEFAULT = {"qwen3": False, "gemma3_text": True}  # their config classes' defaults, as transformers'
GEMMA_FIELDS = ("query_pre_attn_scalar", "hidden_activation", "rope_local_base_freq", "_sliding_window_pattern")
# their config keys that mean nothing to transformers' own classes (or would change them)
FOREIGN_KEYS = ("auto_map", "architectures", "model_type", "classifier_pooling", "clf_pooling",
                "use_bidirectional_attention", "is_causal", "transformers_version")
DECODER_PARTS = ("embed_tokens.", "layers.", "norm.")
NEVER_COPIED = (".py", ".pyc", ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl")


def read_config(folder: Path) -> dict | None:
    """A folder's ``config.json`` as a dict, or None when it is missing or not a JSON object (checked elsewhere)."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def is_published(folder: Path) -> bool:
    config = read_config(Path(folder))
    return config is not None and config.get("model_type") in PUBLISHED_TYPES


def base_architecture(config: dict) -> str:
    """``qwen3`` or ``gemma3_text``: the decoder a BidirLM config describes."""
    model_type = config.get("model_type")
    if model_type in ("biqwen3", "bigemma3_text"):
        return "qwen3" if model_type == "biqwen3" else "gemma3_text"
    if any(key in config for key in GEMMA_FIELDS):
        return "gemma3_text"
    if "hidden_act" in config and "head_dim" in config:
        return "qwen3"
    raise BidirLMError(f"a '{model_type}' config that is neither Qwen3 nor Gemma3 (no hidden_act, no "
                       "query_pre_attn_scalar); expected a BidirLM text model")


def native_config(config: dict) -> dict:
    """Their config as transformers' own ``qwen3`` / ``gemma3_text`` config, bidirectional.

    Qwen3 is always bidirectional (biqwen's attention is ``causal=False`` whatever the config says). Gemma3
    follows ``use_bidirectional_attention`` (default true): bidirectionally a sliding layer sees
    ``|i - j| <= sw // 2`` (``window_size=(sw // 2, sw // 2)``), which is our ``is_causal: false`` window
    ``sw // 2``; causally it sees ``0 <= i - j <= sw``, our causal window ``sw + 1``.
    """
    arch = base_architecture(config)
    native = {k: v for k, v in config.items() if k not in FOREIGN_KEYS}
    native.update(model_type=arch, architectures=[CAUSAL_LM[arch]], is_causal=False)
    if native.get("rope_scaling", 0) is None:  # transformers 5 warns on the legacy key even when null
        del native["rope_scaling"]
    if arch == "gemma3_text":
        bidirectional = bool(config.get("use_bidirectional_attention", True))
        native.update(is_causal=not bidirectional, use_bidirectional_attention=False)
        window = config.get("sliding_window")
        if window:
            native["sliding_window"] = window // 2 if bidirectional else window + 1
    return native


def tied_embeddings(config: dict) -> bool:
    return bool(config.get("tie_word_embeddings", TIED_DEFAULT[base_architecture(config)]))


def native_key(key: str, *, tied: bool) -> str | None:
    """The standard causal-LM name of one of their weights, or None for a weight transformers has no place for
    (classification heads, a tied output layer)."""
    base = key.removeprefix("model.")
    if base.startswith(DECODER_PARTS):
        return "model." + base
    if key == "lm_head.weight" and not tied:
        return key
    return None


def weight_files(folder: Path) -> list[str]:
    """The names of a folder's safetensors files: the index's shards, else every ``*.safetensors``."""
    index = folder / INDEX
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return sorted(p.name for p in folder.glob("*.safetensors"))


def key_map(folder: Path, *, tied: bool) -> dict[str, dict[str, str | None]]:
    """Per weight file: each key's native name (None: dropped). One line when the decoder is missing."""
    mapping = {}
    for name in weight_files(folder):
        with safe_open(str(folder / name), framework="pt") as handle:
            mapping[name] = {key: native_key(key, tied=tied) for key in handle.keys()}
    if not any(v == "model.embed_tokens.weight" for keys in mapping.values() for v in keys.values()):
        raise BidirLMError(f"'{folder}' holds no embed_tokens weight; expected a BidirLM checkpoint's weights")
    return mapping


def write_weights(source: Path, staging: Path, mapping: dict[str, dict[str, str | None]]) -> list[str]:
    """Link the weight files when every name is already standard, else rewrite them renamed; return the
    dropped keys."""
    dropped = sorted(k for keys in mapping.values() for k, v in keys.items() if v is None)
    if not dropped and all(k == v for keys in mapping.values() for k, v in keys.items()):
        for name in [*mapping, *([INDEX] if (source / INDEX).is_file() else [])]:
            os.symlink((source / name).resolve(), staging / name)
        return dropped
    weight_map = {}
    for name, keys in mapping.items():
        with safe_open(str(source / name), framework="pt") as handle:
            tensors = {new: handle.get_tensor(old) for old, new in keys.items() if new is not None}
        save_file(tensors, str(staging / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
    if (source / INDEX).is_file():
        index = json.loads((source / INDEX).read_text())
        (staging / INDEX).write_text(json.dumps({**index, "weight_map": weight_map}, indent=2))
    return dropped


def copy_other_files(source: Path, staging: Path) -> None:
    """Tokenizer, Sentence-Transformers modules, card...: everything but config.json, weights and code."""
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if (not path.is_file() or relative.parts[0].startswith(".") or path.name.endswith(NEVER_COPIED)
                or str(relative) in ("config.json", INDEX)):
            continue
        (staging / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, staging / relative)


def convert(source: Path, staging: Path, config: dict) -> None:
    """Write the native folder of ``source`` into ``staging``."""
    native = native_config(config)
    dropped = write_weights(source, staging, key_map(source, tied=tied_embeddings(config)))
    copy_other_files(source, staging)
    (staging / "config.json").write_text(json.dumps(native, indent=2, sort_keys=True))
    record = {"source": str(source), "model_type": config.get("model_type"), "architecture": native["model_type"],
              "is_causal": native["is_causal"], "sliding_window": native.get("sliding_window"),
              "dropped_weights": dropped, "converter_version": CONVERTER_VERSION}
    (staging / RECORD).write_text(json.dumps(record, indent=2))


def fingerprint(folder: Path) -> str:
    """A readable, content-keyed name for the converted folder: the repo (or folder) name and a digest of the
    source's path and of its files' sizes and times (a changed source converts again)."""
    folder = folder.absolute()
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.endswith((".py", ".pyc")))
    stats = [(str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    digest = hashlib.sha256(json.dumps([CONVERTER_VERSION, str(folder), stats]).encode()).hexdigest()
    name = folder.parent.parent.name if folder.parent.name == "snapshots" else folder.name
    return f"{''.join(c if c.isalnum() or c in '-_.' else '_' for c in name)}-{digest[:16]}"


def native_folder(folder: str | Path) -> Path:
    """``folder`` itself, or for a published BidirLM checkpoint its native folder (converted on first use, under
    ``$BIDIRLM_CACHE/published``; concurrent callers wait for one conversion)."""
    folder = Path(folder)
    config = read_config(folder)
    if config is None or config.get("model_type") not in PUBLISHED_TYPES:
        return folder
    target = cache_dir() / "published" / fingerprint(folder)
    if (target / RECORD).is_file():
        return target
    (cache_dir() / "published").mkdir(exist_ok=True)
    with file_lock(cache_dir() / "published" / f".{target.name}.lock"):
        if not (target / RECORD).is_file():
            with atomic_folder(target, overwrite=True) as staging:
                convert(folder, staging, config)
    return target
