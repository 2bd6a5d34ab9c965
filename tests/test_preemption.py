"""Long runs lose nothing: checkpoints are written atomically, and a scheduler's SIGTERM saves and stops a fit
that the same command then resumes exactly (real signals and kills sent to real training processes)."""

import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "mntp" / "tiny.yaml")
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
       "HF_HUB_OFFLINE": "1"}


def fit_args(root: Path, *extra: str, steps: int = 6) -> list[str]:
    return ["fit", "--config", TINY, "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "0",
            "--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(root), "--trainer.logger", "false",
            "--trainer.callbacks", "bidirlm_pl.callbacks.HFExport", "--trainer.callbacks.dirpath", str(root / "hf"),
            *extra]


def final_weights(root: Path) -> dict:
    return load_file(root / "hf" / "model.safetensors")


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def cli(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bidirlm_pl.cli.main", *args], env=ENV, cwd=REPO, capture_output=True,
                          text=True, timeout=600, check=False, **kwargs)


def test_sigterm_saves_stops_with_75_and_the_same_command_resumes_exactly(tmp_path):
    plain = tmp_path / "plain"
    assert cli(fit_args(plain)).returncode == 0
    root, markers = tmp_path / "preempted", tmp_path / "markers"
    slow = ["--trainer.callbacks+=slow_steps.SlowSteps", "--trainer.callbacks.marker_dir", str(markers)]
    proc = subprocess.Popen([sys.executable, "-m", "bidirlm_pl.cli.main", *fit_args(root, *slow)], env=ENV, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (markers / "step-2").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]
    assert "bidirlm: preempted at step" in err and "rerun the same command to resume" in err
    assert (root / "preempted.ckpt").is_file() and not (root / "hf").exists()
    resumed = cli(fit_args(root, *slow))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout + resumed.stderr
    assert not (root / "preempted.ckpt").exists(), "a finished fit removes its preemption checkpoint"
    assert max_diff(final_weights(root), final_weights(plain)) <= 1e-6


KILL_IN_WRITE = """
import os, signal, sys
from pathlib import Path
from bidirlm_pl.core import checkpoint_io

real, count = checkpoint_io.atomic_write_bytes, [0]

def dies_in_the_third_write(path, data):
    count[0] += 1
    if count[0] == 3:  # half the bytes reach the temporary file, then the process is killed
        tmp = Path(path).parent / f".{Path(path).name}.tmp-{os.getpid()}"
        with open(tmp, "wb") as handle:
            handle.write(bytes(data[: len(data) // 2]))
        os.kill(os.getpid(), signal.SIGKILL)
    return real(path, data)

checkpoint_io.atomic_write_bytes = dies_in_the_third_write
from bidirlm_pl.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_kill_inside_a_checkpoint_write_leaves_the_previous_one_and_resume_matches(tmp_path):
    every_step = ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                  "--trainer.callbacks.dirpath", None, "--trainer.callbacks.every_n_train_steps", "1",
                  "--trainer.callbacks.save_top_k", "1", "--trainer.callbacks.filename", "{step}"]
    plain = tmp_path / "plain"
    assert cli(fit_args(plain, *[a if a else str(plain / "ckpt") for a in every_step])).returncode == 0
    root = tmp_path / "killed"
    args = fit_args(root, *[a if a else str(root / "ckpt") for a in every_step])
    killed = subprocess.run([sys.executable, "-c", KILL_IN_WRITE, *args], env=ENV, cwd=REPO, capture_output=True,
                            text=True, timeout=600, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    names = sorted(p.name for p in (root / "ckpt").iterdir())
    # the 3rd save died: step 2 (kept by save_top_k=1 until a newer one is complete) is whole, no step=3.ckpt
    assert [n for n in names if n.endswith(".ckpt")] == ["step=2.ckpt"], names
    assert zipfile.is_zipfile(root / "ckpt" / "step=2.ckpt")
    assert any(n.startswith(".step=3.ckpt.tmp-") for n in names), names
    resumed = cli([*args, "--ckpt_path", str(root / "ckpt" / "step=2.ckpt")])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert max_diff(final_weights(root), final_weights(plain)) <= 1e-6


def test_two_runs_into_one_folder_one_line_naming_the_holder_and_a_stale_lock_is_taken_over(tmp_path):
    root, markers = tmp_path / "run", tmp_path / "markers"
    slow = ["--trainer.callbacks+=slow_steps.SlowSteps", "--trainer.callbacks.marker_dir", str(markers)]
    first = subprocess.Popen([sys.executable, "-m", "bidirlm_pl.cli.main", *fit_args(root, *slow, steps=40)], env=ENV,
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not (markers / "step-1").exists():
            assert first.poll() is None and time.time() < deadline, first.communicate()[1][-3000:]
            time.sleep(0.05)
        second = cli(fit_args(root))
        assert second.returncode == 2
        line = second.stderr.strip().splitlines()[-1]
        assert line.startswith(f"bidirlm: error: output folder '{root.resolve()}' is in use by pid {first.pid} on ")
        assert len(line) <= 220
    finally:
        first.kill()
        first.communicate()
    # the killed holder left its lock behind: the next run takes it over and trains
    assert (root / ".bidirlm.lock").exists()
    third = cli(fit_args(root, steps=2))
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"taking over the stale lock of {root.resolve()} (pid {first.pid}" in third.stderr
    assert not (root / ".bidirlm.lock").exists(), "a finished run releases its lock"


def test_resuming_with_changed_stage_options_lists_them_before_training(tmp_path):
    root = tmp_path / "run"
    every_step = ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                  "--trainer.callbacks.dirpath", str(root / "ckpt"), "--trainer.callbacks.every_n_train_steps", "1",
                  "--trainer.callbacks.save_top_k", "-1", "--trainer.callbacks.filename", "{step}"]
    assert cli(fit_args(root, *every_step, steps=2)).returncode == 0
    resumed = cli(fit_args(root, *every_step, "--model.init_args.loss_chunk_size", "32", steps=3)
                  + ["--ckpt_path", str(root / "ckpt" / "step=2.ckpt")])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    out = resumed.stdout
    assert "the checkpoint's stage options are used where the config differs" in out
    assert "loss_chunk_size: 64 in the checkpoint, 32 in the config" in out


@pytest.mark.parametrize("exchange", [True, False])
def test_replace_path_swaps_a_complete_folder_in_and_the_target_never_holds_a_mix(tmp_path, monkeypatch, exchange):
    """Sharded checkpoint folders and exports: the target is the old folder or the new one, whole."""
    from bidirlm_pl.core import checkpoint_io

    if not exchange:  # the fallback where renameat2 is missing: move aside, rename, remove
        monkeypatch.setattr(checkpoint_io, "_exchange", lambda a, b: False)
    target, staging = tmp_path / "last.ckpt", tmp_path / ".last.ckpt.partial"
    target.mkdir()
    (target / "old.distcp").write_text("old")
    staging.mkdir()
    (staging / "new.distcp").write_text("new")
    (staging / ".metadata").write_text("meta")
    checkpoint_io.replace_path(staging, target)
    assert sorted(p.name for p in target.iterdir()) == [".metadata", "new.distcp"]
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # nothing left beside it
    file_staging = tmp_path / ".f.tmp"
    file_staging.write_text("2")
    (tmp_path / "f").write_text("1")
    checkpoint_io.replace_path(file_staging, tmp_path / "f")
    assert (tmp_path / "f").read_text() == "2" and not file_staging.exists()
