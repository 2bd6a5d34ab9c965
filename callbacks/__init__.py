"""Lightning callbacks of bidirlm-pl, imported as ``bidirlm_pl.callbacks``."""

from bidirlm_pl.callbacks.export import HFExport

__all__ = ["HFExport"]
