"""``bidirlm dependence --model DIR``: how much attention goes to earlier tokens, the token itself, later tokens."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from bidirlm_pl.core import assets
from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.evaluation.dependence import dependence
from bidirlm_pl.moe.modes import load_any


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="model folder or asset (plain, merged, UBMoE)")
    parser.add_argument("--texts", help="a .txt file, one text per line (default: the 50 Lee documents)")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per text")
    parser.add_argument("--masked", action="store_true", help="shares of the actual (masked) attention instead")
    parser.add_argument("--per-layer", action="store_true", help="also one row per layer")
    parser.add_argument("--json", help="also write the report to this JSON file")


def main(args) -> int:
    if args.texts:
        path = Path(args.texts)
        if not path.is_file():
            raise BidirLMError(f"texts file '{path}' does not exist; expected a .txt file, one text per line")
        texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        texts = assets.lee_documents()
    model, tokenizer = load_any(args.model)
    model.eval()
    report = dependence(model, tokenizer, texts, name=args.model, max_length=args.max_length,
                        masked=args.masked, per_layer=args.per_layer)
    print(report.table())
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(report), indent=2) + "\n")
    return 0
