"""The model card (``README.md``) of every exported folder: base model, stages and data, how to load it.

The card's YAML header is ``huggingface_hub.ModelCardData`` (``base_model``, ``library_name``, tags) plus
``bidirlm_stages``: one entry per stage that produced the folder. A stage trained from an earlier
export inherits that folder's entries, so the card of a final encoder lists MNTP, merge and
contrastive in order.
"""

from __future__ import annotations

from pathlib import Path

from bidirlm_pl.core.hub import split_hub_id


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
    """Write ``folder/README.md``; ``name`` is the folder's final name, ``model`` what the stage trained from."""
    from huggingface_hub import ModelCard, ModelCardData

    history = stage_history(model_folder) + [{"stage": stage, "model": str(model), "steps": steps, "data": data}]
    origin = history[0]["model"]
    card_data = ModelCardData(
        base_model=origin if split_hub_id(origin) else None,
        library_name="sentence-transformers" if encoder else "transformers",
        pipeline_tag="feature-extraction" if encoder else None,
        tags=["bidirlm-pl", "bidirectional", *(["sentence-transformers"] if encoder else [])],
        bidirlm_stages=history,
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
    lines += ["", "## Load it", "", "```python"]
    if loader == "ubmoe":
        lines += ["from bidirlm_pl.moe import load_ubmoe, mode  # a UBMoE folder: expert FFNs under mlp.experts",
                  f'model, tokenizer = load_ubmoe("{name}")', "```", ""]
        return _save(ModelCard, card_data, lines, folder)
    if encoder:
        lines += ["from sentence_transformers import SentenceTransformer",
                  f'model = SentenceTransformer("{name}")  # or the folder path',
                  'embeddings = model.encode(["A sentence.", "Another one."])', ""]
    lines += ["from transformers import AutoModel, AutoTokenizer",
              f'model = AutoModel.from_pretrained("{name}")  # bidirectional: config.is_causal is false',
              f'tokenizer = AutoTokenizer.from_pretrained("{name}")', "```", ""]
    return _save(ModelCard, card_data, lines, folder)


def _save(card_class, card_data, lines: list[str], folder: Path) -> Path:
    path = folder / "README.md"
    card_class(f"---\n{card_data.to_yaml()}\n---\n" + "\n".join(lines)).save(path)
    return path
