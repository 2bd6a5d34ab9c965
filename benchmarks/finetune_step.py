"""Token-classification training step: FinetuneStage through `bidirlm fit` vs transformers' own Trainer.

Ours: the shipped ``configs/finetune/tiny-token.yaml`` (FinetuneStage, task ``token``; AdamW lr 3e-3, betas
0.9/0.95, eps 1e-5, weight decay 0.1; linear schedule with 10% warmup; bidirectional, sdpa) run in-process by
``bidirlm_pl.cli.fit.run_lightning`` exactly as ``bidirlm fit`` runs it (its CLI defaults included: atomic
checkpoint IO, the preemption callback, the non-finite guard), with ``--model``, ``--batch``, ``--length``,
``--precision`` and the device swapped in, no validation, no test after the fit, no logger, progress bar or
checkpoint. The peer: ``transformers.Trainer`` on ``AutoModelForTokenClassification`` of the same folder (loaded
with ``is_causal=False``, so both sides run the same bidirectional computation), ``DataCollatorForTokenClassification``,
the same optimizer (``adamw_torch`` = ``torch.optim.AdamW``; ``--fused`` makes both fused; ``--trainer-optim``
sets the Trainer's alone), hyperparameters and schedule, the same precision and gradient clipping (``--clip``,
off by default as in the config), no eval, logging or saving, dataloader workers 0.

Data: the same token-labelled rows on both sides. Lee background text cut into windows of ``--length`` words
(cyclic), each word with a seeded random BIO tag over 4 entity types (9 labels), written as JSONL and read by
``LabelledTaskData`` (the stage's data module and its sub-word rule: first sub-token labelled, others -100);
the Trainer gets the rows that module encoded. Every row is truncated to exactly ``--length`` tokens, so both
sides see identical (batch, length) tensors whatever their shuffling.

Timing: each side is one fit of ``--warmup`` + ``--steps`` optimizer steps; a callback stamps the end of
every step (after the optimizer step; ``torch.cuda.synchronize`` first on CUDA), and a step's time is the
interval between consecutive stamps: data fetch, collate, forward, backward, optimizer, schedule and the
framework's hooks, warm-up steps left out. ``--repeats`` rounds alternate the order (ours first, then the
Trainer first, ...); prints each side's median and mean seconds per step over all timed steps, and the ratio
of medians (ours / Trainer; goal <= 1, i.e. not slower).

    python benchmarks/finetune_step.py --repeats 4                        # tiny-qwen3, CPU, fp32, 15 s
    python benchmarks/finetune_step.py --model random:qwen3-0.6b --batch 2 --length 64 --steps 2 --warmup 1 --fused
    # ours as the finetune configs ship (torch.optim.AdamW) vs the Trainer's default optimizer (fused)
    python benchmarks/finetune_step.py --model random:qwen3-0.6b --batch 2 --length 64 --steps 2 --warmup 1 \\
        --trainer-optim adamw_torch_fused
    # GPU (bf16-mixed by default there), as the GPU suite's finetune section runs it
    python benchmarks/finetune_step.py --model random:qwen3-0.6b --device cuda --fused --batch 16 --length 512 \\
        --steps 10
"""

from __future__ import annotations

import argparse
import contextvars
import gc
import itertools
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
import yaml
from transformers import (
    AutoConfig,
    AutoModelForTokenClassification,
    DataCollatorForTokenClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from bidirlm_pl.cli.fit import run_lightning
from bidirlm_pl.core import assets
from bidirlm_pl.core.hub import resolve_model_folder
from bidirlm_pl.data.tasks import LabelledTaskData

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))  # the Lightning side names StepClock by its module path

CONFIG = REPO / "configs" / "finetune" / "tiny-token.yaml"
TAGS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]
PRECISIONS = ("32-true", "bf16-mixed", "bf16-true")


# ------------------------------------------------------------------ step clocks (one per side)

def _stamp(clock: list[float]) -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    clock.append(time.perf_counter())


class StepClock(L.Callback):
    """Lightning: the time at the end of every optimizer step."""

    def __init__(self):
        self.stamps: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        _stamp(self.stamps)


class TrainerStepClock(TrainerCallback):
    """transformers.Trainer: the time at the end of every optimizer step."""

    def __init__(self):
        self.stamps: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        _stamp(self.stamps)


# ------------------------------------------------------------------ data

def token_rows(n: int, length: int, seed: int = 0) -> list[dict]:
    """``n`` rows of ``length`` Lee words (cyclic windows) with seeded random BIO tags: ``{"tokens", "tags"}``."""
    words = " ".join(assets.lee_background()).split()
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        start = (i * length) % len(words)
        chunk = [words[(start + k) % len(words)] for k in range(length)]
        tags, previous = [], "O"
        for _ in chunk:
            if rng.random() < 0.7:
                tag = "O"
            elif previous != "O" and rng.random() < 0.5:
                tag = "I-" + previous[2:]
            else:
                tag = "B-" + rng.choice(["PER", "ORG", "LOC", "MISC"])
            tags.append(tag)
            previous = tag
        rows.append({"tokens": chunk, "tags": tags})
    return rows


