"""Checks of a model folder's files before anything loads them: each bad file is one line naming itself.

A folder needs a ``config.json`` that is JSON and names an architecture transformers knows, and
safetensors weights (one file or an index with its shards) whose headers read; a tokenizer where
one is needed. Pickled weights (``pytorch_model.bin``) are refused: nothing here unpickles files.
"""

from __future__ import annotations

import json
from pathlib import Path

from bidirlm_pl.core.errors import BidirLMError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")


def check_config(folder: Path) -> dict:
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise BidirLMError(f"{path} is not JSON ({err.msg} at line {err.lineno} column {err.colno})") from err
    except UnicodeDecodeError as err:
        raise BidirLMError(f"{path} is not UTF-8 text; expected a JSON model configuration") from err
    if not isinstance(config, dict):
        raise BidirLMError(f"{path} holds a {type(config).__name__}, not a JSON object")
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING_NAMES:
        raise BidirLMError(f"{path} names model_type {model_type!r}, an architecture transformers does not know; "
                           "expected e.g. 'qwen3', 'gemma3', 'gemma3_text' or 'llama'")
    return config


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder (the index's shards when there is one); errors name what is wrong."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as err:
            raise BidirLMError(f"{index} is not a safetensors index (JSON with a 'weight_map')") from err
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise BidirLMError(f"{index} lists shards that are missing: {missing}")
        return [folder / s for s in shards]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickled = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
    if pickled:
        raise BidirLMError(f"model folder '{folder}' holds only pickled weights {pickled}; this tool loads "
                           "safetensors only (convert with save_pretrained(..., safe_serialization=True))")
    raise BidirLMError(f"model folder '{folder}' has no weights; expected model.safetensors or a sharded index")


def check_weights(folder: Path) -> None:
    """Every safetensors file's header reads and covers the file (a truncated download fails here)."""
    from safetensors import safe_open

    for path in weight_files(folder):
        try:
            with safe_open(str(path), framework="pt") as handle:
                handle.keys()
        except Exception as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise BidirLMError(f"{path} is truncated or not a safetensors file ({reason})") from err


def check_tokenizer(folder: Path) -> None:
    if not any((folder / name).exists() for name in TOKENIZER_FILES):
        raise BidirLMError(f"model folder '{folder}' has no tokenizer (none of {list(TOKENIZER_FILES)}); "
                           "copy the base model's tokenizer files into it")
