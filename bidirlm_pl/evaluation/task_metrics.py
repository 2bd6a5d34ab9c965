"""Scores of labelled tasks that torchmetrics lacks: entity-level F1 of BIO tags, SQuAD exact match and F1.

Plain functions of tag and answer strings, so the fine-tuning stage and the compare suite share them and
tests check them against hand-made cases and the libraries they mirror.

* Entities follow seqeval's default (conlleval) rule: a chunk starts on ``B-``, on ``S-``, and on an ``I-`` or
  ``E-`` that follows ``O`` or another type; it ends before ``B-``, ``S-`` or ``O``, after ``E-`` or ``S-``, and
  on a type change. So ``I-PER I-PER O`` is one PER entity. ``mode="strict"`` is seqeval's
  ``mode="strict", scheme=IOB2``: an entity starts on ``B-`` only and an ``I-`` of another type is dropped.
* Entity F1 is micro-averaged over types: an entity counts when type, start and end all match.
* QA scores are SQuAD v1.1's: answers lowercased, punctuation and English articles removed, whitespace
  collapsed; exact match and token-overlap F1 take the best gold answer. Words of CJK characters are split
  into characters (MLQA's mixed segmentation), so Chinese and Japanese answers get partial credit too.

>>> entities(["B-PER", "I-PER", "O", "B-LOC"])
[('PER', 0, 1), ('LOC', 3, 3)]
>>> entity_f1([["B-PER", "I-PER", "O"]], [["I-PER", "I-PER", "O"]])
1.0
>>> squad_f1("the Eiffel tower", ["Eiffel Tower"]), squad_exact_match("Paris!", ["paris"])
(1.0, 1.0)
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter

PREFIXES = ("B", "I", "E", "S")


def is_bio(labels: list[str]) -> bool:
    """True when every label is ``O`` or ``B-X`` / ``I-X`` (with at least one entity type): an entity tag set."""
    return bool(labels) and any(label != "O" for label in labels) and all(
        label == "O" or (len(label) > 2 and label[0] in "BI" and label[1] == "-") for label in labels)


def _split(tag: str) -> tuple[str, str]:
    """(prefix, type) as seqeval reads a tag: ``B-PER`` -> (B, PER); ``O`` -> (O, _)."""
    return tag[:1], tag[1:].split("-", maxsplit=1)[-1] or "_"


def _ends(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    return (prev_tag in ("E", "S") or (prev_tag in ("B", "I") and tag in ("B", "S", "O"))
            or (prev_tag not in ("O", ".") and prev_type != type_))


def _starts(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    return (tag in ("B", "S") or (prev_tag in ("E", "S", "O") and tag in ("E", "I"))
            or (tag not in ("O", ".") and prev_type != type_))


def entities(tags: list[str], mode: str = "default") -> list[tuple[str, int, int]]:
    """Entities ``(type, first, last)`` (inclusive word indices) of one tag sequence."""
    if mode == "strict":
        return _strict_entities(tags)
    if mode != "default":
        raise ValueError(f"entity mode '{mode}' is not 'default' or 'strict'")
    chunks, prev_tag, prev_type, begin = [], "O", "", 0
    for i, tag in enumerate([*tags, "O"]):
        prefix, type_ = _split(tag)
        if _ends(prev_tag, prefix, prev_type, type_):
            chunks.append((prev_type, begin, i - 1))
        if _starts(prev_tag, prefix, prev_type, type_):
            begin = i
        prev_tag, prev_type = prefix, type_
    return chunks


def _strict_entities(tags: list[str]) -> list[tuple[str, int, int]]:
    """IOB2 strict: ``B-X`` opens an entity, following ``I-X`` extend it, anything else closes it."""
    out, current = [], None
    for i, tag in enumerate([*tags, "O"]):
        prefix, type_ = _split(tag)
        if current is not None and not (prefix == "I" and type_ == current[0]):
            out.append(tuple(current))
            current = None
        if prefix == "B":
            current = [type_, i, i]
        elif current is not None:
            current[2] = i
    return out


def entity_counts(gold: list[list[str]], predicted: list[list[str]], mode: str = "default") -> tuple[int, int, int]:
    """(true positives, predicted entities, gold entities) over sentences of tags (summable across batches)."""
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold sentences but {len(predicted)} predicted")
    tp = n_pred = n_gold = 0
    for g, p in zip(gold, predicted):
        if len(g) != len(p):
            raise ValueError(f"a sentence has {len(g)} gold tags but {len(p)} predicted")
        g_set, p_set = set(entities(g, mode)), set(entities(p, mode))
        tp, n_pred, n_gold = tp + len(g_set & p_set), n_pred + len(p_set), n_gold + len(g_set)
    return tp, n_pred, n_gold


def group_means(per_group: dict[str, dict[str, float]]) -> dict[str, float]:
    """Scores of several test sets scored apart (UD POS per language): each metric's mean over the sets, then every
    set's own values under ``<set>/<metric>``.

    >>> group_means({"de": {"accuracy": 0.8}, "fr": {"accuracy": 0.6}})
    {'accuracy': 0.7, 'de/accuracy': 0.8, 'fr/accuracy': 0.6}
    """
    names = list(next(iter(per_group.values()), {}))
    means = {k: sum(values[k] for values in per_group.values()) / len(per_group) for k in names}
    return means | {f"{group}/{k}": v for group, values in per_group.items() for k, v in values.items()}


def f1_from_counts(tp: float, n_pred: float, n_gold: float) -> float:
    """Micro F1 = 2 tp / (predicted + gold); 0 when there is nothing (seqeval's zero_division)."""
    return 2 * tp / (n_pred + n_gold) if n_pred + n_gold else 0.0


def entity_f1(gold: list[list[str]], predicted: list[list[str]], mode: str = "default") -> float:
    """Micro-averaged entity F1 (seqeval's ``f1_score`` in its default or strict IOB2 mode)."""
    return f1_from_counts(*entity_counts(gold, predicted, mode))


# ------------------------------------------------------------------ SQuAD

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1: lower case, no punctuation, no articles (a, an, the), single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _is_cjk(ch: str) -> bool:
    return "CJK" in unicodedata.name(ch, "") or "HIRAGANA" in unicodedata.name(ch, "") or \
        "KATAKANA" in unicodedata.name(ch, "")


def answer_tokens(text: str) -> list[str]:
    """Tokens of a normalised answer: words, with CJK characters as one token each."""
    out = []
    for word in normalize_answer(text).split():
        if any(_is_cjk(ch) for ch in word):
            out.extend(ch for ch in word if not unicodedata.category(ch).startswith("P"))
        else:
            out.append(word)
    return out


def squad_exact_match(prediction: str, answers: list[str]) -> float:
    return float(any(normalize_answer(prediction) == normalize_answer(a) for a in answers))


def squad_f1(prediction: str, answers: list[str]) -> float:
    """Token-overlap F1 with the best gold answer."""
    best = 0.0
    predicted = answer_tokens(prediction)
    for answer in answers:
        gold = answer_tokens(answer)
        common = sum((Counter(predicted) & Counter(gold)).values())
        if not predicted or not gold:
            score = float(predicted == gold)
        elif common == 0:
            score = 0.0
        else:
            precision, recall = common / len(predicted), common / len(gold)
            score = 2 * precision * recall / (precision + recall)
        best = max(best, score)
    return best
