"""Lightning callbacks of bidirlm-pl, imported as ``bidirlm_pl.callbacks``."""

from bidirlm_pl.callbacks.embedding_eval import EmbeddingEval
from bidirlm_pl.callbacks.export import HFExport
from bidirlm_pl.callbacks.merge_with_base import MergeWithBase
from bidirlm_pl.callbacks.nonfinite import NonFiniteGuard
from bidirlm_pl.callbacks.preemption import Preemption
from bidirlm_pl.callbacks.router_stats import RouterStats
from bidirlm_pl.callbacks.throughput import Throughput

__all__ = ["EmbeddingEval", "HFExport", "MergeWithBase", "NonFiniteGuard", "Preemption", "RouterStats", "Throughput"]
