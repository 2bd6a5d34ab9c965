"""Multi-process training on CPU: FSDP2 (ModelParallelStrategy, gloo) gathers full weights on export."""

import subprocess
import sys

import torch
from safetensors.torch import load_file

from bidirlm_pl.core import assets


def test_fsdp2_two_processes_export_full_unsharded_weights(tmp_path):
    root = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "bidirlm_pl.cli.main", "fit",
        "--config", "configs/mntp/tiny.yaml", "--config", "configs/trainer/fsdp2.yaml",
        "--trainer.accelerator", "cpu", "--trainer.max_steps", "2", "--trainer.enable_checkpointing", "false",
        "--trainer.logger", "false",
        "--trainer.default_root_dir", str(root), "--model.init_args.optimizer.init_args.lr", "0",
        "--model.init_args.optimizer.init_args.weight_decay", "0",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    exported = list(root.glob("**/hf/model.safetensors"))
    assert len(exported) == 1, exported
    trained = load_file(exported[0])
    original = load_file(assets.tiny_model("qwen3") / "model.safetensors")
    assert set(trained) == set(original)
    for name, tensor in original.items():
        # lr = 0: gathering the shards must give back exactly the original tensors
        assert torch.equal(trained[name], tensor), name
