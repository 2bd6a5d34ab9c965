"""One command that measures every GPU target: correctness of the kernels, MNTP, contrastive, encode, UBMoE, DDP,
and the fine-tuning step against transformers' Trainer.

Random weights of the real configs (Qwen3-0.6B, Gemma3-270M; no download). Each section runs in its own
process under its own time limit, so a failure or a timeout is reported in its row and the other
sections still run. Writes ``gpu_suite.md`` (one table) and ``gpu_suite.json`` into ``--output``.

    # on a lent H100/H200, from the bundle (see BENCHMARKS.md "GPU suite"):
    source .gpu/setup.sh && python benchmarks/gpu_suite.py --output $OUT
    # the same code path on the tiny models, CPU, in about two minutes (a test runs it):
    python benchmarks/gpu_suite.py --device cpu --tiny --output /tmp/gpu-suite

Rows carry the device, torch, transformers and kernel versions. Targets (issue 9): MNTP on Qwen3-0.6B
at 16k packed tokens a step (issue 9 measured 4 x 4096; configs/mntp/gpu.yaml now packs 2 x 8192, the paper's length) >= 40% MFU; contrastive 64 x 512 <= 1.5 s per step; encoding >= 2x sentence-transformers;
UBMoE stage 2 fits 80 GB; the token-classification step no slower than transformers' Trainer (issue 31).
A target row says "met" only when this run measured it on a GPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

SECTIONS = ("correctness", "mntp", "contrastive", "encode", "ubmoe", "ddp", "finetune")
# --tiny runs these by default: the six that tests/test_gpu_suite.py pins; the finetune section's CPU twin is
# tests/test_benchmarks_finetune.py (`--sections finetune`)
TINY_SECTIONS = SECTIONS[:6]
# seconds per section on a GPU, process start-up included: 8.5 min in all on one GPU, where ddp returns at
# once (its 90 s are only spent on a host with 2+ GPUs)
LIMITS = {"correctness": 60, "mntp": 200, "contrastive": 75, "encode": 45, "ubmoe": 75, "ddp": 90, "finetune": 75}
TINY_LIMITS = {name: 300 for name in SECTIONS}
PEAK_BF16 = {"H100": 989e12, "H200": 989e12}  # dense bf16 FLOP/s


# ------------------------------------------------------------------ environment of a row

def environment(device: str) -> dict:
    import torch
    import transformers

    env = {"device": "cpu", "torch": torch.__version__, "transformers": transformers.__version__, "kernels": []}
    if device == "cuda":
        env["device"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
        env["gpus"] = torch.cuda.device_count()
    if _has_torch_varlen():
        env["kernels"].append("torch varlen_attn" + ("" if device == "cuda" else " (CUDA only, unused)"))
    for module in ("flash_attn", "flash_attn_interface"):
        try:
            mod = __import__(module)
            env["kernels"].append(f"{module} {getattr(mod, '__version__', '?')}")
        except ImportError:
            pass
    return env


def _has_torch_varlen() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def peak_flops(device: str) -> float | None:
    if device != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name(0)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


# ------------------------------------------------------------------ sections

def correctness(args) -> list[dict]:
    """Every varlen backend present and flex against sdpa with our mask: packed rows, fp32 weights under bf16
    autocast, causal and bidirectional; max |difference| of final hidden states and of one weight gradient."""
    import torch

    from bidirlm_pl import load_backbone
    from bidirlm_pl.backbone import varlen

    models = ["tiny-qwen3", "tiny-gemma3"] if args.tiny else ["random:qwen3-0.6b", "random:gemma3-270m"]
    backends = ["flex_attention"]
    if args.device == "cuda":
        backends += ["torch_varlen"] if _has_torch_varlen() else []
        backends += [b for b, m in (("flash_attention_2", "flash_attn"), ("flash_attention_4", "flash_attn_interface"))
                     if _importable(m)]
    else:  # the CPU stand-in with the kernels' dtype rule (refuses fp32), as the tests use
        backends.append(varlen.register_varlen_backend("reference", varlen.reference_varlen))
    rows_T = 64 if args.tiny else 1024
    rows = []
    for name in models:
        models_by_backend = {}
        for backend in ["sdpa", *backends]:
            model, _ = load_backbone(name, attn_implementation=backend, dtype="float32", head="base")
            models_by_backend[backend] = model.to(args.device)
        config = models_by_backend["sdpa"].config
        ids, seq, pos = packed_batch(config.vocab_size, rows_T, args.device)
        for bidirectional in (True, False):
            ref_h, ref_g = forward_backward(models_by_backend["sdpa"], ids, seq, pos, bidirectional, args.device)
            for backend in backends:
                h, g = forward_backward(models_by_backend[backend], ids, seq, pos, bidirectional, args.device)
                rows.append({"model": name, "backend": backend, "mode": "bidirectional" if bidirectional else "causal",
                             "max_abs_hidden": float((h - ref_h).abs().max()),
                             "max_abs_grad": float((g - ref_g).abs().max()) if g is not None else "n/a (no CPU backward)",
                             "ref_hidden_scale": float(ref_h.abs().max()),
                             "ref_grad_scale": float(ref_g.abs().max())})
        del models_by_backend
        if args.device == "cuda":
            torch.cuda.empty_cache()
    return rows


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def packed_batch(vocab: int, length: int, device: str):
    """Two rows of documents of uneven lengths (a few tokens of padding at the end of the second)."""
    import torch

    g = torch.Generator().manual_seed(0)
    seq_rows, pos_rows = [], []
    for row, cuts in enumerate(([0.1, 0.45, 1.0], [0.3, 0.9])):
        seq, pos, start = [], [], 0
        for d, cut in enumerate(cuts):
            end = int(length * cut) - (4 if row == 1 and cut == 1.0 else 0)
            seq += [d] * (end - start)
            pos += list(range(end - start))
            start = end
        seq += [-1] * (length - start)
        pos += [0] * (length - start)
        seq_rows.append(seq)
        pos_rows.append(pos)
    ids = torch.randint(5, min(vocab, 500), (2, length), generator=g)
    return ids.to(device), torch.tensor(seq_rows, device=device), torch.tensor(pos_rows, device=device)


def forward_backward(model, ids, seq, pos, bidirectional: bool, device: str):
    """Final hidden states (padding zeroed) and the gradient of one weight (None where the backend has no
    backward here: flex attention on CPU)."""
    import torch

    from bidirlm_pl.backbone import attention

    model.zero_grad(set_to_none=True)
    backward = not (device == "cpu" and model.config._attn_implementation == "flex_attention")
    kw = attention.model_inputs(model.config, seq_ids_BT=seq, bidirectional=bidirectional)
    with torch.set_grad_enabled(backward), torch.autocast(device_type=device, dtype=torch.bfloat16):
        hidden = model(input_ids=ids, position_ids=pos, **kw).last_hidden_state
    real = (seq >= 0).unsqueeze(-1)
    hidden = hidden.float() * real
    if not backward:
        return hidden.detach(), None
    hidden.pow(2).mean().backward()
    return hidden.detach(), model.layers[0].self_attn.q_proj.weight.grad.detach().float().clone()


MNTP_QWEN3 = ("configs/mntp/gpu.yaml", "configs/mntp/qwen3-0.6b.yaml")  # a stage base and its model fragment
CONTRASTIVE_QWEN3 = ("configs/contrastive/gpu.yaml", "configs/contrastive/qwen3-0.6b.yaml")


def _stage_args(args, config: str | tuple[str, ...], model: str, **overrides):
    steps = overrides.pop("steps", 3 if args.tiny else 10)
    configs = [config] if isinstance(config, str) else list(config)
    return argparse.Namespace(config=[str(REPO / c) for c in configs], model=model, random_config=None, device=args.device,
                              steps=steps, warmup=min(1 if args.tiny else 3, steps - 2),
                              batch=overrides.pop("batch", None), length=overrides.pop("length", None),
                              peak_flops=peak_flops(args.device))


def mntp(args) -> list[dict]:
    """The shipped MNTP config through `bidirlm fit` (data swapped for Lee text), each speed lever off and on."""
    from stage_throughput import measure, set_lever, stage_config

    if args.tiny:
        stage_args = _stage_args(args, "configs/mntp/tiny.yaml", "tiny-qwen3", batch=2, length=64)
    else:
        stage_args = _stage_args(args, MNTP_QWEN3, "random:qwen3-0.6b")
    base = stage_config(stage_args)
    levers = ["fused_adamw", "no_checkpointing"] + (["compile"] if args.device == "cuda" else [])
    rows, helped = [], []
    for lever in levers:
        measured = {}
        for on in (False, True):
            config = copy.deepcopy(base)
            set_lever(config, lever, on)
            measured[on] = measure(config)
        ratio = measured[True]["tokens_per_sec"] / max(measured[False]["tokens_per_sec"], 1e-9)
        if ratio > 1.02:
            helped.append(lever)
        rows += [{"lever": lever, "on": on, **_rounded(measured[on]), "ratio_on_off": round(ratio, 3)}
                 for on in (False, True)]
    best = copy.deepcopy(base)
    for lever in helped:
        set_lever(best, lever, True)
    rows.append({"lever": "best: " + (" + ".join(helped) or "none"), "on": True, **_rounded(measure(best))})
    return rows


def contrastive(args) -> list[dict]:
    """The shipped contrastive config (GradCache, gathered negatives) at 64 x 512: seconds per step, sdpa vs varlen."""
    from stage_throughput import measure, stage_config

    if args.tiny:
        stage_args = _stage_args(args, "configs/contrastive/tiny.yaml", "tiny-qwen3", batch=8, length=64)
    else:
        stage_args = _stage_args(args, CONTRASTIVE_QWEN3, "random:qwen3-0.6b",
                                 batch=64, length=512, steps=8)
    base = stage_config(stage_args)
    # torch's varlen kernel is CUDA only, and flex attention has no backward on CPU: there, sdpa vs eager
    arms = ("sdpa", "torch_varlen") if args.device == "cuda" else ("sdpa", "eager")
    rows = []
    for backend in arms:
        config = copy.deepcopy(base)
        config["model"]["init_args"]["backbone"]["attn_implementation"] = backend
        if backend == "torch_varlen":  # the FlashAttention kernels take no attention dropout
            config["model"]["init_args"]["attention_dropout"] = 0.0
        result = measure(config)
        per_step = stage_args.batch / max(result["samples_per_sec"], 1e-9)
        rows.append({"attention": config["model"]["init_args"]["backbone"]["attn_implementation"],
                     "batch": stage_args.batch, "length": stage_args.length, "seconds_per_step": round(per_step, 4),
                     **_rounded(result)})
    return rows


def encode(args) -> list[dict]:
    """`Encoder.encode` vs `SentenceTransformer.encode` on one exported folder, bf16 on GPU, mixed-length texts."""
    import numpy as np
    import torch
    from encode_throughput import mixed_texts
    from sentence_transformers import SentenceTransformer

    from bidirlm_pl.core.hub import resolve_model_folder
    from bidirlm_pl.models.encoder import Encoder, write_encoder_files

    source = resolve_model_folder("tiny-qwen3" if args.tiny else "random:qwen3-0.6b")
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    backend = "torch_varlen" if args.device == "cuda" and _has_torch_varlen() else "sdpa"
    texts = mixed_texts(64 if args.tiny else 4096)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "encoder"
        folder.mkdir()
        for f in source.iterdir():
            if f.is_file():
                (folder / f.name).write_bytes(f.read_bytes())
        hidden = json.loads((folder / "config.json").read_text())["hidden_size"]
        write_encoder_files(folder, hidden_size=hidden, pooling="mean", normalize=True, max_length=512)
        ours = Encoder.from_pretrained(folder, device=args.device, dtype=dtype, attn_implementation=backend)
        st = SentenceTransformer(str(folder), device=args.device,
                                 model_kwargs={"dtype": getattr(torch, dtype), "attn_implementation": "sdpa"})
        st.max_seq_length = 512
        batch = 16 if args.tiny else 128
        a = ours.encode(texts, batch_size=batch, show_progress_bar=False)
        with torch.inference_mode():
            b = st.encode(texts, batch_size=batch, show_progress_bar=False)
        timings = {}
        for name, fn in (("ours", lambda: ours.encode(texts, batch_size=batch, show_progress_bar=False)),
                         ("sentence_transformers", lambda: st.encode(texts, batch_size=batch,
                                                                     show_progress_bar=False))):
            _sync(args.device)
            start = time.perf_counter()
            with torch.inference_mode():
                fn()
            _sync(args.device)
            timings[name] = time.perf_counter() - start
    return [{"texts": len(texts), "dtype": dtype, "ours_attention": backend,
             "ours_texts_per_s": round(len(texts) / timings["ours"], 1),
             "st_texts_per_s": round(len(texts) / timings["sentence_transformers"], 1),
             "ratio": round(timings["sentence_transformers"] / timings["ours"], 3),
             "max_abs_embedding_diff": float(np.abs(np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32)).max())}]


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def ubmoe(args) -> list[dict]:
    """UBMoE stage 1 then stage 2 of the shipped Qwen3-0.6B configs at their batch: seconds per step, peak memory."""
    from stage_throughput import measure, stage_config

    model = "tiny-qwen3" if args.tiny else "random:qwen3-0.6b"
    small = {"batch": 4, "length": 64} if args.tiny else {}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        stage1 = stage_config(_stage_args(args, "configs/ubmoe/stage1-qwen3-0.6b.yaml", model, **small))
        stage1["model"]["init_args"]["backbone"]["gradient_checkpointing"] = True
        stage1["trainer"].pop("max_epochs", None)
        stage1["trainer"]["callbacks"].append({"class_path": "bidirlm_pl.callbacks.HFExport",
                                               "init_args": {"dirpath": f"{tmp}/stage1"}})
        if args.tiny:
            stage1["data"]["init_args"]["sources"] = [{"name": "lee", "kind": "lee", "mode": "simcse"}]
        rows.append(_ubmoe_row("stage 1", stage1, measure(stage1)))
        stage2 = stage_config(_stage_args(args, "configs/ubmoe/stage2-qwen3-0.6b.yaml", f"{tmp}/stage1", **small))
        stage2["trainer"].pop("max_epochs", None)
        rows.append(_ubmoe_row("stage 2", stage2, measure(stage2)))
    for row in rows:
        if row["stage"] == "stage 2" and args.device == "cuda":
            row["fits_80GB"] = row["peak_memory_gb"] < 80
    return rows


def _ubmoe_row(stage: str, config: dict, result: dict) -> dict:
    data = config["data"]["init_args"]
    batch = data.get("batch_size", 1) * config["trainer"].get("accumulate_grad_batches", 1)
    return {"stage": stage, "batch": batch, "length": data.get("max_length"),
            "seconds_per_step": round(batch / max(result["samples_per_sec"], 1e-9), 4), **_rounded(result)}


def ddp(args) -> list[dict]:
    """MNTP and contrastive + GradCache: 2 processes vs 1 on NCCL (only where the host has 2+ GPUs)."""
    import torch
    from safetensors.torch import load_file

    if args.device == "cuda" and torch.cuda.device_count() < 2:
        return [{"check": "ddp", "status": f"skipped: {torch.cuda.device_count()} GPU (needs 2+)"}]
    if args.device == "cpu" and not args.tiny:
        return [{"check": "ddp", "status": "skipped: no GPU (--tiny runs it with 2 gloo processes)"}]
    import yaml
    from stage_throughput import stage_config

    rows = []
    configs = (("configs/mntp/tiny.yaml", "configs/contrastive/tiny.yaml") if args.tiny else
               (MNTP_QWEN3, CONTRASTIVE_QWEN3))
    for config_path in configs:
        model = "tiny-qwen3" if args.tiny else "random:qwen3-0.6b"
        config = stage_config(_stage_args(args, config_path, model, length=64 if args.tiny else 512, steps=3))
        if "attention_dropout" in config["model"]["init_args"]:
            config["model"]["init_args"]["attention_dropout"] = 0.0  # dropout noise differs per process
        data = config["data"]["init_args"]
        data.pop("batch_size", None)
        data["global_batch_size"] = 8
        if "gradcache_chunk_size" in config["model"]["init_args"]:
            config["model"]["init_args"]["gradcache_chunk_size"] = 2
        with tempfile.TemporaryDirectory() as tmp:
            weights = {}
            for devices in (1, 2):
                root = Path(tmp) / f"d{devices}"
                run = copy.deepcopy(config)
                run["trainer"].update(devices=devices, default_root_dir=str(root), warmup=None)
                run["trainer"].pop("warmup")
                if devices == 2:
                    run["trainer"]["strategy"] = "ddp"
                run["trainer"]["callbacks"] = [{"class_path": "bidirlm_pl.callbacks.HFExport",
                                                "init_args": {"dirpath": str(root / "hf")}}]
                path = Path(tmp) / f"d{devices}.yaml"
                path.write_text(yaml.safe_dump(run))
                proc = subprocess.run([sys.executable, "-m", "bidirlm_pl.cli.main", "fit", "--config", str(path)],
                                      capture_output=True, text=True, cwd=REPO, check=False)
                if proc.returncode != 0:
                    raise RuntimeError(proc.stderr.strip().splitlines()[-1])
                weights[devices] = load_file(root / "hf" / "model.safetensors")
            diff = max(float((weights[1][k].float() - weights[2][k].float()).abs().max()) for k in weights[1])
            what = "2 GPUs (NCCL)" if args.device == "cuda" else "2 CPU processes (gloo)"
            rows.append({"check": f"{Path(config_path).parent.name}: {what} vs 1, global batch 8",
                         "max_abs_weight_diff": diff})
    return rows


def finetune(args) -> list[dict]:
    """Token-classification step: FinetuneStage through `bidirlm fit` vs transformers' Trainer on
    AutoModelForTokenClassification, same model, rows, precision and AdamW (benchmarks/finetune_step.py)."""
    from finetune_step import measure, parse_args

    if args.tiny:
        argv = ["--model", "tiny-qwen3", "--batch", "4", "--length", "32", "--steps", "2", "--warmup", "1",
                "--repeats", "1"]
    else:
        argv = ["--model", "random:qwen3-0.6b", "--batch", "16", "--length", "512", "--steps", "10", "--warmup", "3",
                "--repeats", "2"]
    argv += ["--device", args.device]
    if args.device == "cuda":  # as the GPU configs train: fp32 master weights, bf16 autocast, fused AdamW
        argv += ["--precision", "bf16-mixed", "--fused"]
    result = measure(parse_args(argv))
    row = {k: result[k] for k in ("model", "precision", "batch", "length", "steps", "warmup", "repeats", "fused")}
    for side in ("ours", "trainer"):
        row[f"{side}_s_per_step"] = round(result["median"][side], 5)
        if result["peak_gb"][side] is not None:
            row[f"{side}_peak_gb"] = round(result["peak_gb"][side], 2)
    row["ratio_ours_over_trainer"] = round(result["ratio"], 3)
    row["not_slower"] = result["ratio"] <= 1.0 if args.device == "cuda" else "n/a (CPU plumbing run)"
    return [row]


def _rounded(result: dict) -> dict:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items()}


RUNNERS = {"correctness": correctness, "mntp": mntp, "contrastive": contrastive, "encode": encode, "ubmoe": ubmoe,
           "ddp": ddp, "finetune": finetune}


# ------------------------------------------------------------------ driver

def run_section(args) -> None:
    """Child process: run one section, write its rows (or its error) as JSON."""
    start = time.perf_counter()
    out = {"section": args.run_section, "environment": environment(args.device)}
    try:
        out["rows"] = RUNNERS[args.run_section](args)
        out["status"] = "ok"
    except Exception as err:  # noqa: BLE001 -- a failing section is reported in its row; the others still run
        out["status"] = "failed"
        out["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        out["traceback"] = traceback.format_exc()
    out["seconds"] = round(time.perf_counter() - start, 1)
    Path(args.result).write_text(json.dumps(out, indent=2, default=str))


def run_all(args) -> dict:
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    limits = dict(TINY_LIMITS if args.tiny else LIMITS)
    if args.limit:
        limits = {name: args.limit for name in limits}
    results = []
    for section in args.sections:
        result_file = output / f".{section}.json"
        result_file.unlink(missing_ok=True)
        cmd = [sys.executable, __file__, "--run-section", section, "--result", str(result_file),
               "--device", args.device, *(["--tiny"] if args.tiny else [])]
        start = time.perf_counter()
        print(f"[gpu_suite] {section} (limit {limits[section]} s) ...", flush=True)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limits[section], cwd=REPO,
                                  check=False)
            if result_file.is_file():
                result = json.loads(result_file.read_text())
            else:
                lines = proc.stderr.strip().splitlines()
                result = {"section": section, "status": "failed",
                          "error": f"exit {proc.returncode}: {lines[-1] if lines else 'no output'}"}
        except subprocess.TimeoutExpired:
            result = {"section": section, "status": "timeout", "error": f"over its {limits[section]} s limit"}
        result.setdefault("seconds", round(time.perf_counter() - start, 1))
        result_file.unlink(missing_ok=True)
        print(f"[gpu_suite] {section}: {result['status']} in {result['seconds']} s"
              + (f" ({result['error']})" if result.get("error") else ""), flush=True)
        results.append(result)
    report = {"device": args.device, "tiny": args.tiny, "sections": results}
    (output / "gpu_suite.json").write_text(json.dumps(report, indent=2, default=str))
    (output / "gpu_suite.md").write_text(markdown(report))
    print((output / "gpu_suite.md").read_text())
    return report


def markdown(report: dict) -> str:
    models = "tiny models" if report["tiny"] else "random weights of the real configs"
    lines = [f"# GPU suite ({models}, {report['device']})", "", "| section | status | seconds | environment | result |",
             "|---|---|---:|---|---|"]
    for section in report["sections"]:
        env = section.get("environment", {})
        env_text = (f"{env.get('device', '?')}; torch {env.get('torch', '?')}; transformers "
                    f"{env.get('transformers', '?')}; kernels: {', '.join(env.get('kernels', [])) or 'none'}")
        rows = section.get("rows") or [{"error": section.get("error", "")}]
        for i, row in enumerate(rows):
            text = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())
            lines.append(f"| {section['section'] if i == 0 else ''} | {section['status'] if i == 0 else ''} | "
                         f"{section['seconds'] if i == 0 else ''} | {env_text if i == 0 else ''} | {text} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when present")
    parser.add_argument("--tiny", action="store_true", help="tiny random models (the CPU smoke run the tests use)")
    parser.add_argument("--output", default=os.environ.get("OUT", "gpu_suite_out"), help="report folder ($OUT)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=None,
                        help="default: every section (with --tiny: the first six)")
    parser.add_argument("--limit", type=float, default=None, help="seconds per section (overrides the defaults)")
    parser.add_argument("--run-section", choices=SECTIONS, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.sections is None:
        args.sections = list(TINY_SECTIONS if args.tiny else SECTIONS)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.run_section:
        run_section(args)
        return 0
    report = run_all(args)
    return 0 if all(s["status"] == "ok" for s in report["sections"]) else 1


if __name__ == "__main__":
    sys.exit(main())
