"""Write Hugging Face folders atomically: a temporary sibling folder, renamed when complete."""

from __future__ import annotations

import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

import torch

from bidirlm_pl.core.checkpoint_io import replace_path
from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.core.serving import add_serving_flags


@contextmanager
def atomic_folder(target: str | Path, *, overwrite: bool = False):
    """Yield a staging folder; on success it replaces ``target``, on error it is removed.

    >>> with atomic_folder("out/model") as tmp:  # doctest: +SKIP
    ...     model.save_pretrained(tmp)
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise BidirLMError(f"output folder '{target}' already exists; pass --overwrite to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.tmp-*"):  # left by a killed writer: never a complete output
        shutil.rmtree(stale, ignore_errors=True)
    staging = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replace_path(staging, target)


def plain_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights without LoRA wrappers: adapters merged into a copy, names as the base model's."""
    if not hasattr(model, "peft_config"):
        return model.state_dict()
    base = model.get_base_model()
    model.merge_adapter()
    try:
        state = {
            name.replace(".base_layer.", "."): tensor.detach().clone()
            for name, tensor in base.state_dict().items()
            if "lora_" not in name
        }
    finally:
        model.unmerge_adapter()
    return state


def save_hf_folder(model, tokenizer, target: str | Path, *, overwrite: bool = True, extra=None,
                   state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Save a (possibly LoRA-wrapped) transformers model and its tokenizer as a plain HF folder.

    ``extra(staging_path)`` may add files (e.g. Sentence-Transformers modules) before the rename;
    ``state_dict`` overrides the weights (e.g. gathered from FSDP shards).
    """
    base = model.get_base_model() if hasattr(model, "peft_config") else model
    with atomic_folder(target, overwrite=overwrite) as staging:
        base.save_pretrained(staging, state_dict=state_dict if state_dict is not None else plain_state_dict(model))
        add_serving_flags(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if extra is not None:
            extra(staging)
    return Path(target)
