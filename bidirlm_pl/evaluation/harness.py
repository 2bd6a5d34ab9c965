"""The field's own harnesses inside ``bidirlm compare``: MTEB for embeddings, lm-evaluation-harness for generation.

Both run through the libraries themselves on the model ``compare`` already loaded, in the right mode:

* ``kind: mteb`` -- ``mteb.evaluate`` on :func:`mteb_model`: the model's :class:`~bidirlm_pl.models.encoder.Encoder`
  (the pooling, normalisation and prompts its folder was exported with; mean pooling for a plain folder),
  with the model's embedding attention (a UBMoE folder in its ``embed`` mode). Prompts reach MTEB as they
  do from ``SentenceTransformer(folder)``: the query prompt on queries only. ``tasks:`` are MTEB task names,
  or ``local:NAME`` for the tasks this project defines over shipped data (``local:lee-sts``); or a
  ``benchmark:`` by name (``"MTEB(eng, v2)"``). Main score per task, and their mean.
* ``kind: lm_eval`` -- ``lm_eval.simple_evaluate`` with lm-eval's own ``HFLM`` wrapped around our model and
  tokenizer, causal attention (a UBMoE folder in its ``generate`` mode, or the routing pinned by
  ``FOLDER@ROUTING``). ``tasks:`` are lm-eval task names; ``include_path:`` a folder of local task YAMLs
  (relative paths inside them resolve against that folder). The headline metric per task
  (``acc``, else the first numeric metric), and their mean; lm-eval's own results JSON is saved beside
  the report.

A task whose data is neither reachable nor cached is one line naming the task. ``mteb`` and ``lm_eval``
are imported inside the functions that use them: each takes seconds to import, and ``bidirlm compare``
without such a task never pays for it.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bidirlm_pl.backbone import attention
from bidirlm_pl.core.errors import BidirLMError, first_line
from bidirlm_pl.evaluation.embedding import lee_sts_task
from bidirlm_pl.models.encoder import DEFAULT_MAX_LENGTH, Encoder

HEADLINE = ("acc", "acc_norm", "exact_match", "f1", "mcc", "pearson", "bleu")


def local_mteb_tasks() -> dict:
    return {"lee-sts": lee_sts_task}


def mteb_tasks(names: list[str] | None, benchmark: str | None, *, where: str) -> list:
    import mteb
    if benchmark:
        try:
            return list(mteb.get_benchmark(benchmark).tasks)
        except Exception as err:
            raise BidirLMError(f"{where}: MTEB has no benchmark '{benchmark}' ({first_line(err, 160)})") from err
    tasks, local = [], local_mteb_tasks()
    for name in names:
        if name.startswith("local:"):
            if name[6:] not in local:
                raise BidirLMError(f"{where}: local MTEB task '{name}' is not one of "
                                   f"{['local:' + k for k in local]}")
            tasks.append(local[name[6:]]())
            continue
        try:
            tasks += list(mteb.get_tasks(tasks=[name]))
        except Exception as err:
            raise BidirLMError(f"{where}: MTEB has no task '{name}' ({first_line(err, 160)})") from err
    return tasks


def mteb_model(encoder: Encoder, name: str = "bidirlm-pl/encoder", revision: str = "local", *,
               encode: Callable | None = None, max_tokens: int | None = None):
    """``encoder`` as an MTEB model: ``mteb.evaluate(mteb_model(encoder), tasks)``.

    Each call's prompt is chosen as MTEB chooses it for ``SentenceTransformer(folder)``: the prompt named
    after the task or its type if the encoder has one, else the ``query`` prompt on queries, the
    ``document`` prompt on documents (``""`` unless set), the default prompt (none in our exports) on the
    texts of symmetric tasks (STS, classification, clustering).
    ``encode(texts, prompt_name) -> (N, D)`` replaces ``encoder.encode`` (``compare`` passes its cache).

    >>> results = mteb.evaluate(mteb_model(Encoder.from_pretrained(folder)), tasks, cache=None)  # doctest: +SKIP
    """
    from mteb.models.abs_encoder import AbsEncoder
    from mteb.models.model_meta import ModelMeta, ScoringFunction

    class MTEBEncoder(AbsEncoder):
        def __init__(self):
            self.model = encoder
            # as mteb's SentenceTransformer wrapper: prompt names MTEB does not know are dropped (with a warning)
            self.model_prompts = AbsEncoder.validate_task_to_prompt_name(encoder.prompts, raise_for_invalid_keys=False)[0]
            self.mteb_model_meta = ModelMeta.create_empty(overwrites={
                "name": name, "revision": revision, "n_parameters": sum(p.numel() for p in encoder.model.parameters()),
                "similarity_fn_name": ScoringFunction.COSINE,
                "embed_dim": encoder.model.config.get_text_config().hidden_size,
                "max_tokens": max_tokens or encoder.max_length or DEFAULT_MAX_LENGTH, "modalities": ["text"],
                "framework": ["PyTorch"],
            })

        def encode(self, inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs):
            texts = [t for batch in inputs for t in batch["text"]]
            prompt_name = self.get_prompt_name(task_metadata, prompt_type)
            if encode is not None:
                return encode(texts, prompt_name)
            return encoder.encode(texts, batch_size=kwargs.get("batch_size", 32), prompt_name=prompt_name,
                                  show_progress_bar=False)

    return MTEBEncoder()


def compare_mteb_model(embed, *, max_length: int, model_name: str = "model"):
    """compare's MTEB model: :func:`mteb_model` over the embedder ``embed`` (its Encoder, through its cache)."""
    return mteb_model(embed.encoder, name=f"bidirlm-pl/{safe_name(model_name)}", max_tokens=embed.limit(max_length),
                      encode=lambda texts, prompt_name: embed(texts, max_length, prompt_name=prompt_name))


