"""One gradient reduction per step when a step runs several backward passes (GradCache's chunk replays).

GradCache back-propagates each chunk of a batch separately, inside the backward of the step's loss.
Left alone, DDP would all-reduce after the first chunk and let later chunks accumulate unsynced
(ranks end with different weights), and FSDP2 would reduce-scatter once per chunk. ``ReplaySync``
makes every chunk but the last accumulate locally and the last one reduce the accumulated
gradients, as DDP's ``no_sync`` does for gradient accumulation:

* DDP: the step's forward does not prepare the reducer (``require_backward_grad_sync`` off while
  ``training_step`` runs inside DDP's forward); the last chunk prepares it (Lightning's
  ``prepare_for_backward``) just before its backward, so that backward all-reduces once.
* FSDP2 (``fully_shard``): ``set_requires_gradient_sync(False)`` for all chunks but the last.

If Lightning itself blocks the sync (a gradient-accumulation micro-batch), the last chunk does not
sync either. One process: nothing to do.

One ``ReplaySync`` serves a whole fit: the stage builds it once the strategy has wrapped the model
(``on_fit_start``, see ``bidirlm_pl.stages.contrastive.ContrastiveCore``) and sets it as ``GradCache.sync``;
each step then calls ``begin()`` in ``training_step`` and ``end()`` after the batch.
"""

from __future__ import annotations

import torch


class ReplaySync:
    """Gradient-sync control for the chunked backward passes of every training step (see the module docstring)."""

    def __init__(self, modules: list[torch.nn.Module | None], strategy_model: torch.nn.Module | None):
        from torch.nn.parallel import DistributedDataParallel

        self.ddp = strategy_model if isinstance(strategy_model, DistributedDataParallel) else None
        self.fsdp = [m for m in modules if m is not None and hasattr(m, "set_requires_gradient_sync")]
        self.wanted = True
        self.active = False

    def begin(self) -> None:
        """Call in ``training_step`` (inside DDP's forward) before the step's loss is built."""
        if self.ddp is not None and torch.is_grad_enabled():
            self.wanted = self.ddp.require_backward_grad_sync
            self.ddp.require_backward_grad_sync = False  # DDP's forward then leaves the reducer idle
            self.active = True

    def before_backward(self, output: torch.Tensor, *, last: bool) -> None:
        """Call between a replayed chunk's forward and its backward."""
        for module in self.fsdp:
            module.set_requires_gradient_sync(last)
        if self.ddp is not None and last and self.active:
            from lightning.pytorch.overrides.distributed import prepare_for_backward

            self.ddp.require_backward_grad_sync = self.wanted
            prepare_for_backward(self.ddp, output)  # no-op when the sync is blocked (accumulation)
            self.active = False

    def end(self) -> None:
        """Restore the flags if a step ended without its backward (e.g. a skipped batch)."""
        if self.ddp is not None and self.active:
            self.ddp.require_backward_grad_sync = self.wanted
            self.active = False
        for module in self.fsdp:
            module.set_requires_gradient_sync(True)
