"""Matryoshka dimensions: the loss against a hand reference, GradCache and gathered negatives with it, the export
(``SentenceTransformer(folder, truncate_dim=k)``), ``compare --dims``, and the one-line errors."""

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from bidirlm_pl.cli.main import main
from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.evaluation import metrics, task_data
from bidirlm_pl.evaluation.compare import compare
from bidirlm_pl.evaluation.embedding import spearman, truncate_rows
from bidirlm_pl.losses.contrastive import GradCache, InfoNCE, check_matryoshka
from bidirlm_pl.stages.contrastive import ContrastiveStage

ROOT = Path(__file__).resolve().parents[1]
T = 0.05


def _embeddings(B=6, N=2, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True) for s in ((B, D), (B, D), (B, N, D))]


def _reference(q, p, n, levels):
    """sum_d w_d * cross_entropy(cosines of the normalised first d dimensions / T), candidates as in
    sentence-transformers: every positive, then hard negative k of every row, then k+1."""
    total = 0.0
    for d, w in levels:
        qd = F.normalize(q[:, :d], dim=-1)
        docs = torch.cat([F.normalize(p[:, :d], dim=-1)] + [F.normalize(n[:, k, :d], dim=-1) for k in range(n.shape[1])])
        total = total + w * F.cross_entropy(qd @ docs.T / T, torch.arange(q.shape[0]))
    return total


def test_loss_equals_the_hand_reference_with_the_full_size_always_in():
    q, p, n = _embeddings()
    loss, details = InfoNCE(T, matryoshka_dims=[4, 8], matryoshka_weights=[0.5, 2]).compute_loss(
        q, p, n, return_details=True)
    expected = _reference(q, p, n, [(16, 1.0), (8, 2.0), (4, 0.5)])
    assert torch.allclose(loss, expected, atol=1e-12)
    grads = torch.autograd.grad(loss, [q, p, n])
    for a, b in zip(grads, torch.autograd.grad(expected, [q, p, n])):
        assert torch.allclose(a, b, atol=1e-12)
    assert sorted(details["dim_losses"]) == [4, 8, 16]
    # the full size listed: its own weight; unlisted, weight 1 (sentence-transformers only warns then)
    listed = InfoNCE(T, matryoshka_dims=[16, 4], matryoshka_weights=[3, 1]).compute_loss(q, p, n)
    assert torch.allclose(listed, _reference(q, p, n, [(16, 3.0), (4, 1.0)]), atol=1e-12)
    assert torch.equal(InfoNCE(T).compute_loss(q, p, n), InfoNCE(T, matryoshka_dims=[]).compute_loss(q, p, n))


def test_each_term_is_the_plain_loss_of_the_slices_with_margin_and_symmetry():
    q, p, n = _embeddings(B=5, N=3)
    options = {"symmetric": True, "false_negative_margin": 0.05}
    loss, details = InfoNCE(T, matryoshka_dims=[2, 6], matryoshka_weights=[1.5, 0.25], **options).compute_loss(
        q, p, n, return_details=True)
    terms = {d: InfoNCE(T, **options).compute_loss(q[:, :d], p[:, :d], n[..., :d], return_details=True)
             for d in (16, 6, 2)}
    assert torch.allclose(loss, terms[16][0] + 0.25 * terms[6][0] + 1.5 * terms[2][0], atol=1e-12)
    assert details["masked_negatives"] == terms[16][1]["masked_negatives"]  # reported at the full size
    assert all(torch.allclose(details["dim_losses"][d], terms[d][0]) for d in terms)


