"""Faults lose nothing: a full disk or a SIGKILL during export or merge leaves no half-written folder and
the previous one intact; a rerun completes."""

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bidirlm_pl.cli.main import main

REPO = Path(__file__).resolve().parents[1]


def _no_staging_left(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", "model.safetensors")


def _merge_args(tiny_qwen3, out):
    return ["merge", "--models", str(tiny_qwen3), str(tiny_qwen3), "--weights", "0.5", "0.5", "--output", str(out),
            "--overwrite"]


def test_disk_full_during_merge_is_one_line_and_keeps_the_previous_output(tiny_qwen3, tmp_path, monkeypatch, capsys):
    from bidirlm_pl.models.merging.safetensors_io import StreamingWriter

    out = tmp_path / "merged"
    assert main(_merge_args(tiny_qwen3, out)) == 0
    before = load_file(out / "model.safetensors")
    monkeypatch.setattr(StreamingWriter, "write", _disk_full)
    assert main(_merge_args(tiny_qwen3, out)) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("bidirlm: error: the disk is full (No space left on device) while writing model.safetensors")
    after = load_file(out / "model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert _no_staging_left(tmp_path)


def test_disk_full_during_export_writes_nothing(tiny_qwen3, tmp_path, monkeypatch):
    import transformers.modeling_utils

    from bidirlm_pl import load_backbone
    from bidirlm_pl.core.export import save_hf_folder

    model, tok = load_backbone(tiny_qwen3)
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", _disk_full)
    with pytest.raises(OSError) as err:
        save_hf_folder(model, tok, tmp_path / "export")
    assert err.value.errno == errno.ENOSPC
    assert not (tmp_path / "export").exists() and _no_staging_left(tmp_path)


SLOW_REPLACE = """
import os, sys, time
real = os.replace
def slow(src, dst):
    time.sleep(60)  # the parent kills us here: the new folder is complete but not yet in place
    real(src, dst)
os.replace = slow
from bidirlm_pl import checkpoint_io  # the atomic swap (renameat2) of an existing folder: as slow
real_exchange = checkpoint_io._exchange
checkpoint_io._exchange = lambda a, b: (time.sleep(60), real_exchange(a, b))[1]
if sys.argv[1] == "export":
    from bidirlm_pl import load_backbone
    from bidirlm_pl.core.export import save_hf_folder
    model, tok = load_backbone(sys.argv[2])
    save_hf_folder(model, tok, sys.argv[3], overwrite=True)
else:
    from bidirlm_pl.cli.main import main
    sys.exit(main(sys.argv[1:]))
"""


def _write(args):
    if args[0] == "export":
        from bidirlm_pl import load_backbone
        from bidirlm_pl.core.export import save_hf_folder

        model, tok = load_backbone(args[1])
        save_hf_folder(model, tok, args[2], overwrite=True)
        return 0
    return main(args)


@pytest.mark.parametrize("command", ["merge", "export"])
def test_sigkill_during_write_leaves_the_previous_folder_and_a_rerun_completes(command, tiny_qwen3, tmp_path):
    out = tmp_path / "out"
    args = _merge_args(tiny_qwen3, out) if command == "merge" else ["export", str(tiny_qwen3), str(out)]
    assert _write(args) == 0
    before = load_file(out / "model.safetensors")
    (out / "marker").write_text("previous run")
    proc = subprocess.Popen([sys.executable, "-c", SLOW_REPLACE, *args], cwd=REPO)
    deadline = time.time() + 120
    while not [p for p in tmp_path.iterdir() if ".tmp-" in p.name] and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (out / "marker").read_text() == "previous run"        # the previous folder is intact
    after = load_file(out / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert _write(args) == 0                                      # a rerun completes and replaces it
    assert not (out / "marker").exists() and _no_staging_left(tmp_path)
