"""Published BidirLM checkpoints load natively and embed as their own code does.

Tiny stand-ins are written in their layout: ``config.json`` with ``model_type: bidirlm`` and ``auto_map`` to
``modeling_bidirlm.py`` (here a file that raises if anything imports it), safetensors keys as their
``BidirLMModel`` (no prefix) or MNTP ``-Base`` (``model.`` prefix, an output layer and a classifier head)
save them, and the Sentence-Transformers files the hub repos ship (mean pooling, ``include_prompt: true``).
:func:`reference_embed` re-implements their forward from Decoder2Encoder's
``optimus/tools/huggingface/{biqwen,bigemma}/modeling_*.py``: padded texts unpadded into one packed sequence,
positions ``arange`` over the pack, a block-diagonal additive ``-inf`` mask limited on Gemma3 sliding
layers to ``|i - j| <= sliding_window // 2``, then Sentence-Transformers' mean over every token.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from hub_standin import HubStandIn
from safetensors.torch import load_file, save_file

from bidirlm_pl.backbone.load import load_backbone, resolve_model_path
from bidirlm_pl.cli.main import main
from bidirlm_pl.core import assets
from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.core.hub import hub_model_folder
from bidirlm_pl.core.published import RECORD, native_config
from bidirlm_pl.evaluation import metrics
from bidirlm_pl.evaluation.embedding import model_embedder
from bidirlm_pl.models.encoder import Encoder
from bidirlm_pl.moe.modes import load_any

REMOTE_CODE = 'raise RuntimeError("remote code must never run")\n'
TEXTS = [
    "The bank by the river flooded after three days of rain in the valley.",
    "Rates rose again.",
    "A short one",
    "Firefighters fought the blaze near Sydney for a week while the wind kept changing direction overnight.",
]


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BIDIRLM_CACHE", str(tmp_path / "bidirlm-cache"))


# ------------------------------------------------------------------ stand-ins in their layout

def their_config(arch: str, vocab: int, tokenizer_ids: dict) -> dict:
    config = {
        "architectures": ["BidirLMModel"], "model_type": "bidirlm", "classifier_pooling": "late",
        "auto_map": {"AutoConfig": "configuration_bidirlm.BidirLMConfig", "AutoModel": "modeling_bidirlm.BidirLMModel",
                     "AutoModelForMaskedLM": "modeling_bidirlm.BidirLMForMaskedLM"},
        "vocab_size": vocab, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 256, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "rope_scaling": None, "attention_bias": False, "attention_dropout": 0.0,
        "tie_word_embeddings": True, "dtype": "float32", "transformers_version": "4.57.6", **tokenizer_ids,
    }
    if arch == "qwen3":
        return {**config, "num_hidden_layers": 2, "hidden_act": "silu"}
    return {**config, "num_hidden_layers": 3, "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 16,
            "sliding_window": 8, "_sliding_window_pattern": 6, "rope_local_base_freq": 10000.0,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
            "use_bidirectional_attention": True, "attn_logit_softcapping": None, "final_logit_softcapping": None}


def their_weights(config: dict, *, gemma: bool, prefix: str, generator) -> dict:
    D, I, V, hd = config["hidden_size"], config["intermediate_size"], config["vocab_size"], config["head_dim"]
    H, KV = config["num_attention_heads"], config["num_key_value_heads"]

    def rand(*shape, scale=0.1):
        return torch.randn(*shape, generator=generator) * scale

    def norm(n):  # Gemma3's RMSNorm scales by (1 + w), Qwen3's by w
        return rand(n) if gemma else 1 + rand(n)

    w = {"embed_tokens.weight": rand(V, D, scale=1.0 if not gemma else 0.2), "norm.weight": norm(D)}
    for i in range(config["num_hidden_layers"]):
        p = f"layers.{i}."
        w |= {p + "self_attn.q_proj.weight": rand(H * hd, D), p + "self_attn.k_proj.weight": rand(KV * hd, D),
              p + "self_attn.v_proj.weight": rand(KV * hd, D), p + "self_attn.o_proj.weight": rand(D, H * hd),
              p + "self_attn.q_norm.weight": norm(hd), p + "self_attn.k_norm.weight": norm(hd),
              p + "mlp.gate_proj.weight": rand(I, D), p + "mlp.up_proj.weight": rand(I, D),
              p + "mlp.down_proj.weight": rand(D, I), p + "input_layernorm.weight": norm(D),
              p + "post_attention_layernorm.weight": norm(D)}
        if gemma:
            w |= {p + "pre_feedforward_layernorm.weight": norm(D), p + "post_feedforward_layernorm.weight": norm(D)}
    return {prefix + k: v.contiguous() for k, v in w.items()}


def write_standin(folder: Path, arch: str, layout: str) -> Path:
    """A tiny BidirLM-published repo: ``layout`` "embedding" (BidirLMModel keys) or "base" (MaskedLM keys)."""
    tiny = assets.tiny_model("qwen3")
    folder.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((tiny / name).read_bytes())
    tiny_config = json.loads((tiny / "config.json").read_text())
    ids = {k: tiny_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in tiny_config}
    config = their_config(arch, tiny_config["vocab_size"], ids)
    generator = torch.Generator().manual_seed(7 if arch == "qwen3" else 11)
    weights = their_weights(config, gemma=arch == "gemma3", prefix="model." if layout == "base" else "",
                            generator=generator)
    if layout == "base":
        config["architectures"] = ["BidirLMForMaskedLM"]
        weights |= {"lm_head.weight": weights["model.embed_tokens.weight"].clone(),
                    "dense.weight": torch.randn(64, 64, generator=generator), "classifier.weight": torch.randn(3, 64)}
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("modeling_bidirlm.py", "configuration_bidirlm.py"):
        (folder / name).write_text(REMOTE_CODE)
    (folder / "1_Pooling").mkdir()
    flags = {f"pooling_mode_{m}": m == "mean_tokens" for m in ("cls_token", "mean_tokens", "max_tokens",
                                                                 "mean_sqrt_len_tokens", "weightedmean_tokens", "lasttoken")}
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 64, **flags, "include_prompt": True}))
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 512, "do_lower_case": False}))
    return folder


# ------------------------------------------------------------------ their forward, re-implemented

def rms_norm(x, weight, eps, gemma):
    y = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return (y * (1.0 + weight.float())).type_as(x) if gemma else weight * y.to(x.dtype)


def rotary(theta, dim, positions):
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    freqs = positions[:, None].float() * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def packed_mask(lengths: list[int], window: int | None):
    """Their ``create_packed_seqs_mask(causal=False, window_size=(w, w))``: same text, |distance| <= w."""
    seq = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    starts = torch.repeat_interleave(torch.cumsum(torch.tensor([0] + lengths[:-1]), 0), torch.tensor(lengths))
    rel = torch.arange(len(seq)) - starts
    allowed = seq[:, None] == seq[None, :]
    if window is not None:
        distance = rel[None, :] - rel[:, None]
        allowed &= (distance >= -window) & (distance <= window)
    return torch.full(allowed.shape, float("-inf")).masked_fill(allowed, 0.0)


def attention(h, w, p, c, rope, mask, gemma):
    T, hd = h.shape[0], c["head_dim"]
    q = rms_norm(F.linear(h, w[p + "q_proj.weight"]).view(T, -1, hd), w[p + "q_norm.weight"], c["rms_norm_eps"], gemma)
    k = rms_norm(F.linear(h, w[p + "k_proj.weight"]).view(T, -1, hd), w[p + "k_norm.weight"], c["rms_norm_eps"], gemma)
    v = F.linear(h, w[p + "v_proj.weight"]).view(T, -1, hd)
    cos, sin = rope
    q, k, v = rotate(q.transpose(0, 1), cos, sin), rotate(k.transpose(0, 1), cos, sin), v.transpose(0, 1)
    groups = c["num_attention_heads"] // c["num_key_value_heads"]
    k, v = k.repeat_interleave(groups, dim=0), v.repeat_interleave(groups, dim=0)
    scaling = (c["query_pre_attn_scalar"] if gemma else hd) ** -0.5
    scores = torch.softmax(q @ k.transpose(1, 2) * scaling + mask, dim=-1, dtype=torch.float32)
    return F.linear((scores @ v).transpose(0, 1).reshape(T, -1), w[p + "o_proj.weight"])


def layer(h, w, i, c, rope, mask, gemma):
    p, eps = f"layers.{i}.", c["rms_norm_eps"]
    act = (lambda x: F.gelu(x, approximate="tanh")) if gemma else F.silu
    attn = attention(rms_norm(h, w[p + "input_layernorm.weight"], eps, gemma), w, p + "self_attn.", c, rope, mask,
                     gemma)
    if gemma:
        h = h + rms_norm(attn, w[p + "post_attention_layernorm.weight"], eps, gemma)
        x = rms_norm(h, w[p + "pre_feedforward_layernorm.weight"], eps, gemma)
    else:
        h = h + attn
        x = rms_norm(h, w[p + "post_attention_layernorm.weight"], eps, gemma)
    mlp = F.linear(act(F.linear(x, w[p + "mlp.gate_proj.weight"])) * F.linear(x, w[p + "mlp.up_proj.weight"]),
                   w[p + "mlp.down_proj.weight"])
    return h + (rms_norm(mlp, w[p + "post_feedforward_layernorm.weight"], eps, gemma) if gemma else mlp)


def reference_embed(folder: Path, ids: list[list[int]]) -> torch.Tensor:
    """Their BidirLMModel forward on the packed texts, then Sentence-Transformers' mean (include_prompt)."""
    c = json.loads((folder / "config.json").read_text())
    w = {k.removeprefix("model."): v for k, v in load_file(str(folder / "model.safetensors")).items()}
    gemma = "query_pre_attn_scalar" in c
    flat = torch.tensor([t for seq in ids for t in seq])
    lengths = [len(seq) for seq in ids]
    h = F.embedding(flat, w["embed_tokens.weight"]) * (math.sqrt(c["hidden_size"]) if gemma else 1.0)
    positions = torch.arange(len(flat))  # their quirk: positions run over the whole pack (RoPE sees only offsets)
    types = c.get("layer_types") or ["full_attention"] * c["num_hidden_layers"]
    window = c["sliding_window"] // 2 if gemma and c.get("use_bidirectional_attention", True) else None
    ropes = {"full_attention": rotary(c["rope_theta"], c["head_dim"], positions),
             "sliding_attention": rotary(c.get("rope_local_base_freq", c["rope_theta"]), c["head_dim"], positions)}
    masks = {"full_attention": packed_mask(lengths, None), "sliding_attention": packed_mask(lengths, window)}
    for i, kind in enumerate(types):
        h = layer(h, w, i, c, ropes[kind], masks[kind], gemma)
    h = rms_norm(h, w["norm.weight"], c["rms_norm_eps"], gemma)
    return torch.stack([chunk.mean(0) for chunk in torch.split(h, lengths)])


