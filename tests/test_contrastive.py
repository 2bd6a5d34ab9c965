"""ContrastiveStage: CLI end to end, export round trip, GradCache inside the stage, SimCSE dropout noise."""

import csv
import json

import numpy as np
import pytest
import torch

from bidirlm_pl.cli.main import main
from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.data.pairs import PairCollator
from bidirlm_pl.stages.contrastive import ContrastiveStage

CONFIG = "configs/contrastive/tiny.yaml"


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """One tiny `bidirlm fit` run (4 steps) whose checkpoint and export the tests share."""
    import os
    from pathlib import Path

    root = tmp_path_factory.mktemp("contrastive-fit")
    config = str(Path(__file__).resolve().parents[1] / CONFIG)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        code = main(["fit", "--config", config, "--trainer.max_steps", "4", "--trainer.val_check_interval", "2",
                     "--trainer.default_root_dir", str(root)])
    finally:
        os.chdir(cwd)
    assert code == 0
    return root


def test_fit_trains_logs_and_exports(fitted):
    exports = list(fitted.rglob("hf/config.json"))
    ckpts = list(fitted.rglob("*.ckpt"))
    assert len(exports) == 1 and len(ckpts) == 1
    folder = exports[0].parent
    for name in ("modules.json", "1_Pooling/config.json", "2_Normalize", "sentence_bert_config.json",
                 "config_sentence_transformers.json", "bidirlm_encoder.json", "model.safetensors"):
        assert (folder / name).exists(), name
    prompts = json.loads((folder / "config_sentence_transformers.json").read_text())["prompts"]
    assert prompts["query"] == "Represent the news article: "
    with open(next(fitted.rglob("metrics.csv"))) as handle:
        metrics = list(csv.DictReader(handle))
    losses = [float(r["train/loss"]) for r in metrics if r.get("train/loss")]
    assert losses and all(np.isfinite(losses))
    assert any(r.get("val/loss") for r in metrics)
    spearman = [(int(r["step"]), float(r["val/lee_spearman"])) for r in metrics if r.get("val/lee_spearman")]
    assert spearman[0][0] == 0 and len(spearman) == 3  # before training, then at both validations
    assert all(-1 <= s <= 1 for _, s in spearman)


