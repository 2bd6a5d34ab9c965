"""``bidirlm compare``: what each variant does to generation and to embeddings, on one scale.

Every model folder (plain, MNTP-adapted, merged, contrastive, UBMoE) runs the evaluation suite of
``--config`` (``configs/compare/*.yaml``; default: ``configs/compare/default.yaml``'s tasks):
generation (causal perplexity, greedy continuations, cloze accuracy), embeddings (STS Spearman,
retrieval Recall@1/@10 and nDCG@10, linear-probe accuracy, clustering V-measure), attention
dependence and the fine-tuning axis (``finetune``: a fresh head fine-tuned per model, the test metric of the
best learning rate; ``frozen_token``: a linear head on frozen token states). Writes ``report.json``,
``report.md`` and ``report.png`` (mean embedding score against perplexity) atomically into ``--output`` and
prints the table.

    bidirlm compare gemma3-270m gemma3-270m runs/quickstart/contrastive/hf \
        --names base bi-base contrastive --attention causal bidirectional bidirectional --output runs/compare
    bidirlm compare gemma3-270m runs/ubmoe/stage2/hf@forced1 runs/ubmoe/stage2/hf   # naive bi-FFN vs UBMoE

Each model embeds as its folder was exported (pooling, normalisation, query prompt on queries, token limit;
``embedding.model_embedder``); a plain or UBMoE folder mean-pools without prompt. ``--attention`` sets each
model's embedding attention (``bidirectional``, the default, or ``causal``: the base model used as a
decoder with mean pooling). ``--dims 64 128 256`` (or the suite's ``dims``) also scores every embedding task
on the first d dimensions of the same embeddings, re-normalised (a Matryoshka model's truncated sizes): one
row per model and size in a table of its own, ``dims`` in ``report.json``. A UBMoE folder runs generation tasks in its ``generate`` mode (its
learned routing) and bidirectional embeddings in its ``embed`` mode; ``FOLDER@ROUTING`` uses one routing
for both (``@forced1``: the bidirectional FFN fine-tune without router, ``@forced0``: the original
model exactly).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

from bidirlm_pl.backbone.load import resolve_model_path
from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.core.export import atomic_folder
from bidirlm_pl.evaluation.embedding import check_dims
from bidirlm_pl.evaluation.harness import safe_name
from bidirlm_pl.evaluation.suite import (
    MAIN_METRIC,
    ModelSpec,
    check_data,
    check_finetune_models,
    evaluate,
    load_suite,
)
from bidirlm_pl.moe.modes import split_routing


def _display_name(path: str) -> str:
    path, routing = split_routing(path)
    p = Path(str(path))
    name = p.parent.name if p.name == "hf" and p.parent.name else p.name
    return f"{name}@{routing}" if routing else name


def _cell(task, values: dict | None) -> str:
    if not values:
        return "-"
    if task.kind == "perplexity":
        return f"{values['perplexity']:.2f}"
    if task.kind == "retrieval":
        return f"{values['recall@1']:.3f} / {values['recall@10']:.3f} / {values['ndcg@10']:.3f}"
    if task.kind == "dependence":
        return f"{values['dp_before']:.1f} / {values['dp_main']:.1f} / {values['dp_after']:.1f}"
    if task.kind in ("finetune", "frozen_token"):
        lr = values.get("learning_rate")
        shown = f"{values['metric']:.4f} {values['metric_name']}"
        return shown + (f" (lr {lr:g})" if lr is not None and len(values.get("runs", [])) > 1 else "")
    return f"{values[MAIN_METRIC[task.kind]]:.4f}"


HEADERS = {"perplexity": "perplexity (lower is better)", "multiple_choice": "cloze accuracy",
           "sts": "STS Spearman", "retrieval": "R@1 / R@10 / nDCG@10", "classification": "probe accuracy",
           "clustering": "V-measure", "dependence": "DP before / main / after %",
           "mteb": "MTEB main score (mean)", "lm_eval": "lm-eval headline (mean)",
           "finetune": "fine-tuned, test", "frozen_token": "frozen-token probe, test"}


def markdown(results, suite) -> str:
    """The comparison table (one row per model, one column per task) and the continuations side by side."""
    tasks = [t for t in suite.tasks if t.kind != "continuation"]
    head = ["model", "embedding attention"] + [f"{t.name}: {HEADERS[t.kind]}" for t in tasks]
    if suite.embedding_tasks:
        head.append("mean embedding score")
    if suite.finetune_tasks:
        head.append("mean fine-tuning score")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
    for r in results:
        cells = [r.name, r.attention] + [_cell(t, r.results.get(t.name)) for t in tasks]
        for present, score in ((suite.embedding_tasks, r.mean_embedding_score(suite)),
                               (suite.finetune_tasks, r.mean_finetune_score(suite))):
            if present:
                cells.append("-" if score is None else f"{score:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += dims_table(results, suite)
    lines += finetune_notes(results, suite)
    lines += finetune_groups_table(results, suite)
    lines += domain_table(results, suite)
    lines += family_table(results, suite)
    for t in suite.tasks:
        if t.kind != "continuation":
            continue
        for i, prompt in enumerate(t.prompts):
            lines += ["", f"Greedy continuations of \"{prompt}\" ({t.name}):", "", "| model | continuation |",
                      "|---|---|"]
            for r in results:
                text = r.results[t.name]["texts"][i].replace("|", "/").replace("\n", " ")
                lines.append(f"| {r.name} | {text} |")
    return "\n".join(lines) + "\n"


def dims_table(results, suite) -> list[str]:
    """The embedding tasks at each suite ``dims`` size (first d dimensions, re-normalised), beside the full size."""
    if not suite.dims or not suite.embedding_tasks or not results:
        return []
    tasks = suite.embedding_tasks
    head = ["model", "dimensions"] + [f"{t.name}: {HEADERS[t.kind]}" for t in tasks] + ["mean embedding score"]
    lines = ["", "Embedding tasks at truncated sizes (the first d dimensions of each embedding, re-normalised):", "",
             "| " + " | ".join(head) + " |", "|---|---:|" + "---:|" * (len(head) - 2)]
    for r in results:
        for dim in [None, *suite.dims]:
            values = r.results if dim is None else r.dims.get(dim, {})
            score = r.mean_embedding_score(suite, dim)
            cells = [r.name, "full" if dim is None else str(dim)] + [_cell(t, values.get(t.name)) for t in tasks]
            lines.append("| " + " | ".join(cells + ["-" if score is None else f"{score:.4f}"]) + " |")
    return lines


def finetune_notes(results, suite) -> list[str]:
    """How the fine-tuning columns were measured: budget, seed and the learning rate each model's best run used."""
    tasks = [t for t in suite.tasks if t.kind == "finetune"]
    if not tasks or not results:
        return []
    intro = ("Fine-tuning (a fresh head per model, the same seed and budget for every model; the test metric of the "
             "run with the best validation score):")
    head = "| task | steps | seed | learning rates | " + " | ".join(f"{r.name}: lr (validation)" for r in results)
    lines = ["", intro, "", head + " |", "|---|---:|---:|---|" + "---|" * len(results)]
    for t in tasks:
        first = next((r.results.get(t.name) for r in results if r.results.get(t.name)), {}) or {}
        grid = ", ".join(f"{run['learning_rate']:g}" for run in first.get("runs", []) if run["learning_rate"] is not None)
        cells = []
        for r in results:
            values = r.results.get(t.name)
            lr = values.get("learning_rate") if values else None
            cells.append("-" if not values else f"{lr:g} ({values['validation']:.4f})" if lr is not None
                         else f"config ({values['validation']:.4f})")
        steps = t.steps if t.steps is not None else "config"
        lines.append(f"| {t.name} | {steps} | {t.seed} | {grid or 'config'} | " + " | ".join(cells) + " |")
    return lines


