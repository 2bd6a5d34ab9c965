"""UBMoE conversion, routing, modes, save/reload and bad input (tiny models of every architecture)."""

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from bidirlm_pl import load_backbone, moe
from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.moe.ffn import UniBiFFN, load_balancing_loss


def _ids(vocab, B=2, T=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, vocab, (B, T), generator=g)


def _perturb_expert1(model, seed=1, scale=0.05):
    """Stand-in for stage 1: move expert 1 away from expert 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for ffn in moe.ubmoe_ffns(model):
            for p in ffn.experts[1].parameters():
                p.add_(torch.randn(p.shape, generator=g) * scale)
            ffn.router.weight.normal_(0, 0.5, generator=g)


@torch.no_grad()
def test_forced_expert0_causal_equals_original_and_generates_same_tokens(tiny_path):
    original, _ = load_backbone(tiny_path, bidirectional=False)
    model = moe.convert_to_ubmoe(copy.deepcopy(original), routing="forced0")
    _perturb_expert1(model)
    ids = _ids(original.config.vocab_size)
    assert (model(input_ids=ids).logits - original(input_ids=ids).logits).abs().max() <= 1e-6
    kw = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(model.generate(ids[:, :5], **kw), original.generate(ids[:, :5], **kw))
    # the generate mode with forced0 routing also reproduces it, whatever the default attention
    moe.set_mode_routing(model, "generate", "forced0")
    moe.set_mode(model, "generate")
    assert (model(input_ids=ids).logits - original(input_ids=ids).logits).abs().max() <= 1e-6


@torch.no_grad()
def test_forced_expert1_bidirectional_equals_plain_model_with_expert1_ffns(tiny_path, tmp_path):
    original, _ = load_backbone(tiny_path, bidirectional=True)
    model = moe.convert_to_ubmoe(copy.deepcopy(original), routing="forced1")
    _perturb_expert1(model)
    ids = _ids(original.config.vocab_size)
    out = model(input_ids=ids).logits
    plain = moe.to_plain(copy.deepcopy(model), 1)
    assert not moe.is_ubmoe(plain) and not moe.ubmoe_ffns(plain)
    assert torch.equal(out, plain(input_ids=ids).logits)
    # through a plain transformers folder too: any loader reads the stage-1 FFN model
    plain.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not reloaded.config.is_causal
    assert (reloaded(input_ids=ids).logits - out).abs().max() <= 1e-6
    assert (out - original(input_ids=ids).logits).abs().max() > 1e-3  # expert 1 really differs
    # and going back to expert 0 gives the original model
    back = moe.to_plain(copy.deepcopy(model), 0)
    assert torch.equal(back(input_ids=ids).logits, original(input_ids=ids).logits)


def _one_ffn(routing, top1_gradient="straight_through", seed=0):
    torch.manual_seed(seed)
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
    ffn = UniBiFFN(mlp, 8, routing=routing, top1_gradient=top1_gradient, router_init="normal", router_std=1.0)
    with torch.no_grad():
        for p in ffn.experts[1].parameters():
            p.add_(torch.randn_like(p))
    return ffn


def test_soft_routing_is_the_probability_weighted_sum():
    ffn = _one_ffn("soft")
    x = torch.randn(2, 5, 8)
    p = torch.softmax(ffn.router(x), -1)
    expected = p[..., :1] * ffn.experts[0](x) + p[..., 1:] * ffn.experts[1](x)
    assert torch.allclose(ffn(x), expected, atol=1e-6)
    assert ffn.experts[0].training is not None and not any(q.requires_grad for q in ffn.experts[0].parameters())


@pytest.mark.parametrize("top1_gradient", ["straight_through", "switch"])
def test_top1_routes_each_token_to_one_expert_and_the_router_learns(top1_gradient):
    ffn = _one_ffn("top1", top1_gradient)
    x = torch.randn(2, 7, 8)
    p = torch.softmax(ffn.router(x), -1)
    choice = p.argmax(-1)
    assert 0 < int(choice.sum()) < choice.numel()  # both experts used
    e0, e1 = ffn.experts[0](x), ffn.experts[1](x)
    scale = p.max(-1).values[..., None] if top1_gradient == "switch" else 1.0
    expected = torch.where(choice[..., None].bool(), e1, e0) * scale
    out = ffn(x)
    assert torch.allclose(out, expected, atol=1e-6)
    out.square().sum().backward()
    assert ffn.router.weight.grad.abs().max() > 1e-4
    # without a gradient, top-1 dispatches tokens to their expert only: same values
    with torch.no_grad():
        assert torch.allclose(ffn(x), expected, atol=1e-6)


def test_renormalised_top1_would_give_no_router_gradient():
    """Why ours differs from the public UBMoE code: a top-1 weight renormalised to 1 is constant."""
    ffn = _one_ffn("top1")
    x = torch.randn(2, 7, 8)
    p = torch.softmax(ffn.router(x), -1)
    top = p.max(-1, keepdim=True).values
    (top / top).sum().backward()
    assert ffn.router.weight.grad.abs().max() == 0


def test_routing_is_switchable_at_run_time_and_recorded(tiny_qwen3):
    model, _ = load_backbone(tiny_qwen3, bidirectional=False)
    moe.convert_to_ubmoe(model)
    assert all(f.routing == "soft" for f in moe.ubmoe_ffns(model))
    moe.set_routing(model, "top1")
    assert all(f.routing == "top1" for f in moe.ubmoe_ffns(model)) and model.config.ubmoe["routing"] == "top1"


def test_load_balancing_loss():
    probs = torch.tensor([[[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]]])
    mask = torch.tensor([[1, 1, 0]])
    # masked: both tokens to expert 0, mean probs (0.85, 0.15): 2 * (1 * 0.85) = 1.7
    assert torch.isclose(load_balancing_loss(probs, probs.argmax(-1), mask), torch.tensor(1.7))
    balanced = torch.tensor([[[0.6, 0.4], [0.4, 0.6]]])
    assert torch.isclose(load_balancing_loss(balanced, balanced.argmax(-1)), torch.tensor(1.0))


@torch.no_grad()
def test_modes_set_attention_and_routing_and_restore(tiny_qwen3):
    model, _ = load_backbone(tiny_qwen3, bidirectional=False)
    moe.convert_to_ubmoe(model, routing="top1")
    with moe.mode(model, "embed"):
        assert not model.config.is_causal and moe.ubmoe_ffns(model)[0].routing == "forced1"
        assert moe.current_mode(model) == "embed"
    assert model.config.is_causal and moe.ubmoe_ffns(model)[0].routing == "top1"
    moe.set_mode_routing(model, "embed", "soft")
    moe.set_mode(model, "embed")
    assert moe.ubmoe_ffns(model)[1].routing == "soft" and model.config.ubmoe["mode_routing"]["embed"] == "soft"


@torch.no_grad()
def test_save_reload_same_outputs(tiny_path, tmp_path):
    model, tok = load_backbone(tiny_path, bidirectional=False)
    moe.convert_to_ubmoe(model, routing="soft", top1_gradient="switch", prior_expert0=0.8)
    _perturb_expert1(model)
    moe.set_mode_routing(model, "embed", "top1")
    ids = _ids(model.config.vocab_size)
    outputs = {}
    for routing in ("soft", "top1", "forced0", "forced1"):
        for causal in (True, False):
            moe.set_routing(model, routing)
            outputs[routing, causal] = model(input_ids=ids, is_causal=causal).logits
    moe.set_routing(model, "soft")
    moe.save_ubmoe(model, tok, tmp_path / "ub")
    recorded = json.loads((tmp_path / "ub" / "config.json").read_text())["ubmoe"]
    assert recorded["top1_gradient"] == "switch" and recorded["mode_routing"]["embed"] == "top1"
    assert not list(tmp_path.glob(".ub.tmp-*"))
    loaded, tok2 = moe.load_ubmoe(tmp_path / "ub")
    assert loaded.config.is_causal and moe.spec_of(loaded) == moe.spec_of(model)
    for (routing, causal), expected in outputs.items():
        moe.set_routing(loaded, routing)
        assert torch.equal(loaded(input_ids=ids, is_causal=causal).logits, expected), (routing, causal)
    assert tok2("hello world").input_ids == tok("hello world").input_ids


# ------------------------------------------------------------------ bad input

def test_unknown_architecture_is_one_line_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(BidirLMError, match="architecture 'gpt2'") as err:
        moe.convert_to_ubmoe(gpt2)
    assert "\n" not in str(err.value)


def test_unknown_ffn_layout_is_one_line_error(tiny_qwen3):
    model, _ = load_backbone(tiny_qwen3)
    model.model.layers[1].mlp = torch.nn.Sequential(torch.nn.Linear(64, 64))
    with pytest.raises(BidirLMError, match="layer 1 FFN 'Sequential'.*unknown layout") as err:
        moe.convert_to_ubmoe(model)
    assert "\n" not in str(err.value)
    assert not moe.ubmoe_ffns(model)  # nothing converted half-way


@pytest.mark.parametrize("call, match", [
    (lambda m: moe.convert_to_ubmoe(m, routing="hard"), "routing mode 'hard' is not one of"),
    (lambda m: moe.convert_to_ubmoe(m, top1_gradient="renorm"), "top1_gradient 'renorm'"),
    (lambda m: moe.convert_to_ubmoe(m, experts=3), "UBMoE option 'experts' does not exist"),
    (lambda m: moe.convert_to_ubmoe(m, layers=[5]), r"UBMoE layers \[5\]"),
    (lambda m: moe.set_routing(moe.convert_to_ubmoe(m), "top2"), "routing mode 'top2'"),
    (lambda m: moe.set_mode(moe.convert_to_ubmoe(m), "train"), "UBMoE mode 'train'"),
    (lambda m: moe.set_routing(m, "soft"), "not a UBMoE model"),
    (lambda m: moe.convert_to_ubmoe(moe.convert_to_ubmoe(m)), "already UBMoE"),
    (lambda m: moe.to_plain(moe.convert_to_ubmoe(m), 2), "expert 2 does not exist"),
])
def test_bad_options_are_one_line_errors(tiny_qwen3, call, match):
    model, _ = load_backbone(tiny_qwen3)
    with pytest.raises(BidirLMError, match=match) as err:
        call(model)
    assert "\n" not in str(err.value)


def test_load_ubmoe_refuses_a_plain_folder(tiny_qwen3):
    with pytest.raises(BidirLMError, match="is not a UBMoE folder"):
        moe.load_ubmoe(tiny_qwen3)


@torch.no_grad()
def test_packed_perplexity_equals_per_document_loss_and_forced0_matches_original(tiny_qwen3):
    from bidirlm_pl.core import assets
    from bidirlm_pl.evaluation.generation import causal_perplexity
    from bidirlm_pl.moe.data import tokenize_documents

    model, tok = load_backbone(tiny_qwen3, bidirectional=True)  # perplexity must run causally anyway
    texts = [t[:120] for t in assets.lee_background()[:5]]
    total, count = 0.0, 0
    for ids in tokenize_documents(tok, texts):
        ids_1T = torch.tensor([ids])
        logits = model(input_ids=ids_1T, is_causal=True).logits[0, :-1]
        total += float(torch.nn.functional.cross_entropy(logits, ids_1T[0, 1:], reduction="sum"))
        count += len(ids) - 1
    expected = float(torch.tensor(total / count).exp())
    ppl = causal_perplexity(model, tok, texts, max_length=512)  # all documents fit in one row
    assert abs(ppl - expected) <= 1e-4 * expected
    moe.convert_to_ubmoe(model, routing="forced0")
    _perturb_expert1(model)
    assert causal_perplexity(model, tok, texts, max_length=512) == pytest.approx(ppl, rel=1e-6)


@pytest.mark.parametrize("routing", ["soft", "top1"])
@torch.no_grad()
def test_generate_with_learned_routing_same_with_and_without_kv_cache(tiny_qwen3, routing):
    """Routing is per token, so incremental decoding (KV cache) routes exactly as a full recompute."""
    model, _ = load_backbone(tiny_qwen3, bidirectional=False)
    moe.convert_to_ubmoe(model, routing=routing)
    _perturb_expert1(model, scale=0.2)
    ids = _ids(model.config.vocab_size, B=2, T=5)
    kw = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    cached = model.generate(ids, use_cache=True, **kw)
    assert torch.equal(cached, model.generate(ids, use_cache=False, **kw))
    choice = moe.ubmoe_ffns(model)[0].last_choice_BT
    assert choice is not None
