"""``bidirlm export``: a Lightning checkpoint of any stage -> an HF folder (plus the stage's extra files).

    bidirlm export --ckpt runs/contrastive/checkpoints/last.ckpt --output models/encoder [--overwrite]

``--ckpt`` may also be a sharded checkpoint folder (FSDP2 with ``save_distributed_checkpoint: true``):
its shards are consolidated in this one process (no process group needed), so the export equals
the one an unsharded run writes. The checkpoint is read with ``torch.load(weights_only=True)``
(no arbitrary unpickling); the stage
is rebuilt from its saved hyperparameters (its base model folder or asset must still exist), the
trained weights are loaded strictly, and the folder is written atomically (temporary sibling, rename).
A contrastive checkpoint yields a folder that ``SentenceTransformer(dir)`` and ``AutoModel`` load.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from bidirlm_pl.errors import BidirLMError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True,
                        help="Lightning checkpoint (.ckpt file, or sharded checkpoint folder) written by `bidirlm fit`")
    parser.add_argument("--output", required=True, help="target folder (written atomically)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--push-to-hub", metavar="ORG/NAME", default=None,
                        help="also upload the folder to this hub repo (created when missing; token: HF_TOKEN)")
    parser.add_argument("--private", action="store_true", help="create the --push-to-hub repo as private")


DCP_METADATA = ".metadata"  # torch.distributed.checkpoint's index of a sharded folder, written last
LIGHTNING_META = "meta.pt"  # Lightning's non-tensor checkpoint entries (hyperparameters, loops, RNG)


def is_sharded_checkpoint(path: Path) -> bool:
    """A complete sharded (FSDP2 / DCP) checkpoint folder."""
    return path.is_dir() and (path / DCP_METADATA).is_file()


def safe_torch_load(path: str | Path):
    """``torch.load(weights_only=True)`` with our config dataclasses allow-listed."""
    import torch

    from bidirlm_pl.backbone import BackboneSpec, LoraSpec
    from bidirlm_pl.stages.base import Schedule

    with torch.serialization.safe_globals([Schedule, LoraSpec, BackboneSpec]):
        return torch.load(path, map_location="cpu", weights_only=True)


def load_checkpoint(path: str | Path) -> dict:
    """A Lightning checkpoint (file or sharded folder) loaded with ``weights_only=True``."""
    path = Path(path)
    if path.is_dir() and not is_sharded_checkpoint(path):
        raise BidirLMError(f"checkpoint '{path}' is a folder without '{DCP_METADATA}'; expected a .ckpt file or a "
                           "sharded checkpoint folder written by `bidirlm fit` (FSDP2, save_distributed_checkpoint)")
    if not path.exists():
        raise BidirLMError(f"checkpoint '{path}' does not exist; expected a .ckpt file written by `bidirlm fit`")
    try:
        ckpt = _load_sharded(path) if path.is_dir() else safe_torch_load(path)
    except Exception as err:  # noqa: BLE001 - unpickling refusals and corrupt files alike
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        first = first.split(". ")[0][:90]  # the library's first sentence; the rest explains torch.load's options
        raise BidirLMError(f"checkpoint '{path}' cannot be loaded safely (weights_only): {first}") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise BidirLMError(f"checkpoint '{path}' has no state_dict/hyper_parameters; expected a Lightning checkpoint")
    return ckpt


def _load_sharded(folder: Path) -> dict:
    """A sharded (DCP) Lightning checkpoint consolidated into one dict in this process."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        consolidated = Path(tmp) / "full.pt"
        dcp_to_torch_save(folder, consolidated)
        ckpt = safe_torch_load(consolidated)
    meta = folder / LIGHTNING_META
    if meta.is_file():
        ckpt.update(safe_torch_load(meta))
    return ckpt


def stage_from_checkpoint(ckpt: dict):
    """Rebuild the stage (a BackboneStage subclass) of a checkpoint and load its trained weights."""
    from bidirlm_pl.backbone import BackboneSpec
    from bidirlm_pl.stages.base import BackboneStage, Schedule

    hparams = dict(ckpt["hyper_parameters"])
    class_path = hparams.pop("_class_path", None)
    hparams.pop("_instantiator", None)
    if class_path is None:
        raise BidirLMError("checkpoint hyper_parameters name no '_class_path'; expected one written by `bidirlm fit`")
    module_name, _, class_name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError):
        raise BidirLMError(f"checkpoint stage class '{class_path}' cannot be imported") from None
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


def main(args: argparse.Namespace) -> int:
    from bidirlm_pl.hub import push_folder, split_hub_id

    if args.push_to_hub is not None and (split_hub_id(args.push_to_hub) is None or "@" in args.push_to_hub):
        raise BidirLMError(f"--push-to-hub '{args.push_to_hub}' is not a hub repo id; expected 'org/name'")
    folder = export_checkpoint(args.ckpt, args.output, overwrite=args.overwrite)
    print(f"exported {args.ckpt} -> {folder}")
    if args.push_to_hub is not None:
        print(f"pushed {folder} -> {push_folder(folder, args.push_to_hub, private=args.private)}")
    return 0
