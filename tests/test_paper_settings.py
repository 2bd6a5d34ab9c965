"""The GPU recipes carry the paper's settings (BidirLM App. B.2 / F.1), the CPU runs keep theirs on purpose, and the
safety transfer (merged with Qwen3Guard, and its unmerged baseline) differs from its baseline by the merge only."""

from pathlib import Path

import pytest
import yaml

from bidirlm_pl.core.yaml_files import merge_mappings

ROOT = Path(__file__).resolve().parent.parent


def _merged(*paths: str) -> dict:
    out: dict = {}
    for path in paths:
        out = merge_mappings(out, yaml.safe_load((ROOT / path).read_text()))
    return out


# model fragment, MNTP learning rate (App. B.2), mask ratio (App. F.1; 30% where the paper quotes none)
MNTP = [("gemma3-270m-gpu", 5e-4, 0.4), ("qwen3-0.6b", 1e-4, 0.3), ("gemma3-1b", 7e-5, 0.3), ("qwen3-1.7b", 5e-5, 0.3)]
# model fragment, contrastive learning rate, GradCache mini-batch (App. B.2)
CONTRASTIVE = [("gemma3-270m-gpu", 6e-5, 64), ("qwen3-0.6b", 3e-5, 32), ("gemma3-1b", 1e-4, 32), ("qwen3-1.7b", 1e-4, 16)]


@pytest.mark.parametrize("fragment, lr, ratio", MNTP)
def test_mntp_gpu_runs_use_the_paper_settings(fragment, lr, ratio):
    run = _merged("configs/mntp/gpu.yaml", f"configs/mntp/{fragment}.yaml")
    init, data = run["model"]["init_args"], run["data"]["init_args"]
    assert init["optimizer"]["init_args"]["lr"] == lr
    assert init["schedule"]["name"] == "wsd"
    assert data["max_length"] == 8192 and data["mask"]["ratio"] == ratio


@pytest.mark.parametrize("fragment, lr, chunk", CONTRASTIVE)
def test_contrastive_gpu_runs_use_the_paper_settings(fragment, lr, chunk):
    run = _merged("configs/contrastive/gpu.yaml", f"configs/contrastive/{fragment}.yaml")
    init, data = run["model"]["init_args"], run["data"]["init_args"]
    assert init["optimizer"]["init_args"]["lr"] == lr and init["gradcache_chunk_size"] == chunk
    assert init["temperature"] == 0.05 and data["batch_size"] == 512 and data["max_length"] == 512
    # instructions on the queries of asymmetric tasks only: retrieval has one, NLI and SimCSE none
    instructed = {s["name"] for s in data["sources"] if s.get("query_instruction")}
    assert instructed == {"retrieval"}, instructed
    assert all(1 <= s.get("num_negatives", 1) <= 7 for s in data["sources"])


def test_cpu_runs_keep_the_values_their_measurements_used():
    """The quickstart and the ablation run these CPU configs; they differ from the paper on purpose (said in them)."""
    mntp = yaml.safe_load((ROOT / "configs/mntp/gemma3-270m.yaml").read_text())
    assert mntp["model"]["init_args"]["optimizer"]["init_args"]["lr"] == 1e-4
    assert mntp["data"]["init_args"]["mask"]["ratio"] == 0.3 and mntp["data"]["init_args"]["max_length"] == 128
    contrastive = yaml.safe_load((ROOT / "configs/contrastive/gemma3-270m.yaml").read_text())
    assert contrastive["model"]["init_args"]["optimizer"]["init_args"]["lr"] == 3e-5
    for path in ("configs/mntp/gemma3-270m.yaml", "configs/contrastive/gemma3-270m.yaml"):
        assert "Not the paper's settings on purpose" in (ROOT / path).read_text()


def test_safety_transfer_merges_qwen3guard_and_its_baseline_does_not():
    merged = _merged("configs/merge/safety-qwen3-0.6b.yaml")
    baseline = _merged("configs/merge/safety-qwen3-0.6b.yaml", "configs/merge/safety-qwen3-0.6b-baseline.yaml")
    init = merged["model"]["init_args"]
    mntp_run = _merged("configs/mntp/gpu.yaml", "configs/mntp/qwen3-0.6b.yaml")
    assert init["backbone"]["model"] == mntp_run["trainer"]["default_root_dir"] + "/hf"  # the Bi+MNTP Qwen3-0.6B
    assert init["merge_with"] == ["Qwen/Qwen3Guard-Gen-0.6B"] and init["merge_weights"] == [0.5, 0.5]
    assert init["target_fraction"] == 0.93 and init["metric"] == "f1"
    source = merged["data"]["init_args"]["source"]
    assert (source["dataset"], source["config"], source["fields"]) == (
        "lmsys/toxic-chat", "toxicchat0124", {"text": "user_input", "label": "toxicity"})
    trainer = merged["trainer"]
    assert (trainer["max_steps"], trainer["val_check_interval"], trainer["precision"]) == (500, 25, "bf16-mixed")
    assert merged["data"]["init_args"]["batch_size"] == 32
    assert baseline["model"]["init_args"]["merge_with"] is None and baseline["model"]["init_args"]["merge_weights"] is None
    assert baseline["trainer"]["default_root_dir"] != trainer["default_root_dir"]
    for config in (merged, baseline):  # nothing else differs
        config["model"]["init_args"].pop("merge_with"), config["model"]["init_args"].pop("merge_weights")
        config["trainer"].pop("default_root_dir")
    assert merged == baseline
