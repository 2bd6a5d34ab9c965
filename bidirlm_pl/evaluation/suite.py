"""The evaluation suite of ``bidirlm compare``: tasks from ``configs/compare/*.yaml``, run on one model.

A suite file::

    max_length: 256          # tokens per text (every task; a task may set its own)
    batch_size: 8
    tasks:
      - {name: lee-perplexity, kind: perplexity}                 # built-in data for the kind
      - {name: polarity, kind: classification, data: polarity}   # a named built-in data set
      - {name: mine, kind: retrieval, path: my-pairs.jsonl}      # a local JSONL file

Kinds and record shapes: :mod:`bidirlm_pl.evaluation.task_data`. Generation tasks (perplexity,
continuation, multiple_choice) run causally (a UBMoE folder in its ``generate`` mode); embedding tasks
(sts, retrieval, classification, clustering, mteb) embed with the folder's
:class:`~bidirlm_pl.models.encoder.Encoder` (:func:`model_embedder`): the pooling, normalisation and
prompts it was exported with, queries with the query prompt and documents with the document prompt as
``SentenceTransformer(folder)`` gives them, texts cut at the task's ``max_length`` or the folder's own,
whichever is shorter; a plain or UBMoE folder mean-pools without prompt. The attention is the model's
embedding attention (``bidirectional`` by default, ``causal`` for a base-model baseline; a UBMoE folder
in its ``embed`` mode when bidirectional); dependence reports DP-before / main / after of the attention
without a causal mask, the model run with its embedding attention.

The fine-tuning axis: ``frozen_token`` trains a logistic-regression head on the frozen final hidden state of
each word's first sub-token (the finetune stage's sub-word rule) on a token task's train split and scores its
test split (word accuracy; entity F1 for BIO tags), embedding with the model's embedding attention;
``finetune`` fine-tunes a fresh head per model through the user's own path, ``python -m bidirlm_pl.cli.main
fit --config <the task's finetune config>`` in a subprocess (the evaluation layer does not import stages), one
run per learning rate of the grid, the same seed and budget for every model, and reports the test metric of
the run with the best validation score (read from the export's ``bidirlm_task.json``).
"""

from __future__ import annotations

import difflib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from bidirlm_pl.backbone import attention as attn
from bidirlm_pl.backbone.load import decoder_of, resolve_model_path
from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.core.yaml_files import merge_mappings, read_yaml_mapping
from bidirlm_pl.data.task_readers import TaskSource, check_source
from bidirlm_pl.data.tasks import IGNORE, LabelledTaskData, align_word_labels
from bidirlm_pl.evaluation import metrics
from bidirlm_pl.evaluation.dependence import dependence
from bidirlm_pl.evaluation.embedding import Embedder, check_dims, model_embedder, spearman
from bidirlm_pl.evaluation.generation import causal_perplexity, continuation, multiple_choice_accuracy
from bidirlm_pl.evaluation.harness import run_lm_eval, run_mteb
from bidirlm_pl.evaluation.task_data import (
    FIELDS,
    builtin,
    builtin_names_for,
    builtin_names_shown,
    read_jsonl,
)
from bidirlm_pl.evaluation.task_metrics import entity_counts, f1_from_counts, is_bio
from bidirlm_pl.moe.convert import is_ubmoe, ubmoe_record
from bidirlm_pl.moe.modes import load_any, mode, split_routing

GENERATION_KINDS = ("perplexity", "continuation", "multiple_choice", "lm_eval")
EMBEDDING_KINDS = ("sts", "retrieval", "classification", "clustering", "mteb")
HARNESS_KINDS = ("mteb", "lm_eval")  # run by the libraries themselves (bidirlm_pl.evaluation.harness)
FINETUNE_KINDS = ("finetune", "frozen_token")  # the fine-tuning axis: labelled tasks, a head per model
KINDS = GENERATION_KINDS + EMBEDDING_KINDS + ("dependence",) + FINETUNE_KINDS
MAIN_METRIC = {"perplexity": "perplexity", "multiple_choice": "accuracy", "sts": "spearman",
               "retrieval": "ndcg@10", "classification": "accuracy", "clustering": "v_measure",
               "dependence": "dp_after", "mteb": "mean", "lm_eval": "mean", "finetune": "metric",
               "frozen_token": "metric"}
# each kind of the fine-tuning axis and the TaskSpec fields only it takes
OWN_FIELDS = {"finetune": ("config", "steps", "val_every", "learning_rates", "seed", "args"),
              "frozen_token": ("source", "test_limit")}
FINETUNE_STAGE = "bidirlm_pl.stages.finetune.FinetuneStage"
ATTENTIONS = ("bidirectional", "causal")
DOMAINS = ("in", "out")
DEFAULT_PROMPTS = ["The prime minister said on Tuesday that"]


