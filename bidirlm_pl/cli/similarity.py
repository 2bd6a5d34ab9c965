"""``bidirlm similarity A B``: cosine similarity of two checkpoints, overall, per tensor group and per layer.

    bidirlm similarity runs/mntp/hf gemma3-270m
    bidirlm similarity runs/ubmoe/stage1/hf gemma3-270m      # UBMoE: expert 1's drift from the original FFN
    bidirlm similarity vlm-folder text-folder --key-map-a model.language_model.=model. --json report.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bidirlm_pl.models.merging.similarity import similarity


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("a", help="first model folder or offline asset name")
    parser.add_argument("b", help="second model folder or offline asset name")
    parser.add_argument("--key-map-a", help="prefix renames of A into the shared backbone, FROM=TO[,FROM=TO]")
    parser.add_argument("--key-map-b", help="prefix renames of B into the shared backbone, FROM=TO[,FROM=TO]")
    parser.add_argument("--expert", type=int, default=1,
                        help="UBMoE folders are compared as the plain model with this expert's FFNs (default 1)")
    parser.add_argument("--json", help="also write the full report (every tensor) to this JSON file")


def main(args: argparse.Namespace) -> int:

    report = similarity(args.a, args.b, key_map_a=args.key_map_a, key_map_b=args.key_map_b, expert=args.expert)
    print(report.table())
    if args.json:
        Path(args.json).write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    return 0
