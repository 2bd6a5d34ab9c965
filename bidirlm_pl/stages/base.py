"""The shared LightningModule of every adaptation stage: backbone, trainable groups, optimizer, schedule, export.

A stage differs from its siblings by its data and its loss: subclasses implement ``step(batch)``
returning a dict of scalars with a ``loss`` key, and may override ``build_model`` (UBMoE, merge).
"""

from __future__ import annotations

from dataclasses import asdict, is_dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable

from bidirlm_pl.backbone import attention
from bidirlm_pl.backbone.load import check_backend, decoder_of, load_backbone, resolve_dtype
from bidirlm_pl.backbone.trainable import apply_trainable
from bidirlm_pl.callbacks.nonfinite import NonFiniteGuard
from bidirlm_pl.core.distributed import full_state_dict, is_distributed
from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.core.export import save_hf_folder
from bidirlm_pl.core.hub import resolve_model_folder
from bidirlm_pl.core.model_card import write_model_card
from bidirlm_pl.core.specs import BackboneSpec, Schedule
from bidirlm_pl.data.validation import is_padding
from bidirlm_pl.stages.resume import (
    RNG_KEY,
    check_same_model,
    collect_rng_states,
    restore_rng_state,
    rng_state_for_rank,
)


def default_optimizer(params):
    """AdamW as the BidirLM authors ran MNTP (lr 1e-4, wd 0.1, betas 0.9/0.95, eps 1e-5)."""
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-5)


def _check_model_reference(model: str) -> None:
    """Fail at config time, before any training, on a model that is not a folder, an asset or a hub id
    (a hub id is fetched into the Hugging Face cache here, or found there when offline; the data module's
    tokenizer, ``load_backbone`` and the export reuse that resolution: ``bidirlm_pl.core.hub``)."""
    resolve_model_folder(model)


def compile_layers(model: torch.nn.Module) -> int:
    """Regional compilation: ``torch.compile`` every decoder layer in place (one graph, reused); return the count."""
    layers = decoder_of(model).layers
    for layer in layers:
        layer.compile(dynamic=None)
    return len(layers)


