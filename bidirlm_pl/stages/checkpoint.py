"""A stage rebuilt from a Lightning checkpoint of any stage, and its export to an HF folder (``bidirlm export``)."""

from __future__ import annotations

import importlib
from pathlib import Path

from bidirlm_pl.core.checkpoint_io import load_checkpoint
from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.core.specs import BackboneSpec, Schedule
from bidirlm_pl.stages.base import BackboneStage


def stage_from_checkpoint(ckpt: dict):
    """Rebuild the stage (a BackboneStage subclass) of a checkpoint and load its trained weights."""
    hparams = dict(ckpt["hyper_parameters"])
    class_path = hparams.pop("_class_path", None)
    hparams.pop("_instantiator", None)
    if class_path is None:
        raise BidirLMError("checkpoint hyper_parameters name no '_class_path'; expected one written by `bidirlm fit`")
    module_name, _, class_name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as err:
        raise BidirLMError(f"checkpoint stage class '{class_path}' cannot be imported") from err
    if not (isinstance(cls, type) and issubclass(cls, BackboneStage)):
        raise BidirLMError(f"checkpoint stage class '{class_path}' is not a bidirlm_pl BackboneStage")
    if isinstance(hparams.get("schedule"), dict):
        hparams["schedule"] = Schedule(**hparams["schedule"])
    if isinstance(hparams.get("backbone"), dict | str):
        hparams["backbone"] = BackboneSpec.of(hparams["backbone"])
    stage = cls(**hparams)
    stage.configure_model()
    missing, unexpected = stage.load_state_dict(ckpt["state_dict"], strict=False)
    if missing or unexpected:
        raise BidirLMError(f"checkpoint weights do not fit stage '{class_path}': missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    return stage


def export_checkpoint(ckpt_path: str | Path, output: str | Path, *, overwrite: bool = False) -> Path:
    """Export a checkpoint to ``output``; return the folder.

    >>> export_checkpoint("runs/x/checkpoints/last.ckpt", "models/encoder")  # doctest: +SKIP
    """
    output = Path(output)
    if output.exists() and not overwrite:
        raise BidirLMError(f"output folder '{output}' already exists; pass --overwrite to replace it")
    ckpt = load_checkpoint(ckpt_path)
    stage = stage_from_checkpoint(ckpt)
    # what the model card records when no trainer is attached: the checkpoint's step and data sources
    stage.card_steps = ckpt.get("global_step")
    stage.card_sources = (ckpt.get("datamodule_hyper_parameters") or {}).get("sources")
    return stage.export_hf(output, overwrite=overwrite)
