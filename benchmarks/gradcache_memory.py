"""Benchmark: peak memory of one contrastive training step, GradCache vs plain, at the same effective batch.

Each variant runs in a fresh child process (same model, same batch of Lee first-half/second-half
pairs, embeddings frozen, gradients pre-allocated): a sampler thread reads the resident set size
every 2 ms during one forward+backward, and the step's peak is reported above the RSS measured just
before it (``MALLOC_MMAP_THRESHOLD_`` is fixed so freed tensors leave the process). Prints both
peaks, the ratio (plain / GradCache; > 1 means GradCache saves memory), and both losses (equal).

    python benchmarks/gradcache_memory.py --model gemma3-270m
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(model: str, batch_size: int, max_length: int, chunk: int | None) -> dict:
    import torch

    from bidirlm_pl.data.pairs import PairCollator, PairSource, load_rows
    from bidirlm_pl.stages.contrastive import ContrastiveStage

    torch.set_num_threads(2)
    torch.manual_seed(0)
    stage = ContrastiveStage({"model": model, "trainable": ["attention", "ffn", "norms"]}, gradcache_chunk_size=chunk)
    stage.configure_model()
    rows = load_rows(PairSource(name="lee", mode="halves", kind="lee", max_rows=batch_size))
    batch = PairCollator(stage.tokenizer, max_length=max_length)(rows)
    for p in stage.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    base = rss_bytes()
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    loss = stage.step(batch)["loss"]
    loss.backward()
    seconds = time.perf_counter() - start
    done.set()
    thread.join()
    tokens = int(batch["query"]["attention_mask"].sum() + batch["positive"]["attention_mask"].sum())
    grad_norm = float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in stage.parameters() if p.requires_grad)))
    return {"peak_mb": (peak[0] - base) / 2**20, "loss": float(loss), "seconds": seconds, "tokens": tokens,
            "grad_norm": grad_norm}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=4, help="GradCache chunk size (rows)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        chunk = None if args.child == "plain" else args.chunk
        print(json.dumps(child(args.model, args.batch_size, args.max_length, chunk)))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20), "TOKENIZERS_PARALLELISM": "false"}
    results = {}
    for variant in ("plain", "gradcache"):
        cmd = [sys.executable, __file__, "--model", args.model, "--batch-size", str(args.batch_size),
               "--max-length", str(args.max_length), "--chunk", str(args.chunk), "--child", variant]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        results[variant] = json.loads(out.strip().splitlines()[-1])
    plain, cached = results["plain"], results["gradcache"]
    print(f"model {args.model}: batch {args.batch_size} pairs x {args.max_length} tokens "
          f"({plain['tokens']} tokens), GradCache chunk {args.chunk} rows")
    for name, r in results.items():
        print(f"{name:9s}: step peak +{r['peak_mb']:8.1f} MB  loss {r['loss']:.6f}  grad norm {r['grad_norm']:.6f}  "
              f"step {r['seconds']:.1f} s")
    print(f"peak memory ratio (plain / GradCache): {plain['peak_mb'] / max(cached['peak_mb'], 1e-9):.2f}")
    print(f"time ratio (GradCache / plain): {cached['seconds'] / plain['seconds']:.2f}")


if __name__ == "__main__":
    main()
