"""The report of a mining run: counts, and cosine-score histograms of positives, kept and dropped negatives.

``report.json`` holds everything (histograms as bin edges and counts over [-1, 1]); ``report.md`` is the same
for people, with text histograms.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

BINS = 20
BAR = 40


def histogram(scores: torch.Tensor | list[float], bins: int = BINS) -> dict:
    """Counts of cosine scores in ``bins`` equal bins over [-1, 1] (values outside are clamped in), and a summary."""
    values = torch.as_tensor(scores, dtype=torch.float64).flatten()
    counts = torch.histc(values.clamp(-1, 1), bins=bins, min=-1, max=1) if len(values) else torch.zeros(bins)
    edges = torch.linspace(-1, 1, bins + 1)
    summary = ({"mean": round(values.mean().item(), 4), "min": round(values.min().item(), 4),
                "max": round(values.max().item(), 4)} if len(values) else {})
    return {"count": len(values), **summary, "edges": [round(e, 3) + 0.0 for e in edges.tolist()],
            "counts": [int(c) for c in counts.tolist()]}


def text_histogram(title: str, hist: dict) -> list[str]:
    """A histogram as fixed-width text lines (bins from the first to the last non-empty one)."""
    counts = hist["counts"]
    lines = [f"{title}: {hist['count']} scores" + (f", mean {hist['mean']}" if hist["count"] else "")]
    filled = [i for i, c in enumerate(counts) if c]
    if not filled:
        return lines
    top = max(counts)
    for i in range(filled[0], filled[-1] + 1):
        bar = "#" * round(BAR * counts[i] / top)
        lines.append(f"  [{hist['edges'][i]:+.1f}, {hist['edges'][i + 1]:+.1f})  {bar:<{BAR}} {counts[i]}")
    return lines


def markdown(report: dict) -> str:
    """``report.md``: settings, row and corpus counts, shard reuse, drop counts and the histograms."""
    rows, corpus, rule = report["rows"], report["corpus"], report["rule"]
    lines = [f"# Mined hard negatives: {report['output']}", "",
             f"Model `{report['model']}`; pairs `{report['pairs']['name']}`; {report['queries']} distinct queries.",
             "",
             "| rule | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rule.items()]
    lines += ["", "| rows | count |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in rows.items()]
    lines += ["", "| negatives per written row | rows |", "|---:|---:|"]
    lines += [f"| {k} | {v} |" for k, v in report["negatives_per_row"].items()]
    lines += ["", "| corpus | entries |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in corpus.items()]
    lines += ["", "| shards | reused | embedded |", "|---|---:|---:|"]
    lines += [f"| {k} | {v['reused']} | {v['embedded']} |" for k, v in report["shards"].items()]
    lines += ["", "| dropped candidates | count |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in report["dropped"].items()]
    lines += ["", "Cosine scores:", "", "```"]
    hists = report["histograms"]
    lines += text_histogram("positives", hists["positive"])
    lines += text_histogram("kept negatives", hists["kept"])
    for reason, hist in hists["dropped"].items():
        lines += text_histogram(f"dropped ({reason})", hist)
    lines += ["```", ""]
    return "\n".join(lines)


def write_report(folder: Path, report: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (folder / "report.md").write_text(markdown(report))