@dataclass
class TaskSpec:
    name: str
    kind: str
    data: str | None = None           # a built-in data set (task_data.builtin)
    path: str | None = None           # or a local JSONL file
    limit: int | None = None          # first N records only
    max_length: int | None = None     # tokens per text; default: the suite's
    prompts: list[str] | None = None  # continuation only
    max_new_tokens: int = 16          # continuation only
    tasks: list[str] | None = None    # mteb / lm_eval: the library's task names (mteb: local:NAME too)
    benchmark: str | None = None      # mteb only: a benchmark by name, e.g. "MTEB(eng, v2)"
    num_fewshot: int | None = None    # lm_eval only
    include_path: str | None = None   # lm_eval only: a folder of local task YAMLs
    domain: str | None = None         # perplexity only: "in" or "out" of the training data's domain
    source: dict | None = None        # frozen_token: a labelled token source (data.task_readers.TaskSource)
    test_limit: int | None = None     # frozen_token: test sentences (a seeded sample); `limit` caps train's
    config: str | list[str] | None = None  # finetune: the finetune stage YAML (a list: base, then fragments)
    steps: int | None = None          # finetune: optimizer steps of every run (default: the config's max_steps)
    val_every: int | None = None      # finetune: validation interval in steps (default: the config's)
    learning_rates: list[float] | None = None  # finetune: the grid, best by validation (default: the config's lr)
    seed: int | None = None           # finetune: seed_everything of every run (default 0)
    args: list[str] | None = None     # finetune: further `bidirlm fit` overrides, e.g. --data.init_args.batch_size=32

    def __post_init__(self):
        where = f"task '{self.name}'"
        if self.kind not in KINDS:
            raise BidirLMError(f"{where}: unknown kind '{self.kind}'; expected one of {', '.join(KINDS)}")
        own = OWN_FIELDS.get(self.kind, ())
        stray = [k for names in OWN_FIELDS.values() for k in names if k not in own and getattr(self, k) is not None]
        if stray:
            owners = " / ".join(kind for kind, names in OWN_FIELDS.items() if set(stray) & set(names))
            raise BidirLMError(f"{where}: {stray} belong to kind {owners}, not to kind '{self.kind}'")
        if self.kind in FINETUNE_KINDS:
            self._check_labelled(where)
            return
        if self.domain is not None and (self.kind != "perplexity" or self.domain not in DOMAINS):
            raise BidirLMError(f"{where}: domain '{self.domain}' is for perplexity tasks, one of {list(DOMAINS)}")
        harness_fields = {"tasks": self.tasks, "benchmark": self.benchmark, "num_fewshot": self.num_fewshot,
                          "include_path": self.include_path}
        if self.kind in HARNESS_KINDS:
            self._check_harness(where)
            return
        given = sorted(k for k, v in harness_fields.items() if v is not None)
        if given:
            raise BidirLMError(f"{where}: {given} belong to kinds mteb / lm_eval, not to kind '{self.kind}'")
        if self.kind == "continuation":
            if self.data or self.path:
                raise BidirLMError(f"{where}: a continuation task takes 'prompts', not data or path")
            self.prompts = list(self.prompts or DEFAULT_PROMPTS)
            return
        if self.prompts is not None:
            raise BidirLMError(f"{where}: 'prompts' belongs to continuation tasks, not to kind '{self.kind}'")
        if self.data and self.path:
            raise BidirLMError(f"{where}: give 'data' (built-in '{self.data}') or 'path' ('{self.path}'), not both")
        if self.data is None and self.path is None:
            self.data = builtin_names_for(self.kind)[0]
        if self.data and self.data not in builtin_names_for(self.kind):
            raise BidirLMError(f"{where}: built-in data '{self.data}' does not fit kind '{self.kind}'; "
                               f"expected {builtin_names_shown(self.kind)}, or a JSONL 'path'")
        if self.limit is not None and self.limit < 2:
            raise BidirLMError(f"{where}: limit {self.limit} must be at least 2")

    def _check_harness(self, where: str) -> None:
        if self.data or self.path or self.prompts is not None:
            raise BidirLMError(f"{where}: kind '{self.kind}' takes 'tasks' (the library's task names), "
                               "not data, path or prompts")
        if self.kind == "mteb":
            if bool(self.tasks) == bool(self.benchmark):
                raise BidirLMError(f"{where}: kind mteb takes 'tasks' (e.g. [STS12, local:lee-sts]) or "
                                   "'benchmark' (e.g. \"MTEB(eng, v2)\"), one of the two")
            if self.num_fewshot is not None or self.include_path is not None:
                raise BidirLMError(f"{where}: num_fewshot and include_path belong to kind lm_eval, not mteb")
        else:
            if not self.tasks or self.benchmark:
                raise BidirLMError(f"{where}: kind lm_eval takes 'tasks' (e.g. [mmlu]), not a benchmark")
            if self.include_path is not None and not Path(self.include_path).is_dir():
                raise BidirLMError(f"{where}: include_path '{self.include_path}' is not a folder of lm-eval "
                                   "task YAMLs")
        if self.limit is not None and self.limit < 1:
            raise BidirLMError(f"{where}: limit {self.limit} must be at least 1")

    def _check_labelled(self, where: str) -> None:
        """The fields of ``finetune`` and ``frozen_token`` tasks (files and sources checked, nothing loaded)."""
        harness = [k for k in ("tasks", "benchmark", "num_fewshot", "include_path", "prompts", "domain")
                   if getattr(self, k) is not None]
        if self.data is not None or self.path is not None or harness:
            given = sorted(k for k in ("data", "path", *harness) if getattr(self, k) is not None)
            takes = "'source' (a labelled token source)" if self.kind == "frozen_token" else "'config' (a finetune YAML)"
            raise BidirLMError(f"{where}: kind {self.kind} takes {takes}, not {given}")
        if self.kind == "frozen_token":
            if not isinstance(self.source, dict):
                raise BidirLMError(f"{where}: kind frozen_token needs 'source', a labelled token source such as "
                                   "{kind: turkish_pos} or {kind: conllu, path: FILE} (docs/finetune.md)")
            try:
                check_source(TaskSource(**self.source), "token")
            except TypeError as err:
                raise BidirLMError(f"{where}: source: {err}") from None
            except BidirLMError as err:
                raise BidirLMError(f"{where}: source: {err}") from None
            for name, value, least in (("limit", self.limit, 2), ("test_limit", self.test_limit, 1)):
                if value is not None and value < least:
                    raise BidirLMError(f"{where}: {name} {value} must be at least {least}")
            return
        self._check_finetune(where)

    def _check_finetune(self, where: str) -> None:
        if self.limit is not None or self.max_length is not None:
            raise BidirLMError(f"{where}: the finetune config decides the data (max_length, max_train_examples); "
                               "override it with args, e.g. --data.init_args.max_length=128, not limit / max_length")
        if not self.config:
            raise BidirLMError(f"{where}: kind finetune needs 'config', a finetune stage YAML "
                               "(e.g. configs/finetune/tiny-sequence.yaml; a list: base, then fragments)")
        paths = [self.config] if isinstance(self.config, str) else self.config
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise BidirLMError(f"{where}: config must be a YAML path or a list of them, not {str(self.config)[:60]!r}")
        for path in paths:
            if not Path(path).is_file():
                raise BidirLMError(f"{where}: config '{path}' does not exist; expected a finetune stage YAML")
        merged = merged_config(paths)
        model = merged.get("model") if isinstance(merged.get("model"), dict) else {}
        if model.get("class_path") != FINETUNE_STAGE:
            raise BidirLMError(f"{where}: config {paths} trains '{model.get('class_path')}', not the finetune stage "
                               f"({FINETUNE_STAGE})")
        trainer = merged.get("trainer") if isinstance(merged.get("trainer"), dict) else {}
        callbacks = [c for c in trainer.get("callbacks") or [] if isinstance(c, dict)]
        if not any(str(c.get("class_path", "")).endswith("ModelCheckpoint") and (c.get("init_args") or {}).get("monitor")
                   for c in callbacks):
            raise BidirLMError(f"{where}: config {paths} keeps no best checkpoint: add a ModelCheckpoint with a "
                               "monitor (e.g. val/metric), by which runs are compared")
        if not any(str(c.get("class_path", "")).endswith("HFExport") for c in callbacks):
            raise BidirLMError(f"{where}: config {paths} has no HFExport callback; its bidirlm_task.json holds the "
                               "test scores compare reads")
        for name in ("steps", "val_every", "seed"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or value < (0 if name == "seed" else 1)):
                raise BidirLMError(f"{where}: {name} {value!r} must be a whole number of at least "
                                   f"{0 if name == 'seed' else 1}")
        steps = self.steps or trainer.get("max_steps")
        every = self.val_every or trainer.get("val_check_interval")
        if isinstance(steps, int) and isinstance(every, int) and not isinstance(every, bool) and every > steps:
            raise BidirLMError(f"{where}: validation every {every} steps never runs in {steps} steps; "
                               "set val_every to at most steps")
        if self.learning_rates is not None:
            try:
                grid = [float(lr) for lr in self.learning_rates]
            except (TypeError, ValueError):
                raise BidirLMError(f"{where}: learning_rates must be a list of numbers, not "
                                   f"{str(self.learning_rates)[:60]}") from None
            if not grid or any(not lr > 0 for lr in grid) or len(set(grid)) != len(grid):
                raise BidirLMError(f"{where}: learning_rates {str(self.learning_rates)[:80]} must be distinct positive numbers")
            self.learning_rates = grid
        if self.args is not None and (not isinstance(self.args, list)
                                      or not all(isinstance(a, str) and a.startswith("--") for a in self.args)):
            raise BidirLMError(f"{where}: args must be a list of '--key=value' overrides, not {str(self.args)[:60]!r}")
        if self.seed is None:
            self.seed = 0

    def records(self) -> list[dict]:
        records = builtin(self.data) if self.data else read_jsonl(self.path, FIELDS[self.kind])
        return records[: self.limit] if self.limit else records

    @property
    def source_name(self) -> str:
        """What the report names as the task's data."""
        if self.kind in HARNESS_KINDS:
            return f"{self.kind}:{self.benchmark or ','.join(self.tasks)}"
        if self.kind == "finetune":
            return "finetune:" + ("+".join(self.config) if isinstance(self.config, list) else self.config)
        if self.kind == "frozen_token":
            return f"labelled:{TaskSource(**self.source).kind}:{TaskSource(**self.source).describe()}"
        return f"builtin:{self.data}" if self.data else str(self.path)


