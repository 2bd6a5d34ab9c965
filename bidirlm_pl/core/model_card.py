"""The model card (``README.md``) of every exported folder: base model, stages and data, how to load it.

The card's YAML header is ``huggingface_hub.ModelCardData`` (``base_model``, ``library_name``, tags) plus
``bidirlm_stages``: one entry per stage that produced the folder. A stage trained from an earlier
export inherits that folder's entries, so the card of a final encoder lists MNTP, merge and
contrastive in order. An encoder's or plain folder's card ends with "Serving": the runtimes that run it
bidirectionally for its architecture, and a warning naming those that would run it causally
(``bidirlm_pl.core.serving``).
"""

from __future__ import annotations

import json
from pathlib import Path

from bidirlm_pl.core.hub import split_hub_id
from bidirlm_pl.core.serving import serving_section


def stage_history(model_folder: str | Path | None) -> list[dict]:
    """The ``bidirlm_stages`` of a model folder's card, or [] (no card, or not ours)."""
    if model_folder is None:
        return []
    card = Path(model_folder) / "README.md"
    if not card.is_file():
        return []
    from huggingface_hub import ModelCard

    try:
        stages = ModelCard.load(card).data.to_dict().get("bidirlm_stages")
    except Exception:  # noqa: BLE001 -- a hand-written or foreign card has no history to inherit
        return []
    return list(stages) if isinstance(stages, list) else []


def write_model_card(folder: Path, *, name: str, model: str, model_folder: Path | None, stage: str, steps: int | None,
                     data: list[dict], encoder: bool, loader: str = "transformers",
                     compare: dict | None = None) -> Path:
    """Write ``folder/README.md``; ``name`` is the folder's final name, ``model`` what the stage trained from.

    ``loader="task"``: a fine-tuned task model; the card reads the folder's ``bidirlm_task.json`` (task, labels,
    metric and scores, how it loads).
    """
    from huggingface_hub import ModelCard, ModelCardData

    history = stage_history(model_folder) + [{"stage": stage, "model": str(model), "steps": steps, "data": data}]
    origin = history[0]["model"]
    task = _task_info(folder) if loader == "task" else None
    card_data = ModelCardData(
        base_model=origin if split_hub_id(origin) else None,
        library_name="sentence-transformers" if encoder else "transformers",
        pipeline_tag="feature-extraction" if encoder else (task or {}).get("pipeline_tag"),
        tags=["bidirlm-pl", "bidirectional", *(["sentence-transformers"] if encoder else [])],
        bidirlm_stages=history,
        **({"bidirlm_task": {k: task.get(k) for k in ("task", "pooling", "labels", "metric", "scores")}} if task else {}),
    )
    intro = (f"Trained with bidirlm-pl from `{origin}`: the base decoder with bidirectional attention "
             "(`\"is_causal\": false` in `config.json`), adapted by these stages:")
    lines = [f"# {name}", "", intro, ""]
    for i, step in enumerate(history, 1):
        sources = ", ".join(d.get("dataset") or d.get("path") or d.get("kind") or d.get("name", "?")
                            for d in step["data"]) or "n/a"
        lines.append(f"{i}. `{step['stage']}` from `{step['model']}`, {step['steps'] or 0} steps; data: {sources}")
    if compare:
        lines += ["", "## Last comparison", "", *(f"- {k}: {v}" for k, v in compare.items())]
    if task:
        lines += _task_lines(task)
    lines += ["", "## Load it", "", "```python"]
    if task:
        lines += _task_loading(task, name)
        return _save(ModelCard, card_data, lines, folder)
    if loader == "ubmoe":
        lines += ["from bidirlm_pl.moe import load_ubmoe, mode  # a UBMoE folder: expert FFNs under mlp.experts",
                  f'model, tokenizer = load_ubmoe("{name}")', "```", ""]
        return _save(ModelCard, card_data, lines, folder)
    if encoder:
        lines += ["from sentence_transformers import SentenceTransformer",
                  f'model = SentenceTransformer("{name}")  # or the folder path',
                  'embeddings = model.encode(["A sentence.", "Another one."])', ""]
        sizes = _encoder_info(folder).get("matryoshka_dims")
        if sizes:
            lines += [f"# trained at Matryoshka sizes {sizes}: a smaller embedding is its first k dimensions",
                      f'small = SentenceTransformer("{name}", truncate_dim={sizes[0]})', ""]
    lines += ["from transformers import AutoModel, AutoTokenizer",
              f'model = AutoModel.from_pretrained("{name}")  # bidirectional: config.is_causal is false',
              f'tokenizer = AutoTokenizer.from_pretrained("{name}")', "```", ""]
    lines += serving_section(_config(folder))
    return _save(ModelCard, card_data, lines, folder)


