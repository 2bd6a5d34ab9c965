"""Text sources: local .txt / JSONL / parquet files, Hugging Face ``datasets`` (saved, local, streaming), Lee.

A :class:`SourceSpec` names where documents come from; :func:`open_source` turns it into a
:class:`TextSource` that either supports random access (in-memory lists, ``datasets.Dataset``) or
only iteration (streaming). :func:`load_texts` is the simple public entry point: an iterable of
document strings, empty and whitespace-only documents skipped.

>>> from bidirlm_pl.data.sources import SourceSpec, load_texts
>>> texts = list(load_texts(SourceSpec(name="news", kind="lee")))
>>> len(texts)
300

Kinds (``kind="auto"`` infers one from ``path``):

* ``text``: a .txt file (or a folder / glob of them); ``text_unit`` = ``line`` (one document per
  line, the default), ``paragraph`` (blank-line separated) or ``file``.
* ``jsonl`` / ``parquet``: local files read with ``datasets`` (``text_field`` picks the column).
* ``disk``: a folder written by ``datasets.Dataset.save_pretrained`` / ``save_to_disk``
  (``load_from_disk``; a ``DatasetDict`` takes ``split``).
* ``hf``: ``datasets.load_dataset(dataset, name=config, split=split, data_files=..., streaming=...)``;
  ``dataset`` is a local folder, a builder name (``json``, ``parquet``, ``text``, ``csv``) or a hub id
  (``org/name`` or ``org/name@revision``): downloaded or streamed into the Hugging Face cache, or read from
  it with ``HF_HUB_OFFLINE=1`` (including a snapshot fetched with ``hf download --repo-type dataset``).
* ``lee`` / ``lee_documents``: the Lee news corpus shipped in the gensim wheel (300 / 50 documents).
* ``family``: the *training* passages of a built-in text family named by ``dataset`` (``kjv``, ``turkish-short``...;
  :mod:`bidirlm_pl.core.assets.families`), disjoint from the held-out passages ``compare`` evaluates on.

``streaming: true`` (jsonl, parquet, hf) reads documents lazily; such a source only supports
iteration, so the mixture resumes it by skipping the documents it has already consumed.

Chat data (jsonl, parquet, disk, hf): ``messages_field`` names a column of turns, each a ``{role, content}``
mapping (the layout of SFT sets such as ``allenai/tulu-v2-sft-mixture``), and each row becomes one document:
the turns rendered by the data module's tokenizer, ``tokenizer.apply_chat_template(turns, tokenize=False)``, so
the text carries the model's own chat markup. A turn without a role or a content string is a one-line error
naming the row and the turn; :func:`open_source` / :func:`load_texts` take the tokenizer (``tokenizer=``).
"""

from __future__ import annotations

import glob
import json
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

from bidirlm_pl.core import assets
from bidirlm_pl.core.errors import BidirLMError, first_line
from bidirlm_pl.core.hub import load_dataset

