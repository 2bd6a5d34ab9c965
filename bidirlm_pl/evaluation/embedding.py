"""Embedding evaluation: Spearman correlation with the Lee et al. (2005) human document similarities.

The 50 Lee documents are embedded, the cosine similarity of each of the 1225 upper-triangle pairs
(order ``np.triu_indices(50, 1)``) is compared with the averaged human ratings
(:func:`bidirlm_pl.core.assets.lee_similarities`). This is the shared "STS score" validation hook: any
object with ``encode(texts, batch_size=...) -> (N, D)`` works (our Encoder, a SentenceTransformer).
Every embedding of this project's evaluation comes from :class:`~bidirlm_pl.models.encoder.Encoder`:
an exported folder's as it was exported, any other model with mean pooling.

>>> from bidirlm_pl.models.encoder import Encoder
>>> lee_spearman(Encoder.from_pretrained("gemma3-270m"))  # doctest: +SKIP
0.43...

compare's embeddings (:class:`Embedder`, :func:`model_embedder`) live here too: a folder's Encoder, each text
embedded once, and its Matryoshka sizes (``Embedder.truncated(d)``: the first d dimensions, re-normalised).

scipy, mteb and datasets are imported where they are used: seconds each, for commands that may not need them.
"""

from __future__ import annotations

import numpy as np

from bidirlm_pl.backbone.load import resolve_model_path
from bidirlm_pl.core import assets
from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.evaluation.metrics import unit_rows
from bidirlm_pl.models.encoder import Encoder, read_encoder_config
from bidirlm_pl.moe.modes import split_routing


def check_dims(dims, where: str = "dims") -> list[int] | None:
    """Embedding sizes to score at (compare's ``dims``): distinct positive whole numbers, ascending; None when unset.

    >>> check_dims([256, 64])
    [64, 256]
    """
    if dims is None:
        return None
    if isinstance(dims, str) or not isinstance(dims, list | tuple) or not dims:
        raise BidirLMError(f"{where} {dims!r} must be a list of embedding sizes, e.g. [64, 128, 256]")
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            raise BidirLMError(f"{where} entry {d!r} must be a positive whole number of dimensions")
    if len(set(dims)) != len(dims):
        raise BidirLMError(f"{where} {list(dims)} repeat a size; expected distinct sizes")
    return sorted(dims)


def truncate_rows(embeddings_ND, dim: int) -> np.ndarray:
    """The first ``dim`` dimensions of every embedding, L2-normalised again (a Matryoshka embedding at size ``dim``).

    >>> truncate_rows(np.array([[3.0, 4.0, 12.0]]), 2)
    array([[0.6, 0.8]])
    """
    if not 1 <= dim <= embeddings_ND.shape[1]:
        raise BidirLMError(f"embedding size {dim} is not in [1, {embeddings_ND.shape[1]}], the model's size")
    return unit_rows(np.asarray(embeddings_ND)[:, :dim])


def spearman(a, b) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    from scipy.stats import spearmanr

    return float(spearmanr(np.asarray(a), np.asarray(b)).statistic)


def pairwise_cosines(embeddings_ND) -> np.ndarray:
    """Cosine similarities of the upper-triangle pairs, in ``np.triu_indices(N, 1)`` order."""
    e = unit_rows(embeddings_ND)
    sims = e @ e.T
    return sims[np.triu_indices(e.shape[0], 1)]


def lee_pairs(n_docs: int = 50) -> tuple[list[str], np.ndarray]:
    """The first ``n_docs`` Lee documents and the human ratings of their upper-triangle pairs."""
    docs = assets.lee_documents()
    if not 2 <= n_docs <= len(docs):
        raise BidirLMError(f"n_docs {n_docs} must be in [2, {len(docs)}]")
    full = np.zeros((len(docs), len(docs)))
    full[np.triu_indices(len(docs), 1)] = assets.lee_similarities()
    return docs[:n_docs], full[:n_docs, :n_docs][np.triu_indices(n_docs, 1)]


def lee_spearman(encoder, batch_size: int = 8, n_docs: int = 50, **encode_kwargs) -> float:
    """Spearman correlation between the encoder's cosine similarities and the Lee human ratings."""
    docs, human = lee_pairs(n_docs)
    embeddings = encoder.encode(docs, batch_size=batch_size, **encode_kwargs)
    if hasattr(embeddings, "detach"):
        embeddings = embeddings.detach().cpu().numpy()
    predicted = pairwise_cosines(embeddings)
    assert predicted.shape == human.shape, (predicted.shape, human.shape)
    return spearman(predicted, human)