def test_gradcache_equals_plain_with_matryoshka():
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.Dropout(0.3), torch.nn.Tanh(),
                                  torch.nn.Linear(32, 16)).double()
    B, N = 7, 2
    x = {k: torch.randn(rows, 12).double() for k, rows in (("q", B), ("p", B), ("n", B * N))}
    loss_fn = InfoNCE(T, false_negative_margin=0.3, matryoshka_dims=[4, 8], matryoshka_weights=[1, 0.5])
    embed = lambda b: encoder(b["x"])
    torch.manual_seed(1)
    plain = loss_fn.compute_loss(embed({"x": x["q"]}), embed({"x": x["p"]}), embed({"x": x["n"]}).view(B, N, -1))
    plain.backward()
    plain_grads = [w.grad.clone() for w in encoder.parameters()]
    encoder.zero_grad()
    torch.manual_seed(1)
    cached = GradCache(loss_fn, chunk_size=3)(embed, {"x": x["q"]}, {"x": x["p"]}, {"x": x["n"]}, n_negatives=N)
    cached.backward()
    assert torch.allclose(cached, plain, atol=1e-12)
    for a, w in zip(plain_grads, encoder.parameters()):
        assert torch.allclose(a, w.grad, atol=1e-10)


def _batch(tokenizer, n=6):
    from bidirlm_pl.core import assets
    from bidirlm_pl.data.pairs import PairCollator

    docs = assets.lee_background()[:3 * n]
    rows = [{"anchor": docs[i][:40 + 25 * i], "positive": docs[n + i][:200], "negatives": [docs[2 * n + i][:200]]}
            for i in range(n)]
    return PairCollator(tokenizer, max_length=48)(rows, "Represent: ")


@pytest.mark.parametrize("pooling", ["mean", "latent_attention"])
def test_gradcache_on_and_off_give_the_same_gradients_in_the_stage(tiny_qwen3, pooling):
    runs = []
    for chunk in (None, 2):
        torch.manual_seed(0)
        stage = ContrastiveStage(str(tiny_qwen3), pooling=pooling, gradcache_chunk_size=chunk, latent_num_latents=8,
                                 latent_num_heads=2, false_negative_margin=0.1, matryoshka_dims=[8, 32])
        stage.configure_model()
        out = stage.step(_batch(stage.tokenizer))
        out["loss"].backward()
        runs.append((out, {k: p.grad.clone() for k, p in stage.named_parameters() if p.grad is not None}))
    (o0, g0), (o1, g1) = runs
    assert {"loss_dim8", "loss_dim32", "loss_dim64"} <= set(o0) and stage.trained_dims() == [8, 32, 64]
    assert torch.allclose(o0["loss"].detach(), o1["loss"], atol=1e-6)
    assert torch.allclose(o0["loss"].detach(), o0["loss_dim8"] + o0["loss_dim32"] + o0["loss_dim64"], atol=1e-5)
    assert g0.keys() == g1.keys() and len(g0) > 10
    for name in g0:
        assert torch.allclose(g0[name], g1[name], atol=1e-5), name


