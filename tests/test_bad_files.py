"""Bad files name themselves: one line (exit status 2 on the CLI), nothing loaded or written."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bidirlm_pl import BidirLMError
from bidirlm_pl.backbone.load import resolve_model_path
from bidirlm_pl.data.sources import SourceSpec, open_source

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def folder(tiny_qwen3, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(tiny_qwen3, target)
    return target


def _truncate(folder):
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _garbage(folder):
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)


def _config_not_json(folder):
    (folder / "config.json").write_text("{not json")


def _unknown_architecture(folder):
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "nosuch"
    (folder / "config.json").write_text(json.dumps(config))


def _pickled_weights_only(folder):
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")


def _missing_shard(folder):
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))


@pytest.mark.parametrize("damage, message", [
    (_truncate, r"model.safetensors is truncated or not a safetensors file \(.*not fully covered"),
    (_garbage, r"model.safetensors is truncated or not a safetensors file"),
    (_config_not_json, r"config.json is not JSON \(Expecting property name .* line 1 column 2\)"),
    (_unknown_architecture, r"names model_type 'nosuch', an architecture transformers does not know"),
    (_pickled_weights_only, r"holds only pickled weights \['pytorch_model.bin'\]; this tool loads safetensors only"),
    (_missing_shard, r"lists shards that are missing: \['model-00002-of-00002.safetensors'\]"),
])
def test_bad_model_folders_are_one_line_errors(folder, damage, message):
    damage(folder)
    with pytest.raises(BidirLMError, match=message) as err:
        resolve_model_path(folder)
    assert "\n" not in str(err.value)


def test_missing_tokenizer_is_named(folder):
    from bidirlm_pl import load_backbone

    for f in folder.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("vocab.json", "merges.txt", "special_tokens_map.json"):
            f.unlink()
    with pytest.raises(BidirLMError, match="has no tokenizer"):
        load_backbone(folder)


@pytest.mark.parametrize("name, content, message", [
    ("notjson.jsonl", b'{"text": "a b c"}\nnot json\n', r"notjson.jsonl:2: not JSON"),
    ("nofield.jsonl", b'{"body": "a b c"}\n', r"nofield.jsonl:1: record has no text field 'text' \(has \['body'\]\)"),
    ("empty.jsonl", b"", r"empty.jsonl is empty"),
    ("latin.jsonl", b'{"text": "a"}\n{"text": "caf\xe9"}\n', r"latin.jsonl:2: not UTF-8 text \(byte 0xe9\)"),
    ("latin.txt", b"fine line\ncaf\xe9 au lait\n", r"latin.txt:2: not UTF-8 text"),
])
def test_bad_data_files_name_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(BidirLMError, match=message):
        open_source(SourceSpec("s", path=str(path)))


def test_parquet_without_the_column(tmp_path):
    import pandas as pd

    pd.DataFrame({"body": ["a b c d"]}).to_parquet(tmp_path / "t.parquet")
    with pytest.raises(BidirLMError, match=r"text_field 'text' is not a column; columns are \['body'\]"):
        open_source(SourceSpec("s", path=str(tmp_path / "t.parquet")))


def test_cli_exit_status_2_and_one_line(folder):
    _truncate(folder)
    run = subprocess.run([sys.executable, "-m", "bidirlm_pl.cli.main", "dependence", "--model", str(folder)],
                         capture_output=True, text=True, cwd=REPO, timeout=300, check=False)
    assert run.returncode == 2
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("bidirlm: error: ") and "is truncated or not a safetensors file" in lines[-1]
