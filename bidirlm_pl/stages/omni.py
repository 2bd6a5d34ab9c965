"""OmniContrastiveStage: align text-text, image-text and audio-text pairs in one space (InfoNCE).

The model is a ``bidirlm compose`` folder loaded as :class:`bidirlm_pl.models.omni.model.OmniEncoder`:
the merged backbone trains (``backbone.trainable`` groups, default all), the towers stay frozen
(no gradient, eval mode). Batches come from :class:`bidirlm_pl.data.omni.OmniPairsData`; the loss is
the contrastive stages' shared core (:class:`bidirlm_pl.stages.contrastive.ContrastiveCore`) on the
encoder's own embeddings, and each step logs ``train/loss`` and ``train/loss_<modality>``. The export
is again an omni folder (same towers and processors, trained backbone), with the training recorded in
its provenance.

    bidirlm fit --config configs/omni/contrastive-tiny.yaml
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from lightning.pytorch.cli import OptimizerCallable

from bidirlm_pl.backbone.load import resolve_model_path
from bidirlm_pl.backbone.trainable import apply_trainable
from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.core.export import atomic_folder
from bidirlm_pl.core.specs import BackboneSpec, Schedule
from bidirlm_pl.models.omni.inputs import OMNI_CONFIG, load_record
from bidirlm_pl.models.omni.model import OmniEncoder
from bidirlm_pl.stages.base import BackboneStage, default_optimizer
from bidirlm_pl.stages.contrastive import ContrastiveCore, ContrastiveOutput


def save_omni(encoder, source: Path, target: str | Path, *, provenance: dict | None = None,
              overwrite: bool = True) -> Path:
    """Write ``encoder`` (trained backbone + its towers) as an omni folder, staged and renamed into place."""
    from safetensors.torch import save_file


    record = load_record(source)
    prefixes = [(record["vision"]["towers"][0], encoder.visual)] if encoder.visual is not None else []
    if encoder.audio_tower is not None:
        prefixes += [(record["audio"]["towers"][0], encoder.audio_tower),
                     (record["audio"]["towers"][1], encoder.audio_projector)]
    state = {"model." + k: v for k, v in encoder.backbone.state_dict().items()}
    for prefix, module in prefixes:
        state.update({prefix + k: v for k, v in module.state_dict().items()})
    record.setdefault("provenance", {})["training"] = provenance or {}
    with atomic_folder(target, overwrite=overwrite) as staging:
        shutil.copytree(source, staging, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json", "DONE"))
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, staging / "model.safetensors",
                  metadata={"format": "pt"})
        (staging / OMNI_CONFIG).write_text(json.dumps(record, indent=2, default=str))
    return Path(target)


class OmniContrastiveStage(ContrastiveCore, BackboneStage):
    """Multimodal contrastive training of a composed omni model.

    Args (besides :class:`BackboneStage`'s; ``backbone.model`` is the composed folder):
        temperature: InfoNCE temperature (> 0).
        gather_across_devices: under DDP/FSDP, every rank's embeddings join the candidates.
        symmetric, false_negative_margin, matryoshka_dims, matryoshka_weights: as the contrastive stage's
            (:class:`bidirlm_pl.stages.contrastive.ContrastiveCore`).

    No GradCache: image and audio inputs are patch and frame tensors whose rows are not the batch's rows.
    """

    default_head = "base"
    fixed_bidirectional = True

    def __init__(self, backbone: BackboneSpec, optimizer: OptimizerCallable = default_optimizer,
                 schedule: Schedule | None = None, temperature: float = 0.05, gather_across_devices: bool = True,
                 symmetric: bool = False, false_negative_margin: float | None = None,
                 matryoshka_dims: list[int] | None = None, matryoshka_weights: list[float] | None = None):
        super().__init__(backbone, optimizer=optimizer, schedule=schedule)
        if self.lora is not None:
            raise BidirLMError("the omni stage trains the merged backbone directly; backbone.lora must be null")
        self.init_contrastive(temperature=temperature, symmetric=symmetric, false_negative_margin=false_negative_margin,
                              gather_across_devices=gather_across_devices, matryoshka_dims=matryoshka_dims,
                              matryoshka_weights=matryoshka_weights)

    def build_model(self):

        encoder = OmniEncoder.from_folder(self.model_path, dtype=self.dtype_name,
                                          attn_implementation=self.attn_implementation)
        return encoder, encoder.tokenizer

    def apply_groups(self) -> dict[str, int]:
        counts = apply_trainable(self.backbone.backbone, self.trainable)
        for tower in self.backbone.towers():  # frozen whatever the groups say
            tower.requires_grad_(False)
        return counts

    def parallelize(self, device_mesh) -> None:
        raise BidirLMError("the omni stage runs on one device or DDP (configs/trainer/ddp.yaml); FSDP2 is not "
                           "supported for it yet")

    def embed(self, group: dict) -> torch.Tensor:
        """The omni encoder's own embeddings (towers, then the backbone's pooled states) of one group."""
        return self.backbone(group)

    def step_metrics(self, batch: dict, result: ContrastiveOutput) -> dict[str, torch.Tensor]:
        return {f"loss_{batch['modality']}": result.loss.detach()}

    def export_hf(self, target: str | Path, *, overwrite: bool = True) -> Path:

        if self._trainer is None or self.trainer.is_global_zero:
            steps = int(self.trainer.global_step) if self._trainer is not None else 0
            save_omni(self.backbone, resolve_model_path(self.model_path), target, overwrite=overwrite,
                      provenance={"stage": type(self).__name__, "from": str(self.model_path), "steps": steps})
        return Path(target)
