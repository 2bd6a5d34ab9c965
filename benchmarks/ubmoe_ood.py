"""UBMoE stage 2 levers against out-of-domain forgetting: one stage-2 run per setting, one stage-1 folder.

Every setting trains the routers of the same stage-1 folder with ``configs/ubmoe/stage2-*.yaml`` plus
its overrides (``kl_to_base``, ``expert1_penalty``, ``routing``, ...), then measures, in the same run:

* generate-mode perplexity **in domain** (the 50 rated Lee news documents: the stage trains on the
  other 250 Lee background articles) and **out of domain** (``wiki``: English Wikipedia articles),
  each as a ratio to the base model measured here on the same text;
* the share of tokens whose router prefers expert 1 (top-1 choice) on each text.

Embed mode (expert 1, bidirectional) does not depend on stage 2 (it never uses the routers), so the
Lee Spearman of the recipe is the stage-1 folder's for every setting.

    python benchmarks/ubmoe_ood.py --stage1 runs/ubmoe/gemma3-270m/stage1/hf --output runs/ubmoe-ood \\
        --setting shipped= --setting kl1=--model.init_args.kl_to_base=1.0
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def perplexity_and_share(model, tokenizer, texts, max_length):
    """Causal perplexity in generate mode and the share of real tokens routed to expert 1 (top-1 choice)."""
    import torch

    from bidirlm_pl import moe
    from bidirlm_pl.evaluation.generation import causal_perplexity

    ppl = causal_perplexity(model, tokenizer, texts, max_length=max_length)
    if not moe.is_ubmoe(model):
        return ppl, None
    shares = []
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)["input_ids"]
            model(input_ids=ids)
            shares += [float(f.last_choice_BT.float().mean()) for f in moe.ubmoe_ffns(model)]
    return ppl, sum(shares) / len(shares)


def measure(path, domains, max_length):
    from bidirlm_pl.moe.convert import is_ubmoe
    from bidirlm_pl.moe.modes import load_any, set_mode

    model, tokenizer = load_any(path)
    model.eval()
    if is_ubmoe(model):
        set_mode(model, "generate")
    return {name: perplexity_and_share(model, tokenizer, texts, max_length) for name, texts in domains.items()}


def _config_in(config: Path, run: Path) -> Path:
    """A copy of the stage-2 config whose outputs (run folder, logs, export) all go under ``run``."""
    import yaml

    raw = yaml.safe_load((ROOT / config).read_text())
    trainer = raw["trainer"]
    trainer["default_root_dir"] = str(run)
    for logger in trainer.get("logger") or []:
        logger["init_args"]["save_dir"] = str(run)
    for callback in trainer.get("callbacks") or []:
        if callback["class_path"].endswith("HFExport"):
            callback["init_args"]["dirpath"] = str(run / "hf")
    run.mkdir(parents=True, exist_ok=True)
    (run / "stage2.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return run / "stage2.yaml"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="gemma3-270m", help="the base model (stage 1's backbone)")
    parser.add_argument("--stage1", required=True, help="the stage-1 UBMoE folder")
    parser.add_argument("--config", default="configs/ubmoe/stage2-gemma3-270m.yaml")
    parser.add_argument("--setting", action="append", required=True,
                        help="NAME=OVERRIDES: a stage-2 run with these extra CLI arguments (may be empty)")
    parser.add_argument("--documents", type=int, default=12, help="documents per domain")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--output", required=True, help="folder for the runs and results.json")
    parser.add_argument("--reuse", action="store_true",
                        help="measure a setting's existing OUTPUT/NAME/hf instead of training it again")
    args = parser.parse_args(argv)

    from bidirlm_pl.evaluation.task_data import builtin

    domains = {"in_domain": [r["text"] for r in builtin("lee")][: args.documents],
               "out_of_domain": [r["text"] for r in builtin("wiki")][: args.documents]}
    out = Path(args.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    base = measure(args.base, domains, args.max_length)
    rows = {}
    for setting in args.setting:
        name, _, overrides = setting.partition("=")
        run = out / name
        config = _config_in(Path(args.config), run)
        cmd = [str(Path(sys.executable).with_name("bidirlm")), "fit", "--config", str(config),
               f"--model.init_args.backbone.model={args.stage1}", *shlex.split(overrides)]
        t0 = time.time()
        if not (args.reuse and (run / "hf" / "config.json").is_file()):
            subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        seconds = time.time() - t0
        measured = measure(str(run / "hf"), domains, args.max_length)
        rows[name] = {"overrides": overrides, "stage2_seconds": round(seconds, 1)}
        for domain, (ppl, share) in measured.items():
            rows[name][domain] = {"perplexity": ppl, "ratio_to_base": ppl / base[domain][0], "expert1_share": share}
        print(f"{name}: {json.dumps(rows[name])}", flush=True)
    print("\n| setting | stage 2 s | in-domain ppl (x base) | out-of-domain ppl (x base) | expert-1 share in / out |")
    print("|---|---:|---:|---:|---:|")
    print(f"| base | - | {base['in_domain'][0]:.2f} | {base['out_of_domain'][0]:.2f} | - |")
    for name, r in rows.items():
        i, o = r["in_domain"], r["out_of_domain"]
        print(f"| {name} `{r['overrides']}` | {r['stage2_seconds']:.0f} | {i['perplexity']:.2f} ({i['ratio_to_base']:.4f}) | "
              f"{o['perplexity']:.2f} ({o['ratio_to_base']:.4f}) | {i['expert1_share']:.3f} / {o['expert1_share']:.3f} |")
    (out / "results.json").write_text(json.dumps({"base": base, "settings": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
