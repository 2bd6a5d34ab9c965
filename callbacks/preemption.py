"""Preemption: on SIGTERM or SIGUSR1 (what SLURM and most schedulers send before a kill), save a checkpoint
at the next optimizer-step boundary and stop with exit status 75 (``bidirlm fit`` / ``bidirlm run``).

The checkpoint goes to ``<default_root_dir>/preempted.ckpt`` (atomically, like every checkpoint). Rerunning
the same command resumes from it exactly: ``bidirlm fit`` (with no ``--ckpt_path``, or ``--ckpt_path last``)
takes it when it exists, and ``bidirlm run`` picks the newest complete checkpoint of a stage. A fit that
ends normally removes the file, so a later run of the same config starts afresh.

One process only: with several, Lightning's own SIGTERM handling (a broadcast from rank 0 and a
``SIGTERMException`` on every rank) stops the job, and this callback stands aside; keep periodic
``ModelCheckpoint``s there, or Lightning's SLURM requeue below.

Lightning's own SLURM integration stays usable: with ``plugins: SLURMEnvironment(auto_requeue: true)``
Lightning handles SIGUSR1 itself (hpc checkpoint and requeue); this callback then only handles SIGTERM.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from bidirlm_pl.errors import PREEMPTED_EXIT, Preempted

__all__ = ["PREEMPTED_EXIT", "Preempted", "Preemption"]

PREEMPTED_CKPT = "preempted.ckpt"


class Preemption(L.Callback):
    """Args: dirpath (default: the trainer's ``default_root_dir``); signals handled (names)."""

    def __init__(self, dirpath: str | None = None, signals: list[str] | None = None):
        self.dirpath = dirpath
        self.signals = list(signals or ["SIGTERM", "SIGUSR1"])
        self.received: str | None = None
        self._previous: dict = {}
        self._last_step = 0
        self.saved = False

    def setup(self, trainer, pl_module, stage):
        if self.dirpath is None:
            self.dirpath = trainer.default_root_dir
        if stage != "fit" or threading.current_thread() is not threading.main_thread() or trainer.world_size > 1:
            return
        lightning_owned = _lightning_handles_sigusr1(trainer)
        for name in self.signals:
            if name == "SIGUSR1" and lightning_owned:
                continue
            number = getattr(signal, name)
            self._previous[number] = signal.signal(number, self._handle)

    def _handle(self, number, frame):
        self.received = signal.Signals(number).name

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self._last_step:  # inside gradient accumulation: not a step boundary
            return
        self._last_step = trainer.global_step
        if self.received is None:
            return
        trainer.save_checkpoint(self.ckpt_path)
        self.saved = True
        rank_zero_info(f"{self.received or 'a signal'} received: checkpoint saved at step {trainer.global_step} "
                       f"to {self.ckpt_path}")
        raise Preempted(trainer.global_step, self.ckpt_path)

    @property
    def ckpt_path(self) -> str:
        return str(Path(self.dirpath or ".") / PREEMPTED_CKPT)

    def teardown(self, trainer, pl_module, stage):
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}
        if stage == "fit" and not self.saved and trainer.is_global_zero:
            Path(self.ckpt_path).unlink(missing_ok=True)  # a finished fit leaves no preemption checkpoint

    def state_dict(self):
        return {}


def _lightning_handles_sigusr1(trainer: L.Trainer) -> bool:
    from lightning.fabric.plugins.environments import SLURMEnvironment

    env = trainer._accelerator_connector.cluster_environment
    return isinstance(env, SLURMEnvironment) and getattr(env, "auto_requeue", False)
