"""Scale out without changing results (CPU, gloo, processes launched as Lightning or a cluster does).

* N processes x B rows == 1 process x N*B rows, in logged losses and updated weights: MNTP under DDP,
  contrastive with GradCache and gathered negatives under DDP and FSDP2, UBMoE stage 1 under DDP,
  MNTP on 2 "nodes" x 1 process over loopback.
* A run resumed from its step-k checkpoint logs the uninterrupted run's losses after k (MNTP,
  contrastive with dropout), also from an FSDP2 sharded checkpoint, and a sharded checkpoint
  exports the unsharded run's weights.
"""

import os
import subprocess
import sys

import pytest
from scale_out_runs import REPO, fit, fit_command, free_port, losses, max_difference, run, weights

MNTP = "configs/mntp/tiny.yaml"
CONTRASTIVE = "configs/contrastive/tiny.yaml"
UBMOE = "configs/ubmoe/stage1-tiny.yaml"
FSDP2 = ["--config", "configs/trainer/fsdp2.yaml"]
DDP2 = ["--trainer.strategy", "ddp"]
TOL = 1e-5
# 8 rows per step whatever the number of processes; no dropout so that every split is deterministic
MNTP_ARGS = ["--data.init_args.global_batch_size", "8"]
# negatives are gathered across ranks by default (gather_across_devices: true): not set here on purpose
CONTRASTIVE_ARGS = ["--data.init_args.global_batch_size", "8", "--model.init_args.attention_dropout", "0",
                    "--model.init_args.gradcache_chunk_size", "2"]
# the shipped DDP fragment as a user adds it, on this machine's CPUs
DDP_FRAGMENT = ["--config", "configs/trainer/ddp.yaml", "--trainer.accelerator", "cpu", "--trainer.devices", "2",
                "--trainer.precision", "32-true"]
UBMOE_ARGS = ["--data.init_args.global_batch_size", "8", "--model.init_args.attention_dropout", "0"]


def assert_same_run(reference, other, *, steps=range(4)):
    ref, got = losses(reference), losses(other)
    assert sorted(ref) == sorted(got) == list(steps), (ref, got)
    for step in steps:
        assert abs(ref[step] - got[step]) <= TOL, (step, ref[step], got[step])
    assert max_difference(weights(reference / "hf"), weights(other / "hf")) <= TOL


@pytest.fixture(scope="module")
def mntp_one_process(tmp_path_factory):
    return fit(tmp_path_factory.mktemp("mntp") / "one", MNTP, *MNTP_ARGS, checkpoints=True)


@pytest.fixture(scope="module")
def contrastive_one_process(tmp_path_factory):
    return fit(tmp_path_factory.mktemp("contrastive") / "one", CONTRASTIVE, *CONTRASTIVE_ARGS)


def test_mntp_ddp_two_processes_equal_one_process(mntp_one_process, tmp_path):
    ddp = fit(tmp_path / "ddp", MNTP, *MNTP_ARGS, *DDP2, devices=2)
    assert_same_run(mntp_one_process, ddp)
    # the run trained: weights moved from the initial model
    from bidirlm_pl.core import assets

    assert max_difference(weights(assets.tiny_model("qwen3")), weights(ddp / "hf")) > 1e-4


def test_contrastive_gradcache_gathered_ddp_equals_one_process(contrastive_one_process, tmp_path):
    """The shipped contrastive config with the shipped DDP fragment: 2 processes x 4 rows == 1 x 8."""
    ddp = fit(tmp_path / "ddp", CONTRASTIVE, *CONTRASTIVE_ARGS, *DDP_FRAGMENT, devices=2)
    assert_same_run(contrastive_one_process, ddp)


def test_contrastive_gradcache_gathered_fsdp2_equals_one_process(tmp_path):
    """FSDP2 shards the trainable latent-attention pooler too; its export gathers it."""
    from safetensors.torch import load_file

    latent = ["--model.init_args.pooling", "latent_attention", "--model.init_args.latent_num_latents", "16",
              "--model.init_args.latent_num_heads", "2"]
    one = fit(tmp_path / "one", CONTRASTIVE, *CONTRASTIVE_ARGS, *latent)
    fsdp = fit(tmp_path / "fsdp2", CONTRASTIVE, *FSDP2, *CONTRASTIVE_ARGS, *latent, devices=2)
    assert_same_run(one, fsdp)
    pooler = "latent_pooling.safetensors"
    assert max_difference(load_file(one / "hf" / pooler), load_file(fsdp / "hf" / pooler)) <= TOL


