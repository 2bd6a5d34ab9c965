"""Cosine similarity of two checkpoints, overall and per tensor group, streamed block by block.

Groups: embeddings, attention, ffn, norms, lm_head, other; and one row per decoder layer.
Keys are matched as in a merge (key maps, tied lm_head), so a VLM's language model can be
compared with a text encoder.

>>> report = similarity("runs/mntp/hf", "gemma3-270m")  # doctest: +SKIP
>>> print(report.table())  # doctest: +SKIP
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

from bidirlm_pl.models.merging.keymap import KeyMap, match_keys
from bidirlm_pl.models.merging.safetensors_io import Checkpoint, row_blocks

LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def tensor_group(key: str) -> str:
    """embeddings | attention | ffn | norms | lm_head | other, from the key name."""
    if "embed" in key:
        return "embeddings"
    if key.startswith("lm_head") or key.endswith("lm_head.weight"):
        return "lm_head"
    if "norm" in key:
        return "norms"
    if any(part in key for part in ("self_attn", "attention", ".attn.")):
        return "attention"
    if any(part in key for part in ("mlp", "ffn", "feed_forward")):
        return "ffn"
    return "other"


@dataclass
class _Sums:
    dot: float = 0.0
    norm_a: float = 0.0
    norm_b: float = 0.0
    diff: float = 0.0
    count: int = 0

    def add(self, other: _Sums) -> None:
        self.dot += other.dot
        self.norm_a += other.norm_a
        self.norm_b += other.norm_b
        self.diff += other.diff
        self.count += other.count

    @property
    def cosine(self) -> float:
        denominator = math.sqrt(self.norm_a * self.norm_b)
        return self.dot / denominator if denominator else float("nan")

    @property
    def relative_distance(self) -> float:
        """|a - b| / |a|."""
        return math.sqrt(self.diff / self.norm_a) if self.norm_a else float("nan")


@dataclass
class SimilarityReport:
    a: str
    b: str
    overall: _Sums = field(default_factory=_Sums)
    groups: dict[str, _Sums] = field(default_factory=dict)
    layers: dict[int, _Sums] = field(default_factory=dict)
    tensors: dict[str, _Sums] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        row = lambda s: {"cosine": s.cosine, "relative_distance": s.relative_distance, "parameters": s.count}
        return {"a": self.a, "b": self.b, "overall": row(self.overall),
                "groups": {k: row(v) for k, v in self.groups.items()},
                "layers": {str(k): row(v) for k, v in sorted(self.layers.items())},
                "tensors": {k: row(v) for k, v in self.tensors.items()}, "unmatched": self.unmatched}

    def table(self) -> str:
        lines = [f"cosine similarity of {self.a} and {self.b}",
                 f"{'group':<14}{'cosine':>14}{'|a-b|/|a|':>12}{'parameters':>14}"]
        rows = [("overall", self.overall)] + sorted(self.groups.items())
        rows += [(f"layer {k}", v) for k, v in sorted(self.layers.items())]
        for name, sums in rows:
            lines.append(f"{name:<14}{sums.cosine:>14.9f}{sums.relative_distance:>12.3e}{sums.count:>14,}")
        if self.unmatched:
            lines.append(f"unmatched keys: {len(self.unmatched)} (e.g. {self.unmatched[0]})")
        return "\n".join(lines)


def similarity(a: str, b: str, *, key_map_a=None, key_map_b=None, expert: int = 1,
               block_elements: int = 4 * 2**20) -> SimilarityReport:
    """Compare the tensors two checkpoints share (float tensors of equal shape), in fp64 sums.

    A UBMoE folder is seen as the plain model with expert ``expert``'s FFNs (default 1, the
    bidirectionally trained copy), so ``similarity(ubmoe, base)`` reports the expert's drift.
    """
    ckpts = [Checkpoint(a, expert=expert), Checkpoint(b, expert=expert)]
    entries, key_report = match_keys(ckpts, [KeyMap.parse(key_map_a), KeyMap.parse(key_map_b)], 0,
                                     unmatched="report", shape_policy="copy")
    names = [f"{c.name} (expert {c.expert})" if c.expert is not None else c.name for c in ckpts]
    report = SimilarityReport(*names, unmatched=key_report.unmatched + key_report.shape_policy_applied)
    for entry in entries:
        if entry.action != "merge":
            continue
        sums = _Sums()
        for rows in row_blocks(entry.shape, block_elements):
            x = ckpts[0].read(entry.keys[0], rows).to(torch.float64).reshape(-1)
            y = ckpts[1].read(entry.keys[1], rows).to(torch.float64).reshape(-1)
            sums.add(_Sums(float(x @ y), float(x @ x), float(y @ y), float((x - y) @ (x - y)), x.numel()))
        report.tensors[entry.name] = sums
        report.overall.add(sums)
        report.groups.setdefault(tensor_group(entry.name), _Sums()).add(sums)
        layer = LAYER.search(entry.name)
        if layer:
            report.layers.setdefault(int(layer.group(1)), _Sums()).add(sums)
    return report