def finetune_groups_table(results, suite) -> list[str]:
    """A finetune task tested on several sets (a source's ``test_configs``: UD POS per language): each set's test
    metric of the best run, beside their mean (the main table's number)."""
    lines = []
    for t in suite.finetune_tasks:
        tests = [(r, (r.results.get(t.name) or {}).get("test") or {}) for r in results]
        groups = list(dict.fromkeys(k[:-len("/metric")] for _, test in tests for k in test if k.endswith("/metric")))
        if not groups:
            continue
        lines += ["", f"{t.name}: the test metric of each test set (the best run's; their mean is in the table above):",
                  "", "| model | " + " | ".join(groups) + " | mean |", "|---|" + "---:|" * (len(groups) + 1)]
        for r, test in tests:
            cells = [f"{test[g + '/metric']:.4f}" if g + "/metric" in test else "-" for g in groups]
            mean = f"{test['metric']:.4f}" if "metric" in test else "-"
            lines.append(f"| {r.name} | " + " | ".join(cells) + f" | {mean} |")
    return lines


def domain_table(results, suite) -> list[str]:
    """Perplexity in / out of the training domain, each model beside the first one (the base, by convention).

    A task says its side with ``domain: in`` or ``domain: out``; several tasks on one side are averaged
    as a geometric mean. Empty unless the suite has a task on each side.
    """
    sides = {d: [t for t in suite.tasks if t.kind == "perplexity" and t.domain == d] for d in ("in", "out")}
    if not all(sides.values()) or not results:
        return []

    def mean(r, tasks):
        values = [r.main(t) for t in tasks]
        return None if None in values else math.exp(sum(math.log(v) for v in values) / len(values))

    base = results[0]
    ref = {d: mean(base, tasks) for d, tasks in sides.items()}
    names = {d: ", ".join(t.name for t in tasks) for d, tasks in sides.items()}
    lines = ["", (f"Generation in domain ({names['in']}) and out of domain ({names['out']}): causal perplexity, "
             f"and its ratio to {base.name}:"), "", "| model | in domain | out of domain |", "|---|---:|---:|"]
    for r in results:
        cells = []
        for d in ("in", "out"):
            value = mean(r, sides[d])
            cells.append("-" if value is None or ref[d] is None else f"{value:.2f} (x{value / ref[d]:.3f})")
        lines.append(f"| {r.name} | {cells[0]} | {cells[1]} |")
    return lines


