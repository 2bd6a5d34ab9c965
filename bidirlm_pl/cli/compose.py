"""``bidirlm compose --config configs/omni/<name>.yaml [--print-plan]``: the Omni composition, written as one folder.

1. The text backbones of the sources are mapped into one namespace (each source's ``layout``, see
   :mod:`bidirlm_pl.models.omni.layouts`, or an explicit ``key_map``) and merged linearly (equal thirds by
   default) with :func:`bidirlm_pl.models.merging.engine.merge`.
2. The towers (Qwen3-VL's vision tower, merger and DeepStack mergers; Qwen3-ASR's audio tower and projector)
   are copied unchanged, renamed onto transformers' names (``model.visual.``, ``model.audio_tower.``,
   ``model.multi_modal_projector.``) whichever layout they came in.
3. Every other source tensor is listed with the reason it is left out (the causal LMs' output layers);
   a tensor without a declared reason is an error.
4. ``omni_config.json`` records the tower configs (as transformers' classes read them), the placeholder
   token ids, the position scheme (interleaved MRoPE, see :mod:`bidirlm_pl.models.omni.positions`) and
   what came from where; each source's processor is saved beside (``vision_processor/``, ``audio_processor/``).

``--print-plan`` reads only configs and safetensors headers and prints the merged groups, attached towers,
left-out tensors and positions, writing nothing. The folder is staged and renamed into place when complete.
Load it with :class:`bidirlm_pl.models.omni.model.OmniEncoder`.

    output: runs/omni-tiny/composed
    sources:
      text:   {model: tiny-omni-text, layout: qwen3}
      vision: {model: tiny-qwen3-vl, layout: qwen3-vl}
      audio:  {model: tiny-qwen3-asr-original, layout: qwen3-asr-original}
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
from bidirlm_pl.models.merging.engine import MergeSpec, merge, plan
from bidirlm_pl.models.merging.keymap import Entry, KeyMap
from bidirlm_pl.models.merging.safetensors_io import Checkpoint
from bidirlm_pl.models.omni.inputs import OMNI_CONFIG, TOKENS
from bidirlm_pl.models.omni.layouts import (
    TOWER_PREFIXES,
    Layout,
    account,
    check_prefixes,
    check_tower_targets,
    resolve_layout,
    source_config,
    text_rope,
)

ROLES = ("text", "vision", "audio")
PROCESSOR_DIRS = {"vision": "vision_processor", "audio": "audio_processor"}
PROCESSOR_FILE = "preprocessor_config.json"  # Qwen3-VL's image processor, Qwen3-ASR's feature extractor
CONFIG_IDS = {"vision": {"image_token_id": "<|image_pad|>", "vision_start_token_id": "<|vision_start|>",
                         "vision_end_token_id": "<|vision_end|>"},
              "audio": {"audio_token_id": "<|audio_pad|>"}}
ROLE_TOKENS = {"vision": ("vision_start", "image", "vision_end"), "audio": ("audio_start", "audio", "audio_end")}


@dataclass
class OmniSource:
    """One source: its model, merge weight and layout (a preset of :data:`LAYOUTS`, or explicit prefixes).

    After :meth:`OmniSpec.load`, ``key_map``, ``towers`` (source prefix -> composed prefix) and ``unused``
    (prefix -> reason) hold the effective values, the layout's unless given.
    """

    model: str
    weight: float = 1.0
    layout: str | None = None
    key_map: dict[str, str] | None = None
    towers: list[str] | dict[str, str] | None = None
    unused: list[str] | dict[str, str] | None = None

    def resolve(self, role: str) -> Layout:
        return resolve_layout(role, self.layout, self.key_map, self.towers, self.unused)


@dataclass
class OmniSpec:
    output: str
    sources: dict[str, OmniSource]
    rope_from: str | None = None       # whose text model gives rope_theta; default: vision if present
    tokenizer_from: str = "text"      # whose tokenizer the folder gets: it must hold every placeholder token
    overwrite: bool = False

    @classmethod
    def load(cls, path: str | Path, output: str | None = None, overwrite: bool = False) -> OmniSpec:
        path = Path(path)
        raw = read_yaml_mapping(path, "compose config", hint="see configs/omni/")
        unknown = set(raw) - {"output", "sources", "rope_from", "tokenizer_from"}
        if unknown:
            raise BidirLMError(f"compose config '{path}' has unknown key '{min(unknown)}'; expected output, "
                               "sources, rope_from, tokenizer_from")
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
        out = output or raw.get("output")
        if not out:
            raise BidirLMError(f"compose config '{path}' has no 'output' (or pass --output)")
        spec = cls(output=str(out), sources=parsed, rope_from=raw.get("rope_from"),
                   tokenizer_from=raw.get("tokenizer_from", "text"), overwrite=overwrite)
        spec.check()
        return spec

    def check(self) -> dict[str, Layout]:
        """Validate roles, weights and layouts; fill each source's effective prefixes; return the layouts."""
        layouts = {}
        for role, source in self.sources.items():
            if source.weight < 0:
                raise BidirLMError(f"compose source '{role}' weight {source.weight} must be >= 0")
            layouts[role] = source.resolve(role)
            source.key_map, source.unused = layouts[role].backbone, layouts[role].unused
            source.towers = layouts[role].towers
        for key, value in (("rope_from", self.rope_from), ("tokenizer_from", self.tokenizer_from)):
            if value is not None and value not in self.sources:
                raise BidirLMError(f"compose {key} '{value}' is not one of the sources {sorted(self.sources)}")
        if sum(s.weight for s in self.sources.values()) <= 0:
            raise BidirLMError(f"compose weights {[s.weight for s in self.sources.values()]} sum to 0; give the "
                               "backbones positive weights")
        return layouts


