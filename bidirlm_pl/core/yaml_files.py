"""Reading the YAML files users write (recipes, merge, compare, compose and fit configs): one-line errors."""

from __future__ import annotations

from pathlib import Path

from bidirlm_pl.core.errors import BidirLMError


def read_yaml_mapping(path: str | Path, what: str, *, hint: str = "") -> dict:
    """The mapping in a YAML file (``{}`` for an empty file), or a one-line error naming the file and the fault.

    ``what`` names the file's role ("recipe", "merge config"...); ``hint`` says where examples live.
    """
    import yaml

    path = Path(path)
    where = f"{what} '{path}'"
    if not path.is_file():
        raise BidirLMError(f"{where} does not exist; expected a YAML file{f' ({hint})' if hint else ''}")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise BidirLMError(f"{where} is not UTF-8 text ({err.reason} at byte {err.start})") from err
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise BidirLMError(f"{where} is not valid YAML: {problem}{at}") from err
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise BidirLMError(f"{where} holds a {type(values).__name__}, not a mapping of keys to values")
    return values


def merge_mappings(base, override):
    """``override`` over ``base`` as repeated ``--config`` files combine: mappings merged key by key, any other
    value (lists included) replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        return {**base, **{k: merge_mappings(base.get(k), v) for k, v in override.items()}}
    return override
