"""Every shipped stage config, and every composition the docs name (a stage base, a model fragment, trainer
fragments: repeated ``--config``), parses with `bidirlm fit --config ... --print_config`."""

from pathlib import Path

import pytest
import yaml
from documented import fit_compositions, texts

from bidirlm_pl.cli.main import main
from bidirlm_pl.core.yaml_files import merge_mappings

ROOT = Path(__file__).resolve().parent.parent
ALL_YAML = sorted((ROOT / "configs").rglob("*.yaml"))
RECIPES = [p for p in ALL_YAML if p.parent.name == "recipes"]  # `bidirlm run` recipes, not fit configs
MERGE_SPECS = [p for p in ALL_YAML if p.parent.name == "specs"]  # `bidirlm merge` specs: test_merging_configs.py
SUITES = [p for p in ALL_YAML if p.parent.name == "compare"]  # `bidirlm compare` suites: test_evaluation_suite.py
LM_EVAL_TASKS = [p for p in ALL_YAML if p.parent.name == "harness"]  # local lm-eval task YAMLs: test_harness.py
# `bidirlm compose` specs: top-level output + sources, no model
COMPOSE_SPECS = [p for p in ALL_YAML if p.parent.name == "omni" and "model" not in yaml.safe_load(p.read_text())]
CONFIGS = [p for p in ALL_YAML if p not in RECIPES + MERGE_SPECS + SUITES + COMPOSE_SPECS + LM_EVAL_TASKS]
TRAINER_FRAGMENTS = [p for p in CONFIGS if p.parent.name == "trainer"]
# a model fragment completes a stage base: model.init_args without a class_path
MODEL_FRAGMENTS = [p for p in CONFIGS if "model" in yaml.safe_load(p.read_text())
                   and "class_path" not in yaml.safe_load(p.read_text())["model"]]
STAGE_CONFIGS = [p for p in CONFIGS if p not in TRAINER_FRAGMENTS + MODEL_FRAGMENTS]
# a stage base names no model: it runs with a model fragment after it
BASES = [p for p in STAGE_CONFIGS if "model" not in yaml.safe_load(p.read_text())["model"]["init_args"]["backbone"]]
COMPOSITIONS = sorted({run for text in texts().values() for run in fit_compositions(text)})
RUNS = [(str(p.relative_to(ROOT)),) for p in STAGE_CONFIGS if p not in BASES] + COMPOSITIONS


def _merged(run: tuple[str, ...]) -> dict:
    """The YAML of a run's files merged in order (mappings merged, other values replaced), as jsonargparse does."""
    out: dict = {}
    for path in run:
        out = merge_mappings(out, yaml.safe_load((ROOT / path).read_text()))
    return out


def _print_config(run: tuple[str, ...], capsys) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *[arg for path in run for arg in ("--config", str(ROOT / path))], "--print_config"])
    out, err = capsys.readouterr()
    assert exit_info.value.code in (0, None), err[-2000:]
    return yaml.safe_load(out)


def _run_id(run: tuple[str, ...]) -> str:
    return "+".join(str(Path(p).relative_to("configs")) for p in run)


def test_configs_are_shipped():
    assert any(p.parent.name == "mntp" for p in CONFIGS)


@pytest.mark.parametrize("run", RUNS, ids=_run_id)
def test_config_parses(run, capsys):
    printed = _print_config(run, capsys)
    assert "trainer" in printed
    assert printed["model"]["class_path"] == _merged(run)["model"]["class_path"]  # its stage class resolved


def test_every_fragment_is_documented_with_its_base():
    """A model or trainer fragment cannot run alone: the docs show it in at least one full composition."""
    composed = {path for run in COMPOSITIONS for path in run}
    missing = [str(p.relative_to(ROOT)) for p in MODEL_FRAGMENTS + TRAINER_FRAGMENTS
               if str(p.relative_to(ROOT)) not in composed]
    assert not missing, missing
    assert all(run[0] in {str(p.relative_to(ROOT)) for p in STAGE_CONFIGS} for run in COMPOSITIONS), COMPOSITIONS
    assert {str(p.relative_to(ROOT)) for p in BASES} <= {run[0] for run in COMPOSITIONS}


def test_model_fragments_complete_a_base_into_the_run_it_replaced():
    """gpu.yaml + qwen3-1.7b.yaml is the run the single qwen3-1.7b config was (model id, lr, mask token, folder)."""
    run = _merged(("configs/mntp/gpu.yaml", "configs/mntp/qwen3-1.7b.yaml"))
    backbone = run["model"]["init_args"]["backbone"]
    assert backbone["model"] == "Qwen/Qwen3-1.7B" and backbone["gradient_checkpointing"] is True
    assert backbone["attn_implementation"] == "torch_varlen" and backbone["trainable"] == ["all"]
    assert run["model"]["init_args"]["optimizer"]["init_args"]["lr"] == 5.0e-5
    assert run["data"]["init_args"]["mask"] == {"ratio": 0.3, "replacement": "all_mask", "mask_token": 151663}
    assert run["trainer"]["default_root_dir"] == "runs/mntp-qwen3-1.7b"


@pytest.mark.parametrize("path", COMPOSE_SPECS, ids=lambda p: p.name)
def test_compose_spec_parses(path):
    from bidirlm_pl.cli.compose import OmniSpec

    spec = OmniSpec.load(path)
    assert set(spec.sources) == {"text", "vision", "audio"}
    assert all(spec.sources[r].towers for r in ("vision", "audio"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_parses_and_names_existing_configs(path):
    from bidirlm_pl.cli.pipeline import load_recipe

    _, stages = load_recipe(path)
    for stage in stages:
        for config in [stage.fit] if isinstance(stage.fit, str) else stage.fit or []:
            assert (ROOT / config).is_file(), config


# single-GPU runs: a stage config, or a base + model fragment, without trainer fragments
GPU_RUNS = [run for run in RUNS if not any(p.startswith("configs/trainer/") for p in run)
            and (_merged(run).get("trainer") or {}).get("accelerator") == "gpu"]


def test_gpu_configs_exist():
    assert len(GPU_RUNS) >= 8


@pytest.mark.parametrize("run", GPU_RUNS, ids=_run_id)
def test_gpu_config_resolves_for_one_device(run, capsys):
    """Every GPU stage config runs as given on a machine with one GPU: one device, no multi-process strategy."""
    from bidirlm_pl.backbone.load import BACKENDS

    printed = _print_config(run, capsys)
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
    media = ("image_captions", "audio_captions")  # local caption files (the hub kinds are hf_*_captions)
    return [s.get("pair") or s for s in found if s.get("kind") not in media]


@pytest.mark.parametrize("run", GPU_RUNS, ids=_run_id)
def test_gpu_config_names_hub_models_and_datasets(run, capsys):
    """A GPU config runs as given where there is network: a hub model (or an earlier stage's export under
    runs/) and training data from hub datasets (image and audio captions included)."""
    from bidirlm_pl.core.hub import split_hub_id

    printed = _print_config(run, capsys)
    model = printed["model"]["init_args"]["backbone"]["model"]
    assert split_hub_id(model) or model.startswith("runs/"), model
    for source in _sources(printed):
        assert source.get("path") is None, source
        assert split_hub_id(source["dataset"]), source


def test_gpu_configs_cover_hub_models():
    named = " ".join((ROOT / path).read_text() for run in GPU_RUNS for path in run)
    for model in ("Qwen/Qwen3-0.6B", "Qwen/Qwen3-1.7B", "google/gemma-3-1b-pt"):
        assert model in named, model