@dataclass
class ComposePlan:
    """What a composition reads and writes, before any byte is written."""

    spec: OmniSpec
    roles: list[str]
    folders: dict[str, Path]
    layouts: dict[str, Layout]
    configs: dict[str, dict]
    merge: MergeSpec
    entries: list[Entry]
    towers: dict[str, dict[str, int]]                     # role -> source tower prefix -> tensors
    left_out: dict[str, dict[str, str]]                   # role -> key -> reason
    positions: dict
    placeholder_ids: dict[str, dict[str, int]] = field(default_factory=dict)

    def text(self) -> str:
        return _plan_text(self)


def _positions(configs: dict[str, dict], rope_from: str | None) -> dict:
    """The backbone's rotary: interleaved MRoPE with a vision source (its mrope_section), theta from rope_from."""
    ropes = {role: text_rope(config) for role, config in configs.items()}
    rope_from = rope_from or ("vision" if "vision" in ropes else "text")
    out = {"rope_from": rope_from, "rope_theta": ropes[rope_from]["rope_theta"],
           "source_rope_thetas": {role: rope["rope_theta"] for role, rope in ropes.items()}}
    if "vision" not in ropes:
        return {"scheme": "rope", **out}
    vision = ropes["vision"]
    if "mrope_section" not in vision or not vision.get("mrope_interleaved"):
        raise BidirLMError("the vision source's text model has no interleaved MRoPE (rope mrope_section + "
                           "mrope_interleaved), the scheme the omni encoder implements (Qwen3-VL's)")
    return {"scheme": "mrope_interleaved", **out, "mrope_section": vision["mrope_section"]}


def _placeholder_ids(roles: list[str], configs: dict[str, dict], tokenizer, name: str) -> dict[str, dict[str, int]]:
    """Each media source's placeholder ids, checked against the composed tokenizer (which must hold them all)."""
    vocab: dict[str, dict[str, int]] = {}
    for role in (r for r in roles if r != "text"):
        vocab[role] = {}
        for short in ROLE_TOKENS[role]:
            token = dict(TOKENS)[short]
            if tokenizer.convert_tokens_to_ids(token) in (None, tokenizer.unk_token_id):
                raise BidirLMError(f"the composed tokenizer (from '{name}') has no {token} for the {role} inputs; "
                                   "set tokenizer_from to a source whose tokenizer holds it (Qwen3-ASR's holds the "
                                   "audio and vision tokens)")
        for key, token in CONFIG_IDS[role].items():
            value = configs[role].get(key)
            if value is None:
                continue
            if tokenizer.convert_tokens_to_ids(token) != value:
                raise BidirLMError(f"source '{role}' uses token id {value} for {token} but the composed tokenizer "
                                   f"maps it to {tokenizer.convert_tokens_to_ids(token)}; compose sources of one "
                                   "tokenizer family")
            vocab[role][key] = int(value)
    return vocab


