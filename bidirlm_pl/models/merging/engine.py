"""The streaming merge: read row blocks of each model's tensor, combine in fp32, append to the output shards.

Peak memory is a few row blocks (``block_elements`` fp32 values each) per model, whatever the
number or size of the models; TIES alone reads whole tensors. The output folder appears only when
complete (``atomic_folder``): a failed merge leaves nothing behind.

>>> from bidirlm_pl.models.merging import MergeSpec, merge
>>> report = merge(MergeSpec(models=["adapted", "gemma3-270m"], weights=[0.5, 0.5],
...                          output="runs/merged"))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.core.export import atomic_folder
from bidirlm_pl.models.merging.keymap import Entry, KeyMap, KeyReport, match_keys
from bidirlm_pl.models.merging.methods import Method, Stats, build_method
from bidirlm_pl.models.merging.safetensors_io import (
    FLOAT_DTYPES,
    Checkpoint,
    PlannedTensor,
    StreamingWriter,
    is_weight_file,
    parse_size,
    row_blocks,
)

OUTPUT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOKENIZER_FILES = ("tokenizer", "special_tokens_map", "added_tokens", "vocab", "merges", "spiece", "chat_template")
RECORD_FILE = "merge_config.json"


@dataclass
class MergeSpec:
    """Everything a merge needs; the CLI flags and a ``--config merge.yaml`` both fill this.

    Args:
        models: model folders or offline asset names, at least one.
        weights: one per model. linear/slerp: non-negative, normalised by their sum (slerp: t = w1/(w0+w1));
            task_arithmetic: scales of the task vectors (model - base), may be negative; ties: non-negative.
        output: the folder to write; refused if it exists unless ``overwrite``.
        method: linear, slerp, task_arithmetic or ties.
        base: the common ancestor for task_arithmetic and ties.
        dtype: output dtype (float32, bfloat16, float16); default: each tensor keeps the source's dtype.
        config_from: which model (a path from ``models``/``base``, or its index in ``models``) gives
            config.json, the key layout and the components outside the key maps. Default: the first model.
        tokenizer_from: which model's tokenizer files to copy (same forms). Default: ``config_from``.
        key_maps: per model (same order as ``models``), prefix renames into the shared backbone,
            e.g. ``{"model.language_model.": "model."}`` for a VLM; ``None`` entries mean identity.
        base_key_map: the same for ``base``.
        attach: other models (paths or indices) whose components outside their key map (a vision or audio
            tower, a projector) are copied unchanged into the output as well, e.g. to compose modalities.
        unmatched: ``error`` when keys meet nothing in another model, or ``report`` (copy/skip and list them).
        shape_policy: ``error`` on shape mismatches, ``copy`` the source tensor, or ``common_rows``
            (merge the shared leading rows, e.g. a common vocabulary, keep the source's extra rows).
        density: fraction of each task vector TIES keeps.
        normalize: divide linear weights by their sum.
        max_shard_size: output shard size (``2GB``, ``500MB``, bytes).
        block_elements: values per row block read at a time (memory knob).
        overwrite: replace an existing output folder.
    """

    models: list[str]
    weights: list[float]
    output: str
    method: str = "linear"
    base: str | None = None
    dtype: str | None = None
    config_from: str | None = None
    tokenizer_from: str | None = None
    key_maps: list[dict[str, str] | None] | None = None
    base_key_map: dict[str, str] | None = None
    attach: list[str] | None = None
    unmatched: str = "error"
    shape_policy: str = "error"
    density: float = 0.5
    normalize: bool = True
    max_shard_size: str = "2GB"
    block_elements: int = 4 * 2**20
    overwrite: bool = False


@dataclass
class MergeReport:
    output: str
    method: str
    merged_tensors: int
    copied_components: list[str] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)
    shape_policy_applied: list[str] = field(default_factory=list)
    aliased: list[str] = field(default_factory=list)
    total_bytes: int = 0
    shards: int = 1
    seconds: float = 0.0

    def summary(self) -> str:
        lines = [(f"merged {self.merged_tensors} tensors ({self.method}) into {self.output}: "
                  f"{self.total_bytes / 1e9:.3f} GB in {self.shards} shard(s), {self.seconds:.1f} s")]
        if self.copied_components:
            lines.append(f"copied unchanged from the source: {len(self.copied_components)} tensors "
                         f"(e.g. {self.copied_components[0]})")
        for title, items in (("unmatched", self.unmatched), ("shape policy", self.shape_policy_applied),
                             ("tied", self.aliased)):
            lines += [f"{title}: {item}" for item in items[:20]]
            if len(items) > 20:
                lines.append(f"{title}: ... and {len(items) - 20} more")
        return "\n".join(lines)


def _pick(reference: str | None, models: list[str], base: str | None, what: str) -> int:
    """Index (into models + [base]) of the model named by ``reference``."""
    if reference is None:
        return 0
    candidates = list(models) + ([base] if base is not None else [])
    if reference in candidates:
        return candidates.index(reference)
    if str(reference).isdigit() and int(reference) < len(models):
        return int(reference)
    raise BidirLMError(f"{what} '{reference}' is not one of the merged models {candidates} nor an index into them")


def _validate(spec: MergeSpec) -> Method:
    if not spec.models:
        raise BidirLMError("no models to merge; give at least one model folder")
    method = build_method(spec.method, list(spec.weights), num_models=len(spec.models),
                          has_base=spec.base is not None, density=spec.density, normalize=spec.normalize)
    if spec.dtype is not None and spec.dtype not in OUTPUT_DTYPES:
        raise BidirLMError(f"dtype '{spec.dtype}' is not one of {list(OUTPUT_DTYPES)}")
    if spec.key_maps is not None and len(spec.key_maps) != len(spec.models):
        raise BidirLMError(f"got {len(spec.key_maps)} key maps for {len(spec.models)} models; give one per model "
                           f"(null for identity)")
    output = Path(spec.output)
    if output.exists() and not spec.overwrite:
        raise BidirLMError(f"output folder '{output}' already exists; pass --overwrite to replace it")
    parse_size(spec.max_shard_size)
    if spec.block_elements < 1:
        raise BidirLMError(f"block_elements {spec.block_elements} must be positive")
    return method


def plan(spec: MergeSpec) -> tuple[Method, list[Checkpoint], list[Entry], KeyReport, int]:
    """Validate the spec, open the checkpoints and match their keys; nothing is written."""
    method = _validate(spec)
    names = list(spec.models) + ([spec.base] if spec.base is not None else [])
    ckpts = [Checkpoint(name) for name in names]
    for ckpt in ckpts:
        if ckpt.is_ubmoe:
            raise BidirLMError(
                f"model '{ckpt.name}' is a UBMoE folder (two FFN experts and a router per layer); merge a plain "
                f"model instead: bidirlm_pl.moe.to_plain(load_ubmoe(folder)[0], 1).save_pretrained(DIR)")
    output = Path(spec.output).resolve()
    for ckpt in ckpts:
        if ckpt.folder.resolve() == output:
            raise BidirLMError(f"output folder '{spec.output}' is one of the input models; write elsewhere")
    maps = [KeyMap.parse(m) for m in (spec.key_maps or [None] * len(spec.models))]
    if spec.base is not None:
        maps.append(KeyMap.parse(spec.base_key_map))
    if all(m.prefixes is None for m in maps):
        types = [c.model_type for c in ckpts]
        if len(set(types)) > 1:
            odd = next(i for i, t in enumerate(types) if t != types[0])
            raise BidirLMError(f"model {ckpts[odd].name} is a '{types[odd]}' but {ckpts[0].name} is a "
                               f"'{types[0]}'; merge one architecture, or declare key maps for the shared backbone")
    source = _pick(spec.config_from, spec.models, spec.base, "config_from")
    attach = [_pick(ref, spec.models, spec.base, "attach") for ref in spec.attach or []]
    entries, key_report = match_keys(ckpts, maps, source, unmatched=spec.unmatched, shape_policy=spec.shape_policy,
                                     attach=attach)
    return method, ckpts, entries, key_report, source


def _out_dtype(ckpt: Checkpoint, key: str, dtype: str | None) -> torch.dtype:
    stored = ckpt.tensors[key].dtype
    return OUTPUT_DTYPES[dtype] if dtype is not None and stored in FLOAT_DTYPES else stored


def _merge_entry(entry: Entry, method: Method, ckpts: list[Checkpoint], source: int, num_models: int,
                 out_dtype: torch.dtype, block_elements: int, writer: StreamingWriter) -> None:
    model_keys = entry.keys[:num_models]
    base_key = entry.keys[num_models] if len(entry.keys) > num_models else None

    def read(rows):
        blocks = [ckpts[i].read(k, rows).to(torch.float32) for i, k in enumerate(model_keys)]
        base = ckpts[num_models].read(base_key, rows).to(torch.float32) if base_key is not None else None
        return blocks, base

    merged_rows = entry.common_rows if entry.common_rows is not None else (entry.shape[0] if entry.shape else None)
    if method.whole_tensor:
        blocks_rows = [None] if entry.common_rows is None else [(0, entry.common_rows)]
    else:
        blocks_rows = row_blocks(entry.shape, block_elements, splits=(merged_rows,) if merged_rows else ())
    coefficients = method.coefficients(None)
    in_merge = [r for r in blocks_rows if r is None or r[1] <= merged_rows]
    cached = None
    if method.needs_stats:
        stats = Stats()
        for rows in in_merge:
            blocks, _ = read(rows)
            stats.update(blocks[0], blocks[1])
            cached = (rows, blocks) if len(in_merge) == 1 else None
        coefficients = method.coefficients(stats)
    for rows in in_merge:
        if cached is not None and cached[0] == rows:
            blocks, base = cached[1], None
        else:
            blocks, base = read(rows)
        writer.write(entry.name, method.combine(blocks, base, coefficients).to(out_dtype))
        del blocks, base
    if entry.common_rows is not None:  # the source's rows beyond the shared ones
        for rows in row_blocks(entry.shape, block_elements, splits=(entry.common_rows,)):
            if rows[0] >= entry.common_rows:
                writer.write(entry.name, ckpts[source].read(entry.keys[source], rows).to(out_dtype))


def _origin(entry: Entry, source: int) -> int:
    """The checkpoint an entry's bytes (or its layout) come from: the source, or the one a copy names."""
    if entry.action == "merge":
        return source
    return next(i for i, key in enumerate(entry.keys) if key is not None)


def _copy_entry(entry: Entry, ckpts: list[Checkpoint], source: int, out_dtype: torch.dtype,
                block_elements: int, writer: StreamingWriter) -> None:
    origin = _origin(entry, source)
    for rows in row_blocks(entry.shape, block_elements):
        writer.write(entry.name, ckpts[origin].read(entry.keys[origin], rows).to(out_dtype))


def _copy_side_files(config_src: Path, tokenizer_src: Path, staging: Path, dtype: str | None) -> None:
    def is_tokenizer(name: str) -> bool:
        return name.startswith(TOKENIZER_FILES)

    for item in sorted(config_src.iterdir()):
        if is_weight_file(item) or is_tokenizer(item.name) or item.name == RECORD_FILE or item.name.startswith("."):
            continue
        if item.is_dir():
            shutil.copytree(item, staging / item.name)
        else:
            shutil.copy2(item, staging / item.name)
    for item in sorted(tokenizer_src.iterdir()):
        if item.is_file() and is_tokenizer(item.name):
            shutil.copy2(item, staging / item.name)
    if dtype is not None:
        config = json.loads((staging / "config.json").read_text())
        for holder in (config, config.get("text_config")):
            if isinstance(holder, dict):
                holder["dtype"] = dtype
                holder.pop("torch_dtype", None)
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def merge(spec: MergeSpec) -> MergeReport:
    """Merge ``spec.models`` into ``spec.output``; every check runs before the first byte is written."""
    start = time.perf_counter()
    method, ckpts, entries, key_report, source = plan(spec)
    num_models = len(spec.models)
    tokenizer_src = ckpts[_pick(spec.tokenizer_from, spec.models, spec.base, "tokenizer_from")].folder
    out_dtypes = {e.name: _out_dtype(ckpts[_origin(e, source)], e.keys[_origin(e, source)], spec.dtype)
                  for e in entries}
    planned = [PlannedTensor(e.name, out_dtypes[e.name], e.shape) for e in entries]
    with atomic_folder(spec.output, overwrite=spec.overwrite) as staging:
        with StreamingWriter(staging, planned, max_shard_bytes=spec.max_shard_size,
                             metadata={"merge_method": spec.method}) as writer:
            for entry in entries:
                if entry.action == "merge":
                    _merge_entry(entry, method, ckpts, source, num_models, out_dtypes[entry.name],
                                 spec.block_elements, writer)
                else:
                    _copy_entry(entry, ckpts, source, out_dtypes[entry.name], spec.block_elements, writer)
        for ckpt in ckpts:
            ckpt.close()
        _copy_side_files(ckpts[source].folder, tokenizer_src, staging, spec.dtype)
        report = MergeReport(
            output=str(spec.output), method=spec.method, merged_tensors=key_report.merged,
            copied_components=key_report.copied_components, unmatched=key_report.unmatched,
            shape_policy_applied=key_report.shape_policy_applied, aliased=key_report.aliased,
            total_bytes=writer.total_size, shards=len(writer.files),
        )
        report.seconds = time.perf_counter() - start
        (staging / RECORD_FILE).write_text(json.dumps({"spec": asdict(spec), "report": asdict(report)}, indent=2))
    return report