class BackboneStage(L.LightningModule):
    """Shared system for adaptation stages.

    Args:
        backbone: the model and how to load it (:class:`~bidirlm_pl.backbone.load.BackboneSpec`; the
            ``backbone:`` block of the YAML). A bare string is taken as ``backbone.model``.
        optimizer: a callable from the config, e.g. ``class_path: torch.optim.AdamW``.
        schedule: learning-rate schedule.

    Subclasses set their defaults for the spec's open fields as class attributes, and
    ``fixed_head`` / ``fixed_bidirectional`` where the stage only makes sense one way.
    """

    default_head: str = "causal_lm"
    default_bidirectional: bool = True
    fixed_head: str | None = None
    fixed_bidirectional: bool | None = None

    def __init__(
        self,
        backbone: BackboneSpec,
        optimizer: OptimizerCallable = default_optimizer,
        schedule: Schedule | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"])
        spec = BackboneSpec.of(backbone)
        _check_model_reference(spec.model)
        resolve_dtype(spec.dtype)
        check_backend(spec.attn_implementation)
        head = spec.head or self.fixed_head or self.default_head
        if self.fixed_head is not None and head != self.fixed_head:
            raise BidirLMError(f"{type(self).__name__} needs backbone.head '{self.fixed_head}', not '{head}'")
        bidirectional = spec.bidirectional
        if bidirectional is None:
            bidirectional = self.default_bidirectional if self.fixed_bidirectional is None else self.fixed_bidirectional
        if self.fixed_bidirectional is not None and bidirectional != self.fixed_bidirectional:
            raise BidirLMError(f"{type(self).__name__} runs with backbone.bidirectional "
                               f"{self.fixed_bidirectional}, not {bidirectional}")
        self.backbone_spec = spec
        self.bidirectional = bidirectional
        self.head = head
        self.trainable = list(spec.trainable) if spec.trainable else self.default_trainable()
        self.optimizer_factory = optimizer
        self.schedule = schedule or Schedule()
        self.backbone = None
        self.tokenizer = None

    def default_trainable(self) -> list[str]:
        return ["lora"] if self.lora else ["all"]

    # the spec's fields under the names the stages, callbacks and export use
    model_path = property(lambda self: self.backbone_spec.model)
    attn_implementation = property(lambda self: self.backbone_spec.attn_implementation)
    dtype_name = property(lambda self: self.backbone_spec.dtype)
    lora = property(lambda self: self.backbone_spec.lora)
    gradient_checkpointing = property(lambda self: self.backbone_spec.gradient_checkpointing)

    # ------------------------------------------------------------------ model
    def load(self, path: str | None = None):
        """``(model, tokenizer)`` of ``path`` (default the spec's model) loaded as the spec says."""
        return load_backbone(
            path or self.model_path, attn_implementation=self.attn_implementation, dtype=self.dtype_name,
            bidirectional=self.bidirectional, head=self.head, lora=self.lora,
        )

    def build_model(self):
        """Return ``(model, tokenizer)``. Override to wrap or convert the backbone (UBMoE, merges)."""
        return self.load()

    def apply_groups(self) -> dict[str, int]:
        """Freeze all but the ``trainable`` groups; return trainable parameter counts. UBMoE has its own groups."""
        return apply_trainable(self.backbone, self.trainable)

    def configure_model(self):
        if self.backbone is not None:
            return
        self.backbone, self.tokenizer = self.build_model()
        self.backbone.train()  # from_pretrained returns eval mode and Lightning keeps module modes
        self.trainable_counts = self.apply_groups()
        if self.gradient_checkpointing:
            self.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.backbone_spec.compile:
            compile_layers(self.backbone)
        if self.device_mesh is not None:  # ModelParallelStrategy: shard after the model is finished
            self.parallelize(self.device_mesh)

    @staticmethod
    def data_parallel_mesh(device_mesh):
        return device_mesh["data_parallel"] if "data_parallel" in (device_mesh.mesh_dim_names or ()) else device_mesh

    def parallelize(self, device_mesh) -> None:
        """FSDP2: shard every decoder layer, then the root, over the data-parallel mesh dimension."""
        from torch.distributed.fsdp import fully_shard

        if self.lora is not None:
            raise BidirLMError("LoRA with ModelParallelStrategy (FSDP2) is not supported; use DDP for LoRA")
        mesh = self.data_parallel_mesh(device_mesh)
        decoder = decoder_of(self.backbone)
        for layer in decoder.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(self.backbone, mesh=mesh)

    def model_kwargs(self, batch: dict, *, bidirectional: bool | None = None) -> dict:
        """Keyword arguments for the backbone call: ids, positions, and the packing-aware mask."""
        bidirectional = self.bidirectional if bidirectional is None else bidirectional
        kwargs = {"input_ids": batch["input_ids"]}
        if batch.get("position_ids") is not None:
            kwargs["position_ids"] = batch["position_ids"]
        dtype = next(self.backbone.parameters()).dtype
        kwargs.update(attention.model_inputs(
            self.backbone.config, seq_ids_BT=batch.get("seq_ids"), attention_mask_BT=batch.get("attention_mask"),
            bidirectional=bidirectional, dtype=dtype,
        ))
        return kwargs

    def hidden_states(self, batch: dict, *, bidirectional: bool | None = None) -> torch.Tensor:
        """Last hidden states (B, T, D) of the decoder, before any output layer."""
        kwargs = self.model_kwargs(batch, bidirectional=bidirectional)
        if self.device_mesh is not None and self.backbone.get_output_embeddings() is not None:
            # FSDP2 gathers the root's parameters (embeddings) only when the root module runs
            out = self.backbone(**kwargs, output_hidden_states=True, logits_to_keep=1)
            return out.hidden_states[-1]
        decoder = decoder_of(self.backbone)
        return decoder(**kwargs).last_hidden_state

    # ------------------------------------------------------------------ steps
    def step(self, batch: dict) -> dict[str, torch.Tensor]:
        raise NotImplementedError("a stage implements step(batch) -> {'loss': ..., other scalars}")

    def batch_size_of(self, batch: dict) -> int:
        return int(batch["input_ids"].shape[0])

    @property
    def world_size(self) -> int:
        return int(self.trainer.world_size) if self._trainer is not None else 1

    def training_step(self, batch, batch_idx):
        out = self.step(batch)
        # several processes: log the mean over ranks, which each stage makes the global batch's value
        self.log_dict({f"train/{k}": v for k, v in out.items()}, prog_bar=True,
                      batch_size=self.batch_size_of(batch), sync_dist=self.world_size > 1)
        return out["loss"]

    def global_token_mean(self, value: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """A per-rank mean over ``count`` tokens, rescaled so that the ranks' average (what DDP and FSDP
        reduce gradients with, and what the log shows) is the mean over every rank's tokens.

        Ranks see different numbers of masked/target tokens; without this, W processes x B rows would
        weight tokens differently from 1 process x W*B rows.
        """

        if not (self.training and torch.is_grad_enabled() and is_distributed()):
            return value
        total = count.detach().to(device=value.device, dtype=torch.float32).clone()
        torch.distributed.all_reduce(total)
        return value * (count.to(value.device, torch.float32) * self.world_size / total.clamp(min=1))

    def validation_step(self, batch, batch_idx):
        return self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx):
        return self._evaluate(batch, "test")

    def _evaluate(self, batch, prefix: str) -> torch.Tensor:
        """Log the step's values, weighted by rows (a rank's filler batch weighs 0: data/validation.py)."""

        weight = 0 if is_padding(batch) else self.batch_size_of(batch)
        out = self.step(batch)
        self.log_dict({f"{prefix}/{k}": v for k, v in out.items()}, prog_bar=prefix == "val", sync_dist=True,
                      batch_size=weight)
        return out["loss"]

    def configure_callbacks(self):
        """Every stage stops on a NaN/inf loss before the update, unless the config sets its own guard."""

        if self._trainer is not None and any(isinstance(c, NonFiniteGuard) for c in self.trainer.callbacks):
            return []
        return [NonFiniteGuard()]

    # ------------------------------------------------------------------ exact resume (see stages/resume.py)
    def on_save_checkpoint(self, checkpoint: dict) -> None:

        checkpoint[RNG_KEY] = collect_rng_states()

    def on_load_checkpoint(self, checkpoint: dict) -> None:

        if "state_dict" in checkpoint:
            self.configure_model()
            saved = (checkpoint.get("hyper_parameters") or {}).get("backbone")
            saved_model = BackboneSpec.of(saved).model if saved is not None else None
            check_same_model(checkpoint["state_dict"], self.state_dict(), saved_model=saved_model, model=self.model_path)
        rank = int(self.trainer.global_rank) if self._trainer is not None else 0
        saved = checkpoint.get(RNG_KEY)
        self._rng_to_restore = rng_state_for_rank(saved, rank, self.world_size)
        if saved and self._rng_to_restore is None:
            from lightning.pytorch.utilities import rank_zero_info

            rank_zero_info(f"the checkpoint's RNG states come from {len(saved)} processes, this run has "
                           f"{self.world_size}: random draws (dropout) continue from fresh seeds, not exactly")

    def on_train_batch_start(self, batch, batch_idx):
        state = getattr(self, "_rng_to_restore", None)
        if state is not None:  # first batch after a resume: continue the interrupted run's random draws

            restore_rng_state(state)
            self._rng_to_restore = None

    # ------------------------------------------------------------------ optimization
    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise BidirLMError("this stage has no trainable parameter; check 'trainable' in the config")
        optimizer = self.optimizer_factory(params)
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer is not None else 1
        scheduler = self.schedule.build(optimizer, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ export
    def export_extra(self, folder: Path) -> None:
        """Hook: add files to an export folder before it is renamed into place (pooling config...)."""

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Unsharded backbone weights (LoRA merged). Collective under FSDP2: call it on every rank."""
        if self.device_mesh is None:
            return None  # save_hf_folder reads the model directly

        state = full_state_dict(self.backbone)
        # a tied output layer is one parameter: keep its first name only, as save_pretrained does
        keep = {name for name, _ in self.backbone.named_parameters()} | {n for n, _ in self.backbone.named_buffers()}
        return {name: tensor for name, tensor in state.items() if name in keep}

    def export_hf(self, target: str | Path, *, overwrite: bool = True) -> Path:
        """Write the trained backbone (LoRA merged) and tokenizer as a plain HF folder, atomically.

        Call it on every rank: sharded weights are gathered collectively, rank 0 writes.
        """
        state = self.full_state_dict()
        if self._trainer is None or self.trainer.is_global_zero:
            self._export_name = Path(target).name
            save_hf_folder(self.backbone, self.tokenizer, target, overwrite=overwrite, extra=self._export_files,
                           state_dict=state)
        return Path(target)

    card_loader = "transformers"  # how the card says to load the export (UBMoE: "ubmoe")

    def _export_files(self, folder: Path) -> None:

        self.export_extra(folder)
        trainer = self._trainer
        if trainer is not None:
            steps, sources = int(trainer.global_step), data_sources(getattr(trainer, "datamodule", None))
        else:  # exported from a checkpoint: bidirlm export sets what the checkpoint recorded
            steps, sources = getattr(self, "card_steps", None), data_sources(getattr(self, "card_sources", None))
        write_model_card(
            folder, name=self._export_name, model=self.model_path, model_folder=resolve_model_folder(self.model_path),
            stage=type(self).__name__, steps=steps, data=sources, encoder=(folder / "modules.json").is_file(),
            loader=self.card_loader)


def data_sources(datamodule) -> list[dict]:
    """The named sources of a data module (its ``sources`` list, which every data module has) or of a list of
    source dicts (a checkpoint's), as plain dicts of where they read from."""
    specs = datamodule if isinstance(datamodule, list | tuple) else getattr(datamodule, "sources", None) or []
    out = []
    for spec in specs:
        fields = asdict(spec) if is_dataclass(spec) else dict(spec) if isinstance(spec, dict) else {}
        out.append({k: fields[k] for k in ("name", "kind", "dataset", "config", "path", "weight")
                    if fields.get(k) not in (None, "auto")})
    return out
