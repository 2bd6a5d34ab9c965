"""Embedding evaluation: Spearman correlation with the Lee et al. (2005) human document similarities.

The 50 Lee documents are embedded, the cosine similarity of each of the 1225 upper-triangle pairs
(order ``np.triu_indices(50, 1)``) is compared with the averaged human ratings
(:func:`bidirlm_pl.core.assets.lee_similarities`). This is the shared "STS score" validation hook: any
object with ``encode(texts, batch_size=...) -> (N, D)`` works (our Encoder, a SentenceTransformer).

>>> from bidirlm_pl.models.encoder import Encoder
>>> lee_spearman(Encoder.from_pretrained("gemma3-270m"))  # doctest: +SKIP
0.43...
"""

from __future__ import annotations

import numpy as np

from bidirlm_pl.core.errors import BidirLMError


def spearman(a, b) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    from scipy.stats import spearmanr

    return float(spearmanr(np.asarray(a), np.asarray(b)).statistic)


def pairwise_cosines(embeddings_ND) -> np.ndarray:
    """Cosine similarities of the upper-triangle pairs, in ``np.triu_indices(N, 1)`` order."""
    from bidirlm_pl.evaluation.metrics import unit_rows

    e = unit_rows(embeddings_ND)
    sims = e @ e.T
    return sims[np.triu_indices(e.shape[0], 1)]


def lee_pairs(n_docs: int = 50) -> tuple[list[str], np.ndarray]:
    """The first ``n_docs`` Lee documents and the human ratings of their upper-triangle pairs."""
    from bidirlm_pl.core import assets

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


def embed_texts(model, tokenizer, texts: list[str], *, causal: bool = False, max_length: int = 512,
                batch_size: int = 8):
    """Mean-pooled last hidden states (N, D), fp32, of a decoder run causally or bidirectionally (right padding)."""
    import torch

    from bidirlm_pl.backbone.load import decoder_of
    from bidirlm_pl.models.pooling import mean_pool

    model.eval()
    decoder = decoder_of(model)
    out = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True,
                            max_length=max_length, return_tensors="pt")
            hidden = decoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                             is_causal=causal).last_hidden_state
            out.append(mean_pool(hidden, enc["attention_mask"]).float())
    return torch.cat(out)


class MeanPoolEncoder:
    """``encode(texts, batch_size) -> (N, D)`` over any decoder: mean pooling, causal or bidirectional attention."""

    def __init__(self, model, tokenizer, max_length: int = 512, *, causal: bool = False):
        self.model, self.tokenizer, self.max_length, self.causal = model, tokenizer, max_length, causal

    def encode(self, texts, batch_size: int = 8, **_):
        return embed_texts(self.model, self.tokenizer, list(texts), causal=self.causal, max_length=self.max_length,
                           batch_size=batch_size).numpy()
