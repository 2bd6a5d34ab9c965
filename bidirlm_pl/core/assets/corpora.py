"""The Lee news corpus and its human similarity ratings, as gensim ships them (offline)."""

from __future__ import annotations

from pathlib import Path

from bidirlm_pl.core.errors import BidirLMError, require


def gensim_data(name: str) -> Path:
    gensim_test = require("gensim.test.utils", "demo", "The Lee corpus")
    path = Path(gensim_test.datapath(name))
    if not path.exists():
        raise BidirLMError(f"gensim ships no {name} at {path}; reinstall gensim (the demo extra)")
    return path


def _read_lines(path: Path) -> list[str]:
    text = path.read_bytes().decode("latin1")
    return [line.strip() for line in text.splitlines() if line.strip()]


def lee_background() -> list[str]:
    """The 300 news articles of the Lee background corpus (training text)."""
    return _read_lines(gensim_data("lee_background.cor"))


def lee_documents() -> list[str]:
    """The 50 documents that Lee et al. (2005) rated for similarity."""
    return _read_lines(gensim_data("lee.cor"))


def lee_similarities():
    """Human similarity ratings of the 50 Lee documents: the upper triangle (1225 pairs) as numpy."""
    import numpy as np

    matrix = np.loadtxt(gensim_data("similarities0-1.txt"))
    return matrix[np.triu_indices(matrix.shape[0], 1)]
