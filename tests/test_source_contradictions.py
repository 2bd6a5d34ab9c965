"""Sources whose fields contradict each other fail before training; a list replaces, never merges silently."""

import subprocess
import sys
from pathlib import Path

import pytest

from bidirlm_pl import BidirLMError
from bidirlm_pl.data.pairs import PairsDataModule, PairSource
from bidirlm_pl.data.sources import SourceSpec, describe_source, open_source, resolve_kind
from bidirlm_pl.data.text_module import TextDataModule

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("spec, message", [
    (SourceSpec("v", kind="lee", path="my.jsonl"), r"source 'v': kind 'lee' takes no \['path'\]"),
    (SourceSpec("v", kind="text", path="a.txt", text_field="body"), r"kind 'text' takes no \['text_field'\]"),
    (SourceSpec("v", kind="jsonl", path="a.jsonl", dataset="x/y"), r"kind 'jsonl' takes no \['dataset'\]"),
    (SourceSpec("v", kind="hf", dataset="x/y", path="a.jsonl"), r"kind 'hf' takes no \['path'\]"),
    (SourceSpec("v", path="a.jsonl", dataset="x/y"), "sets both path 'a.jsonl' and dataset 'x/y'"),
])
def test_contradictory_source_fields_are_one_line_errors(spec, message):
    with pytest.raises(BidirLMError, match=message) as err:
        resolve_kind(spec)
    assert "\n" not in str(err.value)


def test_data_module_refuses_a_contradiction_at_construction(tmp_path):
    with pytest.raises(BidirLMError, match="kind 'lee' takes no"):
        TextDataModule("tiny-qwen3", sources=[{"name": "v", "kind": "lee", "path": str(tmp_path / "x.jsonl")}])
    with pytest.raises(BidirLMError, match=r"mode 'simcse' reads raw text .* takes no \['anchor_field'\]"):
        PairsDataModule("tiny-qwen3", sources=[PairSource("s", mode="simcse", kind="lee", anchor_field="q")])
    with pytest.raises(BidirLMError, match=r"mode 'pairs' reads anchor/positive/negatives columns and takes no "
                                           r"\['text_unit'\]"):
        PairsDataModule("tiny-qwen3", sources=[PairSource("p", path="p.jsonl", text_unit="paragraph")])


def test_describe_source_names_kind_files_and_count(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "one two three"}\n{"text": "four five six"}\n')
    line = describe_source(open_source(SourceSpec("mine", path=str(path))))
    assert line == f"source 'mine': kind jsonl, {path}, 2 documents, weight 1.0"
    assert "gensim lee_background.cor, 300 documents" in describe_source(open_source(SourceSpec("lee", kind="lee")))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "bidirlm_pl.cli.main", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=300, check=False)


def test_cli_list_override_that_merges_into_a_lee_source_fails_and_null_replaces(tmp_path):
    path = tmp_path / "my.jsonl"
    path.write_text('{"text": "The cat sat on the mat and looked at the dog for a while."}\n')
    merged = _cli("fit", "--config", "configs/mntp/tiny.yaml", "--data.init_args.sources",
                  f"[{{name: v, path: {path}}}, {{name: w, path: {path}}}]", "--trainer.max_steps", "1")
    assert merged.returncode == 2, merged.stderr[-2000:]
    error = merged.stderr.strip().splitlines()[-1]
    assert "source 'v': kind 'lee' takes no ['path']" in error
    replaced = _cli("fit", "--config", "configs/mntp/tiny.yaml", "--data.init_args.sources", "null",
                    "--data.init_args.sources", f"[{{name: v, path: {path}}}]", "--print_config")
    assert replaced.returncode == 0, replaced.stderr[-2000:]
    assert "kind: auto" in replaced.stdout and "kind: lee\n" not in replaced.stdout