@dataclass
class Suite:
    tasks: list[TaskSpec]
    max_length: int = 256
    batch_size: int = 8
    name: str = "suite"
    dims: list[int] | None = None  # also score the embedding tasks at these sizes (first d dims, re-normalised)

    def __post_init__(self):
        self.dims = check_dims(self.dims, "compare config: dims")

    @property
    def embedding_tasks(self) -> list[TaskSpec]:
        return [t for t in self.tasks if t.kind in EMBEDDING_KINDS]

    @property
    def finetune_tasks(self) -> list[TaskSpec]:
        return [t for t in self.tasks if t.kind in FINETUNE_KINDS]


DEFAULT_SUITE = "default"


def load_suite(path: str | Path | None) -> Suite:
    """A suite from a YAML file; ``None`` gives the default suite (``configs/compare/default.yaml``'s tasks)."""
    if path is None:
        raw = {"name": DEFAULT_SUITE, "tasks": default_tasks()}
    else:
        path = Path(path)
        raw = read_yaml_mapping(path, "compare config", hint="see configs/compare/")
        raw.setdefault("name", path.stem)
    allowed = {f.name for f in fields(Suite)}
    if set(raw) - allowed:
        raise BidirLMError(f"compare config: unknown keys {sorted(set(raw) - allowed)}; expected {sorted(allowed)}")
    task_keys = {f.name for f in fields(TaskSpec)}
    tasks = []
    for i, entry in enumerate(raw.get("tasks") or []):
        if not isinstance(entry, dict) or "name" not in entry or "kind" not in entry:
            raise BidirLMError(f"compare config: task {i} needs a 'name' and a 'kind', got {entry!r}")
        if set(entry) - task_keys:
            unknown = sorted(set(entry) - task_keys)
            near = difflib.get_close_matches(unknown[0], task_keys, n=1)
            hint = f"did you mean '{near[0]}'?" if near else "the task fields are listed in docs/evaluation.md"
            raise BidirLMError(f"compare config: task '{entry['name']}' has unknown keys {unknown}; {hint}")
        if entry.get("include_path") and path is not None and not Path(entry["include_path"]).is_absolute():
            entry = {**entry, "include_path": str((path.parent / entry["include_path"]).resolve())}
        if entry.get("config") and path is not None:
            configs = entry["config"]
            entry = {**entry, "config": [_suite_relative(c, path) for c in configs] if isinstance(configs, list)
                     else _suite_relative(configs, path)}
        tasks.append(TaskSpec(**entry))
    if not tasks:
        raise BidirLMError("compare config lists no tasks")
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise BidirLMError(f"compare config repeats a task name: {names}")
    return Suite(tasks=tasks, **{k: v for k, v in raw.items() if k not in ("tasks",)})


