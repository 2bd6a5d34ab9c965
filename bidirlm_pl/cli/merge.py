"""``bidirlm merge``: flags or a YAML file, both filling one typed ``MergeSpec``.

    bidirlm merge --models runs/mntp/hf gemma3-270m --weights 0.5 0.5 --output runs/merged
    bidirlm merge --config configs/merge/anti_forgetting.yaml --output runs/merged --overwrite

Flags given on the command line override the YAML's values.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
from pathlib import Path

from bidirlm_pl.backbone.load import resolve_model_path
from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.core.yaml_files import read_yaml_mapping
from bidirlm_pl.models.merging.engine import MergeSpec, merge
from bidirlm_pl.models.merging.keymap import SHAPE_POLICIES, UNMATCHED_POLICIES
from bidirlm_pl.models.merging.methods import METHODS

SPEC_FIELDS = {f.name for f in dataclasses.fields(MergeSpec)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file with MergeSpec fields (models, weights, output, method, ...)")
    parser.add_argument("--models", nargs="+", help="model folders or offline asset names")
    parser.add_argument("--weights", nargs="+", type=float, help="one weight per model")
    parser.add_argument("--output", help="output folder (refused if it exists, unless --overwrite)")
    parser.add_argument("--method", choices=METHODS, help="merge method (default linear)")
    parser.add_argument("--base", help="base model for task_arithmetic and ties")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="output dtype (default: source's)")
    parser.add_argument("--config-from", dest="config_from", help="model giving config.json and the key layout")
    parser.add_argument("--tokenizer-from", dest="tokenizer_from", help="model giving the tokenizer files")
    parser.add_argument("--key-map", dest="key_map", action="append", metavar="INDEX:FROM=TO[,FROM=TO]",
                        help="prefix renames of model INDEX into the shared backbone, e.g. "
                             "'0:model.language_model.=model.'; repeat per model ('base:' for the base)")
    parser.add_argument("--attach", nargs="+", help="other models whose components outside their key map "
                                                    "(towers, projectors) are copied into the output too")
    parser.add_argument("--unmatched", choices=UNMATCHED_POLICIES, help="keys that meet nothing: error or report")
    parser.add_argument("--shape-policy", dest="shape_policy", choices=SHAPE_POLICIES,
                        help="shape mismatches: error, copy the source tensor, or merge common_rows")
    parser.add_argument("--density", type=float, help="fraction of each task vector TIES keeps (default 0.5)")
    parser.add_argument("--max-shard-size", dest="max_shard_size", help="output shard size, e.g. 2GB")
    parser.add_argument("--overwrite", action="store_true", default=None, help="replace an existing output folder")


def load_yaml_spec(path: str | Path) -> dict:
    """The MergeSpec fields of a YAML file; unknown keys are an error naming the key."""


    path = Path(path)
    values = read_yaml_mapping(path, "merge config", hint="see configs/merge/")
    unknown = sorted(set(values) - SPEC_FIELDS)
    if unknown:

        close = difflib.get_close_matches(unknown[0], sorted(SPEC_FIELDS), n=1)
        hint = f"did you mean '{close[0]}'?" if close else "see `bidirlm merge --help` for the keys"
        raise BidirLMError(f"merge config '{path}' has unknown key '{unknown[0]}'; {hint}")
    return values


def _key_maps(items: list[str], num_models: int, values: dict) -> None:
    key_maps = list(values.get("key_maps") or [None] * num_models)
    for item in items:
        index, _, mapping = item.partition(":")
        if not mapping:
            raise BidirLMError(f"--key-map '{item}' is not of the form INDEX:FROM=TO")
        if index == "base":
            values["base_key_map"] = mapping
        elif index.isdigit() and int(index) < num_models:
            key_maps[int(index)] = mapping
        else:
            raise BidirLMError(f"--key-map index '{index}' is not a model index below {num_models} or 'base'")
    values["key_maps"] = key_maps


def spec_from_args(args: argparse.Namespace) -> MergeSpec:
    values = load_yaml_spec(args.config) if args.config else {}
    for name in SPEC_FIELDS:
        given = getattr(args, name, None)
        if given is not None:
            values[name] = given
    for required in ("models", "weights", "output"):
        if not values.get(required):
            raise BidirLMError(f"merge needs --{required} (or '{required}:' in --config)")
    if args.key_map:
        _key_maps(args.key_map, len(values["models"]), values)
    return MergeSpec(**values)


def report_paths(spec: MergeSpec) -> None:
    """Print every path the merge reads and writes, resolved (an asset name shows its cached folder)."""


    for i, (model, weight) in enumerate(zip(spec.models, spec.weights)):
        print(f"model {i}: {model} -> {resolve_model_path(model).resolve()} (weight {weight})")
    if spec.base:
        print(f"base: {spec.base} -> {resolve_model_path(spec.base).resolve()}")
    print(f"output: {Path(spec.output).expanduser().resolve()}", flush=True)


def main(args: argparse.Namespace) -> int:
    spec = spec_from_args(args)
    report_paths(spec)
    report = merge(spec)
    print(report.summary())
    return 0
