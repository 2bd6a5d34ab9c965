"""Varlen (FlashAttention) glue: the kernels' dtype rule, torch's varlen_attn adapter, flex masks from document ids.

The real kernels need CUDA; here they are stand-ins with the same signatures and dtype rules.
"""

import pytest
import torch
from torch.nn.attention.flex_attention import create_mask

from bidirlm_pl import load_backbone
from bidirlm_pl.backbone import attention, varlen
from bidirlm_pl.core.errors import BidirLMError

STRICT = varlen.register_varlen_backend("reference", varlen.reference_varlen)


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _packed(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (2, 14), generator=g)
    seq = torch.tensor([[0] * 5 + [1] * 9, [0] * 11 + [-1] * 3])
    pos = torch.tensor([list(range(5)) + list(range(9)), list(range(11)) + [0] * 3])
    return ids, seq, pos


def _hidden(model, ids, seq, pos, bidirectional):
    kw = attention.model_inputs(model.config, seq_ids_BT=seq, bidirectional=bidirectional)
    return model(input_ids=ids, position_ids=pos, **kw, output_hidden_states=True).hidden_states[-1]


def test_strict_standin_refuses_fp32_as_the_kernels_do():
    q = torch.randn(6, 2, 8)
    cu = torch.tensor([0, 6], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="only support fp16 and bf16"):
        varlen.reference_varlen(q, q, q, cu, cu, 6, 6)
    assert varlen.reference_varlen(q.bfloat16(), q.bfloat16(), q.bfloat16(), cu, cu, 6, 6).dtype == torch.bfloat16


def test_glue_casts_fp32_to_the_autocast_dtype_and_back():
    seen = []

    def spy(q, k, v, *args, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype))
        return varlen.reference_varlen(q, k, v, *args, **kwargs)

    glue = varlen.varlen_attention(spy)
    module = torch.nn.Linear(8, 8)  # fp32 weights, as under bf16-mixed
    module.is_causal = False
    q_BHTD = torch.randn(2, 4, 6, 8)
    k_BHSD = torch.randn(2, 2, 6, 8)  # GQA: 2 key heads for 4 query heads
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = glue(module, q_BHTD, k_BHSD, k_BHSD, None, is_causal=False)
    assert seen == [(torch.bfloat16,) * 3]
    assert out.dtype == torch.float32 and out.shape == (2, 6, 4, 8)
    # the same numbers as computing in bf16 throughout, up to the final cast
    ref, _ = varlen.varlen_attention(varlen.reference_varlen)(
        module.bfloat16(), q_BHTD.bfloat16(), k_BHSD.bfloat16(), k_BHSD.bfloat16(), None, is_causal=False)
    assert torch.equal(out, ref.float())


def test_glue_refuses_fp32_compute_with_one_line():
    glue = varlen.varlen_attention(varlen.reference_varlen)
    module = torch.nn.Linear(8, 8)
    x = torch.randn(1, 2, 4, 8)
    with pytest.raises(BidirLMError, match="bf16-mixed") as err:
        glue(module, x, x, x, None, is_causal=False)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_bf16_model_under_strict_standin_matches_eager(tiny_path, bidirectional):
    """bf16 weights through the strict stand-in (GQA, Gemma3 windows, causal or not) vs eager in bf16."""
    flash, _ = load_backbone(tiny_path, attn_implementation=STRICT, dtype="bfloat16", bidirectional=bidirectional)
    eager, _ = load_backbone(tiny_path, attn_implementation="eager", dtype="bfloat16", bidirectional=bidirectional)
    ids, seq, pos = _packed(flash.config.vocab_size)
    a, b = _hidden(flash, ids, seq, pos, bidirectional), _hidden(eager, ids, seq, pos, bidirectional)
    real = seq >= 0
    scale = b[real].float().abs().max()
    assert ((a[real].float() - b[real].float()).abs().max() / scale) < 3e-2


def _fake_torch_varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                            enable_gqa=False, **_):
    """torch's varlen_attn semantics (no causal flag: causal is window (left, 0)) on CPU."""
    assert q.dtype in varlen.HALF_DTYPES
    if q.shape[1] != k.shape[1]:
        assert enable_gqa
    return varlen.reference_varlen_fp32(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=scale,
                                           causal=False, window_size=window_size)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_torch_varlen_adapter_matches_eager(tiny_path, bidirectional, monkeypatch):
    """torch_varlen: causal becomes a (left, 0) window, Gemma3's windows and GQA pass through."""
    import torch.nn.attention.varlen as torch_varlen_module

    monkeypatch.setattr(torch_varlen_module, "varlen_attn", _fake_torch_varlen_attn)
    backend = varlen.register_varlen_backend("torch_cpu_fake", varlen.torch_varlen)
    model, _ = load_backbone(tiny_path, attn_implementation=backend, dtype="bfloat16", bidirectional=bidirectional)
    eager, _ = load_backbone(tiny_path, attn_implementation="eager", dtype="bfloat16", bidirectional=bidirectional)
    ids, seq, pos = _packed(model.config.vocab_size, seed=1)
    a, b = _hidden(model, ids, seq, pos, bidirectional), _hidden(eager, ids, seq, pos, bidirectional)
    real = seq >= 0
    assert ((a[real].float() - b[real].float()).abs().max() / b[real].float().abs().max()) < 3e-2


def test_torch_varlen_refuses_dropout_and_softcap():
    x = torch.randn(4, 2, 8, dtype=torch.bfloat16)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(BidirLMError, match="no attention dropout"):
        varlen.torch_varlen(x, x, x, cu, cu, 4, 4, dropout_p=0.1)
    with pytest.raises(BidirLMError, match="soft-capping"):
        varlen.torch_varlen(x, x, x, cu, cu, 4, 4, softcap=30.0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU message")
@pytest.mark.parametrize("name", ["torch_varlen", "flash_attention_2", "flash_attention_4"])
def test_every_varlen_backend_says_what_runs_on_cpu(tiny_qwen3, name):
    with pytest.raises(BidirLMError, match=f"'{name}' runs on CUDA GPUs only.*use 'sdpa'") as err:
        load_backbone(tiny_qwen3, attn_implementation=name)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [None, 3])
def test_flex_mask_mod_from_document_ids_equals_the_dense_table(causal, window):
    seq_ids_BT = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, -1, -1], [0] * 7 + [1] * 3])
    mask_mod = attention.document_mask_mod(seq_ids_BT, causal=causal, window=window)
    from_mod = create_mask(mask_mod, 2, 1, 10, 10, device="cpu")
    dense = attention.packed_visibility(seq_ids_BT, causal=causal, window=window)
    assert torch.equal(from_mod, dense)


def test_flex_packed_mask_holds_no_dense_table():
    config = type("C", (), {"_attn_implementation": "flex_attention", "layer_types": None, "sliding_window": None})()
    mask = attention.packed_attention_mask(config, torch.zeros(1, 256, dtype=torch.long), causal=False)
    assert type(mask).__name__ == "BlockMask"
    # the block mask stores per-(128-token) block indices, not a 256 x 256 table
    assert mask.kv_num_blocks.numel() == 2