def merged_config(paths: list[str]) -> dict:
    """Config files merged in order as repeated ``--config`` merges them."""
    merged: dict = {}
    for path in paths:
        merged = merge_mappings(merged, read_yaml_mapping(path, "finetune config", hint="see configs/finetune/"))
    return merged


def config_learning_rate(task: TaskSpec) -> float | None:
    """The learning rate a finetune task's config trains with (``model.init_args.optimizer.init_args.lr``)."""
    merged = merged_config([task.config] if isinstance(task.config, str) else list(task.config))
    lr = merged
    for key in ("model", "init_args", "optimizer", "init_args", "lr"):
        lr = lr.get(key) if isinstance(lr, dict) else None
    try:
        return float(lr)
    except (TypeError, ValueError):
        return None


def _suite_relative(value, suite_path: Path):
    """A relative path of a suite: from the current folder, else from the nearest folder above the suite file that
    holds it (``configs/finetune/x.yaml`` in ``configs/compare/*.yaml`` works from any folder)."""
    if not isinstance(value, str) or Path(value).is_absolute() or Path(value).exists():
        return value
    for folder in Path(suite_path).resolve().parents:
        if (folder / value).exists():
            return str(folder / value)
    return value


def default_tasks() -> list[dict]:
    return [
        {"name": "lee-perplexity", "kind": "perplexity", "domain": "in"},
        {"name": "wiki-perplexity", "kind": "perplexity", "data": "wiki", "domain": "out"},
        {"name": "continuation", "kind": "continuation"},
        {"name": "capitals", "kind": "multiple_choice"},
        {"name": "lee-sts", "kind": "sts"},
        {"name": "newsgroup-retrieval", "kind": "retrieval"},
        {"name": "polarity", "kind": "classification", "data": "polarity"},
        {"name": "newsgroup-topics", "kind": "classification", "data": "newsgroups"},
        {"name": "newsgroup-clusters", "kind": "clustering"},
        {"name": "dependence", "kind": "dependence", "limit": 20},
    ]


