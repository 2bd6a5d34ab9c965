"""Evaluation data: local JSONL files, or offline defaults shipped by packages (gensim of the demo extra, the text
families' packages of the tasks extra).

Each task kind reads one record shape (one JSON object per line):

=================  ===============================================  ==========================================
kind               record                                           built-in data (offline)
=================  ===============================================  ==========================================
perplexity         ``{"text": str}``                                ``lee``: the 50 rated Lee news documents;
                                                                    ``wiki``: 96 English Wikipedia leads;
                                                                    the held-out passages of a text family
                                                                    (``kjv``, ``spanish-bible``, ``turkish``,
                                                                    ``japanese``, ``chinese``, ``python-code``,
                                                                    each also ``NAME-short``: one verse,
                                                                    sentence or code block a passage)
dependence         ``{"text": str}``                                ``lee``
multiple_choice    ``{"context": str, "choices": [str], "answer": int}``  ``capitals``: "Athens is the capital of" -> Greece
sts                ``{"text1": str, "text2": str, "score": float}``  ``lee-sts``: 1,225 Lee pairs, human ratings
retrieval          ``{"query": str, "document": str}``              ``newsgroup-subjects``: subject -> post body
classification     ``{"text": str, "label": str|int}``              ``polarity`` (200 film reviews), ``newsgroups``
clustering         ``{"text": str, "label": str|int}``              ``newsgroups``: 200 posts, atheism vs space
=================  ===============================================  ==========================================

The text families (:mod:`bidirlm_pl.core.assets.families`: sources, licences, the held-out rule) hold out
whole documents; their other documents are training text (the ``family`` source kind), never evaluated.

Retrieval lines with the same query are one query with several relevant documents; the corpus is
every distinct document. Nothing here downloads. The newsgroup posts come from gensim's
``mini_newsgroup`` file, a pickled scikit-learn Bunch: it is read with :mod:`pickletools`, a
disassembler that constructs no object and imports nothing, never unpickled.
"""

from __future__ import annotations

import bz2
import json
import pickletools
import random
import re
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np

from bidirlm_pl.core import assets
from bidirlm_pl.core.assets import gensim_data
from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.evaluation.embedding import lee_pairs

MIN_POST_WORDS = 25  # shorter posts (a signature, "me too") carry no topic

FIELDS = {
    "perplexity": ("text",),
    "dependence": ("text",),
    "multiple_choice": ("context", "choices", "answer"),
    "sts": ("text1", "text2", "score"),
    "retrieval": ("query", "document"),
    "classification": ("text", "label"),
    "clustering": ("text", "label"),
}