def token_ids(texts: list[str]) -> list[list[int]]:
    """The stand-ins' tokenizer (the tiny asset's files; their own folder's config would ask for remote code)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(assets.tiny_model("qwen3"))(texts, add_special_tokens=True)["input_ids"]


# ------------------------------------------------------------------ tests

@pytest.mark.parametrize("layout", ["embedding", "base"])
@pytest.mark.parametrize("arch", ["qwen3", "gemma3"])
def test_native_load_embeds_as_their_code(tmp_path, arch, layout):
    standin = write_standin(tmp_path / "BidirLM-tiny", arch, layout)
    ids = token_ids(TEXTS)
    if arch == "gemma3":
        assert max(map(len, ids)) > 3 * json.loads((standin / "config.json").read_text())["sliding_window"]
    expected = reference_embed(standin, ids).numpy()
    encoder = Encoder.from_pretrained(standin)  # no remote code: modeling_bidirlm.py raises if imported
    assert encoder.include_prompt and not encoder.normalize
    for pack in (False, True):
        got = encoder.encode(TEXTS, batch_size=3, pack=pack)
        assert np.abs(got - expected).max() <= 1e-5, (arch, layout, pack)
    if layout == "embedding":  # the native folder is a plain Sentence-Transformers folder too
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(str(resolve_model_path(standin)), device="cpu")
        assert np.abs(st.encode(TEXTS, batch_size=3) - expected).max() <= 1e-5
    model, _ = load_backbone(str(standin), head="causal_lm", bidirectional=True)  # what `fit` starts from
    assert type(model).__name__ == ("Qwen3ForCausalLM" if arch == "qwen3" else "Gemma3ForCausalLM")
    hidden = model.model(input_ids=torch.tensor([ids[0]])).last_hidden_state.mean(1)[0]
    assert torch.allclose(hidden, torch.from_numpy(expected[0]), atol=1e-5)


def test_the_native_folder_is_plain_transformers_and_converted_once(tmp_path):
    standin = write_standin(tmp_path / "BidirLM-tiny-Base", "gemma3", "base")
    folder = resolve_model_path(standin)
    config = json.loads((folder / "config.json").read_text())
    assert (config["model_type"], config["architectures"], config["is_causal"]) == (
        "gemma3_text", ["Gemma3ForCausalLM"], False)
    assert config["sliding_window"] == 4 and config["use_bidirectional_attention"] is False
    assert "auto_map" not in config and not list(folder.rglob("*.py"))
    assert (folder / "1_Pooling" / "config.json").is_file() and (folder / "tokenizer.json").is_file()
    record = json.loads((folder / RECORD).read_text())
    assert record["dropped_weights"] == ["classifier.weight", "dense.weight", "lm_head.weight"]
    converted_at = (folder / RECORD).stat().st_mtime_ns
    assert resolve_model_path(str(standin)) == folder and (folder / RECORD).stat().st_mtime_ns == converted_at
    native = tmp_path / "native-copy"  # a folder already in standard names links its weights, not copies them
    native.mkdir()
    for f in folder.iterdir():
        if f.is_file():
            (native / f.name).write_bytes(f.read_bytes())
    (native / "config.json").write_text(json.dumps({**json.loads((standin / "config.json").read_text())}))
    relinked = resolve_model_path(native)
    assert (relinked / "model.safetensors").is_symlink()


def test_a_stage_starts_from_a_published_checkpoint(tmp_path):
    """`fit` from a BidirLM id: the stage loads the native model and exports a plain bidirectional folder."""
    from bidirlm_pl.stages.mntp import MNTPStage

    standin = write_standin(tmp_path / "BidirLM-tiny-Base", "gemma3", "base")
    stage = MNTPStage(backbone=str(standin))
    stage.configure_model()
    stage.export_hf(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["model_type"], config["is_causal"], config["sliding_window"]) == ("gemma3_text", False, 4)
    assert str(standin) in (tmp_path / "hf" / "README.md").read_text()


def test_decoder2encoder_configs_map_their_window_and_flag():
    """``bigemma/270m.json`` ships ``use_bidirectional_attention: false`` (causal, window (sw, 0)); their upload
    script sets it true (bidirectional, window sw // 2 each side)."""
    gemma = {"model_type": "bigemma3_text", "sliding_window": 512, "query_pre_attn_scalar": 256,
             "use_bidirectional_attention": False}
    assert (native_config(gemma)["is_causal"], native_config(gemma)["sliding_window"]) == (True, 513)
    gemma["use_bidirectional_attention"] = True
    assert (native_config(gemma)["is_causal"], native_config(gemma)["sliding_window"]) == (False, 256)
    qwen = {"model_type": "biqwen3", "hidden_act": "silu", "clf_pooling": "late", "mask_token_id": 151663}
    assert native_config(qwen)["model_type"] == "qwen3" and native_config(qwen)["is_causal"] is False
    assert "clf_pooling" not in native_config(qwen)
    with pytest.raises(BidirLMError, match="neither Qwen3 nor Gemma3"):
        native_config({"model_type": "bidirlm", "hidden_size": 8})


def test_compare_accepts_a_published_id_offline_and_embeds_as_their_code(tmp_path, monkeypatch):
    """`hf download BidirLM/...` on a login node (the stand-in hub), then `bidirlm compare BidirLM/...` offline."""
    repo = write_standin(tmp_path / "repo", "gemma3", "embedding")
    home = tmp_path / "hf-home"
    env = {"HF_HOME": str(home), "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1", "PATH": ""}
    with HubStandIn() as hub:
        hub.add("BidirLM/BidirLM-tiny-Embedding", repo)
        hf = str(Path(sys.executable).with_name("hf"))
        got = subprocess.run([hf, "download", "BidirLM/BidirLM-tiny-Embedding"], env={**env, "HF_ENDPOINT": hub.url},
                             capture_output=True, text=True, timeout=300, check=False)
    assert got.returncode == 0, got.stderr[-2000:]
    assert list((home / "hub").rglob("modeling_bidirlm.py"))  # downloaded with the rest, never imported
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    queries, documents = TEXTS[:2] + ["bank river"], TEXTS[2:] + ["rain in the valley"]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"query": q, "document": d}) + "\n" for q, d in zip(queries, documents)))
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({"max_length": 256, "tasks": [{"name": "mine", "kind": "retrieval",
                                                                    "path": str(pairs)}]}))
    hub_model_folder.cache_clear()
    try:
        assert main(["compare", "BidirLM/BidirLM-tiny-Embedding", "--config", str(suite),
                     "--output", str(tmp_path / "report")]) == 0
        model, tokenizer = load_any("BidirLM/BidirLM-tiny-Embedding")  # compare's own embedding path
        embed = model_embedder("BidirLM/BidirLM-tiny-Embedding", model, tokenizer, bidirectional=True, batch_size=2)
    finally:
        hub_model_folder.cache_clear()
    ref_q, ref_d = (reference_embed(repo, token_ids(texts)).numpy() for texts in (queries, documents))
    assert np.abs(embed(queries, 256, prompt_name="query") - ref_q).max() <= 1e-5
    assert np.abs(embed(documents, 256, prompt_name="document") - ref_d).max() <= 1e-5
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    [scores] = [m["results"]["mine"] for m in report["models"]]
    expected = metrics.retrieval_scores(metrics.cosine_matrix(ref_q, ref_d), np.eye(3, dtype=bool))
    assert {k: scores[k] for k in expected} == pytest.approx(expected, abs=1e-6)
