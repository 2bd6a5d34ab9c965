"""``bidirlm compare``: what each variant does to generation and to embeddings, on one scale.

For every model folder (plain, MNTP-adapted, merged, contrastive, UBMoE): causal perplexity on
held-out text (the 50 Lee documents, which no shipped training config uses), the Lee similarity
Spearman with bidirectional and with causal attention (mean pooling), and a greedy continuation
of a fixed prompt. Writes ``report.json`` and ``report.md`` atomically and prints the table.

    bidirlm compare gemma3-270m runs/quickstart/mntp/hf runs/quickstart/contrastive/hf --output runs/compare
    bidirlm compare gemma3-270m runs/ubmoe/stage2/hf@forced1 runs/ubmoe/stage2/hf   # naive bi-FFN vs UBMoE

A UBMoE folder's perplexity, continuation and causal Spearman run in its ``generate`` mode (its
learned routing), its bidirectional Spearman in its ``embed`` mode; ``FOLDER@ROUTING`` uses one
routing for both (``@forced1``: the bidirectional FFN fine-tune without router, ``@forced0``: the
original model exactly).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class Row:
    name: str
    path: str
    perplexity: float
    lee_spearman_bidirectional: float
    lee_spearman_causal: float
    continuation: str
    seconds: float


def split_routing(path: str) -> tuple[str, str | None]:
    """``FOLDER@ROUTING`` -> (FOLDER, ROUTING): a UBMoE folder evaluated with one routing in every mode."""
    from bidirlm_pl.moe.ffn import ROUTING_MODES

    folder, at, routing = str(path).rpartition("@")
    if at and routing in ROUTING_MODES:
        return folder, routing
    return str(path), None


def load_any(path: str, *, attn_implementation: str = "sdpa"):
    """A causal LM and tokenizer from a plain folder, an asset name or a UBMoE folder (``@routing`` allowed)."""
    from bidirlm_pl.backbone import load_backbone, resolve_model_path
    from bidirlm_pl.errors import BidirLMError
    from bidirlm_pl.moe.convert import ubmoe_record

    path, routing = split_routing(path)
    folder = resolve_model_path(path)
    if ubmoe_record(folder) is not None:
        from bidirlm_pl.moe.convert import load_ubmoe
        from bidirlm_pl.moe.modes import set_mode_routing

        model, tokenizer = load_ubmoe(folder, attn_implementation=attn_implementation)
        if routing is not None:  # e.g. @forced1: the naive bidirectional FFN fine-tune, @forced0: the original
            for name in ("generate", "embed"):
                set_mode_routing(model, name, routing)
        return model, tokenizer
    if routing is not None:
        raise BidirLMError(f"'{path}@{routing}': a routing applies to UBMoE folders only, and '{path}' is plain")
    return load_backbone(folder, attn_implementation=attn_implementation, head="causal_lm")


def evaluate_model(path: str, name: str | None = None, *, max_length: int = 256, batch_size: int = 4) -> Row:
    from bidirlm_pl import assets
    from bidirlm_pl.evaluation.embedding import MeanPoolEncoder, lee_spearman
    from bidirlm_pl.evaluation.generation import causal_perplexity, continuation

    start = time.time()
    model, tokenizer = load_any(path)
    model.eval()
    with _ubmoe_mode(model, "generate"):  # UBMoE: each mode runs with its own recorded routing
        ppl = causal_perplexity(model, tokenizer, assets.lee_documents(), max_length=max_length,
                                batch_size=batch_size)
        text = continuation(model, tokenizer)
        causal = lee_spearman(MeanPoolEncoder(model, tokenizer, max_length, causal=True), batch_size=batch_size)
    with _ubmoe_mode(model, "embed"):
        bidi = lee_spearman(MeanPoolEncoder(model, tokenizer, max_length), batch_size=batch_size)
    return Row(name or _display_name(path), str(path), ppl, bidi, causal, text, time.time() - start)


def _ubmoe_mode(model, name: str):
    from contextlib import nullcontext

    from bidirlm_pl.moe.convert import is_ubmoe
    from bidirlm_pl.moe.modes import mode

    return mode(model, name) if is_ubmoe(model) else nullcontext()


def _display_name(path: str) -> str:
    path, routing = split_routing(path)
    p = Path(str(path))
    name = p.parent.name if p.name == "hf" and p.parent.name else p.name
    return f"{name}@{routing}" if routing else name


def markdown(rows: list[Row]) -> str:
    lines = [
        "| model | causal perplexity (Lee 50, lower is better) | Lee Spearman, bidirectional | "
        "Lee Spearman, causal | greedy continuation |",
        "|---|---:|---:|---:|---|",
    ]
    for r in rows:
        text = r.continuation.replace("|", "/").replace("\n", " ")
        lines.append(f"| {r.name} | {r.perplexity:.2f} | {r.lee_spearman_bidirectional:.4f} | "
                     f"{r.lee_spearman_causal:.4f} | {text} |")
    return "\n".join(lines) + "\n"


def compare(paths: list[str], names: list[str] | None = None, *, output: str | None = None,
            max_length: int = 256, overwrite: bool = False) -> list[Row]:
    from bidirlm_pl.backbone import resolve_model_path
    from bidirlm_pl.errors import BidirLMError
    from bidirlm_pl.export import atomic_folder

    if names and len(names) != len(paths):
        raise BidirLMError(f"--names has {len(names)} entries for {len(paths)} models; give one name per model")
    for p in paths:
        resolve_model_path(split_routing(p)[0])  # fail on a bad path before any slow evaluation
    if output and Path(output).exists() and not overwrite:
        raise BidirLMError(f"output folder '{output}' already exists; pass --overwrite to replace it")
    rows = []
    for i, p in enumerate(paths):
        print(f"[{i + 1}/{len(paths)}] evaluating {p}", flush=True)
        rows.append(evaluate_model(p, names[i] if names else None, max_length=max_length))
    table = markdown(rows)
    print(table)
    if output:
        with atomic_folder(output, overwrite=overwrite) as staging:
            (staging / "report.json").write_text(json.dumps([asdict(r) for r in rows], indent=2))
            (staging / "report.md").write_text(table)
    return rows


def add_arguments(parser) -> None:
    parser.add_argument("models", nargs="+", help="model folders or asset names (plain, merged, UBMoE...); "
                        "UBMoE@ROUTING (soft, top1, forced0, forced1) evaluates a UBMoE folder with one routing")
    parser.add_argument("--names", nargs="+", help="a display name per model")
    parser.add_argument("--output", help="folder for report.json and report.md")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per evaluation row")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def main(args) -> int:
    compare(args.models, args.names, output=args.output, max_length=args.max_length, overwrite=args.overwrite)
    return 0
