"""Embedding-task scores from embeddings: retrieval (torchmetrics), probe accuracy and V-measure (scikit-learn).

Every function takes plain arrays, so each is checked against hand-computed values in the tests.
"""

from __future__ import annotations

import numpy as np
import torch


def unit_rows(x_ND) -> np.ndarray:
    """Rows scaled to unit length (float64; zero rows stay zero)."""
    x = np.asarray(x_ND, dtype=np.float64)
    return x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)


def cosine_matrix(a_ND, b_MD) -> np.ndarray:
    return unit_rows(a_ND) @ unit_rows(b_MD).T


def retrieval_scores(scores_QD, relevant_QD, ks=(1, 10)) -> dict[str, float]:
    """Recall@k for each k and nDCG@10, averaged over queries (binary relevance)."""
    from torchmetrics.retrieval import RetrievalNormalizedDCG, RetrievalRecall

    scores = torch.as_tensor(np.asarray(scores_QD, dtype=np.float64))
    relevant = torch.as_tensor(np.asarray(relevant_QD, dtype=bool))
    Q, D = scores.shape
    indexes = torch.arange(Q).unsqueeze(1).expand(Q, D)
    out = {}
    for k in ks:
        out[f"recall@{k}"] = float(RetrievalRecall(top_k=k)(scores, relevant, indexes=indexes))
    out["ndcg@10"] = float(RetrievalNormalizedDCG(top_k=10)(scores, relevant, indexes=indexes))
    return out


def probe_accuracy(embeddings_ND, labels, folds: int = 5, seed: int = 0) -> float:
    """Mean accuracy of a logistic-regression probe over stratified ``folds`` (features standardised per fold)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    split = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return float(cross_val_score(probe, np.asarray(embeddings_ND, dtype=np.float64), np.asarray(labels),
                                 cv=split, scoring="accuracy").mean())


def cluster_v_measure(embeddings_ND, labels, seed: int = 0) -> float:
    """V-measure of k-means (k = number of labels) on unit-normalised embeddings against the labels."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import v_measure_score

    e = unit_rows(embeddings_ND)
    k = len(set(labels))
    predicted = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(e)
    return float(v_measure_score(labels, predicted))
