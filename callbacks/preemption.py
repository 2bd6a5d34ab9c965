"""Preemption: on SIGTERM or SIGUSR1 (what SLURM and most schedulers send before a kill), save a checkpoint
at the next optimizer-step boundary and stop with exit status 75 (``bidirlm fit`` / ``bidirlm run``).

The checkpoint goes to ``<default_root_dir>/preempted.ckpt`` (atomically, like every checkpoint). Rerunning
the same command resumes from it exactly: ``bidirlm fit`` (with no ``--ckpt_path``, or ``--ckpt_path last``)
takes it when it exists, and ``bidirlm run`` picks the newest complete checkpoint of a stage. A fit that
ends normally removes the file, so a later run of the same config starts afresh.

Several processes (DDP, FSDP2): at every step boundary the ranks agree (one all-reduce of a flag) whether
any of them received a signal, so a signal sent to one process (the launcher's main process, or one SLURM
task) or to all of them stops every rank at the same step, and all ranks save the checkpoint together
(one file from rank 0, or every rank's shards). The handlers replace Lightning's own SIGTERM handler for
the fit (it would stop the ranks with ``SIGTERMException`` and no checkpoint) and are restored after.

Lightning's own SLURM integration stays usable: with ``plugins: SLURMEnvironment(auto_requeue: true)``
Lightning handles SIGUSR1 itself (hpc checkpoint and requeue); this callback then only handles SIGTERM.
"""

from __future__ import annotations

import shutil
import signal
import threading
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from bidirlm_pl.core.errors import PREEMPTED_EXIT, Preempted

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

    def on_train_start(self, trainer, pl_module):
        # after Lightning registered its own handlers (Trainer._run), so these replace them for the fit
        if threading.current_thread() is not threading.main_thread():
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
        if not self._any_rank_received(trainer):
            return
        trainer.save_checkpoint(self.ckpt_path)
        # this step's metrics go to the loggers after this hook (Lightning's loop), so send them now, and
        # flush: the resumed run starts at the next step and would never log this one
        trainer._logger_connector.update_train_step_metrics()
        for logger in trainer.loggers:
            logger.save()
        self.saved = True
        rank_zero_info(f"{self.received or 'a signal'} received: checkpoint saved at step {trainer.global_step} "
                       f"to {self.ckpt_path}")
        raise Preempted(trainer.global_step, self.ckpt_path)

    def _any_rank_received(self, trainer) -> bool:
        if trainer.world_size == 1:
            return self.received is not None
        import torch
        import torch.distributed as dist

        flag = torch.tensor([0 if self.received is None else 1], device=trainer.strategy.root_device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        anyone = bool(flag.item())  # the one host sync of the step
        if anyone and self.received is None:
            self.received = "a signal to another rank"
        return anyone

    @property
    def ckpt_path(self) -> str:
        return str(Path(self.dirpath or ".") / PREEMPTED_CKPT)

    def on_train_end(self, trainer, pl_module):
        self._restore()

    def on_exception(self, trainer, pl_module, exception):
        self._restore()

    def _restore(self):
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def teardown(self, trainer, pl_module, stage):
        self._restore()
        if stage == "fit" and not self.saved and trainer.is_global_zero:
            path = Path(self.ckpt_path)  # a finished fit leaves no preemption checkpoint (file, or shard folder)
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)

    def state_dict(self):
        return {}


def _lightning_handles_sigusr1(trainer: L.Trainer) -> bool:
    from lightning.fabric.plugins.environments import SLURMEnvironment

    env = trainer._accelerator_connector.cluster_environment
    return isinstance(env, SLURMEnvironment) and getattr(env, "auto_requeue", False)