def test_ubmoe_stage1_ddp_equals_one_process(tmp_path):
    one = fit(tmp_path / "one", UBMOE, *UBMOE_ARGS)
    ddp = fit(tmp_path / "ddp", UBMOE, *UBMOE_ARGS, *DDP2, devices=2)
    assert_same_run(one, ddp)


@pytest.mark.parametrize("launcher", ["env", "torchrun"])
def test_two_nodes_on_loopback_equal_one_process(mntp_one_process, tmp_path, launcher):
    """configs/trainer/multinode.yaml, one process per "node" on 127.0.0.1: launched with the variables a
    cluster sets (NODE_RANK, LOCAL_RANK, MASTER_ADDR/PORT), or with torchrun's c10d rendezvous as in docs/scale-out.md."""
    root = tmp_path / "nodes"
    cmd = fit_command(root, MNTP, "--config", "configs/trainer/ddp.yaml", "--config", "configs/trainer/multinode.yaml",
                      *MNTP_ARGS,
                      "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32-true")
    port = str(free_port())
    commands, envs = [], []
    for rank in (0, 1):
        if launcher == "env":
            commands.append(cmd)
            envs.append({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "LOCAL_RANK": "0", "WORLD_SIZE": "2",
                         "NODE_RANK": str(rank)})
        else:
            commands.append([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                             "--node_rank", str(rank), "--rdzv_backend", "c10d", "--rdzv_endpoint",
                             f"127.0.0.1:{port}", "--rdzv_id", "loopback", *cmd[1:]])
            envs.append({})
    nodes = [subprocess.Popen(c, cwd=REPO, env={**os.environ, **e}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for c, e in zip(commands, envs)]
    for node in nodes:
        _, err = node.communicate(timeout=600)
        assert node.returncode == 0, err[-4000:]
    assert_same_run(mntp_one_process, root)


def test_mntp_resume_from_step_2_continues_exactly(mntp_one_process, tmp_path):
    """LR schedule (wsd), mixture position, masks and optimizer state all continue."""
    ckpt = mntp_one_process / "ckpt" / "step=2.ckpt"
    resumed = fit(tmp_path / "resumed", MNTP, *MNTP_ARGS, "--ckpt_path", str(ckpt))
    ref, got = losses(mntp_one_process), losses(resumed)
    assert sorted(got) == [2, 3]
    assert [got[s] for s in (2, 3)] == [ref[s] for s in (2, 3)]
    assert max_difference(weights(mntp_one_process / "hf"), weights(resumed / "hf")) == 0


def test_contrastive_resume_with_dropout_continues_exactly(tmp_path):
    """Dropout noise (RNG state) and the pair stream position continue across the stop."""
    args = ["--model.init_args.attention_dropout", "0.2"]
    full = fit(tmp_path / "full", CONTRASTIVE, *args, checkpoints=True)
    resumed = fit(tmp_path / "resumed", CONTRASTIVE, *args, "--ckpt_path", str(full / "ckpt" / "step=2.ckpt"))
    ref, got = losses(full), losses(resumed)
    assert sorted(got) == [2, 3]
    assert [got[s] for s in (2, 3)] == [ref[s] for s in (2, 3)]
    assert max_difference(weights(full / "hf"), weights(resumed / "hf")) == 0


def test_fsdp2_sharded_checkpoints_resume_and_export(mntp_one_process, tmp_path):
    sharded = ["--trainer.strategy.init_args.save_distributed_checkpoint", "true"]
    full = fit(tmp_path / "full", MNTP, *FSDP2, *MNTP_ARGS, *sharded, devices=2, checkpoints=True)
    ckpt = full / "ckpt" / "step=2.ckpt"
    assert ckpt.is_dir() and (ckpt / ".metadata").is_file()  # sharded: one folder of shards
    # written by AtomicModelParallelStrategy (the CLI's stand-in for Lightning's): staged, then renamed
    assert not [p.name for p in (full / "ckpt").iterdir() if p.name.startswith(".")]
    assert_same_run(mntp_one_process, full)
    resumed = fit(tmp_path / "resumed", MNTP, *FSDP2, *MNTP_ARGS, *sharded, "--ckpt_path", str(ckpt), devices=2)
    ref, got = losses(full), losses(resumed)
    assert sorted(got) == [2, 3] and all(abs(got[s] - ref[s]) <= TOL for s in (2, 3)), (ref, got)
    # the sharded step-4 checkpoint exports the weights of the unsharded one-process run
    out = tmp_path / "exported"
    run([sys.executable, "-m", "bidirlm_pl.cli.main", "export", "--ckpt", str(full / "ckpt" / "step=4.ckpt"), "--output", str(out)])
    assert max_difference(weights(mntp_one_process / "hf"), weights(out)) <= TOL


def test_sigterm_to_the_main_process_of_two_fsdp2_ranks_saves_shards_and_resumes_exactly(mntp_one_process, tmp_path):
    """The ranks agree on the signal at a step boundary, save one sharded preemption folder, exit 75; the same
    command resumes from it and ends with the one-process run's weights."""
    import signal
    import time

    sharded = ["--trainer.strategy.init_args.save_distributed_checkpoint", "true"]
    root, markers = tmp_path / "preempted", tmp_path / "markers"
    slow = ["--trainer.callbacks+=slow_steps.SlowSteps", "--trainer.callbacks.marker_dir", str(markers)]
    cmd = fit_command(root, MNTP, *FSDP2, *MNTP_ARGS, *sharded, *slow, devices=2)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (markers / "step-1").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # the launcher's process (rank 0) only
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-3000:]
    preempted = root / "preempted.ckpt"
    assert preempted.is_dir() and (preempted / ".metadata").is_file(), err[-2000:]
    assert not (root / "hf").exists() and not list(root.glob(".preempted.ckpt*"))
    run(cmd, env={"PYTHONPATH": env["PYTHONPATH"]})
    assert not preempted.exists(), "a finished fit removes its preemption checkpoint"
    assert max_difference(weights(mntp_one_process / "hf"), weights(root / "hf")) <= TOL
    ref, got = losses(mntp_one_process), losses(root)
    assert all(abs(got[s] - ref[s]) <= TOL for s in got) and sorted(got) == [0, 1, 2, 3], (ref, got)


