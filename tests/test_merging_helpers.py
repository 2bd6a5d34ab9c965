"""Helpers (no tests here) for the merge tests: perturbed, sharded, bf16 copies of tiny checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def state(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) folder, read with safetensors."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        out = {}
        for file in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            out.update(load_file(folder / file))
        return out
    return load_file(folder / "model.safetensors")


def write_copy(source: Path, target: Path, tensors: dict[str, torch.Tensor], *, shards: int = 1,
               config_update: dict | None = None) -> Path:
    """``source``'s side files with ``tensors`` as weights, in ``shards`` files (index written when > 1)."""
    target = Path(target)
    target.mkdir(parents=True)
    for item in Path(source).iterdir():
        if item.is_file() and not item.name.startswith("model"):
            shutil.copy2(item, target / item.name)
    if config_update:
        config = json.loads((target / "config.json").read_text())
        config.update(config_update)
        (target / "config.json").write_text(json.dumps(config))
    names = list(tensors)
    if shards == 1:
        save_file({k: v.contiguous() for k, v in tensors.items()}, target / "model.safetensors",
                  metadata={"format": "pt"})
        return target
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i::shards]
        save_file({k: tensors[k].contiguous() for k in part}, target / file, metadata={"format": "pt"})
        weight_map.update({k: file for k in part})
    (target / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return target


def perturbed(source: Path, target: Path, seed: int, scale: float = 0.05, **kwargs) -> Path:
    generator = torch.Generator().manual_seed(seed)
    tensors = {k: v + scale * torch.randn(v.shape, generator=generator, dtype=v.dtype)
               for k, v in state(source).items()}
    return write_copy(source, target, tensors, **kwargs)