def test_export_cli_round_trip(fitted, tmp_path, capsys):
    from sentence_transformers import SentenceTransformer

    from bidirlm_pl.models.encoder import Encoder

    ckpt = str(next(fitted.rglob("*.ckpt")))
    out = tmp_path / "encoder"
    assert main(["export", "--ckpt", ckpt, "--output", str(out)]) == 0
    assert main(["export", "--ckpt", ckpt, "--output", str(out)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert main(["export", "--ckpt", ckpt, "--output", str(out), "--overwrite"]) == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging leftovers
    texts = ["A bushfire near Sydney.", "The cricket team won the test match by six wickets today."]
    ours = Encoder.from_pretrained(out).encode(texts)
    at_fit_end = Encoder.from_pretrained(next(fitted.rglob("hf/config.json")).parent).encode(texts)
    theirs = SentenceTransformer(str(out), device="cpu").encode(texts)
    assert np.abs(ours - at_fit_end).max() <= 1e-5
    assert np.abs(ours - theirs).max() <= 1e-5
    # the query prompt is the training source's instruction (read from the checkpoint's data options)
    prompts = json.loads((out / "config_sentence_transformers.json").read_text())["prompts"]
    assert prompts["query"] == "Represent the news article: "


def test_query_instruction_follows_the_data_and_export_max_length_reads_its_former_name(tiny_qwen3):
    """The export's query prompt is stated once: the stage's own, else the training sources' one instruction."""
    stage = ContrastiveStage(str(tiny_qwen3))
    assert stage.export_query_instruction() is None and stage.export_max_length == 512
    stage.card_sources = [{"name": "simcse", "query_instruction": None}, {"name": "q", "query_instruction": "Q: "}]
    assert stage.export_query_instruction() == "Q: "
    stage.card_sources.append({"name": "other", "query_instruction": "Other: "})
    with pytest.raises(BidirLMError, match=r"2 different query instructions \['Q: ', 'Other: '\]; set model"):
        stage.export_query_instruction()
    stage.query_instruction = "Mine: "  # the stage's own wins
    assert stage.export_query_instruction() == "Mine: "
    assert ContrastiveStage(str(tiny_qwen3), max_length=96).export_max_length == 96  # older configs, checkpoints
    assert ContrastiveStage(str(tiny_qwen3), export_max_length=128).export_max_length == 128
    with pytest.raises(BidirLMError, match="max_length 96 is the former name of export_max_length 128"):
        ContrastiveStage(str(tiny_qwen3), max_length=96, export_max_length=128)


def test_export_cli_errors(tmp_path, capsys):
    assert main(["export", "--ckpt", str(tmp_path / "none.ckpt"), "--output", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "bad.ckpt").write_bytes(b"not a checkpoint")
    assert main(["export", "--ckpt", str(tmp_path / "bad.ckpt"), "--output", str(tmp_path / "o")]) == 2
    assert "cannot be loaded safely" in capsys.readouterr().err


def _batch(tokenizer, n=6, negatives=1):
    from bidirlm_pl.core import assets

    docs = assets.lee_background()[:n * (2 + negatives)]
    rows = [{"anchor": docs[i][:40 + 25 * i], "positive": docs[n + i][:200],
             "negatives": [docs[2 * n + i * negatives + k][:200] for k in range(negatives)]} for i in range(n)]
    return PairCollator(tokenizer, max_length=48)(rows, "Represent: ")


@pytest.mark.parametrize("pooling", ["mean", "latent_attention"])
def test_gradcache_in_the_stage_equals_plain(tiny_qwen3, pooling):
    grads = []
    for chunk in (None, 2):
        torch.manual_seed(0)
        stage = ContrastiveStage(str(tiny_qwen3), pooling=pooling, gradcache_chunk_size=chunk, latent_num_latents=8,
                                 latent_num_heads=2, false_negative_margin=0.1)
        stage.configure_model()
        batch = _batch(stage.tokenizer)
        out = stage.step(batch)
        out["loss"].backward()
        grads.append((out["loss"].detach(), {n: p.grad.clone() for n, p in stage.named_parameters()
                                             if p.grad is not None}))
    (l0, g0), (l1, g1) = grads
    assert torch.allclose(l0, l1, atol=1e-6)
    assert g0.keys() == g1.keys() and len(g0) > 10
    for name in g0:
        assert torch.allclose(g0[name], g1[name], atol=1e-5), name


def test_attention_dropout_is_the_simcse_noise(tiny_qwen3):
    stage = ContrastiveStage(str(tiny_qwen3), attention_dropout=0.3)
    stage.configure_model()
    # training noise only: the config (what an export's config.json says) keeps the model's own value
    base = json.loads((tiny_qwen3 / "config.json").read_text())["attention_dropout"]
    assert stage.backbone.config.attention_dropout == base != 0.3
    assert {m.attention_dropout for m in stage.backbone.modules() if hasattr(m, "q_proj")} == {0.3}
    group = _batch(stage.tokenizer)["query"]
    assert stage.backbone.training
    a, b = stage.embed(group), stage.embed(group)
    assert (a - b).abs().max() > 1e-4
    stage.eval()
    assert torch.equal(stage.embed(group), stage.embed(group))
    with pytest.raises(BidirLMError, match="attention_dropout 1.5"):
        ContrastiveStage(str(tiny_qwen3), attention_dropout=1.5)
    with pytest.raises(BidirLMError, match="temperature -1"):
        ContrastiveStage(str(tiny_qwen3), temperature=-1)
    with pytest.raises(BidirLMError, match="pooling 'cls'"):
        ContrastiveStage(str(tiny_qwen3), pooling="cls")


def test_a_few_steps_lower_the_loss_on_a_fixed_batch(tiny_qwen3):
    torch.manual_seed(0)
    stage = ContrastiveStage(str(tiny_qwen3))
    stage.configure_model()
    batch = _batch(stage.tokenizer, n=8, negatives=0)
    opt = torch.optim.AdamW(stage.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = stage.step(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]


def test_varlen_backend_packs_rows_and_matches_sdpa(tiny_qwen3):
    """The flash path (packed rows, cumulative lengths) with a CPU stand-in kernel equals padded SDPA."""
    from bidirlm_pl.backbone import varlen
    from bidirlm_pl.models.encoder import Encoder

    backend = varlen.register_varlen_backend("reference_fp32", varlen.reference_varlen_fp32, half_only=False)
    out = []
    for impl in ("sdpa", backend):
        torch.manual_seed(0)
        stage = ContrastiveStage({"model": str(tiny_qwen3), "attn_implementation": impl})
        stage.configure_model()
        stage.eval()
        group = _batch(stage.tokenizer)["query"]
        assert group["attention_mask"].min() == 0  # really padded
        out.append(stage.embed(group))
        enc = Encoder(stage.backbone, stage.tokenizer, stage.pooler)
        out.append(torch.from_numpy(enc.encode(["a short one", "a somewhat longer text than that one"])))
    assert torch.allclose(out[0], out[2], atol=1e-5)
    assert torch.allclose(out[1], out[3], atol=1e-5)


def test_embedding_eval_before_fit_with_csv_logging_every_step(tmp_path, monkeypatch):
    """EmbeddingEval logs at step 0 before any train metric, then validation adds keys: the CSV keeps every column."""
    from pathlib import Path

    config = str(Path(__file__).resolve().parents[1] / CONFIG)
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", config, "--trainer.max_steps", "4", "--trainer.log_every_n_steps", "1",
                 "--trainer.val_check_interval", "2", "--trainer.default_root_dir", str(tmp_path / "run"),
                 "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
                 "--trainer.logger.save_dir", str(tmp_path / "run")]) == 0
    rows = list(csv.DictReader(next((tmp_path / "run").rglob("metrics.csv")).open()))
    assert {"train/loss", "val/lee_spearman", "val/loss"} <= set(rows[0])
    assert rows[0]["val/lee_spearman"] and rows[0]["step"] == "0"   # the before-fit score comes first
    assert sum(bool(r["train/loss"]) for r in rows) == 4
    assert (tmp_path / "run" / "hf" / "modules.json").is_file()     # HFExport without dirpath: beside the run
