"""Every shipped YAML under configs/ parses with `bidirlm fit --config <file> --print_config`."""

from pathlib import Path

import pytest
import yaml

from bidirlm_pl.cli import main

ROOT = Path(__file__).resolve().parent.parent
ALL_YAML = sorted((ROOT / "configs").rglob("*.yaml"))
RECIPES = [p for p in ALL_YAML if p.parent.name == "recipes"]  # `bidirlm run` recipes, not fit configs
MERGE_SPECS = [p for p in ALL_YAML if p.parent.name == "specs"]  # `bidirlm merge` specs: test_merging_configs.py
SUITES = [p for p in ALL_YAML if p.parent.name == "compare"]  # `bidirlm compare` suites: test_evaluation_suite.py
LM_EVAL_TASKS = [p for p in ALL_YAML if p.parent.name == "harness"]  # local lm-eval task YAMLs: test_harness.py
# `bidirlm compose` specs: top-level output + sources, no model
COMPOSE_SPECS = [p for p in ALL_YAML if p.parent.name == "omni" and "model" not in yaml.safe_load(p.read_text())]
CONFIGS = [p for p in ALL_YAML if p not in RECIPES + MERGE_SPECS + SUITES + COMPOSE_SPECS + LM_EVAL_TASKS]


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


@pytest.mark.parametrize("path", COMPOSE_SPECS, ids=lambda p: p.name)
def test_compose_spec_parses(path):
    from bidirlm_pl.omni.compose import OmniSpec

    spec = OmniSpec.load(path)
    assert set(spec.sources) == {"text", "vision", "audio"}
    assert all(spec.sources[r].towers for r in ("vision", "audio"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_parses_and_names_existing_configs(path):
    from bidirlm_pl.pipeline import load_recipe

    _, stages = load_recipe(path)
    for stage in stages:
        if stage.fit:
            assert (ROOT / stage.fit).is_file(), stage.fit


GPU_STAGE_CONFIGS = [p for p in CONFIGS if p.parent.name != "trainer"
                     and (yaml.safe_load(p.read_text()).get("trainer") or {}).get("accelerator") == "gpu"]


def test_gpu_configs_exist():
    assert len(GPU_STAGE_CONFIGS) >= 8


@pytest.mark.parametrize("path", GPU_STAGE_CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_gpu_config_resolves_for_one_device(path, capsys):
    """Every GPU stage config runs as given on a machine with one GPU: one device, no multi-process strategy."""
    from bidirlm_pl.backbone import BACKENDS

    with pytest.raises(SystemExit):
        main(["fit", "--config", str(path), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    trainer = printed["trainer"]
    assert trainer["devices"] in (1, "1", "auto"), trainer["devices"]
    assert trainer.get("strategy") in (None, "auto"), trainer.get("strategy")
    assert trainer["precision"] == "bf16-mixed"
    backbone = printed["model"]["init_args"]["backbone"]
    assert backbone["attn_implementation"] in BACKENDS
    # the FlashAttention kernels take no attention dropout; a varlen config must not ask for it
    if backbone["attn_implementation"] == "torch_varlen":
        assert not printed["model"]["init_args"].get("attention_dropout")


def test_no_placeholder_paths_in_configs():
    offenders = [str(p.relative_to(ROOT)) for p in ALL_YAML if "/path/to" in p.read_text()]
    assert not offenders, offenders


def _sources(printed: dict) -> list[dict]:
    args = printed["data"]["init_args"]
    found = list(args.get("sources") or []) + ([args["source"]] if args.get("source") else [])
    media = ("image_captions", "audio_captions")  # local files: no hub reader for captioned media yet
    return [s.get("pair") or s for s in found if s.get("kind") not in media]


@pytest.mark.parametrize("path", GPU_STAGE_CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_gpu_config_names_hub_models_and_datasets(path, capsys):
    """A GPU config runs as given where there is network: a hub model (or an earlier stage's export under
    runs/) and training data from hub datasets (the omni stage's image/audio captions excepted)."""
    from bidirlm_pl.hub import split_hub_id

    with pytest.raises(SystemExit):
        main(["fit", "--config", str(path), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    model = printed["model"]["init_args"]["backbone"]["model"]
    assert split_hub_id(model) or model.startswith("runs/"), model
    for source in _sources(printed):
        assert source.get("path") is None, source
        assert split_hub_id(source["dataset"]), source


def test_gpu_configs_cover_hub_models():
    named = " ".join(p.read_text() for p in GPU_STAGE_CONFIGS)
    for model in ("Qwen/Qwen3-0.6B", "Qwen/Qwen3-1.7B", "google/gemma-3-1b-pt"):
        assert model in named, model