def write_source(folder: Path, args) -> dict:
    """JSONL files of the three splits (train: every step's batch once, no epoch boundary); the source block."""
    n_train = args.batch * (args.warmup + args.steps)
    rows = token_rows(n_train + 4, args.length)
    splits = {"train": rows[:n_train], "validation": rows[n_train:n_train + 2], "test": rows[n_train + 2:]}
    files = {}
    for split, part in splits.items():
        path = folder / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in part))
        files[split] = str(path)
    return {"kind": "jsonl", "files": files}


# ------------------------------------------------------------------ ours: FinetuneStage through `bidirlm fit`

def ours_config(args, source: dict, root: str) -> dict:
    config = yaml.safe_load(CONFIG.read_text())
    init = config["model"]["init_args"]
    init["backbone"]["model"] = args.model
    init["backbone"]["dtype"] = "bfloat16" if args.precision == "bf16-true" else "float32"
    init["backbone"]["attn_implementation"] = "sdpa"
    init["labels"] = TAGS
    init["test_after_fit"] = False
    init["restore_best"] = False
    if args.fused:
        init["optimizer"]["init_args"]["fused"] = True
    data = config["data"]["init_args"]
    data.update(source=source, max_length=args.length, batch_size=args.batch, max_train_examples=None,
                max_eval_examples=None)
    trainer = config["trainer"]
    trainer.update(accelerator="gpu" if args.device == "cuda" else "cpu", devices=1,
                   max_steps=args.warmup + args.steps, precision=args.precision, limit_val_batches=0,
                   num_sanity_val_steps=0, enable_checkpointing=False, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, default_root_dir=root,
                   gradient_clip_val=args.clip or None,
                   callbacks=[{"class_path": "finetune_step.StepClock"}])
    for key in ("val_check_interval", "check_val_every_n_epoch", "log_every_n_steps"):
        trainer.pop(key, None)
    return config


def run_ours(args, source: dict) -> dict:
    with tempfile.TemporaryDirectory() as root:
        path = Path(root) / "config.yaml"
        path.write_text(yaml.safe_dump(ours_config(args, source, root)))
        _reset_peak(args.device)
        # a copied context: jsonargparse 4.53 leaves its last subcommand parser in a ContextVar
        # (_typehints.subclass_arg_parser), which holds the CLI, its Trainer and the model after the fit
        cli = contextvars.copy_context().run(run_lightning, ["fit", "--config", str(path)])
        clock = next(c for c in cli.trainer.callbacks if type(c).__name__ == "StepClock")
        assert cli.trainer.global_step == args.warmup + args.steps, cli.trainer.global_step
        result = {"stamps": list(clock.stamps), "peak_gb": _peak_gb(args.device)}
        del cli
    return result


# ------------------------------------------------------------------ the peer: transformers.Trainer

def encoded_rows(args, source: dict):
    """The training rows as LabelledTaskData encodes them for ours (input_ids, labels), and its tokenizer."""
    data = LabelledTaskData(source, tokenizer=args.model, task="token", labels=TAGS, max_length=args.length,
                            batch_size=args.batch)
    data.setup("fit")
    rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in data.encoded["train"]]
    return rows, data.tokenizer


def run_trainer(args, rows: list[dict], tokenizer) -> dict:
    optimizer = yaml.safe_load(CONFIG.read_text())["model"]["init_args"]["optimizer"]["init_args"]
    folder = resolve_model_folder(args.model)
    config = AutoConfig.from_pretrained(folder, num_labels=len(TAGS), id2label=dict(enumerate(TAGS)),
                                        label2id={t: i for i, t in enumerate(TAGS)})
    config.is_causal = False  # transformers' own switch to bidirectional masks (what our export sets)
    model = AutoModelForTokenClassification.from_pretrained(
        folder, config=config, attn_implementation="sdpa",
        dtype=torch.bfloat16 if args.precision == "bf16-true" else torch.float32)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    clock = TrainerStepClock()
    with tempfile.TemporaryDirectory() as root:
        training = TrainingArguments(
            output_dir=root, per_device_train_batch_size=args.batch, max_steps=args.warmup + args.steps,
            learning_rate=optimizer["lr"], adam_beta1=optimizer["betas"][0], adam_beta2=optimizer["betas"][1],
            adam_epsilon=optimizer["eps"], weight_decay=optimizer["weight_decay"],
            optim=args.trainer_optim, lr_scheduler_type="linear", warmup_steps=0.1,
            max_grad_norm=args.clip, bf16=args.precision == "bf16-mixed", use_cpu=args.device == "cpu",
            eval_strategy="no", save_strategy="no", logging_strategy="no", report_to="none", disable_tqdm=True,
            dataloader_num_workers=0, seed=0)
        trainer = Trainer(model=model, args=training, train_dataset=rows,
                          data_collator=DataCollatorForTokenClassification(tokenizer), callbacks=[clock])
        _reset_peak(args.device)
        trainer.train()
        assert trainer.state.global_step == args.warmup + args.steps, trainer.state.global_step
        result = {"stamps": list(clock.stamps), "peak_gb": _peak_gb(args.device)}
        del trainer, model
    return result


