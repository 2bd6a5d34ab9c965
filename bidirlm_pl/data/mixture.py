"""A weighted, deterministic, resumable mixture of text sources.

At every draw the mixture picks a source with probability proportional to its weight (a numpy
PCG64 generator seeded from ``seed``), then takes that source's next document. Random-access
sources are read in a fresh seeded permutation each pass (``epoch``); streaming sources are read in
order and restart when exhausted. Everything that decides the next document is in
:meth:`Mixture.state_dict` (a small JSON-able dict), so a run resumed from it draws exactly the
documents the uninterrupted run would have drawn. Counts of documents and tokens per source give
the realised proportions (:meth:`Mixture.proportions`).

>>> from bidirlm_pl.data.sources import SourceSpec, open_source
>>> mix = Mixture([open_source(SourceSpec("lee", kind="lee", weight=0.8)),
...                open_source(SourceSpec("lee50", kind="lee_documents", weight=0.2))], seed=0)
>>> source_index, text = mix.next()
>>> state = mix.state_dict(); a = mix.next(); mix.load_state_dict(state); a == mix.next()
True
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np

from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.data.sources import TextSource


def normalised_weights(names: list[str], weights: list[float]) -> np.ndarray:
    """Weights as probabilities; one-line error for negative, non-finite or all-zero weights."""
    for name, w in zip(names, weights):
        if not np.isfinite(w) or w < 0:
            raise BidirLMError(f"mixture weight of source '{name}' is {w}; expected a finite number >= 0")
    total = float(sum(weights))
    if total <= 0:
        raise BidirLMError(f"mixture weights {dict(zip(names, weights))} sum to {total}; expected a positive sum")
    return np.asarray(weights, dtype=np.float64) / total


class _Cursor:
    """Reading position in one source: pass number and index within the pass."""

    def __init__(self, source: TextSource, seed: int, index: int):
        self.source, self.seed, self.index = source, seed, index
        self.epoch, self.pos = 0, 0
        self._order: np.ndarray | None = None
        self._iter: Iterator[str] | None = None

    def _permutation(self) -> np.ndarray:
        if self._order is None:
            rng = np.random.default_rng([self.seed, self.index, self.epoch])
            self._order = rng.permutation(len(self.source.docs))
        return self._order

    def next(self) -> str:
        for _ in range(2):  # at most one wrap-around per call for a non-empty source
            if self.source.random_access:
                if self.pos < len(self.source.docs):
                    doc = self.source.docs[int(self._permutation()[self.pos])]
                    self.pos += 1
                    return doc
            else:
                if self._iter is None:
                    self._iter = itertools.islice(self.source.iterate(), self.pos, None)
                doc = next(self._iter, None)
                if doc is not None:
                    self.pos += 1
                    return doc
            self.epoch, self.pos, self._order, self._iter = self.epoch + 1, 0, None, None
        raise BidirLMError(f"source '{self.source.name}' has no documents")

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos, self._order, self._iter = int(state["epoch"]), int(state["pos"]), None, None


class Mixture:
    """Draw ``(source_index, document)`` pairs from weighted sources; see the module docstring.

    Empty (whitespace-only) documents are skipped and not counted.
    """

    def __init__(self, sources: list[TextSource], seed: int = 0):
        if not sources:
            raise BidirLMError("the data mixture has no sources; add at least one entry to 'sources'")
        self.sources = sources
        self.names = [s.name for s in sources]
        if len(set(self.names)) != len(self.names):
            raise BidirLMError(f"source names {self.names} are not unique; give each source its own name")
        self.probs = normalised_weights(self.names, [float(s.spec.weight) for s in sources])
        self.seed = seed
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.cursors = [_Cursor(s, seed, i) for i, s in enumerate(sources)]
        self.documents = [0] * len(sources)
        self.tokens = [0] * len(sources)

    def next(self) -> tuple[int, str]:
        while True:
            i = int(self.rng.choice(len(self.sources), p=self.probs))
            doc = self.cursors[i].next()
            if doc.strip():
                self.documents[i] += 1
                return i, doc

    def __iter__(self) -> Iterator[tuple[int, str]]:
        while True:
            yield self.next()

    def count_tokens(self, source_index: int, n: int) -> None:
        """Record ``n`` tokens taken from a source (for the realised token proportions)."""
        self.tokens[source_index] += n

    def proportions(self) -> dict[str, dict[str, float]]:
        """Realised share of documents and tokens per source, next to the configured weight."""
        docs, toks = max(1, sum(self.documents)), max(1, sum(self.tokens))
        return {
            name: {"weight": float(p), "documents": self.documents[i] / docs, "tokens": self.tokens[i] / toks}
            for i, (name, p) in enumerate(zip(self.names, self.probs))
        }

    def state_dict(self) -> dict:
        return {
            "seed": self.seed,
            "names": list(self.names),
            "rng": self.rng.bit_generator.state,
            "cursors": [c.state_dict() for c in self.cursors],
            "documents": list(self.documents),
            "tokens": list(self.tokens),
        }

    def load_state_dict(self, state: dict) -> None:
        if list(state["names"]) != self.names:
            raise BidirLMError(
                f"the checkpoint's data sources {state['names']} differ from the configured {self.names}"
            )
        self.rng.bit_generator.state = state["rng"]
        for cursor, s in zip(self.cursors, state["cursors"]):
            cursor.load_state_dict(s)
        self.documents = list(state["documents"])
        self.tokens = list(state["tokens"])
