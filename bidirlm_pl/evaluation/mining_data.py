"""Hard-negative mining, the data side: pair rows as queries, a deduplicated corpus streamed in shards.

The queries are the distinct anchors of a pair source's rows; the corpus is the distinct positives, then an
optional extra text corpus (any text source kind), each text once. Every query knows the corpus entries it
must never get as a negative: its positives (of every row with this anchor) and its own text, wherever
either occurs in the corpus. Those entries are masked out of the search (string equality, exact).

A source is named the way the contrastive data module names one (:class:`~bidirlm_pl.data.pairs.PairSource`,
:class:`~bidirlm_pl.data.sources.SourceSpec`): a YAML mapping of its fields, or a shorthand: a local file or
folder (``path``), a hub id ``org/name[@revision]`` (``dataset``, kind ``hf``) or a built-in set (``lee``).

>>> pair_source("{path: pairs.jsonl, anchor_field: query}").anchor_field
'query'
>>> pair_source("lee").mode
'halves'
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from bidirlm_pl.core.errors import BidirLMError, first_line
from bidirlm_pl.core.hub import split_hub_id
from bidirlm_pl.data.pairs import PairSource, load_rows
from bidirlm_pl.data.sources import _SUFFIX_KIND, SourceSpec, load_texts

# the built-in sets a shorthand may name: pairs derived from the Lee corpus, or its documents as a corpus
BUILTIN_PAIRS = {"lee": {"kind": "lee", "mode": "halves"}, "lee-simcse": {"kind": "lee", "mode": "simcse"}}
BUILTIN_CORPORA = {"lee": {"kind": "lee"}, "lee_documents": {"kind": "lee_documents"}}


def _fields_of(value: str, what: str, builtin: dict) -> dict:
    """The fields a ``--pairs`` / ``--corpus`` value names: a YAML mapping, or a shorthand."""
    text = value.strip()
    if text.startswith("{"):
        try:
            parsed = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise BidirLMError(f"{what} '{value}' is not a YAML mapping: {first_line(err)}") from err
        if not isinstance(parsed, dict):
            raise BidirLMError(f"{what} '{value}' is not a mapping of source fields")
        return parsed
    if text in builtin:
        return {"name": text, **builtin[text]}
    path = Path(text).expanduser()
    if path.exists() or any(c in text for c in "*?["):
        return {"path": text}
    if path.suffix in _SUFFIX_KIND:
        raise BidirLMError(f"{what} file '{value}' does not exist")
    if split_hub_id(text) is not None:
        return {"dataset": text}
    raise BidirLMError(f"{what} '{value}' is not a file or folder, a hub id 'org/name', one of {sorted(builtin)} "
                       "or a {mapping} of source fields")


def _build(cls, values: dict, what: str, default_name: str):
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise BidirLMError(f"{what}: '{unknown[0]}' is not a {cls.__name__} field (docs/contrastive.md lists them)")
    return cls(**{"name": default_name, **values})


def pair_source(value: str | dict | PairSource) -> PairSource:
    """The pair source a ``--pairs`` value names (a PairSource passes through)."""
    if isinstance(value, PairSource):
        return value
    values = value if isinstance(value, dict) else _fields_of(value, "--pairs", BUILTIN_PAIRS)
    return _build(PairSource, values, "--pairs", "pairs")


def corpus_source(value: str | dict | SourceSpec) -> SourceSpec:
    """The text source a ``--corpus`` value names (a SourceSpec passes through)."""
    if isinstance(value, SourceSpec):
        return value
    values = value if isinstance(value, dict) else _fields_of(value, "--corpus", BUILTIN_CORPORA)
    return _build(SourceSpec, values, "--corpus", "corpus")


@dataclass
class MiningData:
    """Pair rows as queries and positives; corpus indices of the positives come first in the corpus.

    ``excluders[c]``: the queries that must not get corpus entry ``c`` (among the positives) as a negative.
    """

    rows: list[dict]
    queries: list[str]
    row_query: list[int]
    row_positive: list[int]
    positives: list[str]
    query_index: dict[str, int]
    positive_index: dict[str, int]
    excluders: dict[int, set[int]]
    counts: dict[str, int] = field(default_factory=lambda: {"extra": 0, "extra_duplicates": 0})


def load_mining_data(src: PairSource) -> MiningData:
    """The rows of a pair source (validated as the contrastive data module validates them) as queries/positives."""
    rows = load_rows(src)
    query_index: dict[str, int] = {}
    positive_index: dict[str, int] = {}
    row_query, row_positive = [], []
    excluders: dict[int, set[int]] = {}
    for row in rows:
        q = query_index.setdefault(row["anchor"], len(query_index))
        c = positive_index.setdefault(row["positive"], len(positive_index))
        row_query.append(q)
        row_positive.append(c)
        excluders.setdefault(c, set()).add(q)
    for text, q in query_index.items():
        if text in positive_index:  # a query whose own text is some row's positive (SimCSE rows, shared texts)
            excluders.setdefault(positive_index[text], set()).add(q)
    return MiningData(rows=rows, queries=list(query_index), row_query=row_query, row_positive=row_positive,
                      positives=list(positive_index), query_index=query_index, positive_index=positive_index,
                      excluders=excluders)


@dataclass
class CorpusShard:
    """``texts`` are corpus entries ``offset ..``; query ``exclude_q[i]`` must not get entry ``exclude_c[i]``."""

    index: int
    offset: int
    texts: list[str]
    exclude_q: list[int]
    exclude_c: list[int]


def _text_key(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def corpus_entries(data: MiningData, extra: SourceSpec | None) -> Iterator[tuple[str, tuple[int, ...]]]:
    """``(text, excluding queries)`` of every corpus entry in order: the positives, then the extra corpus's new
    texts (lazy: a streaming source is read as it goes; ``data.counts`` tallies extras and duplicates)."""
    for c, text in enumerate(data.positives):
        yield text, tuple(sorted(data.excluders.get(c, ())))
    if extra is None:
        return
    seen: set[bytes] = set()
    for text in load_texts(extra):
        key = _text_key(text)
        if text in data.positive_index or key in seen:
            data.counts["extra_duplicates"] += 1
            continue
        seen.add(key)
        data.counts["extra"] += 1
        q = data.query_index.get(text)
        yield text, (q,) if q is not None else ()


def corpus_shards(data: MiningData, extra: SourceSpec | None, shard_size: int) -> Iterator[CorpusShard]:
    """The corpus in shards of ``shard_size`` entries (the last may be smaller), with their exclusions."""
    shard = CorpusShard(0, 0, [], [], [])
    for text, queries in corpus_entries(data, extra):
        c = shard.offset + len(shard.texts)
        shard.texts.append(text)
        shard.exclude_q.extend(queries)
        shard.exclude_c.extend([c] * len(queries))
        if len(shard.texts) == shard_size:
            yield shard
            shard = CorpusShard(shard.index + 1, c + 1, [], [], [])
    if shard.texts:
        yield shard
