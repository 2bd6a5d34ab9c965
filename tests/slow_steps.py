"""A callback for fault tests (importable from subprocesses with tests/ on PYTHONPATH): each training batch
sleeps a little and leaves ``<marker_dir>/step-N``, so a test can act at a chosen step."""

import time
from pathlib import Path

import lightning as L


class SlowSteps(L.Callback):
    def __init__(self, marker_dir: str, seconds: float = 0.3):
        self.marker_dir, self.seconds = Path(marker_dir), seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        time.sleep(self.seconds)
        self.marker_dir.mkdir(parents=True, exist_ok=True)
        (self.marker_dir / f"step-{trainer.global_step}").touch()