def read_jsonl(path: str | Path, fields: tuple[str, ...]) -> list[dict]:
    """Records of a JSONL file, each checked for ``fields``; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise BidirLMError(f"evaluation data '{path}' does not exist; expected a JSONL file with {list(fields)}")
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise BidirLMError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from err
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise BidirLMError(f"{path}:{number}: not JSON ({err.msg})") from err
        missing = [f for f in fields if not isinstance(record, dict) or f not in record]
        if missing:
            raise BidirLMError(f"{path}:{number}: record has no {missing}; expected fields {list(fields)}")
        records.append(record)
    if not records:
        raise BidirLMError(f"{path}: no records; expected JSONL lines with {list(fields)}")
    return records


def builtin(name: str) -> list[dict]:
    """Records of a built-in data set (see the table above)."""
    makers = {"lee": _lee, "wiki": _wiki, "lee-sts": _lee_sts, "newsgroups": _newsgroups,
              "newsgroup-subjects": _newsgroup_subjects, "polarity": _polarity, "capitals": _capitals}
    if name in assets.family_names():
        return [{"text": t} for t in assets.family_passages(name, "held_out")]
    if name not in makers:
        raise BidirLMError(f"unknown built-in evaluation data '{name}'; expected one of {sorted(makers)} "
                           "or a text family (docs/evaluation.md)")
    return makers[name]()


def builtin_names_shown(kind: str) -> str:
    """The built-in data names of ``kind`` in a few words, for one-line errors."""
    if kind == "perplexity":
        return f"lee, wiki or a family: {assets.families_hint()}"
    return ", ".join(builtin_names_for(kind))


def builtin_names_for(kind: str) -> list[str]:
    return {"perplexity": ["lee", "wiki", *assets.family_names()], "dependence": ["lee"], "multiple_choice": ["capitals"], "sts": ["lee-sts"],
            "retrieval": ["newsgroup-subjects"], "classification": ["polarity", "newsgroups"],
            "clustering": ["newsgroups"]}[kind]


def _lee() -> list[dict]:
    return [{"text": t} for t in assets.lee_documents()]


WIKI_ARTICLE_CHARS = 1000  # an article's lead: about 230 Gemma3 tokens, one 256-token window each


def _wiki() -> list[dict]:
    return [{"text": t} for t in _wiki_leads()]


@lru_cache(maxsize=1)
def _wiki_leads() -> tuple[str, ...]:
    """Out-of-domain English: the opening prose of the articles in gensim's shortened Wikipedia dump.

    Encyclopedic register and 2010s topics (albedo, anarchism, ...), unlike the Lee corpus's 2000s
    Australian news that the stages train on. Markup is stripped with gensim's own ``filter_wiki``;
    headings, lists, tables and lines under 20 words are dropped; redirects and stubs are skipped.
    """
    # gensim takes seconds to import, and only this data set needs it
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    dump = gensim_data("enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
    records = []
    with bz2.open(dump) as stream:
        for _title, markup, _page in extract_pages(stream):
            if markup.lstrip().lower().startswith("#redirect"):
                continue
            text = re.sub(r"'{2,}", "", filter_wiki(markup))
            prose = [re.sub(r"\s+", " ", line).strip() for line in text.splitlines()]
            prose = [re.sub(r" ?\([\s;,]*\)", "", line) for line in prose
                     if len(line.split()) >= 20 and not line.startswith(("=", "*", "|", "!", "{", "NOTE"))]
            article = " ".join(prose)[:WIKI_ARTICLE_CHARS].rsplit(" ", 1)[0]
            if len(article) >= WIKI_ARTICLE_CHARS // 2:
                records.append(article)
    return tuple(records)


def _lee_sts() -> list[dict]:
    docs, human = lee_pairs(50)
    i, j = np.triu_indices(len(docs), 1)
    return [{"text1": docs[a], "text2": docs[b], "score": float(s)} for a, b, s in zip(i, j, human)]


def _polarity() -> list[dict]:
    records = []
    for line in gensim_data("pang_lee_polarity.cor").read_text(encoding="cp1252").splitlines():
        label, _, text = line.partition(" ")
        if label.startswith("__label__") and text.strip():
            records.append({"text": text.strip(), "label": label.removeprefix("__label__")})
    neg, pos = [r for r in records if r["label"] == "neg"], [r for r in records if r["label"] == "pos"]
    return [r for pair in zip(neg, pos) for r in pair]  # alternating: any prefix (``limit``) stays balanced


@lru_cache(maxsize=1)
def _newsgroup_posts() -> tuple[tuple[str, str, str], ...]:
    """(group, subject, body) of gensim's 200 mini-newsgroup posts; quoted lines and headers dropped."""
    raw = zlib.decompress(gensim_data("mini_newsgroup").read_bytes())
    texts = [arg for op, arg, _ in pickletools.genops(raw) if op.name == "UNICODE"]
    posts = []
    for text in texts:
        head, _, body = text.partition("\n\n")
        headers = dict(line.split(": ", 1) for line in head.splitlines() if ": " in line)
        groups = headers.get("Newsgroups", "")
        group = next((g for g in ("alt.atheism", "sci.space") if g in groups), None)
        lines = [line for line in body.splitlines()
                 if not line.lstrip().startswith((">", "|", ":", "In article"))
                 and not re.search(r"(writes|wrote):\s*$", line)]
        body = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
        subject = re.sub(r"^(re:\s*)+", "", headers.get("Subject", ""), flags=re.IGNORECASE).strip()
        if group and subject and len(body.split()) >= MIN_POST_WORDS:
            posts.append((group, subject, body))
    return tuple(posts)


def _newsgroups() -> list[dict]:
    return [{"text": body, "label": group} for group, _, body in _newsgroup_posts()]


def _newsgroup_subjects() -> list[dict]:
    return [{"query": subject, "document": body} for _, subject, body in _newsgroup_posts()]


def _capitals() -> list[dict]:
    """Cloze by log-likelihood: "<capital> is the capital of" -> the country among four (gensim's analogy file)."""
    pairs, section = {}, None
    for line in gensim_data("questions-words.txt").read_text(encoding="utf-8").splitlines():
        if line.startswith(":"):
            section = line[1:].strip()
            continue
        if section in ("capital-common-countries", "capital-world"):
            a, b, c, d = line.split()
            pairs[a], pairs[c] = b, d
    countries = sorted(set(pairs.values()))
    rng = random.Random(0)
    records = []
    for capital in sorted(pairs):
        country = pairs[capital]
        choices = rng.sample([c for c in countries if c != country], 3) + [country]
        rng.shuffle(choices)
        records.append({"context": f"{capital} is the capital of", "choices": [" " + c for c in choices],
                        "answer": choices.index(country)})
    return records
