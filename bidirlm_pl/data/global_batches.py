"""Global batches split over processes: why N processes x B rows train exactly like 1 process x N*B rows.

Every data module plans its batches as *global* batches (the rows of one optimizer step over all
processes), identically on every rank, and each rank takes its contiguous slice: rank ``r`` of
``W`` gets rows ``r*B .. (r+1)*B``. Losses that gather across ranks (InfoNCE's candidates) or
normalise by a global count (MNTP's masked tokens) then see the same rows in the same order as one
process holding the whole global batch.

``global_batch_size`` (optional in every data module) fixes the global batch whatever the number
of processes; ``batch_size`` is then derived per process and the two must agree with the world size.

A resumable stream tags each batch with the state *after* it under :data:`STATE_KEY`; the data
module (:class:`ResumableStream`) keeps the state of the batch the trainer actually consumed (see
``on_before_batch_transfer``), saves it in checkpoints and compares a signature of the stream
(sources, weights, seed, global batch...) on resume.
"""

from __future__ import annotations

import copy

from bidirlm_pl.core.errors import BidirLMError

STATE_KEY = "_stream_state"


def world_of(datamodule) -> tuple[int, int]:
    """``(world_size, global_rank)`` of the trainer a data module is attached to (``(1, 0)`` without one)."""
    trainer = getattr(datamodule, "trainer", None)
    if trainer is None:
        return 1, 0
    return int(trainer.world_size), int(trainer.global_rank)


def per_rank_batch_size(batch_size: int, global_batch_size: int | None, world: int) -> int:
    """Rows per process: ``batch_size``, or ``global_batch_size / world`` when a global batch is configured."""
    if global_batch_size is None:
        return int(batch_size)
    if global_batch_size < 1:
        raise BidirLMError(f"global_batch_size {global_batch_size} must be >= 1 (or null to use batch_size per process)")
    if global_batch_size % world:
        raise BidirLMError(
            f"global_batch_size {global_batch_size} does not divide by the world size {world} "
            f"(devices x num_nodes); use a multiple of {world}, e.g. {world * max(1, global_batch_size // world)}"
        )
    return global_batch_size // world


def rank_rows(n_rows: int, rank: int, world: int, per_rank: int | None = None) -> slice:
    """Rows of a global batch of ``n_rows`` that rank ``rank`` trains on.

    ``per_rank`` given: the contiguous block ``rank*per_rank``. Otherwise (a last, partial evaluation
    batch) every rank gets ``n_rows // world`` rows, so collectives see equal shapes; the remainder is dropped.
    """
    size = per_rank if per_rank is not None else n_rows // world
    return slice(rank * size, (rank + 1) * size)


def check_signature(saved: dict | None, current: dict, *, what: str, option: str) -> None:
    """One-line error when a checkpoint's stream was made by a different data configuration."""
    if not saved:
        return  # checkpoints written before signatures existed
    changed = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
    if changed:
        diff = "; ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in changed.items())
        raise BidirLMError(
            f"the checkpoint's {what} comes from other data settings ({diff}); restore them, or set "
            f"{option}: false for a fresh stream"
        )


class ResumableStream:
    """Mixin (before ``LightningDataModule``) for data modules whose training batches carry their stream state.

    The module calls :meth:`init_stream` in ``__init__``, tags each training batch with ``STATE_KEY``,
    starts its stream from :meth:`stream_start`, and implements :meth:`stream_sources`.
    """

    stream_name = "stream"

    def init_stream(self, resume_stream: bool) -> None:
        self.resume_stream = resume_stream
        self._resume_state: dict | None = None
        self._consumed_state: dict | None = None

    def per_rank_batch_size(self) -> int:
        """Rows per process (``self.batch_size``, or ``self.global_batch_size`` over the world size)."""
        return per_rank_batch_size(self.batch_size, self.global_batch_size, world_of(self)[0])

    def stream_sources(self) -> list[tuple[str, float]]:
        """``(name, weight)`` of each training source, in order (a module may load its sources here)."""
        raise NotImplementedError

    def stream_details(self) -> dict:
        """Hook: what else decides this module's stream (``max_length``, row counts...)."""
        return {}

    def stream_signature(self) -> dict:
        """What decides the stream: a checkpoint's stream only continues under the same values."""
        sources = self.stream_sources()
        return {"sources": [name for name, _ in sources], "weights": [round(float(w), 9) for _, w in sources],
                "seed": self.seed, **self.stream_details(),
                "global_batch": self.per_rank_batch_size() * world_of(self)[0]}

    def stream_start(self) -> dict | None:
        """The state after the last consumed batch (or the checkpoint's); None at the very start."""
        return self._consumed_state or self._resume_state

    def on_stream_state(self, state: dict) -> None:
        """Hook: a training batch with this state is about to be trained on."""

    def on_before_batch_transfer(self, batch, dataloader_idx):
        if isinstance(batch, dict) and STATE_KEY in batch:
            batch = dict(batch)
            self._consumed_state = batch.pop(STATE_KEY)
            self.on_stream_state(self._consumed_state)
        return batch

    def state_dict(self) -> dict:
        state = self.stream_start()
        return {"train": copy.deepcopy(state)} if state is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        from lightning.pytorch.utilities import rank_zero_info

        state = state_dict.get("train")
        if state is not None and not self.resume_stream:
            rank_zero_info(f"data: resume_stream is false: the checkpoint's weights continue on a fresh {self.stream_name}")
            state = None
        if state is not None:
            check_signature(state.get("signature"), self.stream_signature(), what=self.stream_name,
                            option="data.init_args.resume_stream")
        self._resume_state = self._consumed_state = state
