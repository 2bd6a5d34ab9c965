"""Rows kept, and labels derived from several columns, for labelled sources (``TaskSource.filters``,
``label_fields`` / ``label_reduce``).

* ``filters: {column: condition}`` keeps a row when every condition holds: a value (the column equals it), a list
  (the column is one of them) or ``{length: N}`` (the column is a list of N items). MathShepherd's 3-step
  solutions: ``{labels: {length: 3}}``.
* ``label_fields: [column, ...]`` derives the label from those columns' values (a list counts item by item;
  booleans and ``yes`` / ``no`` / ``true`` / ``false`` are 1 / 0, numeric strings their number) by
  ``label_reduce``: ``mean`` (a regression target: Seahorse's six ratings) or ``all`` (class ``"1"`` when every
  value is true, else ``"0"``: MathShepherd's "every step correct").

>>> derived_label({"a": 1, "b": "No"}, ["a", "b"], "mean", "row 0")
0.5
>>> derived_label({"steps": [True, True, False]}, ["steps"], "all", "row 0")
'0'
>>> passes({"steps": [True, False, True], "lang": "en"}, {"steps": {"length": 3}, "lang": ["en", "de"]}, "row 0")
True
"""

from __future__ import annotations

import difflib
import math

from bidirlm_pl.core.errors import BidirLMError

REDUCES = {"mean": ("regression",), "all": ("sequence", "pair")}  # label_reduce -> the tasks it labels
TRUE, FALSE = {"yes", "true"}, {"no", "false"}


def shown_columns(columns) -> str:
    shown = str(sorted(columns))
    return shown if len(shown) < 70 else shown[:66] + " ..."


def check_keys(value: dict, known: list[str]) -> None:
    """One line for a key of a ``source:`` block that is not a :class:`TaskSource` field (the closest one named)."""
    for key in value:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean '{close[0]}'?" if close else "see the source table of docs/finetune.md"
            raise BidirLMError(f"source key '{key}' is unknown ({hint})")


def check_derivation(source, task: str, columnless: bool) -> None:
    """One line for ``test_configs``, filters or derived labels that cannot apply to a source (a
    :class:`~bidirlm_pl.data.task_readers.TaskSource`; ``columnless``: a kind without columns) for ``task``."""
    configs = source.test_configs
    if configs is not None:
        if source.kind != "hf":
            raise BidirLMError(f"test_configs reads dataset configurations; source kind '{source.kind}' has none")
        if not configs or len(set(configs)) != len(configs) or not all(isinstance(c, str) for c in configs):
            raise BidirLMError(f"test_configs {configs!r} must be one or more distinct configuration names")
        if (source.splits or {}).get("test", "test") is None:
            raise BidirLMError("test_configs names the test sets; splits.test cannot be null (carved from train)")
    if (source.filters or source.label_fields is not None) and columnless:
        raise BidirLMError(f"filters and label_fields read columns; source kind '{source.kind}' has none")
    for column, condition in source.filters.items():
        if isinstance(condition, dict) and (set(condition) != {"length"} or not isinstance(condition["length"], int)):
            raise BidirLMError(f"filters.{column}: {condition!r} is not a value, a list of values or {{length: N}}")
    if source.label_reduce not in REDUCES:
        raise BidirLMError(f"label_reduce '{source.label_reduce}' is not one of {list(REDUCES)}")
    fields = source.label_fields
    if fields is None:
        return
    if not fields or not all(isinstance(c, str) for c in fields):
        raise BidirLMError(f"label_fields {fields!r} must name one or more columns")
    if "label" in source.fields:
        raise BidirLMError("the label comes from fields.label or from label_fields, not both")
    if task not in REDUCES[source.label_reduce]:
        raise BidirLMError(f"label_reduce '{source.label_reduce}' labels {' or '.join(REDUCES[source.label_reduce])} "
                           f"tasks, not {task}")


def missing_column(where: str, column: str, option: str, present) -> BidirLMError:
    """``no field 'grammar' (label_fields); it has [...]``: the column, the option naming it, the columns there."""
    return BidirLMError(f"{where}: no field '{column}' ({option}); it has {shown_columns(present)}")


def passes(record: dict, filters: dict, where: str) -> bool:
    """Whether a row meets every ``filters`` condition (module docstring)."""
    for column, condition in filters.items():
        if column not in record:
            raise missing_column(where, column, f"filters.{column}", record)
        value = record[column]
        if isinstance(condition, dict):
            if not isinstance(value, (list, tuple)) or len(value) != condition["length"]:
                return False
        elif isinstance(condition, list):
            if value not in condition:
                return False
        elif value != condition:
            return False
    return True


def _number(value, where: str, column: str) -> float:
    if isinstance(value, (bool, int, float)) and not (isinstance(value, float) and math.isnan(value)):
        return float(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in TRUE or text in FALSE:
            return float(text in TRUE)
        try:
            return float(text)
        except ValueError:
            pass
    raise BidirLMError(f"{where}: label_fields column '{column}' holds {str(value)[:30]!r}; expected a number, a "
                       "boolean or yes/no")


def derived_label(record: dict, label_fields: list[str], reduce: str, where: str) -> float | str:
    """The label of a row from its ``label_fields`` columns (module docstring)."""
    values = []
    for column in label_fields:
        if column not in record:
            raise missing_column(where, column, "label_fields", record)
        value = record[column]
        values += [_number(v, where, column) for v in (value if isinstance(value, (list, tuple)) else [value])]
    if not values:
        raise BidirLMError(f"{where}: label_fields {label_fields} hold no values")
    if reduce == "mean":
        return sum(values) / len(values)
    if any(v not in (0.0, 1.0) for v in values):
        raise BidirLMError(f"{where}: label_reduce 'all' needs true/false values; label_fields hold {values[:6]}")
    return "1" if all(values) else "0"
