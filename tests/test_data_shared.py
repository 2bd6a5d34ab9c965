"""What every data module shares: one tokenizer loader (bidirlm_pl/data/tokenizer.py) and one attribute, ``sources``,
that the model card reads (bidirlm_pl/stages/base.py::data_sources)."""

from __future__ import annotations

import pytest

from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.data.omni import OmniPairsData, OmniSource
from bidirlm_pl.data.pairs import PairsDataModule, PairSource
from bidirlm_pl.data.sources import SourceSpec
from bidirlm_pl.data.tasks import LabelledTaskData
from bidirlm_pl.data.text_module import TextDataModule
from bidirlm_pl.data.tokenizer import load_tokenizer
from bidirlm_pl.moe.data import UBMoEPairsData, UBMoETextData
from bidirlm_pl.stages.base import data_sources


def test_every_data_module_names_its_sources_in_sources():
    modules = {
        "text": TextDataModule(sources=[SourceSpec("news", kind="lee", weight=0.5)]),
        "pairs": PairsDataModule(sources=[PairSource(name="nli", path="nli.jsonl", weight=2.0)]),
        "ubmoe1": UBMoEPairsData(source=SourceSpec("docs", path="docs.txt")),
        "ubmoe2": UBMoETextData(),
        "labelled": LabelledTaskData({"kind": "jsonl", "path": "labels.jsonl"}),
        "omni": OmniPairsData(sources=[OmniSource(name="shapes", kind="shapes")]),
    }
    assert {name: data_sources(dm) for name, dm in modules.items()} == {
        "text": [{"name": "news", "kind": "lee", "weight": 0.5}],
        "pairs": [{"name": "nli", "path": "nli.jsonl", "weight": 2.0}],
        "ubmoe1": [{"name": "simcse", "path": "docs.txt", "weight": 1.0}],  # the documents it reads, not Lee
        "ubmoe2": [{"name": "lee", "kind": "lee", "weight": 1.0}],
        "labelled": [{"kind": "jsonl", "path": "labels.jsonl"}],
        "omni": [{"name": "shapes", "kind": "shapes", "weight": 1.0}],
    }


@pytest.mark.parametrize("make", [
    lambda: TextDataModule(sources=[SourceSpec("lee", kind="lee")]).prepare(),
    lambda: PairsDataModule(sources=[PairSource(name="s", mode="simcse", kind="lee")]).setup("fit"),
    lambda: UBMoEPairsData().setup("fit"),
    lambda: UBMoETextData().setup("fit"),
    lambda: LabelledTaskData({"kind": "pang_lee_polarity"}, task="sequence").setup("fit"),
])
def test_every_data_module_loads_its_tokenizer_through_the_one_loader(make):
    with pytest.raises(BidirLMError, match=r"^\w+ needs 'tokenizer' \(a model folder, asset or hub id; the CLI links"):
        make()


def test_the_loader_pads_with_eos_when_the_tokenizer_has_no_pad_token(tiny_qwen3, tmp_path):
    tokenizer = load_tokenizer(str(tiny_qwen3), owner="test")
    assert tokenizer.pad_token == "<pad>" and tokenizer.name_or_path == str(tiny_qwen3)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((tiny_qwen3 / name).read_bytes())
    assert load_tokenizer(str(tmp_path), owner="test").pad_token == tokenizer.eos_token