@dataclass
class ModelSpec:
    path: str
    name: str
    attention: str = "bidirectional"  # embedding (and dependence) attention

    def __post_init__(self):
        if self.attention not in ATTENTIONS:
            raise BidirLMError(f"model '{self.name}': attention '{self.attention}'; expected one of {list(ATTENTIONS)}")


@dataclass
class ModelResult:
    name: str
    path: str
    attention: str
    results: dict[str, dict] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)  # files written beside the report (lm-eval's own)
    dims: dict[int, dict[str, dict]] = field(default_factory=dict)  # embedding size -> task -> metrics

    def main(self, task: TaskSpec, dim: int | None = None):
        results = self.results if dim is None else self.dims.get(dim, {})
        return results.get(task.name, {}).get(MAIN_METRIC.get(task.kind, ""))

    def mean_embedding_score(self, suite: Suite, dim: int | None = None) -> float | None:
        """The mean main score of the embedding tasks (at embedding size ``dim``: suite ``dims``)."""
        values = [self.main(t, dim) for t in suite.embedding_tasks]
        values = [v for v in values if v is not None]
        return float(np.mean(values)) if values else None

    def mean_finetune_score(self, suite: Suite) -> float | None:
        """The mean test metric of the fine-tuning axis (finetune and frozen_token tasks)."""
        values = [self.main(t) for t in suite.finetune_tasks]
        values = [v for v in values if v is not None]
        return float(np.mean(values)) if values else None


# ------------------------------------------------------------------ frozen_token: a linear head on frozen states

@dataclass
class TokenData:
    """A token task's train and test sentences (``words``, ``spaces``, ``tags``) and its label list."""

    train: list[dict]
    test: list[dict]
    labels: list[str]


@lru_cache(maxsize=8)
def _token_data(source_json: str, limit: int | None, test_limit: int | None) -> TokenData:
    data = LabelledTaskData(json.loads(source_json), task="token", seed=0, max_train_examples=limit,
                            max_eval_examples=test_limit)
    splits = data.read()  # the finetune stage's splits, samples and checks (one line for a bad example)
    return TokenData(train=splits["train"], test=splits["test"], labels=list(data.label_names))


def token_data(task: TaskSpec) -> TokenData:
    """The sentences of a ``frozen_token`` task, read once: the data layer's split of its source (the package's
    own, or carved by the seeded rule as the finetune stage carves it), train capped at ``limit`` and test at
    ``test_limit`` sentences (seeded samples)."""
    data = _token_data(json.dumps(task.source, sort_keys=True), task.limit, task.test_limit)
    if len({t for ex in data.train for t in ex["tags"]}) < 2:
        raise BidirLMError(f"task '{task.name}': the training sentences carry one tag only; a probe needs two or more")
    return data


@dataclass
class TokenFeatures:
    """Final hidden states: one row per labelled training token (``train_X``, ``train_y``) and one per scored test
    word at its first sub-token (``test_X``, ``test_y``; ``test_sizes`` words per test sentence, in order)."""

    train_X: np.ndarray
    train_y: np.ndarray
    test_X: np.ndarray
    test_y: np.ndarray
    test_sizes: list[int]


