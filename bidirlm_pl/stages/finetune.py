"""FinetuneStage: fine-tune a (bidirectional) decoder on one labelled task, exported as a head transformers loads.

Tasks: ``sequence`` (classification of one text), ``pair`` (of a text pair: NLI, paraphrase), ``regression``
(a score), ``token`` (POS, NER with BIO tags) and ``qa`` (extractive answer spans). Batches come from
:class:`bidirlm_pl.data.tasks.LabelledTaskData`; the head is built by :mod:`bidirlm_pl.models.heads`, whose rule
decides the export: ``pooling: last`` (the default) trains transformers' own ``...ForSequenceClassification``
(it pools the last non-pad token), so the folder loads with ``AutoModelForSequenceClassification`` and
``pipeline()``; ``mean`` / ``first`` (the paper's mean pooling) and heads transformers lacks (Gemma3 token
classification and QA) load with ``bidirlm_pl.models.heads.load_task_model``.

Defaults follow BidirLM App. D: bidirectional attention, AdamW (betas 0.9/0.95, eps 1e-5, weight decay 0.1),
10% warmup then linear decay, batch 32 (the data module's). Validation logs the task's metrics (torchmetrics:
accuracy and macro-F1, Spearman and Pearson; entity F1 of BIO tags; SQuAD exact match and F1) as ``val/<name>``,
and ``val/metric`` for the one named by ``metric``. At the end of the fit the best checkpoint of the config's
``ModelCheckpoint(monitor=...)`` is restored, the test split is scored (``test/<name>``, printed, written to
``bidirlm_task.json``) and the export carries those weights. Several test sets (the data's ``test_configs``) are
scored apart: ``test/<set>/<name>`` each, and ``test/<name>`` their mean.

Convergence: every validation also logs ``val/best_metric`` and ``val/steps_to_target``, the first step whose
``metric`` reached ``target_fraction`` (93%) of the best so far; the history is written to
``<log_dir>/convergence.json`` at the end of the fit.

Merge, then fine-tune (BidirLM's specialist transfer): with ``merge_with``, the backbone is ``backbone.model``
merged with those models (``merge_weights``, ``merge_method``...) by the streaming engine, once, into a cache
folder named by a hash of the merge (``models/merging/cache.py``), and reused by later runs; the same weights as
``bidirlm merge`` of the same models writes.

    bidirlm fit --config configs/finetune/tiny-sequence.yaml
    bidirlm fit --config configs/merge/specialist-gemma3-270m.yaml --config configs/merge/specialist-tiny.yaml
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torchmetrics import MeanMetric, PearsonCorrCoef, SpearmanCorrCoef, SumMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from bidirlm_pl.backbone.load import apply_lora, load_backbone
from bidirlm_pl.backbone.trainable import apply_trainable
from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.core.export import plain_state_dict, save_hf_folder
from bidirlm_pl.core.specs import BackboneSpec, Schedule
from bidirlm_pl.data.validation import is_padding
from bidirlm_pl.evaluation.task_metrics import (
    entity_counts,
    f1_from_counts,
    group_means,
    is_bio,
    squad_exact_match,
    squad_f1,
)
from bidirlm_pl.models.heads import (
    HEAD_PREFIX,
    TaskHeadModel,
    TaskInfo,
    best_spans,
    build_task_model,
    check_task,
    head_parameters,
    is_native,
    prepare_tokenizer,
    span_text,
    write_task_files,
)
from bidirlm_pl.models.merging.cache import cached_merge, is_merged, merge_cache_folder
from bidirlm_pl.models.merging.engine import RECORD_FILE, MergeSpec, plan
from bidirlm_pl.stages.base import BackboneStage, default_optimizer

IGNORE = -100
METRICS = {"sequence": ("accuracy", "f1"), "pair": ("accuracy", "f1"), "regression": ("spearman", "pearson"),
           "token": ("accuracy", "entity_f1"), "qa": ("f1", "exact_match")}


def _inner(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "peft_config") else model


def steps_to_target(history: list[tuple[int, float]], fraction: float) -> int:
    """The first step whose value reached ``fraction`` of the best value of ``history`` ((step, value) pairs in
    step order, higher is better; NaN values are skipped); -1 without any value.

    >>> steps_to_target([(5, 0.5), (10, 0.9), (15, 1.0)], 0.9)
    10
    """
    values = [(step, value) for step, value in history if not math.isnan(value)]
    if not values:
        return -1
    best = max(value for _, value in values)
    target = fraction * best if best > 0 else best  # a best at or below 0 (a correlation) must be reached itself
    return next(step for step, value in values if value >= target)


class FinetuneStage(BackboneStage):
    """Fine-tuning on a labelled task with a transformers-loadable head.

    Args (besides :class:`BackboneStage`'s; ``backbone.head`` is decided by the task):
        task: ``sequence``, ``pair``, ``regression``, ``token`` or ``qa``.
        pooling: ``last`` (transformers' native sequence classifier), ``mean`` or ``first`` (our head);
            sequence tasks only.
        (``backbone.trainable`` may name ``head``: with no decoder group, only the head trains, a linear probe.)
        labels: the label list in id order (default: the data's ClassLabel names, else the sorted labels found);
            a data label outside an explicit list is an error.
        metric: the validation metric that ``val/metric`` repeats (default: accuracy for sequence and pair,
            spearman for regression, entity_f1 for BIO tags else accuracy for token, f1 for qa).
        max_answer_tokens: the longest answer span (tokens) QA decoding considers.
        restore_best: at the end of the fit, load the best checkpoint of the ``ModelCheckpoint`` that monitors a
            metric (the export and the test scores then come from it).
        test_after_fit: score the test split at the end of the fit.
        target_fraction: ``val/steps_to_target`` is the first step whose ``metric`` reached this fraction of its best.
        merge_with: models to merge ``backbone.model`` with before fine-tuning (empty: no merge).
        merge_weights: one per model, ``backbone.model`` first (default equal weights).
        merge_method: ``linear``, ``slerp``, ``task_arithmetic`` or ``ties`` (the last two need ``merge_base``).
        merge_base: the common ancestor for ``task_arithmetic`` and ``ties``.
        merge_key_maps: per-model prefix renames into the shared backbone (``MergeSpec.key_maps``).
        merge_cache: where merged folders are kept (default ``<asset cache>/merges``).
    """

    fixed_head = "base"  # the task head is built on the bare decoder (models/heads.py)

    def __init__(
        self,
        backbone: BackboneSpec,
        task: str = "sequence",
        pooling: str = "last",
        labels: list[str] | None = None,
        metric: str | None = None,
        max_answer_tokens: int = 30,
        restore_best: bool = True,
        test_after_fit: bool = True,
        target_fraction: float = 0.93,
        merge_with: list[str] | None = None,
        merge_weights: list[float] | None = None,
        merge_method: str = "linear",
        merge_base: str | None = None,
        merge_key_maps: list[dict[str, str] | None] | None = None,
        merge_cache: str | None = None,
        optimizer: OptimizerCallable = default_optimizer,
        schedule: Schedule | None = None,
    ):
        check_task(task, pooling)
        if pooling != "last" and task in ("token", "qa"):
            raise BidirLMError(f"pooling '{pooling}' applies to sequence tasks; task '{task}' has none (use last)")
        if metric is not None and metric not in METRICS[task]:
            raise BidirLMError(f"metric '{metric}' is not one of task '{task}''s {list(METRICS[task])}")
        if max_answer_tokens < 1:
            raise BidirLMError(f"max_answer_tokens {max_answer_tokens} must be at least 1")
        if not 0.0 < target_fraction <= 1.0:
            raise BidirLMError(f"target_fraction {target_fraction} is not in (0, 1]")
        if not merge_with and merge_weights is not None:
            raise BidirLMError("merge_weights given but merge_with is empty; list the models to merge with")
        super().__init__(backbone, optimizer=optimizer, schedule=schedule or Schedule(name="linear", warmup=0.1))
        self.merge_spec: MergeSpec | None = None
        if merge_with:
            models = [self.model_path, *merge_with]
            weights = list(merge_weights) if merge_weights is not None else [1.0] * len(models)
            self.merge_spec = MergeSpec(models=models, weights=weights, output="", method=merge_method,
                                        base=merge_base, key_maps=merge_key_maps, overwrite=True)
            self.merge_spec.output = str(merge_cache_folder(self.merge_spec, merge_cache))
            plan(self.merge_spec)  # every merge mistake surfaces here, before any training
        self.target_fraction = target_fraction
        self.history: list[dict] = []  # one row per validation: the step and the val/ values
        self.task, self.pooling, self.labels = task, pooling, list(labels) if labels is not None else None
        self.metric_name = metric
        self.max_answer_tokens = max_answer_tokens
        self.restore_best, self.test_after_fit = restore_best, test_after_fit
        self.label_names: list[str] | None = None
        self.test_groups: list[str] = []  # the data's test sets scored apart (test_configs)
        self.metrics = None
        self.scores: dict[str, dict[str, float]] = {}

    # ------------------------------------------------------------------ model
    def _datamodule(self):
        return getattr(self._trainer, "datamodule", None) if self._trainer is not None else None

    def resolve_labels(self) -> list[str] | None:
        """The label names: the data module's (which checked the data against ``labels``), else ``labels``."""
        data = self._datamodule()
        names = getattr(data, "label_names", None)
        if names is None and data is not None and hasattr(data, "read") and self.task not in ("qa", "regression"):
            data.read()
            names = data.label_names
        names = names if names is not None else self.labels
        if self.task not in ("qa", "regression") and not names:
            raise BidirLMError(f"task '{self.task}' needs its labels: set model.init_args.labels or train with "
                               "bidirlm_pl.data.tasks.LabelledTaskData")
        if self.task == "qa":
            return None
        return list(names) if names else None

    def main_metric(self) -> str:
        if self.metric_name is not None:
            return self.metric_name
        if self.task == "token":
            return "entity_f1" if is_bio(self.label_names or []) else "accuracy"
        return METRICS[self.task][0]

    def merged_model_path(self) -> str:
        """The folder the backbone loads: ``backbone.model``, or its merge with ``merge_with`` (run once, cached).

        Several processes: rank 0 merges while the others wait; then a node that does not see that folder (a
        cache on a disk of its own) merges on its local rank 0. Never two writers of one folder.
        """
        spec = self.merge_spec
        if spec is None:
            return self.model_path
        trainer = self._trainer
        if trainer is None or trainer.is_global_zero:
            self._merge(spec)
        if trainer is not None:
            trainer.strategy.barrier("merge_with")
            if trainer.local_rank == 0 and not trainer.is_global_zero and not is_merged(spec.output):
                self._merge(spec)
            trainer.strategy.barrier("merge_with_node")
        return spec.output

    @staticmethod
    def _merge(spec: MergeSpec) -> None:
        report = cached_merge(spec)
        rank_zero_info(report.summary() if report is not None else f"reusing the merged backbone {spec.output}")

    def build_model(self):
        base, tokenizer = load_backbone(
            self.merged_model_path(), attn_implementation=self.attn_implementation, dtype=self.dtype_name,
            bidirectional=self.bidirectional, head="base", lora=None)
        prepare_tokenizer(tokenizer, self.task)
        model = build_task_model(base, self.task, labels=self.label_names, pooling=self.pooling,
                                 pad_token_id=tokenizer.pad_token_id)
        if self.lora is not None:
            model = apply_lora(model, self.lora)
        return model, tokenizer

    def configure_model(self):
        if self.backbone is not None:
            return
        if self.label_names is None:
            self.label_names = self.resolve_labels()
        if self.task == "token" and self.metric_name == "entity_f1" and not is_bio(self.label_names):
            raise BidirLMError(f"metric entity_f1 needs BIO tags (O, B-X, I-X); labels are {self.label_names[:6]}")
        self.hparams["labels"] = self.label_names  # a checkpoint rebuilds the same head (bidirlm export)
        super().configure_model()
        self.test_groups = list(getattr(self._datamodule(), "test_groups", None) or [])
        prefixes = ("val", "test", *(f"test{i}" for i in range(len(self.test_groups))))
        self.metrics = nn.ModuleDict({prefix: self._new_metrics() for prefix in prefixes})

    def apply_groups(self) -> dict[str, int]:
        """The ``trainable`` groups of the decoder, and the task head always (``[head]`` alone: a frozen decoder)."""
        groups = [g for g in self.trainable if g != "head"]
        if groups:
            counts = apply_trainable(self.backbone, groups)
        else:
            counts = {}
            for p in self.backbone.parameters():
                p.requires_grad_(False)
        head = head_parameters(self.backbone)
        for p in head:
            p.requires_grad_(True)
        counts["head"] = sum(p.numel() for p in head)
        return counts

    def _new_metrics(self) -> nn.ModuleDict:
        n = len(self.label_names or [])
        if self.task in ("sequence", "pair"):
            return nn.ModuleDict({"accuracy": MulticlassAccuracy(n, average="micro"),
                                  "f1": MulticlassF1Score(n, average="macro")})
        if self.task == "regression":
            return nn.ModuleDict({"spearman": SpearmanCorrCoef(), "pearson": PearsonCorrCoef()})
        if self.task == "token":
            return nn.ModuleDict({"accuracy": MulticlassAccuracy(n, average="micro", ignore_index=IGNORE),
                                  "tp": SumMetric(), "n_pred": SumMetric(), "n_gold": SumMetric()})
        return nn.ModuleDict({"exact_match": MeanMetric(), "f1": MeanMetric()})

    # ------------------------------------------------------------------ steps
    def forward_batch(self, batch: dict):
        kwargs = self.model_kwargs(batch)
        if not is_native(_inner(self.backbone)):
            kwargs["pool_mask"] = batch["attention_mask"]
        return self.backbone(**kwargs)

    def loss(self, out, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The task loss and the count it averages over (rows, or labelled tokens)."""
        if self.task == "qa":
            count = (batch["start_positions"] != IGNORE).sum()
            start = labelled_mean(out.start_logits.float(), batch["start_positions"])
            end = labelled_mean(out.end_logits.float(), batch["end_positions"])
            return (start + end) / 2, count
        logits = out.logits.float()
        if self.task == "regression":
            return F.mse_loss(logits.squeeze(-1), batch["labels"].float()), batch["labels"].new_tensor(len(logits))
        if self.task == "token":
            return labelled_mean(logits.flatten(0, 1), batch["labels"].flatten()), (batch["labels"] != IGNORE).sum()
        return F.cross_entropy(logits, batch["labels"]), batch["labels"].new_tensor(len(logits))

    def step(self, batch: dict) -> dict[str, torch.Tensor]:
        loss, count = self.loss(self.forward_batch(batch), batch)
        if self.task == "token":  # several processes: the mean over every rank's labelled tokens
            loss = self.global_token_mean(loss, count)
        return {"loss": loss}

    def _evaluate(self, batch: dict, prefix: str, log: bool = True) -> torch.Tensor:
        padding = is_padding(batch)  # a rank's filler batch (data/validation.py): computed, not counted
        group = batch.pop("group", None)  # which test set (test_configs)
        out = self.forward_batch(batch)
        loss, count = self.loss(out, batch)
        if not padding:
            self.update_metrics(self.metrics[prefix if group is None else f"{prefix}{group}"], out, batch)
        if log:
            weight = 0 if padding else max(1, int(count))
            self.log(f"{prefix}/loss", loss, batch_size=weight, sync_dist=True, prog_bar=prefix == "val")
        return loss

    def update_metrics(self, metrics: nn.ModuleDict, out, batch: dict) -> None:
        if self.task in ("sequence", "pair"):
            predicted = out.logits.argmax(-1)
            metrics["accuracy"].update(predicted, batch["labels"])
            metrics["f1"].update(predicted, batch["labels"])
        elif self.task == "regression":
            predicted = out.logits.float().squeeze(-1)
            metrics["spearman"].update(predicted, batch["labels"].float())
            metrics["pearson"].update(predicted, batch["labels"].float())
        elif self.task == "token":
            word_index, gold = batch["word_index"], batch["word_labels"]
            predicted = out.logits.argmax(-1).gather(1, word_index.clamp(min=0))
            predicted = torch.where(word_index >= 0, predicted, torch.full_like(predicted, IGNORE))
            metrics["accuracy"].update(predicted, gold)
            names = self.label_names
            gold_tags = [[names[y] for y in row if y != IGNORE] for row in gold.tolist()]
            predicted_tags = [[names[p] for p, y in zip(prow, grow) if y != IGNORE]
                              for prow, grow in zip(predicted.tolist(), gold.tolist())]
            tp, n_pred, n_gold = entity_counts(gold_tags, predicted_tags) if is_bio(names) else (0, 0, 0)
            metrics["tp"].update(tp)
            metrics["n_pred"].update(n_pred)
            metrics["n_gold"].update(n_gold)
        else:
            start, end = best_spans(out.start_logits, out.end_logits, batch["context_mask"], self.max_answer_tokens)
            for i, (s, e) in enumerate(zip(start.tolist(), end.tolist())):
                text = span_text(batch["contexts"][i], batch["offsets"][i], s, e)
                metrics["exact_match"].update(squad_exact_match(text, batch["answers"][i]))
                metrics["f1"].update(squad_f1(text, batch["answers"][i]))

    def compute_metrics(self, metrics: nn.ModuleDict) -> dict[str, float]:
        """Epoch values (synced over processes by torchmetrics), then reset."""
        if self.task == "token":
            values = {"accuracy": float(metrics["accuracy"].compute())}
            if is_bio(self.label_names):
                counts = [float(metrics[k].compute()) for k in ("tp", "n_pred", "n_gold")]
                values["entity_f1"] = f1_from_counts(*counts)
        else:
            values = {name: float(metric.compute()) for name, metric in metrics.items()}
        for metric in metrics.values():
            metric.reset()
        values["metric"] = values.get(self.main_metric(), float("nan"))
        return values

    def test_scores(self) -> dict[str, float]:
        """The test metrics; with several test sets, each metric's mean over them and every set's own values
        (``<set>/<metric>``)."""
        if not self.test_groups:
            return self.compute_metrics(self.metrics["test"])
        return group_means({name: self.compute_metrics(self.metrics[f"test{i}"])
                            for i, name in enumerate(self.test_groups)})

    def validation_step(self, batch, batch_idx):
        return self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx):
        return self._evaluate(batch, "test")

    def on_validation_epoch_end(self):
        values = self.compute_metrics(self.metrics["val"])
        self.log_dict({f"val/{k}": v for k, v in values.items()}, prog_bar=True)
        if self.trainer.sanity_checking:
            return
        self.history.append({"step": int(self.trainer.global_step), **values})
        summary = self.convergence()
        self.log_dict({"val/best_metric": summary["best"], "val/steps_to_target": float(summary["steps_to_target"])})

    def convergence(self) -> dict:
        """The best validation ``metric`` so far, the first step that reached ``target_fraction`` of it, the history."""
        scores = [(row["step"], row["metric"]) for row in self.history]
        best = max((v for _, v in scores if not math.isnan(v)), default=float("nan"))
        return {"metric": self.main_metric(), "best": best, "target_fraction": self.target_fraction,
                "steps_to_target": steps_to_target(scores, self.target_fraction), "history": self.history}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["convergence_history"] = self.history

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.history = list(checkpoint.get("convergence_history", []))  # a resumed run continues the history

    def on_test_epoch_end(self):
        values = self.test_scores()
        self.log_dict({f"test/{k}": v for k, v in values.items()})
        self.scores["test"] = values

    # ------------------------------------------------------------------ end of the fit
    def on_fit_end(self):
        """``<log_dir>/convergence.json``: the history of the validations and the step that reached the target."""
        folder = self.trainer.log_dir  # a broadcast from rank 0: every rank asks
        if self.trainer.is_global_zero and folder and self.history:
            Path(folder).mkdir(parents=True, exist_ok=True)
            (Path(folder) / "convergence.json").write_text(json.dumps(self.convergence(), indent=2) + "\n")

    def monitored_checkpoint(self):
        for callback in self.trainer.callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.monitor and callback.best_model_path:
                return callback
        return None

    def on_train_end(self):
        """Restore the best monitored checkpoint, then score the test split with it (before any export)."""
        callback = self.monitored_checkpoint() if self.restore_best else None
        if callback is not None and Path(callback.best_model_path).exists():
            checkpoint = self.trainer.strategy.load_checkpoint(callback.best_model_path)
            self.trainer.strategy.load_model_state_dict(checkpoint)
            score = float(callback.best_model_score) if callback.best_model_score is not None else float("nan")
            self.scores["validation"] = {callback.monitor: score}
            rank_zero_info(f"restored the best checkpoint by {callback.monitor} ({score:.4f}): {callback.best_model_path}")
        data = self._datamodule()
        if self.test_after_fit and data is not None and hasattr(data, "test_dataloader"):
            self.scores["test"] = self.run_test(data.test_dataloader())
            shown = ", ".join(f"{k} {v:.4f}" for k, v in self.scores["test"].items())
            rank_zero_info(f"test ({self.task}): {shown}")
            for logger in self.trainer.loggers:
                logger.log_metrics({f"test/{k}": v for k, v in self.scores["test"].items()}, step=self.global_step)

    @torch.no_grad()
    def run_test(self, loader) -> dict[str, float]:
        """Score batches with the current weights (the test loop's computation, outside a Lightning loop)."""
        was_training = self.backbone.training
        self.backbone.eval()
        try:
            for batch in loader:
                batch = self.trainer.strategy.batch_to_device(batch) if self._trainer is not None else batch
                self._evaluate(batch, "test", log=False)
            return self.test_scores()
        finally:
            self.backbone.train(was_training)

    # ------------------------------------------------------------------ export
    card_loader = "task"  # the card reads bidirlm_task.json (core/model_card.py)

    def task_info(self) -> TaskInfo:
        data = self._datamodule()
        return TaskInfo(task=self.task, pooling=self.pooling, labels=self.label_names, metric=self.main_metric(),
                        native=is_native(_inner(self.backbone)), max_length=getattr(data, "max_length", None),
                        scores=self.scores)

    def export_hf(self, target: str | Path, *, overwrite: bool = True) -> Path:
        """transformers' head class: the whole model (``super``). Our head: the bare decoder's folder, and the head
        under ``bidirlm_head.*`` in ``task_head.safetensors`` (see ``models/heads.py``)."""
        max_length = getattr(self._datamodule(), "max_length", None)
        if max_length:
            self.tokenizer.model_max_length = int(max_length)  # pipelines truncate as training did
        inner = _inner(self.backbone)
        if not isinstance(inner, TaskHeadModel):
            return super().export_hf(target, overwrite=overwrite)
        state = self.full_state_dict()  # collective under FSDP2
        if self._trainer is None or self.trainer.is_global_zero:
            if state is None:
                state = plain_state_dict(self.backbone)
            self._export_name = Path(target).name
            self._head_state = {HEAD_PREFIX + k[len("head."):]: v.detach().cpu().contiguous()
                                for k, v in state.items() if k.startswith("head.")}
            decoder = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
            save_hf_folder(inner.model, self.tokenizer, target, overwrite=overwrite, extra=self._export_files,
                           state_dict=decoder)
        return Path(target)

    def export_extra(self, folder: Path) -> None:
        """``bidirlm_task.json`` (and ``task_head.safetensors`` for our heads); the card reads them."""
        write_task_files(self.backbone, folder, self.task_info(), head_state=getattr(self, "_head_state", None))
        if self.merge_spec is not None and is_merged(self.merge_spec.output):  # what the backbone started from
            shutil.copy2(Path(self.merge_spec.output) / RECORD_FILE, folder / RECORD_FILE)


def labelled_mean(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over the labelled entries; 0, still in the graph, when there are none.

    The same value as ``F.cross_entropy(..., ignore_index=IGNORE)`` without its NaN on an all-ignored batch, and
    without reading the count on the host (no device sync per step).
    """
    total = F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum")
    return total / (labels != IGNORE).sum().clamp(min=1)