TASK_NAMES = {"sequence": "sequence classification", "pair": "sequence-pair classification",
              "regression": "regression", "token": "token classification", "qa": "extractive question answering"}


def _config(folder: Path) -> dict:
    """The folder's ``config.json`` ({} when there is none, as in a card written before the weights)."""
    path = Path(folder) / "config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _encoder_info(folder: Path) -> dict:
    path = Path(folder) / "bidirlm_encoder.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _task_info(folder: Path) -> dict:
    path = Path(folder) / "bidirlm_task.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _task_lines(task: dict) -> list[str]:
    """The task, its labels and its metric (with the fit's scores) in the card."""
    labels = task.get("labels") or []
    shown = ", ".join(f"`{label}`" for label in labels[:40]) + (" ..." if len(labels) > 40 else "")
    scores = task.get("scores") or {}
    values = "; ".join(f"{split}: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(s.items()) if isinstance(v, float))
                       for split, s in scores.items() if s)
    pooling = f", {task.get('pooling')} pooling" if task.get("task") in ("sequence", "pair", "regression") else ""
    name = TASK_NAMES.get(task.get("task"), task.get("task"))
    lines = ["", "## Task", "", f"- task: {name} (`{task.get('task')}`{pooling})"]
    if labels:
        lines.append(f"- labels ({len(labels)}): {shown}")
    lines.append(f"- metric: {task.get('metric')}" + (f" ({values})" if values else ""))
    return lines


def _task_loading(task: dict, name: str) -> list[str]:
    """How the card says to load a task model: transformers' class and pipeline, or our loader."""
    kind = task.get("task")
    if not task.get("native"):
        head = f"{task.get('pooling')}-pooled" if kind in ("sequence", "pair", "regression") else kind
        note = ("This head is not a transformers class (its pooling or architecture has none): "
                "`AutoModelFor...` would add a new, untrained head instead of this one.")
        return ["from bidirlm_pl.models.heads import load_task_model  # no remote code; see bidirlm_task.json",
                f'model = load_task_model("{name}")  # the bidirectional decoder and its {head} head', "```", "",
                note, ""]
    auto = task.get("loader", "").rpartition(".")[2]
    lines = [f"from transformers import {auto}, AutoTokenizer" + (", pipeline" if kind != "qa" else ""),
             f'model = {auto}.from_pretrained("{name}")  # bidirectional: config.is_causal is false',
             f'tokenizer = AutoTokenizer.from_pretrained("{name}")']
    if kind == "qa":  # transformers 5.3 removed the question-answering pipeline
        lines += ["from bidirlm_pl.models.heads import answer_question",
                  'answer_question(model, tokenizer, "Who lives in Sydney?", "Ann lives in Sydney.")']
    elif kind == "pair":
        lines += ['classify = pipeline("text-classification", model=model, tokenizer=tokenizer)',
                  'classify({"text": "A man plays.", "text_pair": "Someone plays."})']
    else:
        pipe = "token-classification" if kind == "token" else "text-classification"
        extra = ', function_to_apply="none"' if kind == "regression" else ""
        lines += [f'classify = pipeline("{pipe}", model=model, tokenizer=tokenizer)', f'classify("A sentence."{extra})']
    return lines + ["```", ""]


def _save(card_class, card_data, lines: list[str], folder: Path) -> Path:
    path = folder / "README.md"
    card_class(f"---\n{card_data.to_yaml()}\n---\n" + "\n".join(lines)).save(path)
    return path