@torch.inference_mode()
def hidden_at(model, tokenizer, ids: list[list[int]], positions: list[list[int]], *, batch_size: int,
              bidirectional: bool) -> list[np.ndarray]:
    """Final hidden states (float32) of each sequence at its ``positions``; right-padded batches of similar
    lengths, attention as ``bidirectional`` says (per call, as the Encoder runs it)."""
    decoder = decoder_of(model)
    device = next(decoder.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[np.ndarray | None] = [None] * len(ids)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        width = max(len(ids[i]) for i in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            input_ids[row, :len(ids[i])] = torch.tensor(ids[i])
            mask[row, :len(ids[i])] = 1
        hidden_BTD = decoder(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                             is_causal=not bidirectional).last_hidden_state.float()
        for row, i in enumerate(batch):
            out[i] = hidden_BTD[row, positions[i]].cpu().numpy()
    return out


def token_features(model, tokenizer, data: TokenData, *, max_length: int, batch_size: int,
                   bidirectional: bool) -> TokenFeatures:
    """The finetune stage's sub-word rule (``data.tasks.align_word_labels``): a training row per token that
    carries a word's label (its first sub-token), a test row per word at its first sub-token (words cut off by
    ``max_length`` are not scored, as in the stage)."""
    index = {name: i for i, name in enumerate(data.labels)}

    def encode(examples):
        return [align_word_labels(tokenizer, ex["words"], ex["spaces"], [index[t] for t in ex["tags"]], max_length)
                for ex in examples]

    train, test = encode(data.train), encode(data.test)
    train_pos = [[t for t, y in enumerate(r["labels"]) if y != IGNORE] for r in train]
    test_pos = [[t for t in r["word_index"] if t >= 0] for r in test]
    run = {"batch_size": batch_size, "bidirectional": bidirectional}
    train_states = hidden_at(model, tokenizer, [r["input_ids"] for r in train], train_pos, **run)
    test_states = hidden_at(model, tokenizer, [r["input_ids"] for r in test], test_pos, **run)
    width = decoder_of(model).config.get_text_config().hidden_size

    def stack(parts):
        return np.concatenate(parts) if parts else np.zeros((0, width), np.float32)

    return TokenFeatures(
        train_X=stack(train_states),
        train_y=np.array([r["labels"][t] for r, pos in zip(train, train_pos) for t in pos], dtype=np.int64),
        test_X=stack(test_states),
        test_y=np.array([y for r in test for y, t in zip(r["word_labels"], r["word_index"]) if t >= 0],
                        dtype=np.int64),
        test_sizes=[len(pos) for pos in test_pos])


def token_probe(train_X, train_y, test_X) -> np.ndarray:
    """Predictions of a logistic-regression head on standardised frozen features (the probes' recipe)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    return probe.fit(np.asarray(train_X, dtype=np.float64), np.asarray(train_y)).predict(
        np.asarray(test_X, dtype=np.float64))


def token_scores(predicted, features: TokenFeatures, labels: list[str]) -> dict:
    """Word accuracy, and entity F1 (seqeval's default rule) when the tags are BIO; ``metric`` is the stage's
    main one (entity_f1 for BIO tags, else accuracy)."""
    predicted = np.asarray(predicted)
    scores = {"accuracy": float(np.mean(predicted == features.test_y)) if len(predicted) else 0.0}
    if is_bio(labels):
        gold_tags, predicted_tags, start = [], [], 0
        for size in features.test_sizes:
            gold_tags.append([labels[y] for y in features.test_y[start:start + size]])
            predicted_tags.append([labels[y] for y in predicted[start:start + size]])
            start += size
        scores["entity_f1"] = f1_from_counts(*entity_counts(gold_tags, predicted_tags))
    main = "entity_f1" if "entity_f1" in scores else "accuracy"
    return scores | {"metric": scores[main], "metric_name": main}


def frozen_token(task: TaskSpec, model, tokenizer, *, max_length: int, batch_size: int, bidirectional: bool) -> dict:
    data = token_data(task)
    features = token_features(model, tokenizer, data, max_length=max_length, batch_size=batch_size,
                              bidirectional=bidirectional)
    if len(features.test_y) == 0:
        raise BidirLMError(f"task '{task.name}': no test word survives max_length {max_length}; raise max_length")
    predicted = token_probe(features.train_X, features.train_y, features.test_X)
    return token_scores(predicted, features, data.labels) | {
        "train_tokens": len(features.train_y), "test_words": len(features.test_y),
        "train_sentences": len(data.train), "test_sentences": len(data.test), "labels": len(data.labels)}


# ------------------------------------------------------------------ finetune: a fresh head per model, the user's path

def check_finetune_models(suite: Suite, paths: list[str]) -> None:
    """A ``finetune`` task trains with the finetune stage, which loads plain decoders: refuse UBMoE folders (and
    ``FOLDER@ROUTING``) before anything runs, instead of fine-tuning a decoder with its experts dropped."""
    task = next((t for t in suite.tasks if t.kind == "finetune"), None)
    if task is None:
        return
    for path in paths:
        folder, routing = split_routing(path)
        if routing is not None or ubmoe_record(resolve_model_path(folder)) is not None:
            raise BidirLMError(f"task '{task.name}': kind finetune cannot fine-tune the UBMoE folder '{path}' (the "
                               "finetune stage loads plain decoders); drop the model or the task, or compare its "
                               "tokens with kind frozen_token")


def finetune_argv(task: TaskSpec, model_folder: str, run_dir: str, learning_rate: float | None, *,
                  bidirectional: bool) -> list[str]:
    """The ``bidirlm fit`` command of one run: the task's config, this model, the budget, the seed, the attention
    (causal: ``bidirectional=false`` and last-token pooling, the paper's rule for causal models), then ``args``."""
    configs = [task.config] if isinstance(task.config, str) else list(task.config)
    argv = [sys.executable, "-m", "bidirlm_pl.cli.main", "fit"]
    for config in configs:
        argv += ["--config", str(config)]
    argv += [f"--model.init_args.backbone.model={model_folder}", f"--trainer.default_root_dir={run_dir}",
             f"--seed_everything={task.seed}", "--trainer.enable_progress_bar=false"]
    if task.steps is not None:
        argv.append(f"--trainer.max_steps={task.steps}")
    if task.val_every is not None:
        argv.append(f"--trainer.val_check_interval={task.val_every}")
    if learning_rate is not None:
        argv.append(f"--model.init_args.optimizer.init_args.lr={learning_rate!r}")
    if not bidirectional:
        argv += ["--model.init_args.backbone.bidirectional=false", "--model.init_args.pooling=last"]
    return argv + list(task.args or [])


def _failure(log: Path) -> str:
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("bidirlm: error:") or "Error:" in line]
    return (errors or lines or ["no output"])[-1][:120]


def finetune_run(task: TaskSpec, model_folder: str, learning_rate: float | None, *, bidirectional: bool,
                 model_name: str) -> dict:
    """One fine-tuning run in a subprocess; returns its ``bidirlm_task.json`` plus ``seconds``. The run folder
    (checkpoints, export) is removed afterwards; a failed run keeps it, and the error names its log."""
    run_dir = Path(tempfile.mkdtemp(prefix="bidirlm-finetune-"))
    log = run_dir / "fit.log"
    argv = finetune_argv(task, model_folder, str(run_dir / "run"), learning_rate, bidirectional=bidirectional)
    start = time.time()
    with open(log, "w") as handle:
        handle.write(" ".join(argv) + "\n")
        handle.flush()
        code = subprocess.run(argv, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              check=False).returncode
    seconds = round(time.time() - start, 2)
    shown = "the config's lr" if learning_rate is None else f"lr {learning_rate:g}"
    found = sorted((run_dir / "run").rglob("bidirlm_task.json"))
    if code != 0 or not found:
        why = _failure(log) if code != 0 else "the run wrote no bidirlm_task.json (no HFExport?)"
        raise BidirLMError(f"task '{task.name}': fine-tuning {model_name} at {shown} failed: {why} (log: {log})")
    info = json.loads(found[0].read_text())
    shutil.rmtree(run_dir, ignore_errors=True)
    return info | {"seconds": seconds}


def finetune(task: TaskSpec, model_path: str, *, bidirectional: bool, model_name: str,
             artifacts: dict | None = None) -> dict:
    """Every learning rate of the grid on one model; the test metric of the run with the best validation score
    (lower is better when the monitored metric is a loss; ties keep the earlier rate)."""
    folder = str(resolve_model_path(split_routing(model_path)[0]))
    runs = []
    for lr in task.learning_rates or [None]:
        info = finetune_run(task, folder, lr, bidirectional=bidirectional, model_name=model_name)
        validation = (info.get("scores") or {}).get("validation") or {}
        test = (info.get("scores") or {}).get("test") or {}
        if not validation or "metric" not in test:
            raise BidirLMError(f"task '{task.name}': the run of {model_name} at lr {lr} kept no validation or test "
                               "score (did validation run within the steps?)")
        monitor, score = next(iter(validation.items()))
        learning_rate = lr if lr is not None else config_learning_rate(task)
        runs.append({"learning_rate": learning_rate, "monitor": monitor, "validation": score,
                     "test_metric": test["metric"], "test": test, "seconds": info["seconds"],
                     "metric_name": info.get("metric")})
        if artifacts is not None:
            artifacts[f"finetune/{task.name}-lr{learning_rate:g}.json" if learning_rate is not None
                      else f"finetune/{task.name}.json"] = json.dumps(info, indent=2, ensure_ascii=False) + "\n"
    lower = "loss" in runs[0]["monitor"]
    best = min(runs, key=lambda r: r["validation"]) if lower else max(runs, key=lambda r: r["validation"])
    return {"metric": best["test_metric"], "metric_name": best["metric_name"], "learning_rate": best["learning_rate"],
            "validation": best["validation"], "monitor": best["monitor"], "test": best["test"],
            "runs": [{k: v for k, v in r.items() if k != "test"} for r in runs], "seed": task.seed,
            "steps": task.steps, "attention": "bidirectional" if bidirectional else "causal"}


# ------------------------------------------------------------------ one task on one model

def run_task(task: TaskSpec, model, tokenizer, embed: Embedder, *, max_length: int, batch_size: int,
             bidirectional: bool, model_name: str = "model", artifacts: dict | None = None,
             model_path: str | None = None) -> dict:
    """One task on one loaded model (the caller sets UBMoE modes); returns its metrics. ``finetune`` trains from
    ``model_path`` in a subprocess and needs no loaded model."""
    if task.kind == "finetune":
        if model_path is None:
            raise BidirLMError(f"task '{task.name}': kind finetune needs the model's path")
        return finetune(task, model_path, bidirectional=bidirectional, model_name=model_name, artifacts=artifacts)
    if task.kind == "frozen_token":
        return frozen_token(task, model, tokenizer, max_length=max_length, batch_size=batch_size,
                            bidirectional=bidirectional)
    if task.kind == "mteb":
        return run_mteb(task, embed, max_length=max_length, model_name=model_name)
    if task.kind == "lm_eval":
        scores, raw = run_lm_eval(task, model, tokenizer, batch_size=batch_size, model_name=model_name)
        if artifacts is not None:
            artifacts[f"lm_eval/{task.name}.json"] = raw
        return scores

    if task.kind == "continuation":
        return {"texts": [continuation(model, tokenizer, p, task.max_new_tokens) for p in task.prompts],
                "prompts": task.prompts}
    records = task.records()
    if task.kind == "perplexity":
        ppl = causal_perplexity(model, tokenizer, [r["text"] for r in records], max_length=max_length,
                                batch_size=max(1, batch_size // 4))
        return {"perplexity": ppl}
    if task.kind == "multiple_choice":
        return {"accuracy": multiple_choice_accuracy(model, tokenizer, records)}
    if task.kind == "dependence":
        report = dependence(model, tokenizer, [r["text"] for r in records], max_length=max_length,
                            bidirectional=bidirectional, progress=False)
        before, main, after = report.overall
        return {"dp_before": before, "dp_main": main, "dp_after": after}
    if task.kind == "sts":
        a = embed([r["text1"] for r in records], max_length)
        b = embed([r["text2"] for r in records], max_length)
        cos = np.sum(metrics.unit_rows(a) * metrics.unit_rows(b), axis=1)
        return {"spearman": spearman(cos, [float(r["score"]) for r in records])}
    if task.kind == "retrieval":
        queries = list(dict.fromkeys(r["query"] for r in records))
        documents = list(dict.fromkeys(r["document"] for r in records))
        relevant = np.zeros((len(queries), len(documents)), dtype=bool)
        q_index, d_index = {q: i for i, q in enumerate(queries)}, {d: i for i, d in enumerate(documents)}
        for r in records:
            relevant[q_index[r["query"]], d_index[r["document"]]] = True
        scores = metrics.cosine_matrix(embed(queries, max_length, prompt_name="query"),
                                       embed(documents, max_length, prompt_name="document"))
        return metrics.retrieval_scores(scores, relevant) | {"queries": len(queries), "documents": len(documents)}
    labels = [str(r["label"]) for r in records]
    if len(set(labels)) < 2:
        raise BidirLMError(f"task '{task.name}': {task.source_name} has one label only; {task.kind} needs two or more")
    vectors = embed([r["text"] for r in records], max_length)
    if task.kind == "classification":
        folds = min(5, min(labels.count(x) for x in set(labels)))
        if folds < 2:
            raise BidirLMError(f"task '{task.name}': a label of {task.source_name} has one record; "
                               "cross-validation needs two or more per label")
        return {"accuracy": metrics.probe_accuracy(vectors, labels, folds=folds), "folds": folds}
    return {"v_measure": metrics.cluster_v_measure(vectors, labels)}


def evaluate(spec: ModelSpec, suite: Suite, *, progress: bool = True) -> ModelResult:
    """Every task of ``suite`` on one model folder (plain, merged, contrastive, UBMoE, ``FOLDER@ROUTING``).

    The model is loaded once for the in-process tasks; ``finetune`` tasks train their own copies in subprocesses
    (a suite of finetune tasks alone loads nothing here). With suite ``dims``, the embedding tasks run again at
    each size on the same embeddings, cut to their first d dimensions and re-normalised (``result.dims``)."""
    bidirectional = spec.attention == "bidirectional"
    model = tokenizer = embed = None
    ubmoe = False
    if any(t.kind != "finetune" for t in suite.tasks):
        model, tokenizer = load_any(spec.path)
        model.eval()
        ubmoe = is_ubmoe(model)
        embed = model_embedder(spec.path, model, tokenizer, bidirectional=bidirectional, batch_size=suite.batch_size)
        check_model_dims(spec, model, suite)
    result = ModelResult(spec.name, spec.path, spec.attention)

    def run(task: TaskSpec, embedder: Embedder | None, name: str) -> dict:
        generation = task.kind in GENERATION_KINDS
        routing = "generate" if generation or not bidirectional else "embed"
        with mode(model, routing) if ubmoe and task.kind != "finetune" else nullcontext():
            was = attn.is_bidirectional(model) if model is not None else None
            try:
                return run_task(task, model, tokenizer, embedder, max_length=task.max_length or suite.max_length,
                                batch_size=suite.batch_size, bidirectional=bidirectional and not generation,
                                model_name=name, artifacts=result.artifacts, model_path=spec.path)
            finally:
                if model is not None:
                    attn.set_bidirectional(model, was)

    bar = tqdm(suite.tasks, desc=spec.name, unit="task", disable=not progress)
    for task in bar:
        bar.set_postfix_str(task.name)
        start = time.time()
        result.results[task.name] = run(task, embed, spec.name)
        result.seconds[task.name] = round(time.time() - start, 2)
    for dim in suite.dims or []:
        for task in suite.embedding_tasks:
            start = time.time()
            result.dims.setdefault(dim, {})[task.name] = run(task, embed.truncated(dim), f"{spec.name}@{dim}d")
            result.seconds[f"{task.name}@{dim}d"] = round(time.time() - start, 2)
    return result


def check_model_dims(spec: ModelSpec, model, suite: Suite) -> None:
    """Suite ``dims`` must fit the model's embedding size (its hidden size), checked before any task runs."""
    if not suite.dims or not suite.embedding_tasks:
        return
    size = model.config.get_text_config().hidden_size
    if suite.dims[-1] > size:
        raise BidirLMError(f"model '{spec.name}': dims entry {suite.dims[-1]} exceeds its embedding size {size}; "
                           f"expected sizes <= {size}")


def check_data(suite: Suite) -> None:
    """Read every task's data once, so a bad file fails before any slow model work (a finetune task's data is read
    by its own run)."""
    for task in suite.tasks:
        if task.kind == "frozen_token":
            token_data(task)
        elif task.kind not in ("continuation", "finetune", *HARNESS_KINDS):
            task.records()