KINDS = ("auto", "text", "jsonl", "parquet", "disk", "hf", "lee", "lee_documents", "family")
TEXT_UNITS = ("line", "paragraph", "file")
_SUFFIX_KIND = {".txt": "text", ".text": "text", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


@dataclass
class SourceSpec:
    """One named source of documents in a mixture.

    Args:
        name: a short name used in logs (realised proportions) and errors.
        kind: one of ``auto, text, jsonl, parquet, disk, hf, lee, lee_documents, family``.
        path: a file, folder or glob (text/jsonl/parquet/disk).
        dataset: for ``kind: hf``, the first argument of ``datasets.load_dataset``; for ``kind: family``, the
            text family whose training passages to read.
        config: for ``kind: hf``, the dataset configuration name.
        data_files: for ``kind: hf``, ``data_files`` passed to ``load_dataset``.
        weight: sampling weight in the mixture (normalised over all sources; must be >= 0).
        text_field: the column/key holding the text (jsonl, parquet, disk, hf).
        split: the split to read (disk with a DatasetDict, hf).
        streaming: read lazily (jsonl, parquet, hf).
        text_unit: for ``kind: text``: ``line``, ``paragraph`` or ``file``.
        messages_field: the column of chat turns (``{role, content}`` each) rendered into one document by the
            tokenizer's chat template (jsonl, parquet, disk, hf); ``text_field`` is then unused.
    """

    name: str
    kind: str = "auto"
    path: str | None = None
    dataset: str | None = None
    config: str | None = None
    data_files: list[str] | None = None
    weight: float = 1.0
    text_field: str = "text"
    split: str = "train"
    streaming: bool = False
    text_unit: str = "line"
    messages_field: str | None = None

    @property
    def column(self) -> str:
        """The column read: ``messages_field`` for chat data, else ``text_field``."""
        return self.messages_field or self.text_field


@dataclass
class TextSource:
    """An opened source: ``docs`` supports ``len`` and indexing, or ``iterate`` yields documents lazily.

    Documents are raw strings; empty ones are filtered by the consumers (:func:`load_texts`, the mixture).
    """

    spec: SourceSpec
    docs: Sequence[str] | None = None
    iterate: Callable[[], Iterator[str]] | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def random_access(self) -> bool:
        return self.docs is not None

    def __iter__(self) -> Iterator[str]:
        if self.docs is not None:
            return (self.docs[i] for i in range(len(self.docs)))
        return self.iterate()


class _Column(Sequence):
    """Lazy random access to one column of a ``datasets.Dataset`` as text (no full copy into Python)."""

    def __init__(self, dataset, field_name: str, convert: Callable[[object, int], str]):
        self.dataset, self.field_name, self.convert = dataset, field_name, convert

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        return self.convert(self.dataset[int(i)][self.field_name], int(i))


def _as_text(value, row: int | None = None) -> str:
    return value if isinstance(value, str) else ("" if value is None else str(value))


def render_messages(tokenizer, messages, where: str) -> str:
    """One chat's turns rendered by ``tokenizer``'s chat template; one line naming ``where`` for a bad turn.

    >>> render_messages(None, [{"role": "user"}], "row 3")
    Traceback (most recent call last):
    ...
    bidirlm_pl.core.errors.BidirLMError: row 3: turn 0 has no 'content' string (keys ['role']); each turn needs a role and a content
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise BidirLMError(f"{where}: messages is {type(messages).__name__} {str(messages)[:40]!r}, "
                           "expected a non-empty list of {role, content} turns")
    for number, turn in enumerate(messages):
        keys = sorted(k for k, v in turn.items() if v is not None) if isinstance(turn, dict) else None
        if keys is None:
            raise BidirLMError(f"{where}: turn {number} is {type(turn).__name__}, expected a {{role, content}} mapping")
        for key in ("role", "content"):
            if not isinstance(turn.get(key), str):
                raise BidirLMError(f"{where}: turn {number} has no {key!r} string (keys {keys}); "
                                   "each turn needs a role and a content")
    try:
        return tokenizer.apply_chat_template(list(messages), tokenize=False)
    except Exception as err:  # the template's own refusal (jinja), e.g. roles that do not alternate
        raise BidirLMError(f"{where}: the chat template refused the turns: {first_line(err, 120)}") from err


def _converter(spec: SourceSpec, tokenizer) -> Callable[[object, int], str]:
    """The function turning a row's value (and its index) into a document: plain text, or rendered chat turns."""
    if spec.messages_field is None:
        return _as_text
    if tokenizer is None:
        raise BidirLMError(f"source '{spec.name}': messages_field '{spec.messages_field}' is rendered by a tokenizer's "
                           "chat template; pass tokenizer= (the data modules pass theirs)")
    if not getattr(tokenizer, "chat_template", None):
        raise BidirLMError(f"source '{spec.name}': tokenizer '{getattr(tokenizer, 'name_or_path', '?')}' has no chat "
                           "template to render messages_field; use a chat model's tokenizer or a text_field")
    return lambda value, row: render_messages(tokenizer, value, f"source '{spec.name}' row {row}")


# The fields each kind reads (besides name, kind, weight); any other field set away from its default
# contradicts the kind, e.g. a command-line list merged item by item into a config's ``kind: lee``.
KIND_FIELDS = {
    "lee": set(), "lee_documents": set(), "family": {"dataset"},
    "text": {"path", "text_unit"},
    "jsonl": {"path", "text_field", "messages_field", "streaming"},
    "parquet": {"path", "text_field", "messages_field", "streaming"},
    "disk": {"path", "text_field", "messages_field", "split"},
    "hf": {"dataset", "config", "data_files", "text_field", "messages_field", "split", "streaming"},
}


def given_fields(spec) -> dict:
    """The dataclass fields of ``spec`` whose values differ from their defaults."""

    out = {}
    for f in fields(spec):
        default = f.default if f.default is not MISSING else (
            f.default_factory() if f.default_factory is not MISSING else MISSING)
        value = getattr(spec, f.name)
        if default is MISSING or value != default:
            out[f.name] = value
    return out


def check_contradictions(spec: SourceSpec, kind: str, *, where: str | None = None) -> None:
    """A one-line error when ``spec`` sets fields its ``kind`` does not read."""
    extra = {k: v for k, v in given_fields(spec).items()
             if k not in KIND_FIELDS[kind] | {"name", "kind", "weight"}}
    if extra:
        shown = ", ".join(f"{k}={v!r}" for k, v in extra.items())
        raise BidirLMError(
            f"{where or f'source {spec.name!r}'}: kind '{kind}' takes no {sorted(extra)} (given {shown}); "
            "a command-line list merges into the config's item by item: give each source its 'kind' (docs/mntp.md)"
        )


def resolve_kind(spec: SourceSpec) -> str:
    """The concrete kind of a spec (``auto`` inferred from the path), or a one-line error.

    Fields the kind does not read are a contradiction and an error too.
    """
    kind = _resolve_kind(spec)
    check_contradictions(spec, kind)
    return kind


def _resolve_kind(spec: SourceSpec) -> str:
    if spec.kind not in KINDS:
        raise BidirLMError(f"source '{spec.name}': kind '{spec.kind}' is not one of {list(KINDS)}")
    if spec.kind != "auto":
        return spec.kind
    if spec.dataset is not None and spec.path is not None:
        raise BidirLMError(f"source '{spec.name}' sets both path '{spec.path}' and dataset '{spec.dataset}'; "
                           "keep one (a path reads local files, a dataset means kind: hf)")
    if spec.dataset is not None:
        return "hf"
    if spec.path is None:
        raise BidirLMError(f"source '{spec.name}' has neither 'path' nor 'dataset'; set one (or kind: lee)")
    path = Path(spec.path).expanduser()
    if path.is_dir():
        if (path / "state.json").exists() or (path / "dataset_dict.json").exists():
            return "disk"
        files = sorted(p for p in path.iterdir() if p.suffix in _SUFFIX_KIND)
        if files:
            return _SUFFIX_KIND[files[0].suffix]
        raise BidirLMError(
            f"source '{spec.name}': folder '{spec.path}' holds no .txt/.jsonl/.parquet files and is not a "
            "saved datasets folder"
        )
    suffix = Path(spec.path.replace("*", "x")).suffix
    if suffix not in _SUFFIX_KIND:
        raise BidirLMError(
            f"source '{spec.name}': cannot infer the kind of '{spec.path}'; expected a suffix in "
            f"{sorted(_SUFFIX_KIND)} or an explicit kind"
        )
    return _SUFFIX_KIND[suffix]


def _files(spec: SourceSpec, kind: str) -> list[str]:
    if spec.path is None:
        raise BidirLMError(f"source '{spec.name}' (kind {kind}) needs 'path'")
    path = Path(spec.path).expanduser()
    if path.is_dir():
        suffixes = [s for s, k in _SUFFIX_KIND.items() if k == kind]
        files = sorted(str(p) for p in path.iterdir() if p.suffix in suffixes)
    elif any(c in spec.path for c in "*?["):
        files = sorted(glob.glob(str(path)))
    else:
        files = [str(path)] if path.is_file() else []
    if not files:
        raise BidirLMError(f"source '{spec.name}': path '{spec.path}' does not exist or matches no {kind} file")
    return files


def _utf8_error(path: str, raw: bytes, err: UnicodeDecodeError) -> BidirLMError:
    line = raw.count(b"\n", 0, err.start) + 1
    return BidirLMError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[err.start]:02x}); re-encode the file as UTF-8")


