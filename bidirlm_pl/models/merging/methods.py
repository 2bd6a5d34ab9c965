"""Merge methods: how a list of same-shaped fp32 tensors (and a base) become one tensor.

Linear, SLERP and task arithmetic are elementwise once a few per-tensor scalars are known, so the
engine feeds them row blocks and never holds a whole tensor; TIES needs a per-tensor magnitude
threshold and therefore takes whole tensors.

>>> import torch
>>> method = build_method("linear", [1.0, 3.0])
>>> method.combine([torch.ones(2), torch.zeros(2)], base=None, coefficients=method.coefficients(None))
tensor([0.2500, 0.2500])
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from bidirlm_pl.core.errors import BidirLMError

METHODS = ("linear", "slerp", "task_arithmetic", "ties")
NEEDS_BASE = ("task_arithmetic", "ties")
SLERP_LERP_THRESHOLD = 0.9995  # nearly parallel tensors: interpolate linearly (as mergekit does)


@dataclass
class Stats:
    """Per-tensor sums that SLERP needs before it can combine row blocks: <a,b>, |a|^2, |b|^2."""

    dot: float = 0.0
    norm0_sq: float = 0.0
    norm1_sq: float = 0.0

    def update(self, a: torch.Tensor, b: torch.Tensor) -> None:
        self.dot += float(torch.dot(a.reshape(-1), b.reshape(-1)))
        self.norm0_sq += float(torch.dot(a.reshape(-1), a.reshape(-1)))
        self.norm1_sq += float(torch.dot(b.reshape(-1), b.reshape(-1)))


class Method:
    """Base class. ``coefficients(stats)`` -> per-model scalars; ``combine(blocks, base, coefficients)``."""

    name = ""
    needs_stats = False      # a first pass over the tensor collects Stats (SLERP)
    whole_tensor = False     # combine() must see whole tensors (TIES)

    def __init__(self, weights: list[float]):
        self.weights = [float(w) for w in weights]

    def coefficients(self, stats: Stats | None) -> list[float]:
        return self.weights

    def combine(self, blocks: list[torch.Tensor], base: torch.Tensor | None, coefficients: list[float]) -> torch.Tensor:
        raise NotImplementedError


def _weighted_sum(blocks: list[torch.Tensor], coefficients: list[float]) -> torch.Tensor:
    out = blocks[0] * coefficients[0]
    for block, c in zip(blocks[1:], coefficients[1:]):
        out.add_(block, alpha=c)
    return out


class Linear(Method):
    """Weighted average: sum_i w_i x_i / sum_i w_i (weights non-negative, normalised)."""

    name = "linear"

    def __init__(self, weights, normalize: bool = True):
        super().__init__(weights)
        total = sum(self.weights)
        self.normalized = [w / total for w in self.weights] if normalize else self.weights

    def coefficients(self, stats):
        return self.normalized

    def combine(self, blocks, base, coefficients):
        return _weighted_sum(blocks, coefficients)


class Slerp(Method):
    """Spherical interpolation of two tensors at t = w1 / (w0 + w1), per tensor.

    The angle comes from the normalised tensors; the result combines the original tensors with
    sin((1-t)θ)/sin θ and sin(tθ)/sin θ, falling back to linear interpolation when they are nearly parallel.
    """

    name = "slerp"
    needs_stats = True

    def __init__(self, weights):
        super().__init__(weights)
        self.t = self.weights[1] / (self.weights[0] + self.weights[1])

    def coefficients(self, stats):
        t = self.t
        if stats is None or stats.norm0_sq == 0.0 or stats.norm1_sq == 0.0:
            return [1.0 - t, t]
        cos = stats.dot / math.sqrt(stats.norm0_sq * stats.norm1_sq)
        if abs(cos) > SLERP_LERP_THRESHOLD:
            return [1.0 - t, t]
        theta = math.acos(max(-1.0, min(1.0, cos)))
        sin_theta = math.sin(theta)
        return [math.sin((1.0 - t) * theta) / sin_theta, math.sin(t * theta) / sin_theta]

    def combine(self, blocks, base, coefficients):
        return _weighted_sum(blocks, coefficients)


class TaskArithmetic(Method):
    """base + sum_i w_i (x_i - base): weights scale task vectors (negative weights subtract a task)."""

    name = "task_arithmetic"

    def combine(self, blocks, base, coefficients):
        out = base.clone()
        for block, c in zip(blocks, coefficients):
            out.add_(block - base, alpha=c)
        return out


class Ties(Method):
    """TIES-merging (Yadav et al. 2023): trim task vectors to their top ``density`` magnitudes,
    elect a sign per entry from the weighted sum, average the entries that agree with it."""

    name = "ties"
    whole_tensor = True

    def __init__(self, weights, density: float = 0.5):
        super().__init__(weights)
        if not 0.0 < density <= 1.0:
            raise BidirLMError(f"ties density {density} is not in (0, 1]")
        self.density = density

    def _trim(self, delta: torch.Tensor) -> torch.Tensor:
        keep = math.ceil(self.density * delta.numel())
        if keep >= delta.numel():
            return delta
        magnitude = delta.abs().reshape(-1)
        threshold = torch.kthvalue(magnitude, magnitude.numel() - keep + 1).values
        return torch.where(delta.abs() >= threshold, delta, torch.zeros((), dtype=delta.dtype))

    def combine(self, blocks, base, coefficients):
        weighted = [self._trim(block - base) * c for block, c in zip(blocks, coefficients)]
        sign = torch.sign(sum(weighted))
        numerator = torch.zeros_like(base)
        denominator = torch.zeros_like(base)
        for delta, c in zip(weighted, coefficients):
            agree = (torch.sign(delta) == sign) & (delta != 0)
            numerator += torch.where(agree, delta, 0.0)
            denominator += agree.to(base.dtype) * c
        return base + numerator / denominator.clamp_min(1e-12)


def build_method(name: str, weights: list[float], *, num_models: int | None = None, has_base: bool = False,
                 density: float = 0.5, normalize: bool = True) -> Method:
    """Validate weights for a method and build it; every mistake is a one-line BidirLMError."""
    if name not in METHODS:
        raise BidirLMError(f"merge method '{name}' is not one of {list(METHODS)}")
    num_models = len(weights) if num_models is None else num_models
    if len(weights) != num_models:
        raise BidirLMError(f"got {len(weights)} weights for {num_models} models; give one weight per model")
    if any(not math.isfinite(float(w)) for w in weights):
        raise BidirLMError(f"weights {list(weights)} contain a non-finite value")
    if name in NEEDS_BASE and not has_base:
        raise BidirLMError(f"merge method '{name}' needs a base model (--base)")
    if name not in NEEDS_BASE and has_base:
        raise BidirLMError(f"merge method '{name}' takes no base model; drop --base or use task_arithmetic/ties")
    if name in ("linear", "slerp", "ties"):
        negative = [w for w in weights if w < 0]
        if negative:
            raise BidirLMError(f"weight {negative[0]} is negative; method '{name}' needs weights >= 0")
    if name in ("linear", "slerp") and sum(weights) == 0:
        raise BidirLMError(f"weights {list(weights)} sum to zero; method '{name}' divides by their sum")
    if name in NEEDS_BASE and all(w == 0 for w in weights):
        raise BidirLMError(f"weights {list(weights)} are all zero; the merge would return the base unchanged")
    if name == "slerp":
        if num_models != 2:
            raise BidirLMError(f"slerp interpolates exactly 2 models; got {num_models}")
        return Slerp(weights)
    if name == "linear":
        return Linear(weights, normalize=normalize)
    if name == "task_arithmetic":
        return TaskArithmetic(weights)
    return Ties(weights, density=density)
