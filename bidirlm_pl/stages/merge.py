"""MergeStage: build the backbone by merging checkpoints, then fine-tune it briefly with a classification head.

BidirLM's specialist transfer: average an encoder with a specialist fine-tuned from the same base
(50/50), then train a few hundred steps on a labelled task. The merge runs once through the
streaming engine into a cache folder keyed by the merge spec, and is reused afterwards. Validation
logs accuracy and macro F1 (torchmetrics) and ``val/steps_to_target``: the first step at which F1
reached ``target_fraction`` (93%) of its best value so far; the final history is written to
``<log_dir>/convergence.json``.

    bidirlm fit --config configs/merge/specialist-gemma3-270m.yaml --config configs/merge/specialist-tiny.yaml
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from bidirlm_pl.core import assets
from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.core.specs import BackboneSpec, Schedule
from bidirlm_pl.data.validation import is_padding
from bidirlm_pl.models.merging.engine import MergeSpec, merge, plan
from bidirlm_pl.models.pooling import Pooling
from bidirlm_pl.stages.base import BackboneStage, default_optimizer


def merge_cache_folder(spec: MergeSpec, cache: str | None) -> Path:
    """A folder named by a hash of what determines the merged weights."""

    identity = {k: v for k, v in vars(spec).items() if k not in ("output", "overwrite", "block_elements")}
    identity["models"] = [str(Path(m).expanduser().resolve()) if Path(m).expanduser().exists() else m
                          for m in spec.models]
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
    root = Path(cache).expanduser() if cache else assets.cache_dir() / "merges"
    return root / f"merge-{digest}"


class MergeStage(BackboneStage):
    """Merge ``model`` with ``merge_with`` (streaming engine), then train a pooled linear classifier on top.

    Args (besides :class:`BackboneStage`'s; ``head`` is always the bare decoder):
        backbone: ``backbone.model`` is the first merged model; gives config, tokenizer and the data's tokenizer.
        merge_with: the other models (empty: fine-tune ``model`` unmerged, the baseline).
        weights: one per model (``model`` first); default equal weights.
        merge_method: linear, slerp, task_arithmetic or ties (the last two need ``merge_base``).
        merge_base: the common ancestor for task_arithmetic/ties.
        merge_key_maps: per-model key maps (see ``MergeSpec.key_maps``).
        merge_cache: where merged folders are cached (default ``<cache>/merges``).
        num_labels: classes of the task.
        pooling: mean, last or weighted_mean over the attention mask.
        target_fraction: report the first step reaching this fraction of the best validation F1.
    """

    fixed_head = "base"  # a pooled classifier sits on the bare decoder

    def __init__(
        self,
        backbone: BackboneSpec,
        merge_with: list[str] | None = None,
        weights: list[float] | None = None,
        merge_method: str = "linear",
        merge_base: str | None = None,
        merge_key_maps: list[dict[str, str] | None] | None = None,
        merge_cache: str | None = None,
        num_labels: int = 2,
        pooling: str = "mean",
        target_fraction: float = 0.93,
        optimizer: OptimizerCallable = default_optimizer,
        schedule: Schedule | None = None,
    ):
        super().__init__(backbone, optimizer=optimizer, schedule=schedule)
        model = self.model_path
        if num_labels < 2:
            raise BidirLMError(f"num_labels {num_labels} must be at least 2")
        if not 0.0 < target_fraction <= 1.0:
            raise BidirLMError(f"target_fraction {target_fraction} is not in (0, 1]")
        self.merge_spec = None
        if merge_with:
            models = [model, *merge_with]
            weights = list(weights) if weights is not None else [1.0] * len(models)
            self.merge_spec = MergeSpec(models=models, weights=weights, output="", method=merge_method,
                                        base=merge_base, key_maps=merge_key_maps, overwrite=True)
            self.merged_folder = merge_cache_folder(self.merge_spec, merge_cache)
            self.merge_spec.output = str(self.merged_folder)
            plan(self.merge_spec)  # every merge mistake surfaces here, before any training
        elif weights is not None:
            raise BidirLMError("weights given but merge_with is empty; list the models to merge with")
        self.num_labels = num_labels
        self.pooling = Pooling(pooling)
        self.target_fraction = target_fraction
        self.classifier = None
        self.val_accuracy = MulticlassAccuracy(num_classes=num_labels)
        self.val_f1 = MulticlassF1Score(num_classes=num_labels, average="macro")
        self.history: list[dict] = []

    # ------------------------------------------------------------------ model
    def merged_model_path(self) -> str:
        """Run the merge once (cached by spec) and return the folder to load."""
        if self.merge_spec is None:
            return self.model_path
        if not (self.merged_folder / "config.json").exists():
            report = merge(self.merge_spec)
            print(report.summary())
        return str(self.merged_folder)

    def build_model(self):
        return self.load(self.merged_model_path())

    def configure_model(self):
        if self.backbone is not None:
            return
        super().configure_model()
        config = getattr(self.backbone.config, "text_config", None) or self.backbone.config
        self.classifier = nn.Linear(config.hidden_size, self.num_labels)
        self.classifier.to(next(self.backbone.parameters()).dtype)

    def on_fit_start(self):
        datamodule = getattr(self.trainer, "datamodule", None)
        labels = getattr(datamodule, "num_labels", None)
        if labels is not None and labels != self.num_labels:
            raise BidirLMError(f"num_labels {self.num_labels} differs from the data's {labels} classes "
                               f"{getattr(datamodule, 'label_names', '')}")

    # ------------------------------------------------------------------ steps
    def logits(self, batch: dict) -> torch.Tensor:
        hidden_BTD = self.hidden_states(batch)
        pooled_BD = self.pooling(hidden_BTD, batch["attention_mask"])
        return self.classifier(pooled_BD)

    def step(self, batch: dict) -> dict[str, torch.Tensor]:
        logits_BC = self.logits(batch)
        loss = F.cross_entropy(logits_BC.float(), batch["labels"])
        accuracy = (logits_BC.argmax(-1) == batch["labels"]).float().mean()
        return {"loss": loss, "accuracy": accuracy}

    def validation_step(self, batch, batch_idx):

        padding = is_padding(batch)  # a rank's filler batch (data/validation.py): computed, not counted
        logits_BC = self.logits(batch)
        loss = F.cross_entropy(logits_BC.float(), batch["labels"])
        if not padding:
            self.val_accuracy.update(logits_BC, batch["labels"])
            self.val_f1.update(logits_BC, batch["labels"])
        self.log("val/loss", loss, batch_size=0 if padding else len(batch["labels"]), sync_dist=True, prog_bar=True)
        return loss

    def on_validation_epoch_end(self):
        accuracy, f1 = float(self.val_accuracy.compute()), float(self.val_f1.compute())
        self.val_accuracy.reset()
        self.val_f1.reset()
        self.log_dict({"val/accuracy": accuracy, "val/f1": f1}, prog_bar=True)
        if self.trainer.sanity_checking:
            return
        self.history.append({"step": int(self.trainer.global_step), "accuracy": accuracy, "f1": f1})
        summary = self.convergence()
        self.log_dict({"val/best_f1": summary["best_f1"], "val/steps_to_target": float(summary["steps_to_target"])})

    def test_step(self, batch, batch_idx):

        weight = 0 if is_padding(batch) else len(batch["labels"])
        out = self.step(batch)
        self.log_dict({f"test/{k}": v for k, v in out.items()}, batch_size=weight, sync_dist=True)

    def convergence(self) -> dict:
        """Best validation F1 so far and the first step that reached ``target_fraction`` of it."""
        if not self.history:
            return {"best_f1": float("nan"), "steps_to_target": -1, "history": []}
        best = max(h["f1"] for h in self.history)
        first = next(h["step"] for h in self.history if h["f1"] >= self.target_fraction * best)
        return {"best_f1": best, "best_accuracy": max(h["accuracy"] for h in self.history),
                "target_fraction": self.target_fraction, "steps_to_target": first, "history": self.history}

    def on_fit_end(self):
        if self.trainer.is_global_zero and self.trainer.log_dir:
            folder = Path(self.trainer.log_dir)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "convergence.json").write_text(json.dumps(self.convergence(), indent=2) + "\n")

    # ------------------------------------------------------------------ export
    def export_extra(self, folder: Path) -> None:
        """The classification head beside the backbone: classifier.safetensors + classifier.json."""
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous() for k, v in self.classifier.state_dict().items()},
                  str(folder / "classifier.safetensors"))
        (folder / "classifier.json").write_text(json.dumps(
            {"num_labels": self.num_labels, "pooling": self.pooling.mode,
             "merged_from": self.merge_spec.models if self.merge_spec else [self.model_path],
             "weights": self.merge_spec.weights if self.merge_spec else [1.0]}, indent=2) + "\n")
