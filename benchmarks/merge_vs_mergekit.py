"""Benchmark: `bidirlm merge` (streaming) against mergekit's linear merge, same inputs, same run.

Two real-size checkpoints: Gemma3-270M (fp32, 1.07 GB) fine-tuned briefly as a causal LM on two
disjoint halves of the Lee corpus (made once under --workdir). Each merger runs as a child process
under ``/usr/bin/time -v`` (wall time, peak resident set size), alternating, ``--repeats`` times,
after the inputs were read once so both find them in the page cache. mergekit lives in its own
virtual environment (``--mergekit-venv``). The script also checks that both outputs agree tensor by
tensor and prints the similarity report of the checkpoints.

    python benchmarks/merge_vs_mergekit.py --workdir runs/merge
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def finetune_copy(target: Path, docs: list[str], steps: int, seed: int) -> None:
    """A few AdamW steps of causal LM on ``docs`` from the real Gemma3-270M, saved as an HF folder."""
    import torch

    from bidirlm_pl.backbone.load import load_backbone
    from bidirlm_pl.core.export import save_hf_folder

    torch.manual_seed(seed)
    model, tokenizer = load_backbone("gemma3-270m", bidirectional=False)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.0)
    for step in range(steps):
        batch = tokenizer(docs[2 * step: 2 * step + 2], return_tensors="pt", padding=True, truncation=True,
                          max_length=128)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        print(f"  {target.name} step {step + 1}/{steps}: loss {loss.item():.3f}", flush=True)
    save_hf_folder(model, tokenizer, target, overwrite=True)


def ensure_checkpoints(workdir: Path, steps: int) -> tuple[Path, Path]:
    from bidirlm_pl.core.assets import lee_background

    docs = lee_background()
    paths = (workdir / "gemma3-270m-lee-a", workdir / "gemma3-270m-lee-b")
    for index, path in enumerate(paths):
        if not (path / "model.safetensors").exists():
            half = docs[:150] if index == 0 else docs[150:]
            finetune_copy(path, half, steps, seed=index)
    return paths


def timed(command: list[str], log: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of a child process, from /usr/bin/time -v."""
    start = time.perf_counter()
    with open(log, "w") as handle:
        result = subprocess.run(["/usr/bin/time", "-v", *command], stdout=handle, stderr=subprocess.STDOUT, check=False)
    wall = time.perf_counter() - start
    text = log.read_text()
    if result.returncode != 0:
        raise SystemExit(f"command failed ({result.returncode}): {' '.join(command)}\n{text[-2000:]}")
    peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1))
    return wall, peak_kb / 1024


def max_abs_difference(a: Path, b: Path) -> float:
    """Largest elementwise difference between two merged folders, read tensor by tensor."""
    from bidirlm_pl.models.merging.safetensors_io import Checkpoint

    left, right = Checkpoint(a), Checkpoint(b)
    assert set(left.keys()) == set(right.keys()), (sorted(set(left.keys()) ^ set(right.keys())))[:5]
    worst = 0.0
    for key in left.keys():
        worst = max(worst, float((left.read(key).float() - right.read(key).float()).abs().max()))
    return worst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/merge")
    parser.add_argument("--mergekit-venv", default="/work/venvs/mergekit")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--finetune-steps", type=int, default=4)
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    model_a, model_b = ensure_checkpoints(workdir, args.finetune_steps)
    for path in (model_a, model_b):  # warm the page cache for both mergers alike
        for file in path.glob("*.safetensors"):
            with open(file, "rb") as handle:
                while handle.read(64 << 20):
                    pass

    mergekit_cli = Path(args.mergekit_venv) / "bin" / "mergekit-yaml"
    config = workdir / "mergekit-linear.yml"
    config.write_text(json.dumps({
        "models": [{"model": str(model_a), "parameters": {"weight": 0.5}},
                   {"model": str(model_b), "parameters": {"weight": 0.5}}],
        "merge_method": "linear", "dtype": "float32",
    }, indent=2))
    ours_out, theirs_out = workdir / "merged-bidirlm", workdir / "merged-mergekit"
    runs: dict[str, list[tuple[float, float]]] = {"bidirlm": [], "mergekit": []}
    for repeat in range(args.repeats):
        for name in ("bidirlm", "mergekit"):
            if name == "bidirlm":
                command = [sys.executable, "-m", "bidirlm_pl.cli.main", "merge", "--models", str(model_a), str(model_b),
                           "--weights", "0.5", "0.5", "--output", str(ours_out), "--overwrite"]
            else:
                shutil.rmtree(theirs_out, ignore_errors=True)
                command = [str(mergekit_cli), str(config), str(theirs_out), "--quiet"]
            wall, peak = timed(command, workdir / f"{name}-{repeat}.log")
            runs[name].append((wall, peak))
            print(f"{name:9s} run {repeat + 1}: wall {wall:6.1f} s   peak RSS {peak:7.0f} MB", flush=True)

    wall = {k: statistics.median(w for w, _ in v) for k, v in runs.items()}
    peak = {k: max(p for _, p in v) for k, v in runs.items()}
    difference = max_abs_difference(ours_out, theirs_out)
    print(f"\nmedian wall: bidirlm {wall['bidirlm']:.1f} s, mergekit {wall['mergekit']:.1f} s -> "
          f"speedup x{wall['mergekit'] / wall['bidirlm']:.2f}")
    print(f"peak RSS:    bidirlm {peak['bidirlm']:.0f} MB, mergekit {peak['mergekit']:.0f} MB -> "
          f"bidirlm/mergekit {peak['bidirlm'] / peak['mergekit']:.2f}")
    print(f"outputs agree: max |bidirlm - mergekit| = {difference:.3g}")

    from bidirlm_pl.models.merging.similarity import similarity

    for left, right in ((model_a, model_b), ("gemma3-270m", model_a), ("gemma3-270m", ours_out)):
        print()
        print(similarity(str(left), str(right)).table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