class Embedder:
    """compare's embeddings of one model: its :class:`Encoder`, each distinct (text, prompt, token limit) encoded
    once (tasks share texts).

    ``embed(texts, max_length, prompt_name=...)`` prepends the encoder's prompt of that name as
    sentence-transformers does: ``"query"`` as ``encode_query``, ``"document"`` as ``encode_document``, None
    as ``encode`` (the default prompt: none in our exports). Texts are cut at ``max_length`` or at the
    model's own limit (``own_max_length``: None for a folder without one), whichever is shorter.
    """

    def __init__(self, encoder: Encoder, *, batch_size: int, own_max_length: int | None = None,
                 dim: int | None = None):
        self.encoder, self.batch_size, self.own_max_length = encoder, batch_size, own_max_length
        self.cache: dict[tuple[str, str, int], np.ndarray] = {}
        self.dim = dim

    def truncated(self, dim: int) -> Embedder:
        """This embedder at size ``dim``: the first ``dim`` dimensions, re-normalised (the cache is shared)."""
        view = Embedder(self.encoder, batch_size=self.batch_size, own_max_length=self.own_max_length, dim=dim)
        view.cache = self.cache
        return view

    def limit(self, max_length: int) -> int:
        return max_length if self.own_max_length is None else min(max_length, self.own_max_length)

    def __call__(self, texts: list[str], max_length: int, *, prompt_name: str | None = None) -> np.ndarray:
        prompt = self.encoder.resolve_prompt(prompt_name=prompt_name) or ""
        limit = self.limit(max_length)
        todo = list(dict.fromkeys(t for t in texts if (t, prompt, limit) not in self.cache))
        if todo:
            vectors = self.encoder.encode(todo, self.batch_size, prompt=prompt, max_length=limit,
                                          show_progress_bar=False)
            self.cache.update({(t, prompt, limit): v for t, v in zip(todo, vectors)})
        vectors = np.stack([self.cache[(t, prompt, limit)] for t in texts])
        return vectors if self.dim is None else truncate_rows(vectors, self.dim)


def model_embedder(path: str, model, tokenizer, *, bidirectional: bool, batch_size: int) -> Embedder:
    """compare's embedding path for a model loaded from ``path`` (``FOLDER@ROUTING`` allowed): the Encoder its
    folder was exported as (a plain or UBMoE folder: mean pooling, no prompt), attention as ``--attention``."""
    folder = resolve_model_path(split_routing(path)[0])
    encoder = Encoder.for_model(model, tokenizer, folder, bidirectional=bidirectional)
    return Embedder(encoder, batch_size=batch_size, own_max_length=read_encoder_config(folder)["max_length"])


def lee_sts_task(n_docs: int = 50):
    """A local MTEB STS task over the Lee document pairs (1225 for 50 docs; no hub access), for ``mteb.evaluate``."""
    from datasets import Dataset, DatasetDict
    from mteb.abstasks.sts import AbsTaskSTS
    from mteb.abstasks.task_metadata import TaskMetadata

    class LeeSTS(AbsTaskSTS):
        metadata = TaskMetadata(
            type="STS", name="LeeSTS", main_score="cosine_spearman",
            description="Lee et al. (2005): 50 news documents, 1225 pairs rated for similarity by humans.",
            reference="https://radimrehurek.com/gensim/", dataset={"path": "local/lee", "revision": "local"},
            category="t2t", eval_splits=["test"], eval_langs=["eng-Latn"], date=("2005-01-01", "2005-12-31"),
            dialect=["Written"], domains=["News"], task_subtypes=[], license="not specified",
            annotations_creators="human-annotated", modalities=["text"], sample_creation="found",
            bibtex_citation="",
        )
        min_score = 0.0
        max_score = 1.0

        def load_data(self, num_proc=None, **kwargs):
            docs, human = lee_pairs(n_docs)
            i, j = np.triu_indices(len(docs), 1)
            self.dataset = DatasetDict({"test": Dataset.from_dict({
                "sentence1": [docs[k] for k in i], "sentence2": [docs[k] for k in j],
                "score": [float(s) for s in human],
            })})
            self.data_loaded = True

    return LeeSTS()