def _read_text_file(path: str, unit: str) -> list[str]:
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _utf8_error(path, raw, err) from err
    if unit == "file":
        return [text]
    if unit == "paragraph":

        return [p.strip() for p in re.split(r"\n\s*\n", text)]
    return [line.strip() for line in text.splitlines()]


def _check_field(spec: SourceSpec, columns) -> None:
    if columns is not None and spec.column not in columns:
        which = "messages_field" if spec.messages_field else "text_field"
        raise BidirLMError(
            f"source '{spec.name}': {which} '{spec.column}' is not a column; columns are {sorted(columns)}"
        )


def _from_datasets(spec: SourceSpec, dataset, tokenizer=None) -> TextSource:
    """Wrap a ``datasets`` Dataset (random access) or IterableDataset (streaming)."""
    import datasets

    if isinstance(dataset, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if spec.split not in dataset:
            raise BidirLMError(f"source '{spec.name}': split '{spec.split}' is not one of {sorted(dataset)}")
        dataset = dataset[spec.split]
    _check_field(spec, dataset.column_names)
    convert = _converter(spec, tokenizer)
    if dataset.column_names is not None and len(dataset.column_names) > 1:
        dataset = dataset.select_columns([spec.column])  # decode only the text (or chat) column per row
    if isinstance(dataset, datasets.Dataset):
        return TextSource(spec, docs=_Column(dataset, spec.column, convert))

    def iterate():
        for row, record in enumerate(dataset):
            yield convert(record[spec.column], row)

    return TextSource(spec, iterate=iterate)


SCAN_LINES = 1000  # lines of a streaming JSONL file checked before training (all lines otherwise)


def scan_jsonl(path: str, text_field: str | None, max_lines: int | None = None, *, setting: str = "text_field") -> None:
    """One line naming the file and line of the first record that is not UTF-8, not JSON or has no text field.

    ``text_field=None`` checks UTF-8 and JSON only (pair rows name their own missing columns); ``setting`` is the
    source field the hint names (``messages_field`` for chat data).
    """
    count = 0
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            if max_lines is not None and number > max_lines:
                break
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise BidirLMError(f"{path}:{number}: not UTF-8 text (byte 0x{raw[err.start]:02x}); "
                                   "re-encode the file as UTF-8") from err
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise BidirLMError(f"{path}:{number}: not JSON ({err.msg} at column {err.colno})") from err
            if text_field is not None and (not isinstance(record, dict) or text_field not in record):
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                what = "text field" if setting == "text_field" else setting.replace("_", " ")
                raise BidirLMError(f"{path}:{number}: record has no {what} '{text_field}' (has {keys}); "
                                   f"set {setting} to the right key")
            count += 1
    if count == 0:
        raise BidirLMError(f"{path} is empty; expected JSONL lines" + (f" with a '{text_field}' field" if text_field else ""))


def open_source(spec: SourceSpec, tokenizer=None) -> TextSource:
    """Open a source; raise a one-line :class:`BidirLMError` when it does not exist or is malformed.

    ``tokenizer`` renders a chat source's turns (``messages_field``) with its chat template; plain text needs none.
    """
    kind = resolve_kind(spec)
    if spec.text_unit not in TEXT_UNITS:
        raise BidirLMError(f"source '{spec.name}': text_unit '{spec.text_unit}' is not one of {list(TEXT_UNITS)}")
    if kind in ("lee", "lee_documents"):

        return TextSource(spec, docs=assets.lee_background() if kind == "lee" else assets.lee_documents())
    if kind == "family":
        if spec.dataset is None:
            raise BidirLMError(f"source '{spec.name}' (kind family) needs 'dataset', one of {assets.families_hint()}")
        return TextSource(spec, docs=list(assets.family_passages(spec.dataset, "train")))
    if kind == "text":
        files = _files(spec, kind)
        return TextSource(spec, docs=[d for f in files for d in _read_text_file(f, spec.text_unit)])
    import datasets

    if kind in ("jsonl", "parquet"):
        files = _files(spec, kind)
        if kind == "jsonl":
            for f in files:
                scan_jsonl(f, spec.column, max_lines=SCAN_LINES if spec.streaming else None,
                           setting="messages_field" if spec.messages_field else "text_field")
        builder = "json" if kind == "jsonl" else "parquet"
        try:
            loaded = datasets.load_dataset(builder, data_files=files, split="train", streaming=spec.streaming)
        except Exception as err:
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise BidirLMError(f"source '{spec.name}': cannot read {kind} files {files}: {first}") from err
        return _from_datasets(spec, loaded, tokenizer)
    if kind == "disk":
        path = Path(spec.path or "").expanduser()
        if spec.path is None or not path.is_dir():
            raise BidirLMError(f"source '{spec.name}': saved dataset folder '{spec.path}' does not exist")
        return _from_datasets(spec, datasets.load_from_disk(str(path)), tokenizer)
    # kind == "hf"
    if spec.dataset is None:
        raise BidirLMError(f"source '{spec.name}' (kind hf) needs 'dataset'")
    loaded = load_dataset(spec.dataset, name=spec.config, split=spec.split, data_files=spec.data_files,
                          streaming=spec.streaming, what=f"source '{spec.name}': dataset '{spec.dataset}'")
    return _from_datasets(spec, loaded, tokenizer)


def describe_source(source: TextSource) -> str:
    """One line for the start-of-run log: name, resolved kind, where it reads from and how many documents."""
    spec = source.spec
    kind = resolve_kind(spec)
    if kind in ("lee", "lee_documents"):
        where = "gensim " + ("lee_background.cor" if kind == "lee" else "lee.cor")
    elif kind == "family":
        where = f"text family {spec.dataset} (training passages: {assets.describe_family(spec.dataset)})"
    elif kind == "hf":
        where = f"dataset {spec.dataset}" + (f" ({spec.config})" if spec.config else "") + f", split {spec.split}"
    elif kind == "disk":
        where = str(spec.path)
    else:
        files = _files(spec, kind)
        where = ", ".join(files[:3]) + (f" and {len(files) - 3} more files" if len(files) > 3 else "")
    count = f"{len(source.docs)} documents" if source.docs is not None else "streaming"
    chat = f", chats from '{spec.messages_field}' rendered by the chat template" if spec.messages_field else ""
    return f"source '{spec.name}': kind {kind}, {where}, {count}{chat}, weight {spec.weight}"


def load_texts(spec: SourceSpec | dict, tokenizer=None) -> Iterable[str]:
    """All non-empty documents of one source, in order (lazy for streaming sources).

    ``tokenizer`` renders a chat source's turns (``messages_field``) with its chat template.

    >>> docs = load_texts({"name": "lee", "kind": "lee"})
    >>> next(iter(docs))[:20]
    'Hundreds of people h'
    """
    if isinstance(spec, dict):
        spec = SourceSpec(**spec)
    source = open_source(spec, tokenizer)
    return (doc for doc in source if doc.strip())


def first_documents(source: TextSource, n: int) -> list[str]:
    """Up to ``n`` non-empty documents from the start of a source (for checks before training)."""
    out = []
    for doc in source:
        if doc.strip():
            out.append(doc)
            if len(out) >= n:
                break
    return out
