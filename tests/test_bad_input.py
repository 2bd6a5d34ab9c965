"""Bad input, as a user new to the tool makes it: each mistake is one line on stderr naming the value and
what was expected, exit status 2, and nothing written (every case runs in an empty folder)."""

import pytest

from bidirlm_pl.cli.main import main

MNTP = "configs/mntp/tiny.yaml"


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "broken.yaml").write_text("stages: [\n")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    (tmp_path / "latin1.yaml").write_bytes(b"name: caf\xe9\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path, str(repo / MNTP)


CASES = [
    (["fit", "--config", "missing.yaml"], "config 'missing.yaml' does not exist; expected a YAML file"),
    (["fit", "--config", "broken.yaml"], "config 'broken.yaml' is not valid YAML: expected the node content"),
    (["fit", "--config", "list.yaml"], "config 'list.yaml' holds a list, not a mapping"),
    (["fit", "--config", "latin1.yaml"], "config 'latin1.yaml' is not UTF-8 text"),
    (["fit", "--config", "{MNTP}", "--trainer.max_steps", "abc"],
     'Parser key "trainer.max_steps": Expected a <class \'int\'>. Got value: abc'),
    (["fit", "--config", "{MNTP}", "--model.init_args.bogus", "3"],
     "model (bidirlm_pl.stages.mntp.MNTPStage): Option 'bogus' is not accepted"),
    (["fit", "--config", "{MNTP}", "--data.init_args.max_length", "abc"],
     "data (bidirlm_pl.data.text_module.TextDataModule): max_length: Expected a <class 'int'>. Got value: abc"),
    (["fit", "--config", "{MNTP}", "--model.class_path", "nope.Stage"], "model (nope.Stage): No module named 'nope'"),
    (["fit", "--config", "{MNTP}", "--ckpt_path", "missing.ckpt"], "ckpt_path 'missing.ckpt' does not exist"),
    (["fit", "--config", "{MNTP}", "--model.init_args.backbone.dtype", "float17"],
     "dtype 'float17' is not one of ['float32', 'bfloat16', 'float16']"),
    (["fit", "--config", "{MNTP}", "--data.init_args.batch_size", "0"], "batch_size 0 must be at least 1"),
    (["fit", "--config", "{MNTP}", "--data.init_args.mask.ratio", "1.5"], "mask ratio 1.5 is outside (0, 1]"),
    (["fit", "--config", "{MNTP}", "--trainer.devices", "0"], "trainer.devices '0' asks for no device"),
    (["run", "broken.yaml"], "recipe 'broken.yaml' is not valid YAML"),
    (["run", "list.yaml"], "recipe 'list.yaml' holds a list, not a mapping"),
    (["merge", "--config", "broken.yaml", "--output", "out"], "merge config 'broken.yaml' is not valid YAML"),
    (["compare", "tiny-qwen3", "--config", "broken.yaml"], "compare config 'broken.yaml' is not valid YAML"),
    (["compose", "--config", "broken.yaml"], "compose config 'broken.yaml' is not valid YAML"),
    (["compare"], "bidirlm compare: the following arguments are required: models"),
    (["omni-encode", "--model", "x"], "bidirlm omni-encode: the following arguments are required: --output"),
    (["similarity", "tiny-qwen3"], "bidirlm similarity: the following arguments are required"),
    (["--bogus"], "bidirlm: unrecognized arguments: --bogus"),
    (["export", "--ckpt", "missing.ckpt", "--output", "out"], "checkpoint 'missing.ckpt' does not exist"),
]


@pytest.mark.parametrize("args, expected", CASES, ids=[" ".join(a)[:60] for a, _ in CASES])
def test_each_mistake_is_one_line_exit_2_and_writes_nothing(workdir, capsys, args, expected):
    folder, mntp = workdir
    before = sorted(p.name for p in folder.iterdir())
    rc = main([a.replace("{MNTP}", mntp) for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert err and err[-1].startswith("bidirlm: error: ") and expected in err[-1], err[-3:]
    assert sorted(p.name for p in folder.iterdir()) == before  # no run folder, lock, log or partial output
