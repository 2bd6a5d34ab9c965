"""NaN or inf losses never reach the weights: stop with a message naming the step, or skip the batch.

Every stage attaches ``NonFiniteGuard(action="stop")`` unless the trainer's callbacks already hold
one, so a run whose loss turns non-finite stops *before* the update, names the step and the last
checkpoint, and exports nothing (an HF export only happens at the end of a successful fit).
``action: skip`` drops such batches instead (no optimizer update: every gradient is cleared, so
AdamW leaves weights and moments untouched) and stops once ``max_skips`` batches in a row were bad.

    trainer:
      callbacks:
        - class_path: bidirlm_pl.callbacks.NonFiniteGuard
          init_args: {action: skip, max_skips: 10}
"""

from __future__ import annotations

import lightning as L
import torch

from bidirlm_pl.core.errors import BidirLMError

ACTIONS = ("stop", "skip")


class NonFiniteLossError(BidirLMError):
    """The training loss was NaN or inf; raised before the optimizer could apply it."""


class NonFiniteGuard(L.Callback):
    def __init__(self, action: str = "stop", max_skips: int = 10):
        if action not in ACTIONS:
            raise BidirLMError(f"NonFiniteGuard action '{action}' is not one of {list(ACTIONS)}")
        if max_skips < 1:
            raise BidirLMError(f"NonFiniteGuard max_skips {max_skips} must be >= 1")
        self.action, self.max_skips = action, max_skips
        self.skipped = 0          # total batches dropped
        self._in_a_row = 0
        self._bad = False

    def on_before_backward(self, trainer, pl_module, loss):
        # under gradient accumulation one bad micro-batch spoils the whole step's gradient: _bad stays set
        # until the step's optimizer call
        if torch.isfinite(loss.detach()).all():
            self._in_a_row = 0
            return
        self._bad = True
        self._in_a_row += 1
        value = float(loss.detach().float().reshape(-1)[0])
        if self.action == "stop" or self._in_a_row >= self.max_skips:
            why = "" if self.action == "stop" else f" ({self._in_a_row} batches in a row; max_skips {self.max_skips})"
            raise NonFiniteLossError(
                f"training loss is {value} at step {trainer.global_step}{why}; stopped before the update (weights "
                f"are those after step {trainer.global_step - 1}; last checkpoint: {_last_checkpoint(trainer)}); "
                "lower the lr or skip such batches"
            )

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if not self._bad:
            return
        self._bad = False  # the next step starts clean
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None  # optimizers skip parameters without gradients: no update, moments untouched
        self.skipped += 1
        pl_module.log("train/skipped_nonfinite", float(self.skipped), batch_size=1)


def _last_checkpoint(trainer) -> str:
    callback = getattr(trainer, "checkpoint_callback", None)
    path = getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "") if callback else ""
    return path or "none saved (enable checkpointing to keep one)"