def run_mteb(task, embed, *, max_length: int, model_name: str) -> dict:
    """One mteb task entry on compare's embedder ``embed``."""
    import mteb

    where = f"task '{task.name}'"
    tasks = mteb_tasks(task.tasks, task.benchmark, where=where)
    model = compare_mteb_model(embed, max_length=max_length, model_name=model_name)
    try:
        result = mteb.evaluate(model, tasks, cache=None, show_progress_bar=False)
    except Exception as err:
        raise BidirLMError(f"{where}: MTEB could not evaluate {[t.metadata.name for t in tasks]}: "
                           f"{first_line(err, 160)} (offline: is the task's data in the Hugging Face cache?)") from err
    scores = {r.task_name: float(r.get_score()) for r in result.task_results}
    return {**scores, "mean": float(np.mean(list(scores.values()))), "tasks": list(scores)}


def run_lm_eval(task, model, tokenizer, *, batch_size: int, model_name: str) -> tuple[dict, str]:
    """Scores of one lm_eval task entry, and lm-eval's own results as JSON text (saved beside the report)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    where = f"task '{task.name}'"
    # lm-eval calls the model without is_causal: make causal attention the model's default (the caller restores)
    attention.set_bidirectional(model, False)
    device = str(next(model.parameters()).device)
    first = tokenizer("a")["input_ids"]
    adds_bos = bool(first) and tokenizer.bos_token_id is not None and first[0] == tokenizer.bos_token_id
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device, add_bos_token=adds_bos)
    include = str(Path(task.include_path).resolve()) if task.include_path else None
    manager = TaskManager(include_path=include) if include else TaskManager()
    unknown = [t for t in task.tasks if t not in manager.all_tasks]
    if unknown:
        raise BidirLMError(f"{where}: lm-eval knows no task {unknown}"
                           + (f" (nor does include_path '{task.include_path}')" if include else ""))
    try:
        with _inside(include):
            results = lm_eval.simple_evaluate(model=lm, tasks=list(task.tasks), num_fewshot=task.num_fewshot,
                                              limit=task.limit, task_manager=manager, log_samples=False,
                                              bootstrap_iters=0, verbosity="ERROR")
    except Exception as err:
        raise BidirLMError(f"{where}: lm-eval could not evaluate {task.tasks}: {first_line(err, 160)} "
                           "(offline: is the task's data in the Hugging Face cache?)") from err
    raw = json.dumps({"model": model_name, **{k: results[k] for k in ("results", "configs", "versions", "n-shot")
                                              if k in results}}, indent=2, default=str)
    scores = {name: headline(metrics) for name, metrics in results["results"].items() if name in task.tasks}
    return {**scores, "mean": float(np.mean(list(scores.values()))), "tasks": list(scores)}, raw


def headline(metrics: dict) -> float:
    """lm-eval's headline metric of one task: ``acc`` (or the first of HEADLINE), else the first number."""
    numeric = {k.split(",")[0]: v for k, v in metrics.items()
               if isinstance(v, int | float) and not k.split(",")[0].endswith("_stderr") and k != "alias"}
    for name in HEADLINE:
        if name in numeric:
            return float(numeric[name])
    if not numeric:
        raise BidirLMError(f"lm-eval returned no numeric metric ({sorted(metrics)})")
    return float(next(iter(numeric.values())))


def safe_name(name: str) -> str:
    """A name usable in file names."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name))


@contextlib.contextmanager
def _inside(folder: str | None):
    """Run with ``folder`` as the working directory (lm-eval's local YAMLs name data files relative to it)."""
    if folder is None:
        yield
        return
    previous = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)
