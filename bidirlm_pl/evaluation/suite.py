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
"""

from __future__ import annotations

import difflib
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from bidirlm_pl.backbone import attention as attn
from bidirlm_pl.backbone.load import resolve_model_path
from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.core.yaml_files import read_yaml_mapping
from bidirlm_pl.evaluation import metrics
from bidirlm_pl.evaluation.dependence import dependence
from bidirlm_pl.evaluation.embedding import spearman
from bidirlm_pl.evaluation.generation import causal_perplexity, continuation, multiple_choice_accuracy
from bidirlm_pl.evaluation.harness import run_lm_eval, run_mteb
from bidirlm_pl.evaluation.task_data import FIELDS, builtin, builtin_names_for, read_jsonl
from bidirlm_pl.models.encoder import Encoder, read_encoder_config
from bidirlm_pl.moe.convert import is_ubmoe
from bidirlm_pl.moe.modes import load_any, mode, split_routing

GENERATION_KINDS = ("perplexity", "continuation", "multiple_choice", "lm_eval")
EMBEDDING_KINDS = ("sts", "retrieval", "classification", "clustering", "mteb")
HARNESS_KINDS = ("mteb", "lm_eval")  # run by the libraries themselves (bidirlm_pl.evaluation.harness)
KINDS = GENERATION_KINDS + EMBEDDING_KINDS + ("dependence",)
MAIN_METRIC = {"perplexity": "perplexity", "multiple_choice": "accuracy", "sts": "spearman",
               "retrieval": "ndcg@10", "classification": "accuracy", "clustering": "v_measure",
               "dependence": "dp_after", "mteb": "mean", "lm_eval": "mean"}
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

    def __post_init__(self):
        where = f"task '{self.name}'"
        if self.kind not in KINDS:
            raise BidirLMError(f"{where}: unknown kind '{self.kind}'; expected one of {list(KINDS)}")
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
                               f"expected one of {builtin_names_for(self.kind)} or a JSONL 'path'")
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

    def records(self) -> list[dict]:
        records = builtin(self.data) if self.data else read_jsonl(self.path, FIELDS[self.kind])
        return records[: self.limit] if self.limit else records

    @property
    def source(self) -> str:
        if self.kind in HARNESS_KINDS:
            return f"{self.kind}:{self.benchmark or ','.join(self.tasks)}"
        return f"builtin:{self.data}" if self.data else str(self.path)


@dataclass
class Suite:
    tasks: list[TaskSpec]
    max_length: int = 256
    batch_size: int = 8
    name: str = "suite"

    @property
    def embedding_tasks(self) -> list[TaskSpec]:
        return [t for t in self.tasks if t.kind in EMBEDDING_KINDS]


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
        tasks.append(TaskSpec(**entry))
    if not tasks:
        raise BidirLMError("compare config lists no tasks")
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise BidirLMError(f"compare config repeats a task name: {names}")
    return Suite(tasks=tasks, **{k: v for k, v in raw.items() if k not in ("tasks",)})


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

    def main(self, task: TaskSpec):
        return self.results.get(task.name, {}).get(MAIN_METRIC.get(task.kind, ""))

    def mean_embedding_score(self, suite: Suite) -> float | None:
        values = [self.main(t) for t in suite.embedding_tasks]
        values = [v for v in values if v is not None]
        return float(np.mean(values)) if values else None


class Embedder:
    """compare's embeddings of one model: its :class:`Encoder`, each distinct (text, prompt, token limit) encoded
    once (tasks share texts).

    ``embed(texts, max_length, prompt_name=...)`` prepends the encoder's prompt of that name as
    sentence-transformers does: ``"query"`` as ``encode_query``, ``"document"`` as ``encode_document``, None
    as ``encode`` (the default prompt: none in our exports). Texts are cut at ``max_length`` or at the
    model's own limit (``own_max_length``: None for a folder without one), whichever is shorter.
    """

    def __init__(self, encoder: Encoder, *, batch_size: int, own_max_length: int | None = None):
        self.encoder, self.batch_size, self.own_max_length = encoder, batch_size, own_max_length
        self.cache: dict[tuple[str, str, int], np.ndarray] = {}

    def limit(self, max_length: int) -> int:
        return max_length if self.own_max_length is None else min(max_length, self.own_max_length)

    def __call__(self, texts: list[str], max_length: int, *, prompt_name: str | None = None) -> np.ndarray:
        prompt = self.encoder.resolve_prompt(prompt_name=prompt_name) or ""
        limit = self.limit(max_length)
        todo = list(dict.fromkeys(t for t in texts if (t, prompt, limit) not in self.cache))
        if todo:
            vectors = self.encoder.encode(todo, self.batch_size, prompt=prompt, max_length=limit,
                                          show_progress_bar=False)
            self.cache.update({(t, prompt, limit): v for t, v in zip(todo, vectors)})
        return np.stack([self.cache[(t, prompt, limit)] for t in texts])


def model_embedder(path: str, model, tokenizer, *, bidirectional: bool, batch_size: int) -> Embedder:
    """compare's embedding path for a model loaded from ``path`` (``FOLDER@ROUTING`` allowed): the Encoder its
    folder was exported as (a plain or UBMoE folder: mean pooling, no prompt), attention as ``--attention``."""
    folder = resolve_model_path(split_routing(path)[0])
    encoder = Encoder.for_model(model, tokenizer, folder, bidirectional=bidirectional)
    return Embedder(encoder, batch_size=batch_size, own_max_length=read_encoder_config(folder)["max_length"])


def run_task(task: TaskSpec, model, tokenizer, embed: Embedder, *, max_length: int, batch_size: int,
             bidirectional: bool, model_name: str = "model", artifacts: dict | None = None) -> dict:
    """One task on one loaded model (the caller sets UBMoE modes); returns its metrics."""
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
        raise BidirLMError(f"task '{task.name}': {task.source} has one label only; {task.kind} needs two or more")
    vectors = embed([r["text"] for r in records], max_length)
    if task.kind == "classification":
        folds = min(5, min(labels.count(x) for x in set(labels)))
        if folds < 2:
            raise BidirLMError(f"task '{task.name}': a label of {task.source} has one record; "
                               "cross-validation needs two or more per label")
        return {"accuracy": metrics.probe_accuracy(vectors, labels, folds=folds), "folds": folds}
    return {"v_measure": metrics.cluster_v_measure(vectors, labels)}


def evaluate(spec: ModelSpec, suite: Suite, *, progress: bool = True) -> ModelResult:
    """Every task of ``suite`` on one model folder (plain, merged, contrastive, UBMoE, ``FOLDER@ROUTING``)."""
    model, tokenizer = load_any(spec.path)
    model.eval()
    bidirectional = spec.attention == "bidirectional"
    ubmoe = is_ubmoe(model)
    embed = model_embedder(spec.path, model, tokenizer, bidirectional=bidirectional, batch_size=suite.batch_size)
    result = ModelResult(spec.name, spec.path, spec.attention)
    bar = tqdm(suite.tasks, desc=spec.name, unit="task", disable=not progress)
    for task in bar:
        bar.set_postfix_str(task.name)
        start = time.time()
        generation = task.kind in GENERATION_KINDS
        routing = "generate" if generation or not bidirectional else "embed"
        with mode(model, routing) if ubmoe else nullcontext():
            was = attn.is_bidirectional(model)
            try:
                result.results[task.name] = run_task(
                    task, model, tokenizer, embed, max_length=task.max_length or suite.max_length,
                    batch_size=suite.batch_size, bidirectional=bidirectional and not generation,
                    model_name=spec.name, artifacts=result.artifacts)
            finally:
                attn.set_bidirectional(model, was)
        result.seconds[task.name] = round(time.time() - start, 2)
    return result


def check_data(suite: Suite) -> None:
    """Read every task's data once, so a bad file fails before any slow model work."""
    for task in suite.tasks:
        if task.kind not in ("continuation", *HARNESS_KINDS):
            task.records()
