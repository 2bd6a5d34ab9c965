"""``bidirlm compose --config configs/omni/<name>.yaml``: the Omni composition, written as one folder.

1. The text backbones of the sources are mapped into one namespace (each source's ``key_map``)
   and merged linearly (equal thirds by default) with :func:`bidirlm_pl.models.merging.engine.merge`.
2. The towers (every tensor under each source's ``towers`` prefixes: Qwen3-VL's vision tower and
   merger, Qwen3-ASR's audio tower and projector) are copied unchanged (``attach``).
3. ``omni_config.json`` records the tower configs, the placeholder token ids, and what came from
   where; each source's own processor is saved beside (``vision_processor/``, ``audio_processor/``).

The folder is staged and renamed into place when complete. Load it with
:class:`bidirlm_pl.models.omni.model.OmniEncoder`.

    output: runs/omni-tiny/composed
    sources:
      text:   {model: tiny-omni-text}
      vision: {model: tiny-qwen3-vl, key_map: {"model.language_model.": "model."}, towers: [model.visual.]}
      audio:  {model: tiny-qwen3-asr, key_map: {"model.language_model.": "model."},
               towers: [model.audio_tower., model.multi_modal_projector.]}
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from bidirlm_pl.backbone.load import resolve_model_path
from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.core.export import atomic_folder
from bidirlm_pl.core.yaml_files import read_yaml_mapping
from bidirlm_pl.models.merging.engine import MergeSpec, merge
from bidirlm_pl.models.merging.safetensors_io import Checkpoint
from bidirlm_pl.models.omni.inputs import OMNI_CONFIG

ROLES = ("text", "vision", "audio")
PROCESSOR_DIRS = {"vision": "vision_processor", "audio": "audio_processor"}
PROCESSOR_FILE = "preprocessor_config.json"  # Qwen3-VL's image processor, Qwen3-ASR's feature extractor
PLACEHOLDERS = {"vision": {"image_token_id": "<|image_pad|>", "vision_start_token_id": "<|vision_start|>",
                           "vision_end_token_id": "<|vision_end|>"},
                "audio": {"audio_token_id": "<|audio_pad|>"}}


@dataclass
class OmniSource:
    model: str
    weight: float = 1.0
    key_map: dict[str, str] = field(default_factory=lambda: {"model.": "model."})
    towers: list[str] = field(default_factory=list)


@dataclass
class OmniSpec:
    output: str
    sources: dict[str, OmniSource]
    overwrite: bool = False

    @classmethod
    def load(cls, path: str | Path, output: str | None = None, overwrite: bool = False) -> OmniSpec:


        path = Path(path)
        raw = read_yaml_mapping(path, "compose config", hint="see configs/omni/")
        unknown = set(raw) - {"output", "sources"}
        if unknown:
            raise BidirLMError(f"compose config '{path}' has unknown key '{min(unknown)}'; expected output, sources")
        sources = raw.get("sources") or {}
        bad = [r for r in sources if r not in ROLES]
        if bad or "text" not in sources or len(sources) < 2:
            raise BidirLMError(f"compose config '{path}' sources {sorted(sources)} must be 'text' plus 'vision' "
                               f"and/or 'audio' (roles {list(ROLES)})")
        parsed = {}
        for role, item in sources.items():
            try:
                parsed[role] = OmniSource(**item)
            except TypeError as err:
                raise BidirLMError(f"compose source '{role}': {err}") from err
            if role != "text" and not parsed[role].towers:
                raise BidirLMError(f"compose source '{role}' declares no 'towers' (key prefixes of its tower and "
                                   "projector, e.g. [model.visual.])")
            if parsed[role].weight < 0:
                raise BidirLMError(f"compose source '{role}' weight {parsed[role].weight} must be >= 0")
        out = output or raw.get("output")
        if not out:
            raise BidirLMError(f"compose config '{path}' has no 'output' (or pass --output)")
        return cls(output=str(out), sources=parsed, overwrite=overwrite)


def _keys(folder: Path) -> set[str]:

    return set(Checkpoint(folder).keys())


def check_towers(role: str, source: OmniSource, folder: Path) -> dict[str, int]:
    """Count each tower prefix's tensors; one-line error naming the source when a tower is missing."""
    keys = _keys(folder)
    counts = {prefix: sum(k.startswith(prefix) for k in keys) for prefix in source.towers}
    for prefix, n in counts.items():
        if n == 0:
            raise BidirLMError(f"source '{role}' ({source.model}) has no tensor under '{prefix}': its tower is "
                               f"missing (is it the right checkpoint? its keys start with "
                               f"{sorted({k.split('.')[0] + '.' + k.split('.')[1] for k in keys})[:6]})")
    return counts


