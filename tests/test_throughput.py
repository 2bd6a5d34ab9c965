"""Throughput callback: vectorised counts equal the per-document definition, and every stage's batches log."""

import csv
from pathlib import Path

import pytest
import torch

from bidirlm_pl import load_backbone
from bidirlm_pl.callbacks.throughput import _group_pairs, flops_tensor, tokens_tensor
from bidirlm_pl.cli.main import main

ROOT = Path(__file__).resolve().parents[1]


def _pairs_by_loop(seq_BT):
    total = 0
    for row in seq_BT:
        row = row[row >= 0]
        if row.numel():
            total += int((torch.unique_consecutive(row, return_counts=True)[1] ** 2).sum())
    return total


def _random_row(g, T=24):
    """Documents of random lengths, then padding (-1)."""
    lengths = torch.randint(1, 9, (8,), generator=g)
    seq = torch.repeat_interleave(torch.arange(8), lengths)[:T]
    fill = int(torch.randint(0, T - 1, (1,), generator=g))
    row = torch.full((T,), -1)
    row[:fill] = seq[:fill]
    return row


def test_vectorised_attention_pairs_equal_the_per_document_sum():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        rows = torch.stack([_random_row(g) for _ in range(3)])
        assert int(_group_pairs({"seq_ids": rows})) == _pairs_by_loop(rows)


def test_contrastive_batch_counts_every_group_and_no_output_layer(tiny_qwen3):
    model, _ = load_backbone(tiny_qwen3, head="base")
    c = model.config
    mask_q = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    mask_p = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])
    batch = {"query": {"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": mask_q},
             "positive": {"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": mask_p}}
    body = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    d_attn = c.num_attention_heads * c.head_dim
    expected = 6 * body * (5 + 5) + 12 * c.num_hidden_layers * d_attn * (9 + 4 + 16 + 1)
    assert int(tokens_tensor(batch)) == 10
    assert float(flops_tensor(model, batch)) == pytest.approx(expected)


def _logged_throughput(folder: Path) -> list[float]:
    rows = []
    for metrics in folder.rglob("metrics.csv"):
        with open(metrics) as f:
            rows += [float(r["throughput/tokens_per_sec"]) for r in csv.DictReader(f)
                     if r.get("throughput/tokens_per_sec")]
    return rows


@pytest.mark.parametrize("config", ["configs/contrastive/tiny.yaml", "configs/ubmoe/stage1-tiny.yaml",
                                    "configs/ubmoe/stage2-tiny.yaml:stage1",
                                    "configs/merge/specialist-gemma3-270m.yaml+configs/merge/specialist-tiny.yaml"])
def test_throughput_logs_for_every_stage(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config, _, needs = config.partition(":")
    configs = [arg for path in config.split("+") for arg in ("--config", str(ROOT / path))]
    extra = []
    if needs == "stage1":
        assert main(["fit", "--config", str(ROOT / "configs/ubmoe/stage1-tiny.yaml"), "--trainer.max_steps=1",
                     "--trainer.default_root_dir", str(tmp_path / "s1"), "--trainer.logger=false"]) == 0
        export = next((tmp_path).rglob("hf/config.json")).parent
        extra = ["--model.init_args.backbone.model", str(export)]
    code = main(["fit", *configs, "--trainer.max_steps=3", *extra,
                 "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.logger=null",
                 "--trainer.logger+=lightning.pytorch.loggers.CSVLogger",
                 f"--trainer.logger.save_dir={tmp_path / 'run'}", "--trainer.log_every_n_steps=1",
                 "--trainer.callbacks+=bidirlm_pl.callbacks.Throughput"])
    assert code == 0
    speeds = _logged_throughput(tmp_path / "run")
    assert len(speeds) >= 2 and all(s > 0 for s in speeds)