def test_rank_shares_cover_the_one_process_batches_once_and_pad_with_marked_copies():
    from bidirlm_pl.data.validation import PADDING, RankShare, is_padding

    batches = [{"i": i} for i in range(5)]
    shares = [list(RankShare(batches, rank, 2)) for rank in range(2)]
    assert [len(s) for s in shares] == [3, 3]  # equal counts: the ranks' forwards stay in step
    real = [b["i"] for s in shares for b in s if PADDING not in b]
    assert sorted(real) == [0, 1, 2, 3, 4]
    filler = shares[1][-1]
    assert is_padding(filler) and PADDING not in filler and filler == batches[0] and PADDING not in batches[0]


def test_mntp_validation_under_ddp_equals_one_process_with_an_uneven_number_of_batches(tmp_path):
    """3 validation batches over 2 ranks: Lightning's sampler would count batch 0 twice; ours counts each once."""
    val = ["--trainer.limit_val_batches", "1.0", "--trainer.val_check_interval", "2", "--trainer.max_steps", "2",
           "--data.init_args.val_max_batches", "3"]
    one = fit(tmp_path / "one", MNTP, *MNTP_ARGS, *val, steps=2)
    ddp = fit(tmp_path / "ddp", MNTP, *MNTP_ARGS, *DDP2, *val, devices=2, steps=2)
    for key in ("val/loss", "val/accuracy"):
        ref, got = losses(one, key), losses(ddp, key)
        assert sorted(ref) == sorted(got) == [1], (key, ref, got)
        assert abs(ref[1] - got[1]) <= TOL, (key, ref, got)
