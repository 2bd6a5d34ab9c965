"""Key maps and key matching: which tensor of each model meets which tensor of the output.

A ``KeyMap`` renames key prefixes of one model into a shared backbone namespace, e.g. a
vision-language model's ``model.language_model.`` onto a text model's ``model.``. Keys outside
a model's map are not part of the backbone: the output source's are copied unchanged (vision
towers, projectors), the other models' are ignored. ``match_keys`` lines the models up, reports
keys that matched nothing, handles tied embeddings, and checks shapes.

>>> KeyMap.parse("model.language_model.=model.").canonical("model.language_model.norm.weight")
'model.norm.weight'
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.models.merging.safetensors_io import FLOAT_DTYPES, Checkpoint

LM_HEAD = "lm_head.weight"
SHAPE_POLICIES = ("error", "copy", "common_rows")
UNMATCHED_POLICIES = ("error", "report")


@dataclass
class KeyMap:
    """Prefix renames (``from -> to``); ``None`` prefixes means every key, unchanged.

    ``components`` (keys outside the map, when this model is the source or is attached): ``None`` keeps
    every one under its own name; a mapping keeps only the keys under its prefixes, renamed (longest
    prefix first), and leaves the rest out (``KeyReport.left_out``), e.g. an omni source's towers.
    """

    prefixes: dict[str, str] | None = None
    components: dict[str, str] | None = None

    @classmethod
    def parse(cls, spec: str | dict[str, str] | KeyMap | None) -> KeyMap:
        """From ``{"model.language_model.": "model."}`` or ``"model.language_model.=model.,lm_head.=lm_head."``."""
        if spec is None or isinstance(spec, KeyMap):
            return spec or cls()
        if isinstance(spec, str):
            pairs = {}
            for item in filter(None, (s.strip() for s in spec.split(","))):
                if "=" not in item:
                    raise BidirLMError(f"key map entry '{item}' is not of the form FROM_PREFIX=TO_PREFIX")
                source, target = item.split("=", 1)
                pairs[source] = target
            spec = pairs
        if not isinstance(spec, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in spec.items()):
            raise BidirLMError(f"key map {spec!r} is not a mapping of key prefixes to key prefixes")
        return cls(dict(spec) if spec else None)

    def canonical(self, key: str) -> str | None:
        """The key in the shared namespace, or None when the key lies outside this map."""
        if self.prefixes is None:
            return key
        return _renamed(self.prefixes, key)

    def component(self, key: str) -> str | None:
        """The output name of a key outside the map, or None when it is left out."""
        if self.components is None:
            return key
        return _renamed(self.components, key)


def _renamed(prefixes: dict[str, str], key: str) -> str | None:
    for source in sorted(prefixes, key=len, reverse=True):
        if key.startswith(source):
            return prefixes[source] + key[len(source):]
    return None


@dataclass
class Entry:
    """One output tensor: merged from ``keys`` (one per model, in model order) or copied from the source."""

    name: str
    shape: tuple[int, ...]
    action: str                      # "merge" | "copy"
    keys: list[str | None]           # per checkpoint (models then base); None where not used
    common_rows: int | None = None   # merge only these leading rows, copy the rest from the source


@dataclass
class KeyReport:
    merged: int = 0
    copied_components: list[str] = field(default_factory=list)   # outside the source's map
    unmatched: list[str] = field(default_factory=list)            # "model: key" that met nothing
    shape_policy_applied: list[str] = field(default_factory=list)
    aliased: list[str] = field(default_factory=list)              # tied lm_head read from embeddings
    left_out: list[str] = field(default_factory=list)             # "model: key" outside the map and its components


class _Table(dict):
    """canonical key -> stored key; ``aliases`` holds the (canonical, stored) pairs that are tied aliases."""

    aliases: set


def _canonical_keys(ckpt: Checkpoint, key_map: KeyMap) -> _Table:
    """canonical key -> stored key, with a tied model's absent lm_head aliased to its embeddings."""
    table = _Table()
    table.aliases = set()
    for key in ckpt.keys():
        canonical = key_map.canonical(key)
        if canonical is not None:
            table[canonical] = key
    embed = ckpt.embedding_key()
    if LM_HEAD not in ckpt.tensors and ckpt.ties_embeddings and embed is not None:
        canonical = key_map.canonical(LM_HEAD)
        if canonical is not None and canonical not in table:
            table[canonical] = embed
            table.aliases.add((canonical, embed))
    return table


