"""Streaming model merging: linear, SLERP, task arithmetic, TIES; key maps; similarity reports."""

from bidirlm_pl.models.merging.engine import MergeReport, MergeSpec, merge
from bidirlm_pl.models.merging.keymap import KeyMap
from bidirlm_pl.models.merging.methods import METHODS

__all__ = ["METHODS", "KeyMap", "MergeReport", "MergeSpec", "merge"]