def _placeholder_ids(role: str, config: dict, tokenizer) -> dict[str, int]:
    """The source's placeholder token ids, checked against the composed (text) tokenizer."""
    ids = {}
    for key, token in PLACEHOLDERS[role].items():
        value = config.get(key)
        if value is None:
            continue
        if tokenizer.convert_tokens_to_ids(token) != value:
            raise BidirLMError(f"source '{role}' uses token id {value} for {token} but the text tokenizer maps it "
                               f"to {tokenizer.convert_tokens_to_ids(token)}; compose sources of one tokenizer family")
        ids[key] = int(value)
    return ids


def compose(spec: OmniSpec) -> Path:
    from transformers import AutoConfig, AutoTokenizer


    roles = [r for r in ROLES if r in spec.sources]
    folders = {r: resolve_model_path(spec.sources[r].model) for r in roles}
    towers = {r: check_towers(r, spec.sources[r], folders[r]) for r in roles if r != "text"}
    processors = {r: folders[r] / PROCESSOR_FILE for r in towers}
    for role, path in processors.items():
        if not path.is_file():
            raise BidirLMError(f"source '{role}' ({folders[role]}) has no {PROCESSOR_FILE}: its processor is needed "
                               "to encode its inputs")
    weights = [spec.sources[r].weight for r in roles]
    if sum(weights) <= 0:
        raise BidirLMError(f"compose weights {weights} sum to 0; give the backbones positive weights")
    output = Path(spec.output).expanduser()
    with atomic_folder(output, overwrite=spec.overwrite) as staging:
        report = merge(MergeSpec(
            models=[str(folders[r]) for r in roles], weights=weights, output=str(staging), overwrite=True,
            key_maps=[dict(spec.sources[r].key_map, **{"lm_head.": "lm_head."}) for r in roles],
            config_from="0", attach=[str(i) for i, r in enumerate(roles) if r != "text"], unmatched="report",
        ))
        tokenizer = AutoTokenizer.from_pretrained(staging)
        record = {"format": "bidirlm-omni", "version": 1, "modalities": roles, "provenance": {
            "backbone": {"method": "linear", "weights": {r: w / sum(weights) for r, w in zip(roles, weights)},
                         "sources": {r: str(folders[r]) for r in roles},
                         "key_maps": {r: spec.sources[r].key_map for r in roles},
                         "merged_tensors": report.merged_tensors},
            "towers": {r: {"source": str(folders[r]), "tensors": towers[r]} for r in towers}}}
        for role in towers:
            config = AutoConfig.from_pretrained(folders[role]).to_dict()
            record[role] = {"towers": spec.sources[role].towers, **_placeholder_ids(role, config, tokenizer),
                            "config": config, "processor": PROCESSOR_DIRS[role]}
            (staging / PROCESSOR_DIRS[role]).mkdir()
            shutil.copy2(processors[role], staging / PROCESSOR_DIRS[role] / PROCESSOR_FILE)
        (staging / OMNI_CONFIG).write_text(json.dumps(record, indent=2, default=str))
    print(report.summary())
    print(f"composed {', '.join(roles)} -> {output}")
    return output


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="compose YAML (see configs/omni/)")
    parser.add_argument("--output", help="override the YAML's output folder")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def main(args) -> int:
    compose(OmniSpec.load(args.config, output=args.output, overwrite=args.overwrite))
    return 0