def match_keys(ckpts: list[Checkpoint], key_maps: list[KeyMap], source: int, *, unmatched: str = "error",
               shape_policy: str = "error", attach: list[int] | None = None) -> tuple[list[Entry], KeyReport]:
    """Plan the output tensors in the source's key order; raise a one-line error on mismatches.

    ``attach``: other checkpoints whose components (keys outside their map: towers, projectors) are
    copied into the output too (renamed by their map's ``components``), after the source's tensors; a
    name clash is an error.
    """
    if unmatched not in UNMATCHED_POLICIES:
        raise BidirLMError(f"unmatched policy '{unmatched}' is not one of {list(UNMATCHED_POLICIES)}")
    if shape_policy not in SHAPE_POLICIES:
        raise BidirLMError(f"shape policy '{shape_policy}' is not one of {list(SHAPE_POLICIES)}")
    tables = [_canonical_keys(c, m) for c, m in zip(ckpts, key_maps)]
    src, src_map = ckpts[source], key_maps[source]
    report = KeyReport()
    missing: list[str] = []
    entries: list[Entry] = []
    src_canonical = set()
    for key in src.keys():
        info = src.tensors[key]
        canonical = src_map.canonical(key)
        if canonical is None:
            name = src_map.component(key)
            if name is None:
                report.left_out.append(f"{src.name}: {key}")
                continue
            report.copied_components.append(key)
            entries.append(Entry(name, info.shape, "copy", _only(len(ckpts), source, key)))
            continue
        src_canonical.add(canonical)
        lacking = [i for i, table in enumerate(tables) if canonical not in table]
        if lacking:
            missing += [f"tensor '{key}' of {src.name} has no counterpart in {ckpts[i].name}" for i in lacking]
            entries.append(Entry(key, info.shape, "copy", _only(len(ckpts), source, key)))
            continue
        keys = [table[canonical] for table in tables]
        for ckpt, table, stored in zip(ckpts, tables, keys):
            if (canonical, stored) in table.aliases:
                report.aliased.append(f"{ckpt.name}: {LM_HEAD} read from tied '{stored}'")
        entries.append(_shaped_entry(key, keys, ckpts, source, shape_policy, report))
    # keys of the other models that the source never asked for
    for i, table in enumerate(tables):
        if i == source:
            continue
        for canonical, stored in table.items():
            if canonical in src_canonical:
                continue
            if (canonical, stored) in table.aliases:
                continue  # a tied alias nobody needs
            if canonical == src_map.canonical(LM_HEAD) and LM_HEAD not in src.tensors and src.ties_embeddings:
                continue  # the output ties its output layer to the (merged) embeddings
            missing.append(f"tensor '{stored}' of {ckpts[i].name} has no counterpart in {src.name}")
    _attach(ckpts, key_maps, source, attach or [], entries, report)
    if missing:
        if unmatched == "error":
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise BidirLMError(f"{missing[0]}{more}; the models' keys differ: declare key maps, "
                               f"or pass unmatched='report' to copy unmatched source tensors and skip the rest")
        report.unmatched = missing
    report.merged = sum(e.action == "merge" for e in entries)
    return entries, report


def _attach(ckpts: list[Checkpoint], key_maps: list[KeyMap], source: int, attach: list[int], entries: list[Entry],
            report: KeyReport) -> None:
    """Append the attached models' components (keys outside their map, renamed by ``components``)."""
    taken = {e.name for e in entries}
    for i in attach:
        if i == source or key_maps[i].prefixes is None:
            raise BidirLMError(f"attach: model {ckpts[i].name} must be another model with a key map "
                               f"(its keys outside the map are the components to attach)")
        for key in ckpts[i].keys():
            if key_maps[i].canonical(key) is not None:
                continue
            name = key_maps[i].component(key)
            if name is None:
                report.left_out.append(f"{ckpts[i].name}: {key}")
                continue
            if name in taken:
                raise BidirLMError(f"attached component '{key}' of {ckpts[i].name} clashes with a tensor of the "
                                   f"same name already in the output")
            taken.add(name)
            keys: list[str | None] = [None] * len(ckpts)
            keys[i] = key
            entries.append(Entry(name, ckpts[i].tensors[key].shape, "copy", keys))
            report.copied_components.append(f"{key} (from {ckpts[i].name})")


def _only(count: int, index: int, key: str) -> list[str | None]:
    keys: list[str | None] = [None] * count
    keys[index] = key
    return keys


def _shaped_entry(name: str, keys: list[str], ckpts: list[Checkpoint], source: int, shape_policy: str,
                  report: KeyReport) -> Entry:
    infos = [c.tensors[k] for c, k in zip(ckpts, keys)]
    src_info = infos[source]
    if any(info.dtype not in FLOAT_DTYPES for info in infos):
        return Entry(name, src_info.shape, "copy", _only(len(ckpts), source, name))  # integer buffers
    shapes = [info.shape for info in infos]
    if all(shape == src_info.shape for shape in shapes):
        return Entry(name, src_info.shape, "merge", keys)
    other = next(i for i, shape in enumerate(shapes) if shape != src_info.shape)
    renamed = f" (as '{keys[other]}')" if keys[other] != name else ""
    detail = (f"tensor '{name}' has shape {list(src_info.shape)} in {ckpts[source].name} but "
              f"{list(shapes[other])} in {ckpts[other].name}{renamed}")
    if shape_policy == "copy":
        report.shape_policy_applied.append(f"{name}: copied from the source ({detail})")
        return Entry(name, src_info.shape, "copy", _only(len(ckpts), source, name))
    if shape_policy == "common_rows" and all(len(s) == len(src_info.shape) and s[1:] == src_info.shape[1:]
                                             for s in shapes):
        common = min(s[0] for s in shapes)
        report.shape_policy_applied.append(f"{name}: merged the first {common} rows, the rest from the source")
        return Entry(name, src_info.shape, "merge", keys, common_rows=common)
    raise BidirLMError(f"{detail}; shapes must match (or set shape_policy copy|common_rows)")