# ------------------------------------------------------------------ the measurement

def _reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gb(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else None


def step_times(stamps: list[float], warmup: int) -> list[float]:
    """Intervals between consecutive step ends, the first ``warmup`` (>= 1) steps left out."""
    return [b - a for a, b in itertools.pairwise(stamps[warmup - 1:])]


def measure(args) -> dict:
    """Run both sides ``args.repeats`` times, alternating; return every number the report prints."""
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.warmup < 1:
        raise SystemExit("--warmup must be at least 1 (a step's time is measured from the end of the previous one)")
    with tempfile.TemporaryDirectory() as tmp:
        source = write_source(Path(tmp), args)
        rows, tokenizer = encoded_rows(args, source)
        assert all(len(r["input_ids"]) == args.length for r in rows), "every row must fill --length tokens"
        runners = {"ours": lambda: run_ours(args, source), "trainer": lambda: run_trainer(args, rows, tokenizer)}
        times = {"ours": [], "trainer": []}
        peak = {"ours": None, "trainer": None}
        for round_ in range(args.repeats):
            for side in (("ours", "trainer") if round_ % 2 == 0 else ("trainer", "ours")):
                out = runners[side]()
                gc.collect()  # the previous side's model, gradients and optimizer state go before the next loads
                times[side] += step_times(out["stamps"], args.warmup)
                peak[side] = out["peak_gb"]
    median = {side: statistics.median(t) for side, t in times.items()}
    mean = {side: statistics.fmean(t) for side, t in times.items()}
    return {"model": args.model, "device": _device_name(args.device), "precision": args.precision,
            "batch": args.batch, "length": args.length, "steps": args.steps, "warmup": args.warmup,
            "repeats": args.repeats, "threads": args.threads, "fused": args.fused, "clip": args.clip,
            "trainer_optim": args.trainer_optim,
            "labelled_tokens_per_batch": round(statistics.fmean(
                sum(y != -100 for r in rows[i:i + args.batch] for y in r["labels"])
                for i in range(0, len(rows), args.batch)), 1),
            "times": times, "median": median, "mean": mean, "peak_gb": peak,
            "ratio": median["ours"] / median["trainer"], "ratio_mean": mean["ours"] / mean["trainer"]}


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name(0) if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"


def report(result: dict) -> str:
    header = (f"model {result['model']}, device {result['device']}, {result['precision']}, batch {result['batch']} x "
              f"{result['length']} tokens ({result['labelled_tokens_per_batch']} labelled per batch), "
              f"{result['steps']} timed steps after {result['warmup']} warm-up, {result['repeats']} rounds alternating, "
              f"ours AdamW {'fused' if result['fused'] else 'torch default'}, Trainer optim {result['trainer_optim']}, "
              f"clip {result['clip'] or 'off'}, {result['threads']} threads")
    lines = [header]
    names = {"ours": "FinetuneStage (bidirlm fit)", "trainer": "transformers Trainer"}
    for side in ("ours", "trainer"):
        peak = f", peak {result['peak_gb'][side]:.2f} GB" if result["peak_gb"][side] is not None else ""
        lines.append(f"{names[side]:28s} median {result['median'][side]:.4f} s/step, mean {result['mean'][side]:.4f}"
                     f"{peak}  (steps: {', '.join(f'{t:.3f}' for t in result['times'][side])})")
    lines.append(f"ratio ours / Trainer (seconds per step, medians): {result['ratio']:.3f}  "
                 f"(means: {result['ratio_mean']:.3f}; goal <= 1)")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-qwen3",
                        help="a folder or asset with a transformers token classifier (tiny-qwen3, random:qwen3-0.6b)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="steps left out at the start of every run")
    parser.add_argument("--repeats", type=int, default=2, help="rounds; the order of the two sides alternates")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precision", choices=PRECISIONS, default=None,
                        help="default: 32-true on CPU, bf16-mixed on CUDA (fp32 weights, bf16 autocast)")
    parser.add_argument("--fused", action="store_true", help="fused AdamW on both sides (the Trainer's own default)")
    parser.add_argument("--trainer-optim", choices=["adamw_torch", "adamw_torch_fused"], default=None,
                        help="the Trainer's optimizer alone (default: the same as ours); adamw_torch_fused without "
                             "--fused compares our shipped config with the Trainer's default")
    parser.add_argument("--clip", type=float, default=0.0, help="gradient clipping norm on both sides (0: off)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args(argv)
    args.precision = args.precision or ("bf16-mixed" if args.device == "cuda" else "32-true")
    args.trainer_optim = args.trainer_optim or ("adamw_torch_fused" if args.fused else "adamw_torch")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = measure(args)
    print(report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
