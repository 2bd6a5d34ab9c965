"""UBMoE generate mode on every kind of text: one stage-2 setting per row, every text family per column.

Every setting is one of:

* ``NAME=OVERRIDES`` — a stage-2 run of ``--config`` plus these extra ``bidirlm fit`` arguments (may be empty):
  ``kl_to_base``, ``expert1_penalty``, ``routing``, ``generate_routing`` / ``confidence``...;
* ``NAME=CONFIG.yaml [OVERRIDES]`` — a stage-2 run of another config (e.g. the family mixture,
  ``configs/ubmoe/stage2-gemma3-270m-mix.yaml``) on the same stage-1 folder;
* ``NAME=OTHER@ROUTING`` — no training: the folder of setting ``OTHER`` (given earlier) measured with a
  generate routing, e.g. ``conf0.9=shipped@confident=0.9`` (``FOLDER@ROUTING`` as ``compare`` reads it).

Each folder is measured in generate mode on every perplexity task of ``--suite`` (default
``configs/compare/ood-families.yaml``: the Lee news in domain, Wikipedia leads and the held-out passages of every
built-in text family out of domain; :mod:`bidirlm_pl.core.assets.families`), as ``bidirlm compare`` measures it,
beside the base model measured here on the same text. The table: the in-domain ratio to the base, the worst
out-of-domain ratio (the goal: <= 1.01) and the tokens routed to expert 1 (the top choice; for ``confident``,
tokens above the threshold; padding of a batch's last row included). ``results.json`` keeps every number.

    python benchmarks/ubmoe_ood.py --stage1 runs/ubmoe/gemma3-270m/stage1/hf --output runs/ubmoe-ood \\
        --setting shipped= --setting conf0.9=shipped@confident=0.9 \\
        --setting mix=configs/ubmoe/stage2-gemma3-270m-mix.yaml
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def perplexity_tasks(suite_path: str):
    from bidirlm_pl.evaluation.suite import load_suite

    suite = load_suite(suite_path)
    tasks = [t for t in suite.tasks if t.kind == "perplexity"]
    if not any(t.domain == "in" for t in tasks) or not any(t.domain == "out" for t in tasks):
        raise SystemExit(f"suite {suite_path} needs perplexity tasks with domain: in and domain: out")
    return suite, tasks


def measure(path: str, suite, tasks) -> dict:
    """Generate-mode perplexity and expert-1 share of one model (plain, UBMoE or FOLDER@ROUTING) on every task."""
    import torch

    from bidirlm_pl import moe
    from bidirlm_pl.evaluation.generation import causal_perplexity
    from bidirlm_pl.moe.modes import load_any

    model, tokenizer = load_any(path)
    model.eval()
    counts = [0, 0]
    hooks = []
    if moe.is_ubmoe(model):
        moe.set_mode(model, "generate")

        def count(ffn, _inputs, _output):
            counts[0] += int(ffn.last_choice_BT.sum())
            counts[1] += ffn.last_choice_BT.numel()

        hooks = [f.register_forward_hook(count) for f in moe.ubmoe_ffns(model)]
    out = {}
    with torch.no_grad():
        for task in tasks:
            counts[:] = [0, 0]
            texts = [r["text"] for r in task.records()]
            ppl = causal_perplexity(model, tokenizer, texts, max_length=task.max_length or suite.max_length,
                                    batch_size=max(1, suite.batch_size // 4))
            out[task.name] = {"domain": task.domain, "perplexity": ppl,
                              "expert1_share": counts[0] / counts[1] if counts[1] else None}
    for hook in hooks:
        hook.remove()
    return out


def _config_in(config: Path, run: Path) -> Path:
    """A copy of a stage-2 config whose outputs (run folder, logs, export) all go under ``run``."""
    import yaml

    raw = yaml.safe_load((ROOT / config).read_text())
    trainer = raw["trainer"]
    trainer["default_root_dir"] = str(run)
    for logger in trainer.get("logger") or []:
        logger["init_args"]["save_dir"] = str(run)
    for callback in trainer.get("callbacks") or []:
        if callback["class_path"].endswith("HFExport"):
            callback.setdefault("init_args", {})["dirpath"] = str(run / "hf")
    run.mkdir(parents=True, exist_ok=True)
    (run / "stage2.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return run / "stage2.yaml"


def train(name: str, spec: str, args, out: Path) -> tuple[str, float]:
    """One stage-2 run (or none with --reuse and an existing export); returns its folder and seconds."""
    words = shlex.split(spec)
    config = Path(args.config)
    if words and words[0].endswith((".yaml", ".yml")):
        config, words = Path(words[0]), words[1:]
    run = out / name
    stage2 = _config_in(config, run)
    cmd = [str(Path(sys.executable).with_name("bidirlm")), "fit", "--config", str(stage2),
           f"--model.init_args.backbone.model={args.stage1}", *words]
    start = time.time()
    if not (args.reuse and (run / "hf" / "config.json").is_file()):
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return str(run / "hf"), round(time.time() - start, 1)


def ratios(measured: dict, base: dict) -> dict:
    """Per task ratio to the base; the in-domain geometric mean; the worst out-of-domain ratio and its task."""
    per_task = {task: m["perplexity"] / base[task]["perplexity"] for task, m in measured.items()}
    inside = [r for task, r in per_task.items() if measured[task]["domain"] == "in"]
    worst = max((r, task) for task, r in per_task.items() if measured[task]["domain"] == "out")
    share = {d: [m["expert1_share"] for m in measured.values() if m["domain"] == d and m["expert1_share"] is not None]
             for d in ("in", "out")}
    return {"per_task": per_task, "in_domain": math.exp(sum(map(math.log, inside)) / len(inside)),
            "worst": worst[0], "worst_task": worst[1],
            "expert1_share": {d: (sum(v) / len(v) if v else None) for d, v in share.items()}}


def print_tables(base: dict, rows: dict, tasks) -> None:
    share = lambda v: "-" if v is None else f"{v:.3f}"
    print("\n| setting | stage 2 s | in domain (x base) | worst family (x base) | expert-1 share in / out |")
    print("|---|---:|---:|---:|---:|")
    for name, r in rows.items():
        s = r["ratios"]["expert1_share"]
        print(f"| {name} `{r['spec']}` | {r['stage2_seconds']} | x{r['ratios']['in_domain']:.4f} | "
              f"x{r['ratios']['worst']:.4f} ({r['ratios']['worst_task']}) | {share(s['in'])} / {share(s['out'])} |")
    print("\n| setting | " + " | ".join(f"{t.name} ({t.domain})" for t in tasks) + " |")
    print("|---|" + "---:|" * len(tasks))
    print("| base perplexity | " + " | ".join(f"{base[t.name]['perplexity']:.2f}" for t in tasks) + " |")
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(f"x{r['ratios']['per_task'][t.name]:.4f}" for t in tasks) + " |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="gemma3-270m", help="the base model (stage 1's backbone)")
    parser.add_argument("--stage1", required=True, help="the stage-1 UBMoE folder")
    parser.add_argument("--config", default="configs/ubmoe/stage2-gemma3-270m.yaml", help="the stage-2 config")
    parser.add_argument("--suite", default="configs/compare/ood-families.yaml",
                        help="the compare suite whose perplexity tasks (domain in / out) are measured")
    parser.add_argument("--setting", action="append", required=True,
                        help="NAME=OVERRIDES, NAME=CONFIG.yaml [OVERRIDES] or NAME=OTHER@ROUTING (see above)")
    parser.add_argument("--output", required=True, help="folder for the runs and results.json")
    parser.add_argument("--reuse", action="store_true",
                        help="measure a setting's existing OUTPUT/NAME/hf instead of training it again")
    args = parser.parse_args(argv)

    suite, tasks = perplexity_tasks(args.suite)
    out = Path(args.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    base = measure(args.base, suite, tasks)
    folders, rows = {}, {}
    for setting in args.setting:
        name, _, spec = setting.partition("=")
        other, at, routing = spec.partition("@")
        if at and other in folders and " " not in spec:
            folder, seconds = f"{folders[other]}@{routing}", "-"
        else:
            folder, seconds = train(name, spec, args, out)
        folders[name] = folder
        measured = measure(folder, suite, tasks)
        rows[name] = {"spec": spec, "folder": folder, "stage2_seconds": seconds, "measured": measured,
                      "ratios": ratios(measured, base)}
        print(f"{name}: {json.dumps(rows[name]['ratios'])}", flush=True)
    print_tables(base, rows, tasks)
    (out / "results.json").write_text(json.dumps({"suite": args.suite, "base": base, "settings": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