def _gathered(rank: int, world: int, port: int, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        q, p, n = (t.detach() for t in _embeddings(B=2 * world, N=1, D=8))
        rows = slice(rank * 2, rank * 2 + 2)
        local = [t[rows].clone().requires_grad_() for t in (q, p, n)]
        loss = InfoNCE(T, symmetric=True, gather_across_devices=True, matryoshka_dims=[2, 4]).compute_loss(*local)
        loss.backward()
        torch.save({"loss": loss.detach(), "grads": [t.grad for t in local]}, f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def test_gathered_negatives_equal_one_process_over_the_full_batch(tmp_path):
    """Two gloo processes, each with half the rows: mean loss and (summed) gradients of the full batch's loss."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_gathered, args=(2, port, str(tmp_path / "r")), nprocs=2, join=True)
    parts = [torch.load(tmp_path / f"r.{rank}") for rank in range(2)]
    q, p, n = _embeddings(B=4, N=1, D=8)
    full = InfoNCE(T, symmetric=True, matryoshka_dims=[2, 4]).compute_loss(q, p, n)
    assert torch.allclose((parts[0]["loss"] + parts[1]["loss"]) / 2, full.detach(), atol=1e-12)
    # all_gather's backward sums every rank's loss gradient into each rank's rows: halved, the full loss's
    expected = torch.autograd.grad(full, [q, p, n])
    for i, g in enumerate(expected):
        ours = torch.cat([parts[r]["grads"][i] for r in range(2)]) / 2
        assert torch.allclose(ours, g, atol=1e-12), i


@pytest.mark.parametrize("dims, weights, message", [
    ([0, 8], None, "matryoshka_dims entry 0 must be a positive whole number"),
    ([8.5], None, "matryoshka_dims entry 8.5 must be a positive whole number"),
    ("64", None, "matryoshka_dims '64' must be a list of embedding sizes"),
    ([8, 8], None, r"matryoshka_dims \[8, 8\] repeat a size"),
    ([8, 16], [1], r"matryoshka_weights \[1\] must be a list of 2 numbers"),
    ([8], [-1], "matryoshka_weights entry -1 must be a finite number >= 0"),
    (None, [1], r"matryoshka_weights \[1\] need matryoshka_dims"),
])
def test_bad_dims_are_one_line_errors(dims, weights, message):
    with pytest.raises(BidirLMError, match=message) as info:
        InfoNCE(T, matryoshka_dims=dims, matryoshka_weights=weights)
    assert "\n" not in str(info.value)


def test_a_size_above_the_hidden_size_fails_when_the_model_is_built(tiny_qwen3):
    stage = ContrastiveStage(str(tiny_qwen3), matryoshka_dims=[32, 128])
    with pytest.raises(BidirLMError, match="matryoshka_dims entry 128 exceeds the embedding size 64; expected sizes <= 64"):
        stage.configure_model()
    assert check_matryoshka([64, 8], [2, 1], hidden_size=64) == ((64, 8), (2.0, 1.0))


@pytest.fixture(scope="module")
def matryoshka_export(tmp_path_factory):
    """A tiny `bidirlm fit` (2 steps, GradCache on) with Matryoshka sizes 8 and 16 (hidden 64); its folder."""
    root = tmp_path_factory.mktemp("matryoshka-fit")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        code = main(["fit", "--config", str(ROOT / "configs/contrastive/tiny.yaml"),
                     "--model.init_args.matryoshka_dims=[8, 16]", "--model.init_args.matryoshka_weights=[1, 1]",
                     "--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.log_every_n_steps=1",
                     f"--trainer.default_root_dir={root}"])
    finally:
        os.chdir(cwd)
    assert code == 0
    return root, next(root.rglob("hf/config.json")).parent


def test_fit_logs_each_size_and_the_export_loads_truncated_in_sentence_transformers(matryoshka_export):
    from sentence_transformers import SentenceTransformer

    root, folder = matryoshka_export
    with open(next(root.rglob("metrics.csv"))) as handle:
        logged = [r for r in csv.DictReader(handle) if r.get("train/loss_dim8")]
    assert logged and all(np.isfinite(float(r["train/loss_dim16"])) for r in logged)
    assert json.loads((folder / "bidirlm_encoder.json").read_text())["matryoshka_dims"] == [8, 16, 64]
    assert "truncate_dim" not in json.loads((folder / "config_sentence_transformers.json").read_text())
    assert "truncate_dim=8)" in (folder / "README.md").read_text()  # the card shows how to load a smaller size
    texts = ["A bushfire near Sydney.", "The cricket team won by six wickets.", "Rain in the west."]
    full = SentenceTransformer(str(folder), device="cpu").encode(texts)
    cut = SentenceTransformer(str(folder), device="cpu", truncate_dim=8).encode(texts)
    # sentence-transformers truncates after its Normalize module: the first 8 dimensions of the unit vector,
    # not unit length themselves; their cosines are those of our re-normalised slice
    assert cut.shape == (3, 8) and np.abs(cut - full[:, :8]).max() <= 1e-6
    assert not np.allclose(np.linalg.norm(cut, axis=1), 1.0)
    ours = truncate_rows(full, 8)
    assert np.abs(metrics.cosine_matrix(cut, cut) - ours @ ours.T).max() <= 1e-6


def test_compare_scores_each_size_as_sentence_transformers_truncated_embeddings(matryoshka_export, tmp_path, capsys):
    from sentence_transformers import SentenceTransformer

    _, folder = matryoshka_export
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({"max_length": 64, "dims": [16], "tasks": [
        {"name": "lee-sts", "kind": "sts", "limit": 20},
        {"name": "clusters", "kind": "clustering", "limit": 20},
        {"name": "dependence", "kind": "dependence", "limit": 2}]}))
    out = tmp_path / "report"
    [result] = compare([str(folder)], ["m"], config=str(suite), output=str(out), progress=False, dims=[8, 64])
    assert sorted(result.dims) == [8, 64] and set(result.dims[8]) == {"lee-sts", "clusters"}
    records = task_data.builtin("lee-sts")[:20]
    st = SentenceTransformer(str(folder), device="cpu", truncate_dim=8)
    a, b = (st.encode([r[k] for r in records]) for k in ("text1", "text2"))
    cos = np.sum(metrics.unit_rows(a) * metrics.unit_rows(b), axis=1)
    assert result.dims[8]["lee-sts"]["spearman"] == pytest.approx(spearman(cos, [r["score"] for r in records]),
                                                                  abs=1e-6)
    assert result.dims[64]["lee-sts"] == pytest.approx(result.results["lee-sts"])  # the full size: the same score
    report = json.loads((out / "report.json").read_text())
    assert report["dims"] == [8, 64] and set(report["models"][0]["mean_embedding_score_by_dim"]) == {"8", "64"}
    table = (out / "report.md").read_text()
    assert "Embedding tasks at truncated sizes" in table and "| m | 8 |" in table and "| m | full |" in table


def test_compare_dims_errors(tiny_qwen3, tmp_path, capsys):
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({"tasks": [{"name": "lee-sts", "kind": "sts", "limit": 6}]}))
    with pytest.raises(BidirLMError, match="model 'tiny': dims entry 128 exceeds its embedding size 64"):
        compare([str(tiny_qwen3)], ["tiny"], config=str(suite), progress=False, dims=[8, 128])
    with pytest.raises(BidirLMError, match="--dims entry 0 must be a positive whole number"):
        compare([str(tiny_qwen3)], config=str(suite), progress=False, dims=[0])
    suite.write_text(yaml.safe_dump({"dims": [8, 8], "tasks": [{"name": "lee-sts", "kind": "sts"}]}))
    with pytest.raises(BidirLMError, match=r"compare config: dims \[8, 8\] repeat a size"):
        compare([str(tiny_qwen3)], config=str(suite), progress=False)
    suite.write_text(yaml.safe_dump({"tasks": [{"name": "ppl", "kind": "perplexity", "limit": 2}]}))
    with pytest.raises(BidirLMError, match=r"dims \[8\] score embedding tasks, and suite 'suite' has none"):
        compare([str(tiny_qwen3)], config=str(suite), progress=False, dims=[8])
    assert main(["compare", str(tiny_qwen3), "--dims", "0"]) == 2
    assert "--dims entry 0 must be a positive whole number" in capsys.readouterr().err


def test_ubmoe_stage1_and_the_omni_stage_take_the_sizes(tiny_qwen3):
    """The option lives in the shared ContrastiveCore: UBMoE stage 1 trains and logs every size (GradCache on)."""
    import inspect

    from bidirlm_pl.moe import UBMoEStage1
    from bidirlm_pl.stages.omni import OmniContrastiveStage

    torch.manual_seed(0)
    stage = UBMoEStage1(backbone=str(tiny_qwen3), attention_dropout=0.0, gradcache_chunk_size=3,
                        matryoshka_dims=[16], matryoshka_weights=[0.5])
    stage.configure_model()
    out = stage.step(_batch(stage.tokenizer))
    out["loss"].backward()
    assert torch.allclose(out["loss"], out["loss_dim64"] + 0.5 * out["loss_dim16"], atol=1e-5)
    assert any(p.grad is not None for p in stage.backbone.parameters())
    assert {"matryoshka_dims", "matryoshka_weights"} <= set(inspect.signature(OmniContrastiveStage).parameters)
