"""Every shipped YAML under configs/ parses with `bidirlm fit --config <file> --print_config`."""

from pathlib import Path

import pytest
import yaml

from bidirlm_pl.cli import main

ROOT = Path(__file__).resolve().parent.parent
ALL_YAML = sorted((ROOT / "configs").rglob("*.yaml"))
RECIPES = [p for p in ALL_YAML if p.parent.name == "recipes"]  # `bidirlm run` recipes, not fit configs
MERGE_SPECS = [p for p in ALL_YAML if p.parent.name == "specs"]  # `bidirlm merge` specs: test_merging_configs.py
CONFIGS = [p for p in ALL_YAML if p not in RECIPES and p not in MERGE_SPECS]


def test_configs_are_shipped():
    assert any(p.parent.name == "mntp" for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_config_parses(path, capsys):
    assert isinstance(yaml.safe_load(path.read_text()), dict)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(path), "--print_config"])
    out, err = capsys.readouterr()
    assert exit_info.value.code in (0, None), err[-2000:]
    printed = yaml.safe_load(out)
    assert "trainer" in printed
    source = yaml.safe_load(path.read_text())
    if "model" in source:  # a stage config (not a trainer fragment): its class was resolved
        assert printed["model"]["class_path"] == source["model"]["class_path"]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_parses_and_names_existing_configs(path):
    from bidirlm_pl.pipeline import load_recipe

    _, stages = load_recipe(path)
    for stage in stages:
        if stage.fit:
            assert (ROOT / stage.fit).is_file(), stage.fit
