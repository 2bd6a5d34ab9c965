"""A NaN loss never reaches the weights: the run stops naming the step, or skips the batch when asked."""

import math
from pathlib import Path

import pytest
import torch

from bidirlm_pl.callbacks.nonfinite import NonFiniteGuard
from bidirlm_pl.cli.main import main
from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.stages.mntp import MNTPStage

TINY = str(Path(__file__).resolve().parent.parent / "configs" / "mntp" / "tiny.yaml")
WATCHED = "model.layers.0.mlp.up_proj.weight"


@pytest.fixture()
def nan_at_step_2(monkeypatch):
    """MNTP's loss turns NaN at global step 2; records the watched weight at the start of every step."""
    snapshots = {}
    original = MNTPStage.step

    def step(self, batch):
        out = original(self, batch)
        if self.training:
            snapshots[self.trainer.global_step] = dict(self.backbone.named_parameters())[WATCHED].detach().clone()
            if self.trainer.global_step == 2:
                out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(MNTPStage, "step", step)
    return snapshots


ARGS = ["--trainer.max_steps", "4", "--trainer.limit_val_batches", "0", "--trainer.enable_checkpointing", "false"]


def test_nan_loss_stops_before_the_update_and_exports_nothing(tmp_path, monkeypatch, capsys, nan_at_step_2):
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", TINY, *ARGS]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "training loss is nan at step 2" in error and "weights are those after step 1" in error
    assert "last checkpoint: none saved" in error
    assert sorted(nan_at_step_2) == [0, 1, 2]
    assert torch.isfinite(nan_at_step_2[2]).all()
    assert not list(Path("runs").glob("**/hf/config.json"))  # no export of a failed run


def test_skip_drops_the_batch_and_training_goes_on(tmp_path, monkeypatch, nan_at_step_2):
    monkeypatch.chdir(tmp_path)
    guard = '{"class_path": "bidirlm_pl.callbacks.NonFiniteGuard", "init_args": {"action": "skip"}}'
    assert main(["fit", "--config", TINY, *ARGS, f"--trainer.callbacks+={guard}"]) == 0
    assert sorted(nan_at_step_2) == [0, 1, 2, 3]
    assert torch.equal(nan_at_step_2[3], nan_at_step_2[2])        # the NaN batch changed nothing
    assert not torch.equal(nan_at_step_2[2], nan_at_step_2[1])    # a good batch did
    assert all(torch.isfinite(w).all() for w in nan_at_step_2.values())


def test_guard_arguments_are_checked():
    with pytest.raises(BidirLMError, match="action 'ignore' is not one of"):
        NonFiniteGuard(action="ignore")
    assert math.isfinite(NonFiniteGuard(action="skip").max_skips)


def test_skip_judges_the_whole_accumulated_step(tmp_path, monkeypatch):
    """2 micro-batches per step, the first one NaN: the step is skipped although the last micro-batch is fine."""
    snapshots, calls = {}, [0]
    original = MNTPStage.step

    def step(self, batch):
        out = original(self, batch)
        if self.training:
            calls[0] += 1
            snapshots.setdefault(self.trainer.global_step, dict(self.backbone.named_parameters())[WATCHED]
                                 .detach().clone())
            if calls[0] == 3:  # the first micro-batch of step 1
                out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(MNTPStage, "step", step)
    monkeypatch.chdir(tmp_path)
    guard = '{"class_path": "bidirlm_pl.callbacks.NonFiniteGuard", "init_args": {"action": "skip"}}'
    assert main(["fit", "--config", TINY, *ARGS, "--trainer.max_steps", "3", "--trainer.accumulate_grad_batches", "2",
                 f"--trainer.callbacks+={guard}"]) == 0
    assert torch.equal(snapshots[2], snapshots[1])         # step 1 (micro-batches 3 and 4) changed nothing
    assert not torch.equal(snapshots[1], snapshots[0])     # step 0 did
    assert all(torch.isfinite(w).all() for w in snapshots.values())
