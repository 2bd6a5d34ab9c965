"""The typed blocks a stage config is made of: the backbone to load, its LoRA adapters, the learning-rate schedule.

Plain dataclasses (no torch at import) in the leaf layer: checkpoints allow-list them for
``torch.load(weights_only=True)``, jsonargparse builds them from YAML, and every layer may import them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from bidirlm_pl.core.errors import BidirLMError

if TYPE_CHECKING:
    import torch

SUPPORTED_MODEL_TYPES = ("qwen3", "gemma3_text", "gemma3", "llama")  # HF model_type of the decoders we adapt


@dataclass
class LoraSpec:
    """LoRA adapters (peft) on the chosen modules; merged into the weights on export."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class BackboneSpec:
    """The model a stage trains and how it is loaded: the ``backbone:`` block of every stage config.

    One typed block shared by every stage, so that a backbone option is written once.
    ``head``, ``bidirectional`` and ``trainable`` left at ``None`` take the stage's own default
    (MNTP keeps the output layer, contrastive loads the bare decoder, UBMoE stage 2 runs causally...).

    Args:
        model: a hub id (``Qwen/Qwen3-0.6B``, ``org/name@revision``), a local HF folder or an offline asset
            name (``gemma3-270m``, ``tiny-qwen3``, ``random:qwen3-0.6b``).
        attn_implementation: eager, sdpa, flex_attention (CPU/GPU); varlen, flash_attention_2,
            flash_attention_4 (CUDA, packed rows through a FlashAttention varlen kernel).
        dtype: weights dtype at load (use the trainer's ``precision`` for mixed precision).
        bidirectional: default attention mode of the backbone.
        head: ``causal_lm`` keeps the output layer, ``base`` loads the bare decoder.
        trainable: module groups that train (see ``bidirlm_pl.backbone.trainable.GROUPS``).
        lora: LoRA adapters (then ``trainable`` defaults to the adapters only).
        gradient_checkpointing: recompute activations in backward to save memory.
        compile: ``torch.compile`` each decoder layer (regional compilation: one graph reused per layer).
    """

    model: str
    attn_implementation: str = "sdpa"
    dtype: str = "float32"
    bidirectional: bool | None = None
    head: str | None = None
    trainable: list[str] | None = None
    lora: LoraSpec | None = None
    gradient_checkpointing: bool = False
    compile: bool = False

    @classmethod
    def of(cls, spec: BackboneSpec | dict | str) -> BackboneSpec:
        """A spec from a spec, a dict of its fields (a YAML block) or a bare model reference."""
        if isinstance(spec, cls):
            return spec
        if isinstance(spec, str):
            return cls(model=spec)
        if isinstance(spec, dict):
            unknown = sorted(set(spec) - set(cls.__dataclass_fields__))
            if unknown:
                raise BidirLMError(f"backbone keys {unknown} are unknown; expected some of "
                                   f"{sorted(cls.__dataclass_fields__)}")
            fields = dict(spec)
            if isinstance(fields.get("lora"), dict):
                fields["lora"] = LoraSpec(**fields["lora"])
            return cls(**fields)
        raise BidirLMError(f"backbone {spec!r} is not a model reference or a mapping of backbone fields")



SCHEDULES = ("constant", "linear", "cosine", "wsd")


@dataclass
class Schedule:
    """Learning-rate schedule: linear warmup, then constant, linear or cosine decay, or warmup-stable-decay.

    ``warmup`` and ``decay`` are fractions of the total optimizer steps when below 1, else step counts.
    """

    name: str = "constant"
    warmup: float = 0.0
    decay: float = 0.1
    min_lr_ratio: float = 0.0

    def build(self, optimizer: torch.optim.Optimizer, total_steps: int):
        from transformers import get_scheduler

        if self.name not in SCHEDULES:
            raise BidirLMError(f"schedule '{self.name}' is not one of {list(SCHEDULES)}")
        steps = lambda x: int(x * total_steps) if x < 1 else int(x)
        warmup = steps(self.warmup)
        if self.name == "wsd":
            return get_scheduler(
                "warmup_stable_decay", optimizer, num_warmup_steps=warmup, num_training_steps=total_steps,
                scheduler_specific_kwargs={"num_decay_steps": max(1, steps(self.decay)),
                                           "min_lr_ratio": self.min_lr_ratio},
            )
        if self.name == "cosine" and self.min_lr_ratio > 0:
            return get_scheduler("cosine_with_min_lr", optimizer, num_warmup_steps=warmup,
                                 num_training_steps=total_steps,
                                 scheduler_specific_kwargs={"min_lr_rate": self.min_lr_ratio})
        name = "constant_with_warmup" if self.name == "constant" else self.name
        return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