def _accounting(spec: OmniSpec, roles, layouts, ckpts, entries) -> tuple[dict, dict]:
    towers, left_out = {}, {}
    for i, role in enumerate(roles):
        keys = ckpts[i].keys()
        used = {e.keys[i] for e in entries if e.keys[i] is not None}
        left_out[role] = account(role, spec.sources[role].model, layouts[role], keys, used)
        if role != "text":
            prefixes = sorted(layouts[role].towers, key=len, reverse=True)
            attached = [e.keys[i] for e in entries if e.action == "copy" and e.keys[i] is not None]
            towers[role] = {p: 0 for p in layouts[role].towers}
            for key in attached:
                towers[role][next(p for p in prefixes if key.startswith(p))] += 1
    return towers, left_out


def build_plan(spec: OmniSpec) -> ComposePlan:
    """Resolve the sources, check their layouts and match their keys (headers only): nothing is written."""
    from transformers import AutoTokenizer

    layouts = spec.check()
    roles = [r for r in ROLES if r in spec.sources]
    folders = {r: resolve_model_path(spec.sources[r].model) for r in roles}
    for role in roles:
        ckpt = Checkpoint(folders[role])
        check_prefixes(role, spec.sources[role].model, layouts[role], ckpt.keys())
        ckpt.close()
        check_tower_targets(role, layouts[role])
        if role != "text" and layouts[role].processor == "copy" and not (folders[role] / PROCESSOR_FILE).is_file():
            raise BidirLMError(f"source '{role}' ({folders[role]}) has no {PROCESSOR_FILE}: its processor is needed "
                               "to encode its inputs")
    configs = {r: source_config(layouts[r], folders[r]) for r in roles}
    merge_spec = MergeSpec(
        models=[str(folders[r]) for r in roles], weights=[spec.sources[r].weight for r in roles],
        output=spec.output, overwrite=True, config_from="0", tokenizer_from=str(roles.index(spec.tokenizer_from)),
        key_maps=[KeyMap(layouts[r].backbone, components=layouts[r].towers) for r in roles],
        attach=[str(i) for i, r in enumerate(roles) if r != "text"], unmatched="error")
    _, ckpts, entries, _, _ = plan(merge_spec)
    try:
        towers, left_out = _accounting(spec, roles, layouts, ckpts, entries)
    finally:
        for ckpt in ckpts:
            ckpt.close()
    tokenizer = AutoTokenizer.from_pretrained(folders[spec.tokenizer_from])
    return ComposePlan(spec=spec, roles=roles, folders=folders, layouts=layouts, configs=configs, merge=merge_spec,
                       entries=entries, towers=towers, left_out=left_out,
                       positions=_positions(configs, spec.rope_from),
                       placeholder_ids=_placeholder_ids(roles, configs, tokenizer, spec.tokenizer_from))


def _set_rope_theta(staging: Path, theta: float) -> None:
    """The folder's text config gets the composed rotary base, so AutoModel embeds text as the encoder does."""
    path = staging / "config.json"
    config = json.loads(path.read_text())
    config["rope_parameters"] = {**(config.get("rope_parameters") or {"rope_type": "default"}), "rope_theta": theta}
    if "rope_theta" in config:
        config["rope_theta"] = theta
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _save_processor(role: str, layout: Layout, folder: Path, target: Path) -> None:
    target.mkdir()
    if layout.processor == "qwen3_asr":  # what transformers' converter writes for the original repos
        from transformers import Qwen3ASRFeatureExtractor

        Qwen3ASRFeatureExtractor().save_pretrained(target)
    else:
        shutil.copy2(folder / PROCESSOR_FILE, target / PROCESSOR_FILE)


def _record(plan_: ComposePlan, merged_tensors: int) -> dict:
    spec, roles = plan_.spec, plan_.roles
    total = sum(spec.sources[r].weight for r in roles)
    record = {"format": "bidirlm-omni", "version": 2, "modalities": roles, "positions": plan_.positions,
              "provenance": {
                  "backbone": {"method": "linear", "weights": {r: spec.sources[r].weight / total for r in roles},
                               "sources": {r: str(plan_.folders[r]) for r in roles},
                               "layouts": {r: spec.sources[r].layout for r in roles},
                               "key_maps": {r: plan_.layouts[r].backbone for r in roles},
                               "merged_tensors": merged_tensors, "tokenizer_from": spec.tokenizer_from},
                  "towers": {r: {"source": str(plan_.folders[r]), "tensors": plan_.towers[r],
                                 "renames": plan_.layouts[r].towers} for r in plan_.towers},
                  "left_out": plan_.left_out}}
    for role in plan_.towers:
        record[role] = {"towers": TOWER_PREFIXES[role], **plan_.placeholder_ids[role],
                        "config": plan_.configs[role], "processor": PROCESSOR_DIRS[role]}
    return record


