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

``streaming: true`` (jsonl, parquet, hf) reads documents lazily; such a source only supports
iteration, so the mixture resumes it by skipping the documents it has already consumed.
"""

from __future__ import annotations

import glob
import json
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

from bidirlm_pl.core import assets
from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.core.hub import load_dataset

KINDS = ("auto", "text", "jsonl", "parquet", "disk", "hf", "lee", "lee_documents")
TEXT_UNITS = ("line", "paragraph", "file")
_SUFFIX_KIND = {".txt": "text", ".text": "text", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


@dataclass
class SourceSpec:
    """One named source of documents in a mixture.

    Args:
        name: a short name used in logs (realised proportions) and errors.
        kind: one of ``auto, text, jsonl, parquet, disk, hf, lee, lee_documents``.
        path: a file, folder or glob (text/jsonl/parquet/disk).
        dataset: for ``kind: hf``, the first argument of ``datasets.load_dataset``.
        config: for ``kind: hf``, the dataset configuration name.
        data_files: for ``kind: hf``, ``data_files`` passed to ``load_dataset``.
        weight: sampling weight in the mixture (normalised over all sources; must be >= 0).
        text_field: the column/key holding the text (jsonl, parquet, disk, hf).
        split: the split to read (disk with a DatasetDict, hf).
        streaming: read lazily (jsonl, parquet, hf).
        text_unit: for ``kind: text``: ``line``, ``paragraph`` or ``file``.
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
    """Lazy random access to one text column of a ``datasets.Dataset`` (no full copy into Python)."""

    def __init__(self, dataset, field_name: str):
        self.dataset, self.field_name = dataset, field_name

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        return _as_text(self.dataset[int(i)][self.field_name])


def _as_text(value) -> str:
    return value if isinstance(value, str) else ("" if value is None else str(value))


# The fields each kind reads (besides name, kind, weight); any other field set away from its default
# contradicts the kind, e.g. a command-line list merged item by item into a config's ``kind: lee``.
KIND_FIELDS = {
    "lee": set(), "lee_documents": set(),
    "text": {"path", "text_unit"},
    "jsonl": {"path", "text_field", "streaming"}, "parquet": {"path", "text_field", "streaming"},
    "disk": {"path", "text_field", "split"},
    "hf": {"dataset", "config", "data_files", "text_field", "split", "streaming"},
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
    if columns is not None and spec.text_field not in columns:
        raise BidirLMError(
            f"source '{spec.name}': text_field '{spec.text_field}' is not a column; columns are {sorted(columns)}"
        )


def _from_datasets(spec: SourceSpec, dataset) -> TextSource:
    """Wrap a ``datasets`` Dataset (random access) or IterableDataset (streaming)."""
    import datasets

    if isinstance(dataset, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if spec.split not in dataset:
            raise BidirLMError(f"source '{spec.name}': split '{spec.split}' is not one of {sorted(dataset)}")
        dataset = dataset[spec.split]
    _check_field(spec, dataset.column_names)
    if dataset.column_names is not None and len(dataset.column_names) > 1:
        dataset = dataset.select_columns([spec.text_field])  # decode only the text column per row
    if isinstance(dataset, datasets.Dataset):
        return TextSource(spec, docs=_Column(dataset, spec.text_field))

    def iterate():
        for row in dataset:
            yield _as_text(row[spec.text_field])

    return TextSource(spec, iterate=iterate)


SCAN_LINES = 1000  # lines of a streaming JSONL file checked before training (all lines otherwise)


def scan_jsonl(path: str, text_field: str | None, max_lines: int | None = None) -> None:
    """One line naming the file and line of the first record that is not UTF-8, not JSON or has no text field.

    ``text_field=None`` checks UTF-8 and JSON only (pair rows name their own missing columns).
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
                raise BidirLMError(f"{path}:{number}: record has no text field '{text_field}' (has {keys}); "
                                   "set text_field to the right key")
            count += 1
    if count == 0:
        raise BidirLMError(f"{path} is empty; expected JSONL lines" + (f" with a '{text_field}' field" if text_field else ""))


def open_source(spec: SourceSpec) -> TextSource:
    """Open a source; raise a one-line :class:`BidirLMError` when it does not exist or is malformed."""
    kind = resolve_kind(spec)
    if spec.text_unit not in TEXT_UNITS:
        raise BidirLMError(f"source '{spec.name}': text_unit '{spec.text_unit}' is not one of {list(TEXT_UNITS)}")
    if kind in ("lee", "lee_documents"):

        return TextSource(spec, docs=assets.lee_background() if kind == "lee" else assets.lee_documents())
    if kind == "text":
        files = _files(spec, kind)
        return TextSource(spec, docs=[d for f in files for d in _read_text_file(f, spec.text_unit)])
    import datasets

    if kind in ("jsonl", "parquet"):
        files = _files(spec, kind)
        if kind == "jsonl":
            for f in files:
                scan_jsonl(f, spec.text_field, max_lines=SCAN_LINES if spec.streaming else None)
        builder = "json" if kind == "jsonl" else "parquet"
        try:
            loaded = datasets.load_dataset(builder, data_files=files, split="train", streaming=spec.streaming)
        except Exception as err:
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise BidirLMError(f"source '{spec.name}': cannot read {kind} files {files}: {first}") from err
        return _from_datasets(spec, loaded)
    if kind == "disk":
        path = Path(spec.path or "").expanduser()
        if spec.path is None or not path.is_dir():
            raise BidirLMError(f"source '{spec.name}': saved dataset folder '{spec.path}' does not exist")
        return _from_datasets(spec, datasets.load_from_disk(str(path)))
    # kind == "hf"
    if spec.dataset is None:
        raise BidirLMError(f"source '{spec.name}' (kind hf) needs 'dataset'")
    loaded = load_dataset(spec.dataset, name=spec.config, split=spec.split, data_files=spec.data_files,
                          streaming=spec.streaming, what=f"source '{spec.name}': dataset '{spec.dataset}'")
    return _from_datasets(spec, loaded)


def describe_source(source: TextSource) -> str:
    """One line for the start-of-run log: name, resolved kind, where it reads from and how many documents."""
    spec = source.spec
    kind = resolve_kind(spec)
    if kind in ("lee", "lee_documents"):
        where = "gensim " + ("lee_background.cor" if kind == "lee" else "lee.cor")
    elif kind == "hf":
        where = f"dataset {spec.dataset}" + (f" ({spec.config})" if spec.config else "") + f", split {spec.split}"
    elif kind == "disk":
        where = str(spec.path)
    else:
        files = _files(spec, kind)
        where = ", ".join(files[:3]) + (f" and {len(files) - 3} more files" if len(files) > 3 else "")
    count = f"{len(source.docs)} documents" if source.docs is not None else "streaming"
    return f"source '{spec.name}': kind {kind}, {where}, {count}, weight {spec.weight}"


def load_texts(spec: SourceSpec | dict) -> Iterable[str]:
    """All non-empty documents of one source, in order (lazy for streaming sources).

    >>> docs = load_texts({"name": "lee", "kind": "lee"})
    >>> next(iter(docs))[:20]
    'Hundreds of people h'
    """
    if isinstance(spec, dict):
        spec = SourceSpec(**spec)
    source = open_source(spec)
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
