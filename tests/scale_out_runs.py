"""Helpers of the scale-out tests: run ``bidirlm fit`` in fresh processes (as users do) and read what it left.

Each run writes under its own root: ``metrics.csv`` (CSVLogger, every step), ``hf/`` (HFExport at the
end) and, when asked, ``ckpt/step=N.ckpt`` after every step.
"""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]


def _callbacks_yaml(root: Path, checkpoints: bool) -> Path:
    lines = ["trainer:", f"  enable_checkpointing: {str(checkpoints).lower()}", "  callbacks:",
             "    - class_path: bidirlm_pl.callbacks.HFExport", f"      init_args: {{dirpath: {root / 'hf'}}}"]
    if checkpoints:
        lines += ["    - class_path: lightning.pytorch.callbacks.ModelCheckpoint",
                  (f"      init_args: {{dirpath: {root / 'ckpt'}, every_n_train_steps: 1, save_top_k: -1, "
                   "filename: '{step}'}")]
    path = root.parent / f"{root.name}-callbacks.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def fit_command(root: Path, config: str, *args: str, devices: int = 1, steps: int = 4,
                checkpoints: bool = False) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    return [sys.executable, "-m", "bidirlm_pl.cli.main", "fit", "--config", config,
            "--config", str(_callbacks_yaml(root, checkpoints)),
            "--trainer.accelerator", "cpu", "--trainer.devices", str(devices), "--trainer.max_steps", str(steps),
            "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
            "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(root), "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
            "--trainer.logger.save_dir", str(root), *args]


def run(cmd: list[str], env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def fit(root: Path, config: str, *args: str, **kwargs) -> Path:
    run(fit_command(root, config, *args, **kwargs))
    return root


def losses(root: Path, key: str = "train/loss") -> dict[int, float]:
    """``step -> logged value`` from every metrics.csv under ``root`` (a resumed run continues the steps)."""
    out = {}
    for path in sorted(root.glob("**/metrics.csv")):
        with open(path) as f:
            for row in csv.DictReader(f):
                if row.get(key):
                    out[int(row["step"])] = float(row[key])
    return out


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