def domain_tasks(suite) -> list:
    """The perplexity tasks that name a ``domain``, in-domain ones first."""
    return [t for d in ("in", "out") for t in suite.tasks if t.kind == "perplexity" and t.domain == d]


def family_ratios(results, suite) -> dict[str, dict[str, float]]:
    """model -> ``domain`` perplexity task -> perplexity / the first model's (report.json ``family_ratios``)."""
    if not results:
        return {}
    base = results[0]
    ratios = {}
    for r in results:
        values = {t.name: (r.main(t), base.main(t)) for t in domain_tasks(suite)}
        ratios[r.name] = {name: v / ref for name, (v, ref) in values.items() if v is not None and ref}
    return ratios


def family_table(results, suite) -> list[str]:
    """Every ``domain`` perplexity task on its own (in domain first), each as a ratio to the first model, and
    each model's worst out-of-domain ratio. Empty unless the suite has two or more ``domain: out`` tasks."""
    tasks = domain_tasks(suite)
    if sum(t.domain == "out" for t in tasks) < 2 or not results:
        return []
    ratios = family_ratios(results, suite)
    head = [f"{t.name} ({t.domain})" for t in tasks]
    intro = (f"Generation per text family: causal perplexity and its ratio to {results[0].name} (the worst "
             "out-of-domain ratio last):")
    lines = ["", intro, "", "| model | " + " | ".join(head) + " | worst out of domain |",
             "|---|" + "---:|" * (len(tasks) + 1)]
    for r in results:
        mine = ratios[r.name]
        cells = [f"{r.main(t):.2f} (x{mine[t.name]:.3f})" if t.name in mine else "-" for t in tasks]
        out = [(mine[t.name], t.name) for t in tasks if t.domain == "out" and t.name in mine]
        cells.append(f"x{max(out)[0]:.3f} ({max(out)[1]})" if out else "-")
        lines.append(f"| {r.name} | " + " | ".join(cells) + " |")
    return lines


