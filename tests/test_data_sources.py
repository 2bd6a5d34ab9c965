"""Text sources: every kind reads the same documents; bad sources fail with one line."""

import json

import pytest

from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.data.sources import SourceSpec, first_documents, load_texts, open_source, resolve_kind

DOCS = ["The first document.", "A second one, longer than the first.", "Third!"]


@pytest.fixture()
def files(tmp_path):
    (tmp_path / "docs.txt").write_text("\n".join(DOCS) + "\n\n")
    with open(tmp_path / "docs.jsonl", "w") as f:
        f.writelines(json.dumps({"body": d, "id": 1}) + "\n" for d in DOCS)
    import datasets

    ds = datasets.Dataset.from_dict({"text": DOCS})
    ds.to_parquet(str(tmp_path / "docs.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "saved_dict"))
    return tmp_path


@pytest.mark.parametrize("spec", [
    {"path": "docs.txt"},
    {"path": "docs.jsonl", "text_field": "body"},
    {"path": "docs.jsonl", "text_field": "body", "streaming": True},
    {"path": "docs.parquet"},
    {"path": "docs.parquet", "streaming": True},
    {"path": "saved"},
    {"path": "saved_dict", "split": "train"},
    {"kind": "hf", "dataset": "json", "data_files": ["docs.jsonl"], "text_field": "body", "streaming": True},
])
def test_every_kind_reads_the_same_documents(files, spec):
    spec = dict(spec)
    if "path" in spec:
        spec["path"] = str(files / spec["path"])
    if "data_files" in spec:
        spec["data_files"] = [str(files / f) for f in spec["data_files"]]
    assert list(load_texts(SourceSpec(name="s", **spec))) == DOCS
    source = open_source(SourceSpec(name="s", **spec))
    assert source.random_access == (not spec.get("streaming", False))


def test_text_units_and_globs(tmp_path):
    (tmp_path / "a.txt").write_text("para one\nstill one\n\npara two\n")
    (tmp_path / "b.txt").write_text("other file\n")
    assert list(load_texts(SourceSpec("p", path=str(tmp_path / "a.txt"), text_unit="paragraph"))) == [
        "para one\nstill one", "para two"]
    assert len(list(load_texts(SourceSpec("f", path=str(tmp_path / "*.txt"), text_unit="file")))) == 2
    assert list(load_texts(SourceSpec("d", path=str(tmp_path)))) == ["para one", "still one", "para two", "other file"]


def test_lee_corpus_is_a_named_source():
    docs = list(load_texts({"name": "news", "kind": "lee"}))
    assert len(docs) == 300 and all(len(d) > 100 for d in docs)
    assert len(list(load_texts(SourceSpec("rated", kind="lee_documents")))) == 50
    assert len(first_documents(open_source(SourceSpec("news", kind="lee")), 5)) == 5


@pytest.mark.parametrize("spec, message", [
    ({"path": "/nonexistent/corpus.txt"}, "does not exist"),
    ({"path": "/nonexistent/corpus.jsonl"}, "does not exist"),
    ({"kind": "disk", "path": "/nonexistent/saved"}, "does not exist"),
    ({"path": "/tmp/corpus.xyz"}, "cannot infer the kind"),
    ({"kind": "csvish", "path": "x"}, "kind 'csvish' is not one of"),
    ({}, "has neither 'path' nor 'dataset'"),
    ({"kind": "hf"}, "needs 'dataset'"),
])
def test_bad_sources_fail_with_one_line(spec, message):
    with pytest.raises(BidirLMError, match=message) as err:
        open_source(SourceSpec(name="bad", **spec))
    assert "\n" not in str(err.value) and "'bad'" in str(err.value)


def test_missing_text_field_names_the_columns(files):
    with pytest.raises(BidirLMError, match=r"docs.jsonl:1: record has no text field 'text' \(has \['body', 'id'\]\)"):
        open_source(SourceSpec("j", path=str(files / "docs.jsonl")))


def test_resolve_kind_from_folder_contents(files):
    assert resolve_kind(SourceSpec("s", path=str(files / "saved"))) == "disk"
