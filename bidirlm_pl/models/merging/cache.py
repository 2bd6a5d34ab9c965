"""A merge run once and reused: its folder is named by a hash of everything that decides the merged weights.

A stage that trains on a merge (``FinetuneStage(merge_with=...)``) points ``MergeSpec.output`` at
:func:`merge_cache_folder` and calls :func:`cached_merge` before it loads its backbone: the first run
writes the folder (atomically, ``engine.merge``), later runs with the same models, weights and method read it.
A model rewritten in place (its weight files change size or time) gets a new folder.

>>> spec = MergeSpec(models=["tiny-qwen3", "runs/specialist"], weights=[0.5, 0.5], output="")  # doctest: +SKIP
>>> spec.output = str(merge_cache_folder(spec, None)); cached_merge(spec)  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from bidirlm_pl.core import assets
from bidirlm_pl.models.merging.engine import RECORD_FILE, MergeReport, MergeSpec, merge
from bidirlm_pl.models.merging.safetensors_io import is_weight_file, resolve_folder

NOT_IDENTITY = ("output", "overwrite", "block_elements")  # where and how the folder is written, not what it holds


def _fingerprint(name: str) -> dict:
    """The resolved folder of a model and the size and time of its config and weight files."""
    folder = resolve_folder(name).resolve()
    files = sorted(p for p in folder.iterdir() if p.is_file() and (is_weight_file(p) or p.name == "config.json"))
    return {"folder": str(folder), "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]}


def merge_cache_folder(spec: MergeSpec, cache: str | None) -> Path:
    """``<cache>/merge-<hash>`` (default cache ``<asset cache>/merges``) for the merge ``spec`` describes."""
    identity = {k: v for k, v in vars(spec).items() if k not in NOT_IDENTITY}
    identity["models"] = [_fingerprint(m) for m in spec.models]
    identity["base"] = _fingerprint(spec.base) if spec.base is not None else None
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
    root = Path(cache).expanduser() if cache else assets.cache_dir() / "merges"
    return root / f"merge-{digest}"


def is_merged(folder: str | Path) -> bool:
    """True once a merge has been renamed into ``folder`` (its record is written last, inside the staging folder)."""
    return (Path(folder) / RECORD_FILE).is_file()


def cached_merge(spec: MergeSpec) -> MergeReport | None:
    """Merge into ``spec.output`` unless a complete merge is there already; the report, or None when reused."""
    if is_merged(spec.output):
        return None
    return merge(spec)
