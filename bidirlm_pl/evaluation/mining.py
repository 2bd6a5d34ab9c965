"""``bidirlm mine``: hard negatives for contrastive pairs, mined with an encoder and filtered against the positive.

The queries (a pair source's anchors) and a corpus (the positives of every pair, plus an optional extra text
corpus) are embedded by :class:`~bidirlm_pl.models.encoder.Encoder` (our exports with their pooling and query
prompt, any Sentence-Transformers folder or hub id, a plain model with mean pooling), the corpus in shards
written to disk (:mod:`~bidirlm_pl.evaluation.mining_shards`: a killed run resumes, a corpus larger than memory
works); an exact cosine top-k merges over the shards (:mod:`~bidirlm_pl.evaluation.mining_index`); each row
keeps ``num_negatives`` candidates that pass the rank window and margins
(:mod:`~bidirlm_pl.evaluation.mining_filters`). The output folder holds ``pairs.jsonl`` (or ``pairs.parquet``)
with the columns a pair source reads as given (``anchor``, ``positive``, ``negatives``; also
``positive_score`` and ``negative_scores``) and ``report/`` (``report.json``, ``report.md``). It is written to
a temporary folder and renamed when complete.

>>> mine(MiningSpec(model="runs/quickstart/merged/hf", pairs="lee", output="runs/mined"))  # doctest: +SKIP
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from datasets import Features, Value
from datasets.arrow_writer import ParquetWriter
from tqdm.auto import tqdm

from bidirlm_pl.backbone.load import resolve_model_path
from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.core.export import atomic_folder
from bidirlm_pl.data.pairs import PairSource, check_mode_fields
from bidirlm_pl.data.sources import SourceSpec, resolve_kind
from bidirlm_pl.evaluation.mining_data import (
    MiningData,
    corpus_shards,
    corpus_source,
    load_mining_data,
    pair_source,
)
from bidirlm_pl.evaluation.mining_filters import REASONS, NegativeRule, Selection, select_negatives
from bidirlm_pl.evaluation.mining_index import ExactTopK
from bidirlm_pl.evaluation.mining_report import histogram, write_report
from bidirlm_pl.evaluation.mining_shards import ShardCache, model_fingerprint
from bidirlm_pl.models.encoder import Encoder, read_encoder_config

FORMATS = ("jsonl", "parquet")
PARQUET_FEATURES = Features({"anchor": Value("string"), "positive": Value("string"), "negatives": [Value("string")],
                             "positive_score": Value("float64"), "negative_scores": [Value("float64")]})


@dataclass
class MiningSpec(NegativeRule):
    """A mining run (``bidirlm mine --help`` describes every field; the rule fields are :class:`NegativeRule`'s).

    Args:
        model: the encoder: our export, a Sentence-Transformers folder, a hub id or an asset name.
        pairs: the pair source (a ``--pairs`` value, a mapping of PairSource fields or a PairSource).
        output: the output folder (refused if it exists, unless ``overwrite``).
        corpus: an extra text corpus searched besides the positives (a ``--corpus`` value or a SourceSpec).
        drop_incomplete: drop rows with fewer than ``num_negatives`` kept negatives (else keep them).
        query_prompt: the text prepended to queries; None: the source's ``query_instruction``, else the
            encoder's query prompt.
        cache_dir: the shard cache (default ``.<output name>.mine-cache`` beside the output); removed after a
            complete run unless ``keep_cache``.
    """

    model: str = ""
    pairs: str | dict | PairSource | None = None
    output: str = ""
    corpus: str | dict | SourceSpec | None = None
    drop_incomplete: bool = False
    format: str = "jsonl"
    shard_size: int = 50_000
    batch_size: int = 32
    search_block: int = 4096
    max_length: int | None = None
    query_prompt: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    attn_implementation: str = "sdpa"
    cache_dir: str | None = None
    keep_cache: bool = False
    overwrite: bool = False
    progress: bool = True

    def check(self) -> None:
        for name in ("model", "pairs", "output"):
            if not getattr(self, name):
                raise BidirLMError(f"mine needs --{name}")
        super().check()
        if self.format not in FORMATS:
            raise BidirLMError(f"format '{self.format}' is not one of {list(FORMATS)}")
        for name in ("shard_size", "batch_size", "search_block"):
            if getattr(self, name) < 1:
                raise BidirLMError(f"{name} {getattr(self, name)} must be >= 1")
        if self.max_length is not None and self.max_length < 1:
            raise BidirLMError(f"max_length {self.max_length} must be >= 1")
        if Path(self.output).exists() and not self.overwrite:
            raise BidirLMError(f"output folder '{self.output}' already exists; pass --overwrite to replace it")

    @property
    def rule(self) -> NegativeRule:
        return NegativeRule(self.num_negatives, self.range_min, self.range_max, self.relative_margin,
                            self.absolute_margin)

    def cache_folder(self) -> Path:
        out = Path(self.output).expanduser()
        return Path(self.cache_dir) if self.cache_dir else out.with_name(f".{out.name}.mine-cache")


def _load_encoder(spec: MiningSpec) -> tuple[Encoder, Path]:
    folder = resolve_model_path(spec.model)
    device = spec.device if spec.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = spec.dtype if spec.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
    return Encoder.from_pretrained(folder, device=device, dtype=dtype,
                                   attn_implementation=spec.attn_implementation), folder


def _key_fields(spec: MiningSpec, folder: Path, encoder: Encoder, src: PairSource, extra: SourceSpec | None,
                prompts: dict) -> dict:
    """What the embeddings depend on: the model's files and settings, the prompts, the sources, the shard size."""
    return {"model": str(folder.resolve()), "files": model_fingerprint(folder),
            "encoder": read_encoder_config(folder), "dtype": str(encoder.model.dtype),
            "attn_implementation": spec.attn_implementation, "max_length": spec.max_length or encoder.max_length,
            "prompts": prompts, "pairs": asdict(src), "corpus": asdict(extra) if extra else None,
            "shard_size": spec.shard_size}


def _embedder(encoder: Encoder, spec: MiningSpec, prompt: str | None):
    def embed(texts: list[str]) -> torch.Tensor:
        return encoder.encode(texts, batch_size=spec.batch_size, prompt=prompt or "", max_length=spec.max_length,
                              normalize=True, show_progress_bar=False, convert_to_numpy=False)
    return embed


def _embed_queries(cache: ShardCache, encoder: Encoder, data: MiningData, spec: MiningSpec,
                   prompt: str | None) -> torch.Tensor:
    """Every query's unit embedding (Q, D), float32 on the encoder's device."""
    parts = []
    embed = _embedder(encoder, spec, prompt)
    with tqdm(total=len(data.queries), desc="mine: queries", unit="text", disable=not spec.progress) as bar:
        for index, start in enumerate(range(0, len(data.queries), spec.shard_size)):
            texts = data.queries[start: start + spec.shard_size]
            parts.append(cache.embeddings("queries", index, texts, embed))
            bar.update(len(texts))
    queries = torch.nn.functional.normalize(torch.cat(parts), dim=-1)
    return queries.to(encoder.device)


def _search(cache: ShardCache, encoder: Encoder, index: ExactTopK, data: MiningData, extra: SourceSpec | None,
            spec: MiningSpec, prompt: str | None) -> tuple[dict[tuple[int, int], float], int]:
    """Embed (or reuse) each corpus shard and merge it into the index; the excluded pairs' scores, corpus size."""
    excluded: dict[tuple[int, int], float] = {}
    size = 0
    embed = _embedder(encoder, spec, prompt)
    total = len(data.positives) if extra is None else None  # an extra corpus may stream: its size is unknown
    with tqdm(total=total, desc="mine: corpus", unit="text", disable=not spec.progress) as bar:
        for shard in corpus_shards(data, extra, spec.shard_size):
            corpus_CD = cache.embeddings("corpus", shard.index, shard.texts, embed, keep_texts=True)
            corpus_CD = torch.nn.functional.normalize(corpus_CD, dim=-1)
            exclude_q = torch.tensor(shard.exclude_q, dtype=torch.long)
            exclude_c = torch.tensor(shard.exclude_c, dtype=torch.long)
            scores = index.add(corpus_CD, shard.offset, exclude_q, exclude_c).tolist()
            excluded.update(zip(zip(shard.exclude_q, shard.exclude_c), scores))
            size = shard.offset + len(shard.texts)
            bar.update(len(shard.texts))
    return excluded, size


def _rows_scores(data: MiningData, excluded: dict[tuple[int, int], float]) -> tuple[torch.Tensor, list[float]]:
    """Each row's positive score, and the scores of the entries removed as equal texts (the query's own text or
    another positive of its query), counted per row."""
    by_query: dict[int, list[tuple[int, float]]] = {}
    for (q, c), score in excluded.items():
        by_query.setdefault(q, []).append((c, score))
    positive, same_text = [], []
    for q, c in zip(data.row_query, data.row_positive):
        positive.append(excluded[(q, c)])
        same_text.extend(s for other, s in by_query[q] if other != c)
    return torch.tensor(positive), same_text


def _lookup_texts(cache: ShardCache, ids: set[int], shard_size: int) -> dict[int, str]:
    """The texts of corpus entries, read from the saved shard texts (one shard in memory at a time)."""
    found: dict[int, str] = {}
    for shard in sorted({i // shard_size for i in ids}):
        texts = cache.texts("corpus", shard)
        found.update({i: texts[i - shard * shard_size] for i in ids if i // shard_size == shard})
    return found


def _output_rows(data: MiningData, selection: Selection, positive_R: torch.Tensor, texts: dict[int, str],
                 spec: MiningSpec):
    """The written rows, in input order (rows short of ``num_negatives`` dropped with ``drop_incomplete``)."""
    for r, row in enumerate(data.rows):
        ids = selection.ids[r]
        if spec.drop_incomplete and len(ids) < spec.num_negatives:
            continue
        yield {"anchor": row["anchor"], "positive": row["positive"], "negatives": [texts[i] for i in ids],
               "positive_score": round(float(positive_R[r]), 6),
               "negative_scores": [round(s, 6) for s in selection.scores[r]]}


def _write_rows(folder: Path, rows, fmt: str) -> int:
    count = 0
    if fmt == "jsonl":
        with open(folder / "pairs.jsonl", "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
                count += 1
        return count
    writer = ParquetWriter(features=PARQUET_FEATURES, path=str(folder / "pairs.parquet"), writer_batch_size=10_000)
    try:
        for row in rows:
            writer.write(row)
            count += 1
        writer.finalize()
    finally:
        writer.close()
    return count


def _prepare(spec: MiningSpec) -> tuple[PairSource, SourceSpec | None]:
    """Every check that needs no model or data: the rule, the output, the sources' fields."""
    spec.check()
    src = pair_source(spec.pairs)
    extra = corpus_source(spec.corpus) if spec.corpus is not None else None
    check_mode_fields(src)
    resolve_kind(SourceSpec(name=src.name, kind=src.kind, path=src.path, dataset=src.dataset))
    if extra is not None:
        resolve_kind(extra)
    return src, extra


def mine(spec: MiningSpec) -> dict:
    """Mine hard negatives as ``spec`` says; write the output folder; return the report (also in ``report/``)."""
    src, extra = _prepare(spec)
    encoder, folder = _load_encoder(spec)
    data = load_mining_data(src)
    prompts = {"query": spec.query_prompt if spec.query_prompt is not None
               else src.query_instruction or encoder.resolve_prompt(prompt_name="query") or "",
               "document": encoder.resolve_prompt(prompt_name="document") or ""}
    cache = ShardCache(spec.cache_folder(), _key_fields(spec, folder, encoder, src, extra, prompts))
    queries_QD = _embed_queries(cache, encoder, data, spec, prompts["query"])
    index = ExactTopK(queries_QD, spec.range_max, block=spec.search_block)
    excluded, corpus_size = _search(cache, encoder, index, data, extra, spec, prompts["document"])
    positive_R, same_text = _rows_scores(data, excluded)
    rows_q = torch.tensor(data.row_query, device=index.scores.device)
    selection = select_negatives(index.scores[rows_q].cpu(), index.ids[rows_q].cpu(), positive_R, spec.rule)
    texts = _lookup_texts(cache, {i for ids in selection.ids for i in ids}, spec.shard_size)
    with atomic_folder(spec.output, overwrite=spec.overwrite) as staging:
        written = _write_rows(staging, _output_rows(data, selection, positive_R, texts, spec), spec.format)
        report = _report(spec, (src, extra), data, selection, (positive_R, same_text), cache, corpus_size,
                         written, folder)
        write_report(staging / "report", report)
    if not spec.keep_cache:
        cache.remove()
    return report


def _report(spec: MiningSpec, sources: tuple[PairSource, SourceSpec | None], data: MiningData, selection: Selection,
            scores: tuple[torch.Tensor, list[float]], cache: ShardCache, corpus_size: int, written: int,
            folder: Path) -> dict:
    """The report: rows, corpus, shard reuse, drop counts per reason, score histograms."""
    (src, extra), (positive_R, same_text) = sources, scores
    counts = [len(ids) for ids in selection.ids]
    incomplete = sum(n < spec.num_negatives for n in counts)
    kept = [s for scores in selection.scores for s in scores]
    dropped = {**{k: selection.dropped[k] for k in REASONS}, "same_text": torch.tensor(same_text)}
    return {
        "model": spec.model, "model_folder": str(folder), "output": spec.output, "format": spec.format,
        "pairs": asdict(src), "corpus_source": asdict(extra) if extra else None,
        "rule": asdict(spec.rule), "queries": len(data.queries),
        "rows": {"read": len(data.rows), "written": written, "complete": len(counts) - incomplete,
                 "incomplete": incomplete, "dropped_incomplete": len(data.rows) - written},
        "negatives_per_row": {str(k): sum(n == k for n in counts) for k in range(spec.num_negatives + 1)},
        "corpus": {"size": corpus_size, "positives": len(data.positives), "extra": data.counts["extra"],
                   "extra_duplicates_skipped": data.counts["extra_duplicates"]},
        "shards": cache.counts(), "cache": str(cache.folder) if spec.keep_cache else None,
        "dropped": {k: len(v) for k, v in dropped.items()},
        "histograms": {"positive": histogram(positive_R), "kept": histogram(kept),
                       "dropped": {k: histogram(v) for k, v in dropped.items()}},
    }
