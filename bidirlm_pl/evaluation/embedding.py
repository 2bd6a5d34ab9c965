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

scipy, mteb and datasets are imported where they are used: seconds each, for commands that may not need them.
"""

from __future__ import annotations

import numpy as np

from bidirlm_pl.core import assets
from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.evaluation.metrics import unit_rows


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
