"""Streaming model merging: linear, SLERP, task arithmetic, TIES; key maps; similarity reports."""

from bidirlm_pl.merging.engine import MergeReport, MergeSpec, merge
from bidirlm_pl.merging.keymap import KeyMap
from bidirlm_pl.merging.methods import METHODS

__all__ = ["METHODS", "KeyMap", "MergeReport", "MergeSpec", "merge"]
