"""MNTPStage end to end: `bidirlm fit --config configs/mntp/tiny.yaml` trains, logs, exports a bidirectional folder."""

import csv
import json
from pathlib import Path

import pytest
import torch

from bidirlm_pl import load_backbone
from bidirlm_pl.backbone import attention
from bidirlm_pl.cli.main import main

TINY = str(Path(__file__).resolve().parent.parent / "configs" / "mntp" / "tiny.yaml")


def test_fit_tiny_exports_a_bidirectional_folder_that_reloads(tmp_path, monkeypatch, tiny_qwen3):
    monkeypatch.chdir(tmp_path)
    code = main(["fit", "--config", TINY, "--trainer.max_steps", "6", "--trainer.val_check_interval", "3"])
    assert code == 0
    run = next(Path("runs/mntp-tiny").glob("**/metrics.csv")).parent
    export = Path("runs/mntp-tiny/hf")  # HFExport without dirpath: beside the run's other outputs
    config = json.loads((export / "config.json").read_text())
    assert config["is_causal"] is False
    model, tokenizer = load_backbone(export, bidirectional=True)
    assert attention.is_bidirectional(model) and tokenizer.mask_token == "<mask>"
    # the exported weights are the trained ones: equal to the last checkpoint, different from the start
    ckpt = torch.load(next((run / "checkpoints").glob("*.ckpt")), weights_only=False)
    name = "model.layers.0.mlp.up_proj.weight"
    trained = ckpt["state_dict"][f"backbone.{name}"]
    start, _ = load_backbone(tiny_qwen3)
    assert torch.equal(model.state_dict()[name], trained)
    assert not torch.equal(start.state_dict()[name], trained)
    # the data stream's resume state and the logged metrics
    assert ckpt["TextDataModule"]["train"]["rounds"] == 6
    rows = list(csv.DictReader((run / "metrics.csv").read_text().splitlines()))
    logged = {k for r in rows for k, v in r.items() if v}
    assert {"train/loss", "train/accuracy", "val/loss", "val/accuracy", "throughput/tokens_per_sec",
            "throughput/samples_per_sec", "data/lee/documents", "data/lee50/tokens"} <= logged
    assert (run / "config.yaml").exists()


def test_lora_fit_merges_adapters_on_export(tmp_path, monkeypatch, tiny_qwen3):
    monkeypatch.chdir(tmp_path)
    code = main(["fit", "--config", TINY, "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
                 "--model.init_args.backbone.lora", "{r: 4, alpha: 8, target_modules: [q_proj, v_proj]}"])
    assert code == 0
    export = next(Path("runs/mntp-tiny").glob("**/hf"))
    state = load_backbone(export)[0].state_dict()
    assert not any("lora" in k for k in state)
    base = load_backbone(tiny_qwen3)[0].state_dict()
    assert state.keys() == base.keys()
    # adapted modules changed (adapters merged in), the others are the base weights
    assert not torch.equal(state["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(state["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])


@pytest.mark.parametrize("args, message", [
    (["--data.init_args.max_length", "4096"], "max_length 4096 exceeds the model's limit 256"),
    (["--data.init_args.sources", "null", "--data.init_args.sources", "[{name: x, path: /nonexistent/x.txt}]"],
     "path '/nonexistent/x.txt' does not"),
    # same length as the config's list: jsonargparse merges item by item, so x inherits kind: lee
    (["--data.init_args.sources", "[{name: x, path: /nonexistent/x.txt}, {name: y, path: /nonexistent/y.txt}]"],
     "source 'x': kind 'lee' takes no ['path']"),
    (["--data.init_args.sources", "[{name: x, kind: lee, weight: -1}]"], "mixture weight of source 'x' is -1.0"),
    (["--model.init_args.loss_chunk_size", "0"], "loss_chunk_size 0 must be a positive"),
])
def test_cli_bad_input_is_one_line_before_training(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = main(["fit", "--config", TINY, *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("bidirlm: error: ") and message in err[-1], err[-3:]
    assert not Path("runs").exists()  # nothing written


def test_throughput_flops_estimate_counts_only_masked_outputs(tiny_qwen3):
    from bidirlm_pl.callbacks.throughput import flops_tensor, tokens_tensor

    model, _ = load_backbone(tiny_qwen3)
    c = model.config
    seq_ids = torch.tensor([[0, 0, 0, 1, 1, -1]])
    batch = {"input_ids": torch.ones(1, 6, dtype=torch.long), "seq_ids": seq_ids,
             "labels": torch.tensor([[-100, 5, -100, -100, 7, -100]])}
    body = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "lm_head" not in n)
    d_attn = c.num_attention_heads * c.head_dim
    expected = 6 * body * 5 + 12 * c.num_hidden_layers * d_attn * (3 ** 2 + 2 ** 2) + 6 * c.vocab_size * c.hidden_size * 2
    assert int(tokens_tensor(batch)) == 5
    assert float(flops_tensor(model, batch)) == pytest.approx(expected)
    dense = dict(batch, labels=None)
    assert float(flops_tensor(model, dense)) - float(flops_tensor(model, batch)) == pytest.approx(6 * c.vocab_size * c.hidden_size * 3)
