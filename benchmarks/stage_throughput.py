"""Training throughput of a shipped stage config through `bidirlm fit`, a speed lever off vs on, same run.

Random weights of a real config (no download), Lee text, the stage's own config otherwise; the
Throughput callback's tokens/s and MFU (after warm-up), and peak memory. The baseline is the config
with the lever off, measured in the same process; the ratio is lever-on over lever-off.

    # GPU (one H100): MNTP on Qwen3-0.6B, 2 x 8192 packed tokens (configs/mntp/gpu.yaml), regional compile off vs on
    python benchmarks/stage_throughput.py --config configs/mntp/gpu.yaml --config configs/mntp/qwen3-0.6b.yaml \
        --random-config qwen3-0.6b \
        --device cuda --lever compile --steps 30
    # contrastive, GradCache chunk 16 with vs without gradient checkpointing
    python benchmarks/stage_throughput.py --config configs/contrastive/gpu.yaml \
        --config configs/contrastive/qwen3-0.6b.yaml --random-config qwen3-0.6b \
        --device cuda --lever no_checkpointing
    # CPU smoke run of the plumbing
    python benchmarks/stage_throughput.py --config configs/mntp/tiny.yaml --model tiny-qwen3 --device cpu \
        --lever fused_adamw --steps 4 --batch 2 --length 128
"""

from __future__ import annotations

import argparse
import copy
import resource
import tempfile
import time
from pathlib import Path

import torch
import yaml

from bidirlm_pl.core.yaml_files import merge_mappings

# lever name -> (how to switch it on in the stage config dict, what it is)
LEVERS = {
    "compile": "backbone.compile: true (regional torch.compile of each decoder layer)",
    "fused_adamw": "optimizer AdamW fused: true",
    "no_checkpointing": "backbone.gradient_checkpointing: false (GradCache recomputes chunks anyway)",
    "torch_varlen": "attn_implementation torch_varlen instead of sdpa",
    "flex": "attn_implementation flex_attention instead of sdpa",
}


def set_lever(config: dict, lever: str, on: bool) -> None:
    init = config["model"]["init_args"]
    backbone = init["backbone"]
    if lever == "compile":
        backbone["compile"] = on
    elif lever == "fused_adamw":
        init.setdefault("optimizer", {"class_path": "torch.optim.AdamW", "init_args": {}})
        init["optimizer"].setdefault("init_args", {})["fused"] = on
    elif lever == "no_checkpointing":
        backbone["gradient_checkpointing"] = not on
    elif lever in ("torch_varlen", "flex"):
        backbone["attn_implementation"] = {"torch_varlen": "torch_varlen", "flex": "flex_attention"}[lever] if on \
            else "sdpa"
    else:
        raise SystemExit(f"--lever {lever} is not one of {sorted(LEVERS)}")


def stage_config(args) -> dict:
    paths = [args.config] if isinstance(args.config, str) else list(args.config)
    config: dict = {}
    for path in paths:  # a stage base, then its fragments
        config = merge_mappings(config, yaml.safe_load(Path(path).read_text()))
    init = config["model"]["init_args"]
    init["backbone"]["model"] = args.model or f"random:{args.random_config}"
    data = config["data"]["init_args"]
    if "sources" in data:
        modes = {s.get("mode") for s in data["sources"]}
        if modes & {"pairs", "halves", "simcse"}:
            data["sources"] = [{"name": "lee", "kind": "lee", "mode": "halves"}]
        else:
            data["sources"] = [{"name": "lee", "kind": "lee"}]
    if "source" in data:
        data["source"] = {"name": "lee", "kind": "lee"}
    data.pop("val_sources", None)
    if isinstance(data.get("mask"), dict):
        data["mask"].pop("mask_token", None)  # the Lee tokenizer of random/tiny models has <mask>
    if args.batch:
        data["batch_size"] = args.batch
    if args.length:
        data["max_length"] = args.length
    accelerator = "gpu" if args.device == "cuda" else "cpu"
    trainer = config["trainer"]
    trainer.update(accelerator=accelerator, devices=1, max_steps=args.steps, limit_val_batches=0,
                   num_sanity_val_steps=0, enable_checkpointing=False, logger=False, enable_progress_bar=False,
                   precision="bf16-mixed" if accelerator == "gpu" else "32-true")
    trainer.pop("strategy", None)
    trainer["callbacks"] = [{"class_path": "bidirlm_pl.callbacks.throughput.Throughput",
                             "init_args": {"skip_first": args.warmup, "window": 1,
                                           **({"peak_flops": args.peak_flops} if args.peak_flops else {})}}]
    if accelerator == "cpu":
        init["backbone"]["attn_implementation"] = "sdpa" if init["backbone"].get("attn_implementation") in (
            "torch_varlen", "flash_attention_2", "flash_attention_4") else init["backbone"]["attn_implementation"]
        init.get("optimizer", {}).get("init_args", {}).pop("fused", None)
    return config


def measure(config: dict) -> dict:
    from bidirlm_pl.callbacks.throughput import Throughput
    from bidirlm_pl.cli.fit import run_lightning

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        cli = run_lightning(["fit", "--config", str(path), "--trainer.default_root_dir", tmp])
        wall = time.perf_counter() - start
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, Throughput))
    summary = callback.summary()
    peak = (torch.cuda.max_memory_allocated() if torch.cuda.is_available()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {**summary, "peak_memory_gb": peak / 1e9, "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, action="append",
                        help="a shipped stage config (configs/...yaml); repeat it for a base and its fragments")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--random-config", choices=["qwen3-0.6b", "gemma3-270m"],
                       help="random weights of this real config (bidirlm assets random:NAME)")
    group.add_argument("--model", help="a model folder or asset instead")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--lever", choices=sorted(LEVERS), required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5, help="batches left out of the average (compilation)")
    parser.add_argument("--batch", type=int, default=None, help="override data batch_size")
    parser.add_argument("--length", type=int, default=None, help="override data max_length")
    parser.add_argument("--peak-flops", type=float, default=None, help="per-device peak FLOP/s (MFU on CPU)")
    args = parser.parse_args()
    if args.device == "cpu":
        args.warmup = min(args.warmup, max(0, args.steps - 2))
    base = stage_config(args)
    results = {}
    for on in (False, True):
        config = copy.deepcopy(base)
        set_lever(config, args.lever, on)
        results[on] = measure(config)
        print(f"{args.lever} {'on ' if on else 'off'}: " + ", ".join(f"{k} {v:.4g}" for k, v in results[on].items()))
    ratio = results[True]["tokens_per_sec"] / max(results[False]["tokens_per_sec"], 1e-9)
    print(f"ratio tokens/s ({args.lever} on / off): {ratio:.2f}x  [{LEVERS[args.lever]}; {args.device}]")


if __name__ == "__main__":
    main()
