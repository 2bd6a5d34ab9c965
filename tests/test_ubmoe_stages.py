"""UBMoE stages: what trains and what stays frozen, stage-1 equality with a plain model, CLI end to end."""

from pathlib import Path

import lightning as L
import pytest
import torch

from bidirlm_pl import load_backbone, moe
from bidirlm_pl.callbacks import RouterStats
from bidirlm_pl.cli.main import main
from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.moe import UBMoEPairsData, UBMoEStage1, UBMoEStage2, UBMoETextData

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "ubmoe"


def _sgd(params):
    return torch.optim.SGD(params, lr=0.5)


def _trainer(steps=3, callbacks=()):
    return L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                     callbacks=list(callbacks))


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.backbone.named_parameters()}


@pytest.fixture(scope="module")
def stage1_folder(tmp_path_factory, tiny_qwen3):
    """A UBMoE folder whose expert 1 differs from expert 0 (as after stage 1)."""
    model, tok = load_backbone(tiny_qwen3, bidirectional=True)
    moe.convert_to_ubmoe(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for ffn in moe.ubmoe_ffns(model):
            for p in ffn.experts[1].parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return moe.save_ubmoe(model, tok, tmp_path_factory.mktemp("ub") / "stage1")


def test_stage1_trains_only_expert1_and_equals_a_plain_model(tiny_path, tmp_path):
    stage = UBMoEStage1(backbone=str(tiny_path), optimizer=_sgd, attention_dropout=0.3)
    data = UBMoEPairsData(tokenizer=str(tiny_path), max_length=32, batch_size=4, holdout=10)
    stage.configure_model()
    before = _snapshot(stage)
    _trainer(3).fit(stage, datamodule=data)
    after = _snapshot(stage)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    expert1 = {k for k in before if ".mlp.experts.1." in k}
    assert changed == expert1, sorted(changed ^ expert1)[:5]
    # the stage-1 model (forced expert 1, bidirectional) is the plain model with expert-1 FFNs
    stage.eval()
    batch = data.collator(data.val_rows[0][:3])["query"]
    with torch.no_grad():
        ours = stage.embed(batch)
        stage.export_hf(tmp_path / "s1")
        loaded, tok = moe.load_ubmoe(tmp_path / "s1")
        plain = moe.to_plain(loaded, 1)
        plain.save_pretrained(tmp_path / "plain")
        tok.save_pretrained(tmp_path / "plain")
        reference, _ = load_backbone(tmp_path / "plain", bidirectional=True)
        from bidirlm_pl.models.pooling import mean_pool

        hidden = reference.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        assert (mean_pool(hidden, batch["attention_mask"]) - ours).abs().max() <= 1e-5


def test_stage1_takes_supervised_pairs_with_hard_negatives(tiny_qwen3, tmp_path):
    """The contrastive stage's PairsDataModule (pairs + hard negatives + instruction) feeds stage 1 as is."""
    import json

    from bidirlm_pl.data.pairs import PairsDataModule, PairSource

    docs = [d[:200] for d in __import__("bidirlm_pl.core.assets", fromlist=["x"]).lee_background()[:12]]
    rows = [{"anchor": d[:80], "positive": d[80:], "negatives": [docs[(i + 1) % 12][80:]]} for i, d in enumerate(docs)]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    data = PairsDataModule(tokenizer=str(tiny_qwen3), batch_size=4, max_length=32, sources=[PairSource(
        name="p", mode="pairs", path=str(tmp_path / "pairs.jsonl"), num_negatives=1, query_instruction="Query: ")])
    stage = UBMoEStage1(backbone=str(tiny_qwen3), optimizer=_sgd)
    stage.configure_model()
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    out = stage.step(batch)
    assert torch.isfinite(out["loss"]) and out["loss"] > 0
    before = _snapshot(stage)
    _trainer(2).fit(stage, datamodule=data)
    after = _snapshot(stage)
    assert {k for k in before if not torch.equal(before[k], after[k])} == {k for k in before if ".experts.1." in k}


def test_stage1_gradcache_equals_embedding_at_once(tiny_qwen3):
    """Stage 1 shares the contrastive stage's core: GradCache chunks give the loss and expert-1 gradients of
    embedding each group at once (hard negatives and a query instruction included)."""
    from bidirlm_pl.core.assets import lee_background
    from bidirlm_pl.data.pairs import PairCollator

    docs = lee_background()[:7]
    rows = [{"anchor": d[:60], "positive": d[60:200], "negatives": [docs[i + 1][60:200]]} for i, d in enumerate(docs[:6])]
    runs = []
    for chunk in (None, 2):
        torch.manual_seed(0)
        stage = UBMoEStage1(backbone=str(tiny_qwen3), attention_dropout=0.0, gradcache_chunk_size=chunk,
                            false_negative_margin=0.1)
        stage.configure_model()
        out = stage.step(PairCollator(stage.tokenizer, max_length=32)(rows, "Query: "))
        out["loss"].backward()
        runs.append((out, {n: p.grad for n, p in stage.backbone.named_parameters() if p.grad is not None}))
    (plain, g0), (cached, g1) = runs
    assert set(plain) == {"loss", "masked_negatives", "accuracy"}
    assert torch.allclose(plain["loss"], cached["loss"], atol=1e-6)
    assert torch.equal(plain["accuracy"], cached["accuracy"])
    assert g0.keys() == g1.keys() and g0 and all(".mlp.experts.1." in n for n in g0)
    for name in g0:
        assert torch.allclose(g0[name], g1[name], atol=1e-5), name


@pytest.mark.parametrize("routing", ["soft", "top1"])
def test_stage2_router_gets_gradient_and_frozen_parameters_stay(stage1_folder, routing):
    stage = UBMoEStage2(backbone=str(stage1_folder), routing=routing, load_balance=0.01, optimizer=_sgd)
    data = UBMoETextData(tokenizer=str(stage1_folder), max_length=48, batch_size=2, holdout=10)
    stage.configure_model()
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    stage.step(batch)["loss"].backward()
    routers = [f.router.weight for f in moe.ubmoe_ffns(stage.backbone)]
    assert all(w.grad is not None and w.grad.abs().max() > 0 for w in routers)
    assert not any(p.grad is not None for n, p in stage.backbone.named_parameters() if ".router." not in n)
    stage.backbone.zero_grad(set_to_none=True)
    before = _snapshot(stage)
    stats = RouterStats(every_n_steps=1)
    _trainer(3, [stats]).fit(stage, datamodule=data)
    after = _snapshot(stage)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {k for k in before if ".mlp.router." in k}
    assert stage.backbone.config.is_causal  # trained causally
    assert all(f.routing == routing for f in moe.ubmoe_ffns(stage.backbone))


def test_stage2_kl_to_base_equals_the_full_logits_kl_to_the_forced0_model(stage1_folder):
    """The reference is the model itself with expert 0 everywhere (the base); routing is restored after."""
    import torch.nn.functional as F

    from bidirlm_pl.losses.token import next_token_labels, prediction_mask

    stage = UBMoEStage2(backbone=str(stage1_folder), kl_to_base=2.0, expert1_penalty=0.5, loss_chunk_size=7,
                        optimizer=_sgd)
    data = UBMoETextData(tokenizer=str(stage1_folder), max_length=48, batch_size=2, holdout=10)
    stage.configure_model()
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    out = stage.step(batch)
    assert all(f.routing == "soft" for f in moe.ubmoe_ffns(stage.backbone))
    ids = {"input_ids": batch["input_ids"], "position_ids": batch.get("position_ids")}
    with torch.no_grad():
        routed = stage.backbone(**ids).logits
        moe.set_routing(stage.backbone, "forced0")
        base = stage.backbone(**ids).logits
        moe.set_routing(stage.backbone, "soft")
    valid = prediction_mask(next_token_labels(batch["input_ids"], seq_ids_BT=batch.get("seq_ids")),
                            batch.get("seq_ids"))
    want = F.kl_div(routed[:, :-1][valid].float().log_softmax(-1), base[:, :-1][valid].float().log_softmax(-1),
                    log_target=True, reduction="batchmean")
    assert want > 0 and abs(float(out["kl_to_base"]) - float(want)) <= 1e-5 * max(1.0, float(want))
    expected = out["lm_loss"] + 2.0 * out["kl_to_base"] + 0.5 * out["expert1_prob"]
    assert torch.allclose(out["loss"], expected, atol=1e-6)
    assert 0 < float(out["expert1_prob"]) < 1


def test_stage2_expert1_penalty_pulls_every_router_toward_expert0(stage1_folder):
    data = UBMoETextData(tokenizer=str(stage1_folder), max_length=48, batch_size=2, holdout=10)
    shares = {}
    for penalty in (0.0, 50.0):
        torch.manual_seed(0)
        stage = UBMoEStage2(backbone=str(stage1_folder), expert1_penalty=penalty, optimizer=_sgd)
        _trainer(3).fit(stage, datamodule=data)
        data.setup("fit")
        with torch.no_grad():
            shares[penalty] = float(stage.step(next(iter(data.train_dataloader())))["expert1_prob"])
    assert shares[50.0] < shares[0.0] - 0.05, shares


def test_router_stats_shares_count_real_tokens(stage1_folder):
    model, _ = moe.load_ubmoe(stage1_folder)
    with torch.no_grad():
        for i, ffn in enumerate(moe.ubmoe_ffns(model)):
            ffn.router.bias.copy_(torch.tensor([5.0, -5.0]) * (1 if i == 0 else -1))
    from bidirlm_pl.callbacks.router_stats import routing_shares

    ids = torch.randint(5, 100, (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    moe.set_routing(model, "top1")
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    shares = routing_shares(model, mask.bool())
    assert float(shares["layer0/expert0"]) == 1.0 and float(shares["layer1/expert1"]) == 1.0
    assert float(shares["expert1"]) == 0.5


@pytest.mark.parametrize("make, match", [
    (lambda m, f: UBMoEStage1({"model": m, "trainable": []}), "nothing would train"),
    (lambda m, f: UBMoEStage1({"model": m, "trainable": ["ffn"]}), "trainable group 'ffn' is not one of"),
    (lambda m, f: UBMoEStage1(backbone=m, routing="forced0"), "routing 'forced0' gives no gradient"),
    (lambda m, f: UBMoEStage1(backbone=m, routing="hard"), "routing mode 'hard'"),
    (lambda m, f: UBMoEStage2(backbone=m), "is not a UBMoE folder"),
    (lambda m, f: UBMoEStage2(backbone=f, routing="forced1"), "routing 'forced1' gives no gradient"),
    (lambda m, f: UBMoEStage2(backbone=f, load_balance=-1), "load_balance -1"),
    (lambda m, f: UBMoEStage2(backbone=f, kl_to_base=-0.5), "kl_to_base -0.5 must be a weight >= 0"),
    (lambda m, f: UBMoEStage2(backbone=f, expert1_penalty=float("nan")), "expert1_penalty nan must be"),
    (lambda m, f: UBMoEPairsData(tokenizer=m, batch_size=1), "batch_size 1 must be >= 2"),
])
def test_stage_configs_that_would_train_nothing_fail_before_training(tiny_qwen3, stage1_folder, make, match):
    with pytest.raises(BidirLMError, match=match) as err:
        make(str(tiny_qwen3), str(stage1_folder))
    assert "\n" not in str(err.value)


def test_cli_bad_stage_config_is_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc = main(["fit", "--config", str(CONFIGS / "stage1-tiny.yaml"), "--model.init_args.backbone.trainable=[router]",
               "--model.init_args.routing=forced1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("bidirlm: error: routing 'forced1' gives no gradient")


def test_cli_stage1_then_stage2_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    common = ["--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.enable_progress_bar=false",
              "--trainer.enable_model_summary=false"]
    assert main(["fit", "--config", str(CONFIGS / "stage1-tiny.yaml"), *common]) == 0
    stage1 = tmp_path / "runs/ubmoe/stage1-tiny/hf"
    model1, _ = moe.load_ubmoe(stage1)
    assert not model1.config.is_causal and moe.spec_of(model1).routing == "forced1"
    assert main(["fit", "--config", str(CONFIGS / "stage2-tiny.yaml"), *common]) == 0
    model2, _ = moe.load_ubmoe(tmp_path / "runs/ubmoe/stage2-tiny/hf")
    assert model2.config.is_causal and moe.spec_of(model2).routing == "soft"
    s1, s2 = model1.state_dict(), model2.state_dict()
    assert {k for k in s1 if not torch.equal(s1[k], s2[k])} == {k for k in s1 if ".mlp.router." in k}
    metrics = next((tmp_path / "runs/ubmoe/stage2-tiny").glob("**/metrics.csv")).read_text()
    assert "router/layer1/expert1" in metrics and "val/perplexity" in metrics
    # generation still works, and forced expert 0 reproduces the original tiny model's tokens
    original, tok = load_backbone("tiny-qwen3", bidirectional=False)
    moe.set_mode_routing(model2, "generate", "forced0")
    moe.set_mode(model2, "generate")
    ids = tok(["The river"], return_tensors="pt").input_ids
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": tok.pad_token_id}
    with torch.no_grad():
        assert torch.equal(model2.generate(ids, **kw), original.generate(ids, **kw))


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_ubmoe_yaml_parses(name, capsys):
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(CONFIGS / name), "--print_config"])
    assert done.value.code in (0, None)
    assert "class_path: bidirlm_pl.moe.UBMoEStage" in capsys.readouterr().out


def test_similarity_reads_a_ubmoe_folder_as_expert_drift(stage1_folder, tiny_qwen3):
    """`bidirlm similarity UBMoE base`: only the FFN moved (expert 1); expert 0 is the original exactly."""
    from bidirlm_pl.models.merging.similarity import similarity

    drift = similarity(str(stage1_folder), str(tiny_qwen3), expert=1)
    assert drift.groups["attention"].cosine == pytest.approx(1.0, abs=1e-12)
    assert drift.groups["ffn"].cosine < 0.9999 and drift.groups["ffn"].relative_distance > 0
    assert "(expert 1)" in drift.a and not drift.unmatched
    same = similarity(str(stage1_folder), str(tiny_qwen3), expert=0)
    assert same.groups["ffn"].relative_distance == 0.0


def test_merge_refuses_a_ubmoe_folder_with_one_line(stage1_folder, tiny_qwen3, tmp_path, capsys):
    from bidirlm_pl.cli.main import main as cli_main

    code = cli_main(["merge", "--models", str(stage1_folder), str(tiny_qwen3), "--weights", "0.5", "0.5",
                     "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "is a UBMoE folder" in err[-1] and len(err) == 1
    assert not (tmp_path / "out").exists()


def _effective_rank(x: torch.Tensor) -> float:
    """exp(entropy) of the normalised singular values of centred embeddings: 1 for a single-direction collapse."""
    s = torch.linalg.svdvals(x - x.mean(0))
    p = s / s.sum()
    return float(torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum()))


def test_tiny_stage1_does_not_collapse_and_keeps_expert0(tmp_path, monkeypatch, tiny_qwen3):
    """A stage-1 run keeps expert 1's embeddings spread out, and expert 0 is bit-identical to the original FFN.

    Threshold: a SimCSE collapse maps every text to one direction (effective rank ~1, the failure seen
    on Gemma3-270M at lr 3e-4); we require at least half the untrained model's effective rank.
    """
    from bidirlm_pl.core.assets import lee_documents
    from bidirlm_pl.models.encoder import Encoder

    def embed_texts(model, tok, texts):  # mean pooling of bidirectional states, no normalisation
        encoder = Encoder(model, tok, "mean", normalize=False, max_length=64, bidirectional=True)
        return encoder.encode(texts, batch_size=8, convert_to_numpy=False)

    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", str(CONFIGS / "stage1-tiny.yaml"), "--trainer.max_steps=12",
                 "--trainer.default_root_dir", str(tmp_path)]) == 0
    folder = next(tmp_path.rglob("hf/config.json")).parent
    trained, tok = moe.load_ubmoe(folder)
    base, _ = load_backbone(tiny_qwen3, bidirectional=True)
    texts = lee_documents()[:32]
    with torch.no_grad(), moe.mode(trained, "embed"):
        after = embed_texts(trained, tok, texts)
    with torch.no_grad():
        before = embed_texts(base, tok, texts)
    assert _effective_rank(after) >= 0.5 * _effective_rank(before) and _effective_rank(after) > 2.0
    plain = dict(base.named_parameters())
    for i, ffn in enumerate(moe.ubmoe_ffns(trained)):
        for name, p in ffn.experts[0].named_parameters():
            assert torch.equal(p, plain[f"model.layers.{i}.mlp.{name}"]), (i, name)
        moved = any(not torch.equal(p, plain[f"model.layers.{i}.mlp.{n}"]) for n, p in ffn.experts[1].named_parameters())
        assert moved, f"expert 1 of layer {i} did not train"


def test_stage1_starts_from_an_exported_bidirectional_folder(tmp_path, tiny_qwen3):
    """Composition: stage 1 takes what another stage exported (here a bidirectional plain folder, as MNTP writes)."""
    from bidirlm_pl.core.export import save_hf_folder

    exported, tok = load_backbone(tiny_qwen3, bidirectional=True)
    with torch.no_grad():
        exported.model.layers[0].mlp.up_proj.weight.mul_(1.5)  # as if adapted
    folder = save_hf_folder(exported, tok, tmp_path / "mntp-hf")
    stage = UBMoEStage1(str(folder))
    stage.configure_model()
    ffn = moe.ubmoe_ffns(stage.backbone)[0]
    assert torch.equal(ffn.experts[0].up_proj.weight, exported.model.layers[0].mlp.up_proj.weight)
    assert torch.equal(ffn.experts[1].up_proj.weight, exported.model.layers[0].mlp.up_proj.weight)
    assert [n for n, p in stage.backbone.named_parameters() if p.requires_grad and "experts.0" in n] == []
