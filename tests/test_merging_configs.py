"""Every shipped `bidirlm merge` spec (configs/merge/specs/*.yaml) loads into a MergeSpec with valid choices."""

from pathlib import Path

import pytest

from bidirlm_pl.cli.merge import load_yaml_spec
from bidirlm_pl.models.merging.engine import OUTPUT_DTYPES, MergeSpec
from bidirlm_pl.models.merging.keymap import SHAPE_POLICIES, UNMATCHED_POLICIES, KeyMap
from bidirlm_pl.models.merging.methods import METHODS, NEEDS_BASE

SPECS = sorted((Path(__file__).resolve().parent.parent / "configs" / "merge" / "specs").glob("*.yaml"))


def test_specs_are_shipped():
    assert len(SPECS) >= 2


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_merge_spec_parses(path):
    spec = MergeSpec(**{"output": "unused", **load_yaml_spec(path)})
    assert spec.method in METHODS and len(spec.weights) == len(spec.models)
    assert (spec.base is not None) == (spec.method in NEEDS_BASE)
    assert spec.unmatched in UNMATCHED_POLICIES and spec.shape_policy in SHAPE_POLICIES
    assert spec.dtype is None or spec.dtype in OUTPUT_DTYPES
    for key_map in spec.key_maps or []:
        KeyMap.parse(key_map)