def _groups(names: list[str], prefix: str) -> list[str]:
    """``layers.{0..27} (308)``-style groups of the names under ``prefix``, in first-seen order."""
    groups: dict[str, list] = {}
    for name in names:
        parts = name[len(prefix):].split(".")
        numbered = len(parts) > 2 and parts[1].isdigit()
        entry = groups.setdefault(parts[0] + ("#" if numbered else ""), [0, set()])
        entry[0] += 1
        if numbered:
            entry[1].add(int(parts[1]))
    return [f"{head[:-1]}.{{{min(ids)}..{max(ids)}}} ({n})" if head.endswith("#") else f"{head} ({n})"
            for head, (n, ids) in groups.items()]


def _longest(key: str, prefixes) -> str:
    return max((p for p in prefixes if key.startswith(p)), key=len)


def _plan_text(p: ComposePlan) -> str:
    spec, total = p.spec, sum(p.spec.sources[r].weight for r in p.roles)
    lines = [f"compose plan for {spec.output} (nothing written)", "sources:"]
    for role in p.roles:
        source = spec.sources[role]
        lines.append(f"  {role:<6} {source.model}  layout {source.layout or 'custom'}  weight "
                     f"{source.weight / total:.3f}  backbone {', '.join(source.key_map)} -> model.")
    merged = [e.name for e in p.entries if e.action == "merge"]
    lines.append(f"merged backbone ({len(merged)} tensors, weighted average): "
                 + ", ".join("model." + g for g in _groups(merged, "model.")))
    kept = [e.name for e in p.entries if e.action == "copy" and e.keys[0] is not None]
    if kept:
        lines.append(f"copied from text ({len(kept)} tensors, not merged): {', '.join(kept[:8])}")
    lines.append("attached towers (frozen, copied unchanged):")
    for role, counts in p.towers.items():
        i = p.roles.index(role)
        for prefix, target in p.layouts[role].towers.items():
            names = [e.name for e in p.entries if e.action == "copy" and e.keys[i] is not None
                     and _longest(e.keys[i], p.layouts[role].towers) == prefix]
            lines.append(f"  {role:<6} {target} <- {prefix} ({counts[prefix]} tensors): "
                         + ", ".join(_groups(names, target)))
    left = [(role, key, why) for role, items in p.left_out.items() for key, why in items.items()]
    lines.append(f"left out ({len(left)} tensors):" + ("" if left else " none"))
    lines += [f"  {role:<6} {key}: {why}" for role, key, why in left]
    pos = p.positions
    thetas = ", ".join(f"{r} {t:.0f}" for r, t in pos["source_rope_thetas"].items())
    if pos["scheme"] == "mrope_interleaved":
        lines.append(f"positions: interleaved MRoPE, rope_theta {pos['rope_theta']:.0f} (from {pos['rope_from']}; "
                     f"sources: {thetas}), mrope_section {pos['mrope_section']}: images 3-D (t, h, w), text and "
                     "audio 1-D")
    else:
        lines.append(f"positions: 1-D RoPE, rope_theta {pos['rope_theta']:.0f} (from {pos['rope_from']}; {thetas})")
    lines.append(f"tokenizer: {spec.tokenizer_from}'s; config.json: text's, rope_theta set to {pos['rope_theta']:.0f}")
    return "\n".join(lines)


def compose(spec: OmniSpec, *, print_plan: bool = False) -> Path | None:
    plan_ = build_plan(spec)
    if print_plan:
        print(plan_.text())
        return None
    output = Path(spec.output).expanduser()
    with atomic_folder(output, overwrite=spec.overwrite) as staging:
        plan_.merge.output = str(staging)
        report = merge(plan_.merge)
        _set_rope_theta(staging, plan_.positions["rope_theta"])
        for role in plan_.towers:
            _save_processor(role, plan_.layouts[role], plan_.folders[role], staging / PROCESSOR_DIRS[role])
        (staging / OMNI_CONFIG).write_text(json.dumps(_record(plan_, report.merged_tensors), indent=2, default=str))
    print(report.summary())
    print(f"composed {', '.join(plan_.roles)} -> {output}")
    return output


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="compose YAML (see configs/omni/)")
    parser.add_argument("--output", help="override the YAML's output folder")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--print-plan", action="store_true",
                        help="print the merged groups, attached towers, left-out tensors and positions; write nothing")


def main(args) -> int:
    compose(OmniSpec.load(args.config, output=args.output, overwrite=args.overwrite), print_plan=args.print_plan)
    return 0
