"""One MNTP optimizer step on the real Gemma3-270M: sparse-vocabulary loss (this stage) vs full logits.

Both variants run the same packed, masked 4 x 128 batch from the Lee corpus (30% all-mask), the same
bidirectional sdpa backbone in fp32, every weight trainable, AdamW; a step is forward + backward +
optimizer step + zero_grad. The reference computes logits at every position (LLM2Vec) and a shifted
cross-entropy over the masked ones; this stage gathers only the hidden states that predict a masked
token and projects those (``bidirlm_pl.losses.token``).

Time: one process, one warm-up step each, then ``--repeats`` alternating pairs; the ratio of medians.
Memory: each variant runs in its own fresh subprocess; a thread samples the resident set size
(/proc/self/statm) every millisecond; the step's memory is peak RSS during the first step minus RSS
just before it (weights loaded, optimizer built; both variants then allocate the same AdamW state and
gradients, so the difference is the logits and their backward). Fresh processes avoid the allocator
keeping freed pages of an earlier step. Reported: peak step memory of each variant and their ratio.

    python benchmarks/mntp_step.py --repeats 5
    python benchmarks/mntp_step.py --repeats 5 --trainable attention,ffn,norms
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import torch

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRSS:
    """Sample RSS in a background thread; ``peak`` is the maximum seen while active."""

    def __init__(self, interval: float = 0.001):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def __enter__(self):
        self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def build(args):
    from bidirlm_pl.data.masking import MaskSpec
    from bidirlm_pl.data.sources import SourceSpec
    from bidirlm_pl.data.text_module import STATE_KEY, TextDataModule
    from bidirlm_pl.stages.mntp import MNTPStage

    torch.manual_seed(0)
    stage = MNTPStage({"model": args.model, "attn_implementation": "sdpa", "dtype": "float32",
                       "trainable": args.trainable.split(",")}, loss_chunk_size=args.chunk)
    stage.configure_model()
    dm = TextDataModule(args.model, sources=[SourceSpec("lee", kind="lee")], max_length=args.length,
                        batch_size=args.batch, val_fraction=0.0, mask=MaskSpec(ratio=0.3), check_documents=10)
    batch = next(dm.train_batches())
    batch.pop(STATE_KEY)
    optimizer = torch.optim.AdamW([p for p in stage.parameters() if p.requires_grad], lr=1e-5)
    return stage, batch, optimizer


def step_fn(stage, batch, optimizer, variant: str):
    from bidirlm_pl.losses.token import full_logits_mntp_loss

    def run(timings: list | None = None):
        start = time.perf_counter()
        if variant == "sparse":
            loss = stage.step(batch)["loss"]
        else:
            logits_BTV = stage.backbone(**stage.model_kwargs(batch)).logits
            loss = full_logits_mntp_loss(logits_BTV, batch["labels"])
        loss.backward()
        middle = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if timings is not None:
            timings.append((middle - start, time.perf_counter() - middle))
        return float(loss.detach())

    return run


def memory_child(args) -> None:
    stage, batch, optimizer = build(args)
    run = step_fn(stage, batch, optimizer, args.memory_child)
    before = rss_bytes()
    with PeakRSS() as peak:
        loss = run()
    print(json.dumps({"variant": args.memory_child, "before": before, "peak": peak.peak, "loss": loss}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunk", type=int, default=None, help="loss_chunk_size of the sparse variant")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--trainable", default="all",
                        help="comma-separated groups, e.g. attention,ffn,norms (configs/mntp/gemma3-270m.yaml)")
    parser.add_argument("--memory-child", choices=["sparse", "full"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        return memory_child(args)

    stage, batch, optimizer = build(args)
    n_masked = int((batch["labels"] != -100).sum())
    print(f"model {args.model}, batch {args.batch} x {args.length}, masked tokens {n_masked}, "
          f"vocab {stage.backbone.config.vocab_size}, threads {args.threads}, fp32, chunk {args.chunk}, "
          f"trainable {args.trainable} ({sum(p.numel() for p in stage.parameters() if p.requires_grad) / 1e6:.0f}M)")
    runs = {v: step_fn(stage, batch, optimizer, v) for v in ("sparse", "full")}
    for run in runs.values():  # warm-up
        run()
    parts = {"sparse": [], "full": []}
    for i in range(args.repeats):
        for v in (("sparse", "full") if i % 2 == 0 else ("full", "sparse")):
            runs[v](parts[v])
    med = {v: statistics.median(a + b for a, b in p) for v, p in parts.items()}
    fwd_bwd = {v: statistics.median(a for a, _ in p) for v, p in parts.items()}
    opt = {v: statistics.median(b for _, b in p) for v, p in parts.items()}
    for v, p in parts.items():
        print(f"{v:6s} step: median {med[v]:.3f} s = forward+backward {fwd_bwd[v]:.3f} s + AdamW {opt[v]:.3f} s  "
              f"(steps: {', '.join(f'{a + b:.2f}' for a, b in p)})")
    print(f"time ratio full / sparse: step {med['full'] / med['sparse']:.2f}x, "
          f"forward+backward {fwd_bwd['full'] / fwd_bwd['sparse']:.2f}x")
    del stage, batch, optimizer, runs

    mem = {}
    for v in ("sparse", "full"):
        cmd = [sys.executable, __file__, "--model", args.model, "--batch", str(args.batch), "--length",
               str(args.length), "--threads", str(args.threads), "--trainable", args.trainable, "--memory-child", v]
        if args.chunk:
            cmd += ["--chunk", str(args.chunk)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        mem[v] = json.loads(out)
        step_mb = (mem[v]["peak"] - mem[v]["before"]) / 2**20
        print(f"{v:6s} first step: RSS before {mem[v]['before'] / 2**20:.0f} MiB, peak {mem[v]['peak'] / 2**20:.0f} MiB, "
              f"step memory {step_mb:.0f} MiB, loss {mem[v]['loss']:.4f}")
    step = {v: mem[v]["peak"] - mem[v]["before"] for v in mem}
    print(f"peak step memory ratio full / sparse: {step['full'] / step['sparse']:.2f}x; "
          f"peak RSS ratio: {mem['full']['peak'] / mem['sparse']['peak']:.2f}x")


if __name__ == "__main__":
    main()
