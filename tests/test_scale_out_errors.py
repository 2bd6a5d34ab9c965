"""Scale-out mistakes fail in one line that says what to change, before any process is launched or any
weight is overwritten: placement, batch splits, GradCache chunks, resuming under a changed data
mixture (with the fresh-stream escape hatch) or a changed model."""

import pytest
import torch
from scale_out_runs import fit

from bidirlm_pl.cli import main as cli
from bidirlm_pl.cli.preflight import check_fit_config
from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.data.global_batches import per_rank_batch_size

MNTP = "configs/mntp/tiny.yaml"
CONTRASTIVE = "configs/contrastive/tiny.yaml"


def _error(capsys, *argv) -> str:
    code = cli.main(["fit", *argv, "--trainer.max_steps", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) >= 1 and err[-1].startswith("bidirlm: error: ")
    return err[-1]


@pytest.mark.parametrize("argv, expected", [
    (["--config", CONTRASTIVE, "--config", "configs/trainer/ddp.yaml"], "trainer.accelerator 'gpu' needs a CUDA GPU"),
    (["--config", MNTP, "--trainer.devices", "4096"], "asks for 4096 processes per node but this machine has"),
    (["--config", MNTP, "--config", "configs/trainer/fsdp1-gpu.yaml", "--trainer.accelerator", "cpu"],
     "FSDPStrategy (FSDP1) runs on GPUs only"),
    (["--config", MNTP, "--trainer.devices", "2", "--trainer.strategy", "ddp", "--data.init_args.global_batch_size", "7"],
     "global_batch_size 7 does not divide by the world size 2"),
    (["--config", CONTRASTIVE, "--trainer.devices", "2", "--trainer.strategy", "ddp",
      "--data.init_args.global_batch_size", "8", "--model.init_args.gradcache_chunk_size", "6"],
     "gradcache_chunk_size 6 is larger than the per-process batch 4"),
], ids=["gpu-on-cpu", "too-many-devices", "fsdp1-on-cpu", "global-batch", "gradcache-chunk"])
def test_placement_and_batch_mistakes_are_one_line_before_launch(capsys, argv, expected):
    if "ddp.yaml" in argv and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert expected in _error(capsys, *argv)


def test_per_rank_batch_and_preflight_units():
    assert per_rank_batch_size(4, None, 8) == 4 and per_rank_batch_size(4, 16, 2) == 8
    with pytest.raises(BidirLMError, match="global_batch_size 0 must be >= 1"):
        per_rank_batch_size(4, 0, 1)
    config = {"trainer": {"accelerator": "cpu", "devices": 1}, "data": {"init_args": {"batch_size": 4}},
              "model": {"init_args": {"gradcache_chunk_size": 4}}}
    check_fit_config(config)  # chunk == per-process batch is fine
    config["trainer"]["devices"] = 0
    with pytest.raises(BidirLMError, match="asks for no device"):
        check_fit_config(config)


@pytest.fixture(scope="module")
def mntp_checkpoint(tmp_path_factory):
    root = fit(tmp_path_factory.mktemp("resume-errors") / "run", MNTP, steps=2, checkpoints=True)
    return root / "ckpt" / "step=2.ckpt"


def test_resume_with_a_changed_mixture_says_how_to_proceed(capsys, tmp_path, mntp_checkpoint):
    changed = tmp_path / "mixture.yaml"
    changed.write_text("data:\n  init_args:\n    sources:\n      - {name: lee, kind: lee, weight: 0.5}\n"
                       "      - {name: lee50, kind: lee_documents, weight: 0.5}\n")
    common = ["--config", MNTP, "--config", str(changed), "--trainer.default_root_dir", str(tmp_path / "r"),
              "--trainer.logger", "false", "--trainer.enable_checkpointing", "false", "--trainer.callbacks", "[]",
              "--ckpt_path", str(mntp_checkpoint)]
    message = _error(capsys, *common)
    assert "weights: checkpoint [0.8, 0.2] vs config [0.5, 0.5]" in message
    assert "resume_stream: false" in message and "fresh stream" in message
    # the escape hatch: keep the trained weights, start a fresh stream
    assert cli.main(["fit", *common, "--trainer.max_steps", "3", "--data.init_args.resume_stream", "false"]) == 0


def test_resume_with_a_changed_model_is_one_line(capsys, tmp_path, mntp_checkpoint):
    message = _error(capsys, "--config", MNTP, "--model.init_args.backbone.model", "tiny-llama",
                     "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false",
                     "--ckpt_path", str(mntp_checkpoint))
    assert "was trained from model 'tiny-qwen3', but the config says 'tiny-llama'" in message


def test_a_checkpoint_that_does_not_fit_the_model_is_one_line():
    from bidirlm_pl.stages.resume import check_same_model

    current = {"a": torch.zeros(2, 3), "b": torch.zeros(1)}
    with pytest.raises(BidirLMError, match=r"1 reshaped tensors; 'a' is \(3, 3\) in the checkpoint but \(2, 3\)"):
        check_same_model({"a": torch.zeros(3, 3), "b": torch.zeros(1)}, current, saved_model="x", model="y")
    with pytest.raises(BidirLMError, match="1 missing, 0 unexpected"):
        check_same_model({"a": torch.zeros(2, 3)}, current, saved_model=None, model="y")
    check_same_model(dict(current), current, saved_model=None, model="y")
