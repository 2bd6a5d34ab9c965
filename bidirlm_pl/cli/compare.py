"""``bidirlm compare A B ...``: the evaluation suite per model, reported side by side (evaluation.compare)."""

from __future__ import annotations

from bidirlm_pl.evaluation.compare import compare


def add_arguments(parser) -> None:
    parser.add_argument("models", nargs="+", help="model folders or asset names (plain, merged, UBMoE...); "
                        "UBMoE@ROUTING (soft, top1, forced0, forced1) evaluates a UBMoE folder with one routing")
    parser.add_argument("--names", nargs="+", help="a display name per model")
    parser.add_argument("--attention", nargs="+", choices=["bidirectional", "causal"],
                        help="embedding attention per model, also the attention finetune tasks train with "
                        "(causal: last-token pooling); default: bidirectional for all")
    parser.add_argument("--config", help="evaluation suite YAML (configs/compare/*.yaml; default: the default suite)")
    parser.add_argument("--output", help="folder for report.json, report.md and report.png")
    parser.add_argument("--max-length", type=int, help="tokens per text for every task (overrides the suite)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--dims", nargs="+", type=int, metavar="D",
                        help="also score the embedding tasks on the first D dimensions of each embedding, "
                        "re-normalised (Matryoshka sizes; overrides the suite's dims)")


def main(args) -> int:
    compare(args.models, args.names, attention=args.attention, config=args.config, output=args.output,
            max_length=args.max_length, overwrite=args.overwrite, dims=args.dims)
    return 0
