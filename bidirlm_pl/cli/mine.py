"""``bidirlm mine``: hard negatives for pair data, mined with an encoder and filtered against each positive.

    bidirlm mine --model runs/quickstart/merged/hf --pairs lee --output runs/mined-lee --num-negatives 3
    bidirlm mine --model BAAI/bge-small-en-v1.5 --pairs "{dataset: sentence-transformers/all-nli, config: pair}" \\
        --corpus wiki.jsonl --range-min 10 --range-max 100 --relative-margin 0.95 --output runs/mined-nli

The output folder is a pair source as given: ``{name: mined, path: runs/mined-lee, num_negatives: 3}``.
docs/contrastive.md ("Mining hard negatives") explains the rules.
"""

from __future__ import annotations

import argparse
import dataclasses

from bidirlm_pl.evaluation.mining import FORMATS, MiningSpec, mine


def optional_float(value: str) -> float | None:
    """A float, or ``none`` / ``off`` for no value."""
    if value.strip().lower() in ("none", "off", "null"):
        return None
    try:
        return float(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"'{value}' is not a number or 'none'") from err


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="the encoder: our export, a Sentence-Transformers folder, a hub id or an asset name")
    parser.add_argument("--pairs", required=True,
                        help="pair source: a JSONL/parquet file or folder, a saved datasets folder, a hub id "
                             "org/name, 'lee' (Lee halves), or a YAML mapping of PairSource fields, e.g. "
                             "\"{dataset: org/name, config: triplet, anchor_field: query}\"")
    parser.add_argument("--output", required=True, help="output folder (refused if it exists, unless --overwrite)")
    parser.add_argument("--corpus", help="extra texts searched besides the positives: a text file/JSONL/parquet, "
                                         "a hub id, 'lee', or a YAML mapping of text SourceSpec fields")
    parser.add_argument("--num-negatives", type=int, default=1, help="hard negatives per row (default 1)")
    parser.add_argument("--range-min", type=int, default=0, help="skip the top RANGE_MIN hits (default 0)")
    parser.add_argument("--range-max", type=int, default=50, help="consider hits up to this rank (default 50)")
    parser.add_argument("--relative-margin", type=optional_float, default=0.95,
                        help="keep a negative only if its score < this x the positive's (TopK-PercPos, "
                             "NV-Retriever; default 0.95; 'none' turns it off)")
    parser.add_argument("--absolute-margin", type=optional_float, default=None,
                        help="keep a negative only if its score < the positive's minus this (default none; "
                             "-0.1 masks only hits more than 0.1 above the positive, as Qwen3-Embedding)")
    parser.add_argument("--drop-incomplete", action="store_true",
                        help="drop rows with fewer than --num-negatives kept negatives (default: keep them)")
    parser.add_argument("--format", choices=FORMATS, default="jsonl", help="output file format (default jsonl)")
    parser.add_argument("--shard-size", type=int, default=50_000,
                        help="texts per embedding shard written to disk (default 50000)")
    parser.add_argument("--batch-size", type=int, default=32, help="texts per encoder batch (default 32)")
    parser.add_argument("--search-block", type=int, default=4096, help="queries per search matmul (default 4096)")
    parser.add_argument("--max-length", type=int, help="token limit per text (default: the encoder's)")
    parser.add_argument("--query-prompt",
                        help="text prepended to queries (default: the source's query_instruction, else the "
                             "encoder's query prompt; '' for none)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 (default: bf16 on GPU)")
    parser.add_argument("--attn-implementation", default="sdpa", help="attention backend (default sdpa)")
    parser.add_argument("--cache-dir", help="shard cache, reused by a rerun (default .NAME.mine-cache beside the "
                                            "output; removed after a complete run)")
    parser.add_argument("--keep-cache", action="store_true", help="keep the shard cache after a complete run")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def spec_from_args(args: argparse.Namespace) -> MiningSpec:
    names = {f.name for f in dataclasses.fields(MiningSpec)}
    return MiningSpec(**{k: v for k, v in vars(args).items() if k in names})


def main(args: argparse.Namespace) -> int:
    report = mine(spec_from_args(args))
    rows, dropped = report["rows"], report["dropped"]
    print(f"mined {rows['written']} rows ({rows['read']} read, {rows['incomplete']} with fewer than "
          f"{report['rule']['num_negatives']} negatives, {rows['dropped_incomplete']} dropped) from "
          f"{report['queries']} queries over {report['corpus']['size']} corpus texts -> {report['output']}")
    print("dropped candidates: " + ", ".join(f"{k} {v}" for k, v in dropped.items()))
    shards = ", ".join(f"{k}: {v['reused']} reused, {v['embedded']} embedded" for k, v in report["shards"].items())
    print(f"shards: {shards}")
    if rows["incomplete"] and rows["dropped_incomplete"] == 0:
        least = min(int(k) for k, v in report["negatives_per_row"].items() if v)
        also = f", or read them with num_negatives <= {least}" if least else ""
        print(f"note: {rows['incomplete']} rows carry fewer than {report['rule']['num_negatives']} negatives (as few "
              f"as {least}): a pair source refuses rows short of its num_negatives; rerun with --drop-incomplete{also}")
    return 0