def plot(results, suite, target: Path) -> bool:
    """Mean embedding score against perplexity, one labelled point per model; False when either is missing."""
    perplexity = next((t for t in suite.tasks if t.kind == "perplexity"), None)
    points = [(r.name, r.main(perplexity), r.mean_embedding_score(suite)) for r in results] if perplexity else []
    points = [p for p in points if p[1] is not None and p[2] is not None]
    if not points:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for name, ppl, score in points:
        ax.scatter(ppl, score, s=40)
        ax.annotate(name, (ppl, score), textcoords="offset points", xytext=(5, 4), fontsize=9)
    ax.set_xscale("log")
    ax.set_xlabel(f"causal perplexity, {perplexity.name} (log scale, lower is better)")
    ax.set_ylabel(f"mean embedding score over {len(suite.embedding_tasks)} tasks (higher is better)")
    ax.set_title(f"generation vs embeddings ({suite.name})")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(target, dpi=120)
    plt.close(fig)
    return True


def compare(paths: list[str], names: list[str] | None = None, *, attention: list[str] | None = None,
            config: str | None = None, output: str | None = None, max_length: int | None = None,
            overwrite: bool = False, progress: bool = True, dims: list[int] | None = None):
    """Run the suite on every model; returns the per-model results (and writes the report to ``output``).

    ``dims`` (``--dims``) replaces the suite's ``dims``: embedding sizes to score the embedding tasks at too."""
    for option, values in (("--names", names), ("--attention", attention)):
        if values and len(values) != len(paths):
            raise BidirLMError(f"{option} has {len(values)} entries for {len(paths)} models; give one per model")
    specs = [ModelSpec(p, names[i] if names else _display_name(p),
                       attention[i] if attention else "bidirectional") for i, p in enumerate(paths)]
    if len({s.name for s in specs}) != len(specs):
        raise BidirLMError(f"model names repeat: {[s.name for s in specs]}; give distinct --names")
    suite = load_suite(config)
    if max_length is not None:
        suite.max_length = max_length
    if dims is not None:
        suite.dims = check_dims(list(dims), "--dims")
    if suite.dims and not suite.embedding_tasks:
        raise BidirLMError(f"dims {suite.dims} score embedding tasks, and suite '{suite.name}' has none")
    for p in paths:
        resolve_model_path(split_routing(p)[0])  # fail on a bad path before any slow evaluation
    check_finetune_models(suite, paths)
    check_data(suite)
    if output and Path(output).exists() and not overwrite:
        raise BidirLMError(f"output folder '{output}' already exists; pass --overwrite to replace it")
    results = []
    for i, spec in enumerate(specs):
        print(f"[{i + 1}/{len(specs)}] evaluating {spec.name} ({spec.path}, {spec.attention} embeddings)", flush=True)
        results.append(evaluate(spec, suite, progress=progress))
    table = markdown(results, suite)
    print(table)
    if output:
        with atomic_folder(output, overwrite=overwrite) as staging:
            report = {"suite": suite.name, "max_length": suite.max_length, "dims": suite.dims,
                      "tasks": [asdict(t) | {"source": t.source_name if t.kind != "continuation" else None,
                                             "source_block": t.source} for t in suite.tasks],
                      "models": [{k: v for k, v in asdict(r).items() if k != "artifacts"}
                                 | {"mean_embedding_score": r.mean_embedding_score(suite),
                                    "mean_finetune_score": r.mean_finetune_score(suite),
                                    "mean_embedding_score_by_dim": {d: r.mean_embedding_score(suite, d)
                                                                    for d in suite.dims or []}}
                                 for r in results],
                      "family_ratios": family_ratios(results, suite)}
            (staging / "report.json").write_text(json.dumps(report, indent=2) + "\n")
            (staging / "report.md").write_text(table)
            for r in results:  # the harnesses' own outputs, beside the report
                for name, text in r.artifacts.items():
                    target = staging / Path(name).parent / f"{safe_name(r.name)}-{Path(name).name}"
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_text(text)
            plotted = plot(results, suite, staging / "report.png")
            if not plotted:
                print("no plot: the suite needs a perplexity task and an embedding task")
        print(f"report written to {output}/report.md, report.json" + (", report.png" if plotted else ""))
    return results
