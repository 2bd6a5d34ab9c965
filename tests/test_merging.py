"""The streaming merge engine against hand computations, tensor by tensor."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_merging_helpers import perturbed, state, write_copy

from bidirlm_pl.models.merging import MergeSpec, merge
from bidirlm_pl.models.merging.safetensors_io import Checkpoint


@pytest.fixture()
def trio(tiny_path, tmp_path):
    """A tiny model of each architecture and two perturbed copies."""
    return [tiny_path, perturbed(tiny_path, tmp_path / "b", seed=1), perturbed(tiny_path, tmp_path / "c", seed=2)]


def run(models, weights, out, **kwargs):
    return merge(MergeSpec(models=[str(m) for m in models], weights=weights, output=str(out), **kwargs))


def test_linear_equals_weighted_sum_by_hand(trio, tmp_path):
    report = run(trio, [1.0, 2.0, 3.0], tmp_path / "out")
    states = [state(m) for m in trio]
    merged = state(tmp_path / "out")
    assert set(merged) == set(states[0]) and report.merged_tensors == len(merged)
    for key, tensor in merged.items():
        expected = (1 * states[0][key] + 2 * states[1][key] + 3 * states[2][key]) / 6
        torch.testing.assert_close(tensor, expected, rtol=1e-6, atol=1e-7, msg=key)
    # config and tokenizer come from the first model; the spec is recorded
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == json.loads((trio[0] / "config.json").read_text())
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (trio[0] / "tokenizer.json").read_bytes()
    assert json.loads((tmp_path / "out" / "merge_config.json").read_text())["spec"]["weights"] == [1.0, 2.0, 3.0]


def test_merging_a_model_with_itself_returns_it(tiny_path, tmp_path):
    run([tiny_path, tiny_path], [1.0, 1.0], tmp_path / "same")
    original, merged = state(tiny_path), state(tmp_path / "same")
    assert all(torch.equal(original[k], merged[k]) for k in original)
    run([tiny_path, tiny_path, tiny_path], [0.2, 0.3, 0.5], tmp_path / "same3")
    for key, tensor in state(tmp_path / "same3").items():
        torch.testing.assert_close(tensor, original[key], rtol=1e-6, atol=1e-7)


def test_weights_one_zero_return_the_first_model(trio, tmp_path):
    run(trio[:2], [1.0, 0.0], tmp_path / "first")
    first, merged = state(trio[0]), state(tmp_path / "first")
    assert all(torch.equal(first[k], merged[k]) for k in first)


def _slerp_by_hand(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    a64, b64 = a.double().flatten(), b.double().flatten()
    norms = float(a64.norm() * b64.norm())
    cos = float(a64 @ b64) / norms if norms else 1.0  # a zero tensor (Gemma3's norm offsets): linear
    if abs(cos) > 0.9995:
        return ((1 - t) * a64 + t * b64).reshape(a.shape).float()
    theta = math.acos(cos)
    out = (math.sin((1 - t) * theta) * a64 + math.sin(t * theta) * b64) / math.sin(theta)
    return out.reshape(a.shape).float()


def test_slerp_endpoints_and_midpoint(trio, tmp_path):
    a, b = state(trio[0]), state(trio[1])
    run(trio[:2], [1.0, 0.0], tmp_path / "t0", method="slerp")
    run(trio[:2], [0.0, 1.0], tmp_path / "t1", method="slerp")
    t0, t1 = state(tmp_path / "t0"), state(tmp_path / "t1")
    for key in a:
        torch.testing.assert_close(t0[key], a[key], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(t1[key], b[key], rtol=1e-6, atol=1e-7)
    run(trio[:2], [0.7, 0.3], tmp_path / "mid", method="slerp", block_elements=1000)  # stats over many blocks
    mid = state(tmp_path / "mid")
    rotated = 0
    for key in a:
        expected = _slerp_by_hand(a[key], b[key], 0.3)
        torch.testing.assert_close(mid[key], expected, rtol=1e-5, atol=1e-6, msg=key)
        rotated += not torch.allclose(mid[key], 0.7 * a[key] + 0.3 * b[key], atol=1e-6)
    assert rotated > 0  # slerp differs from lerp on tensors that are not nearly parallel


def test_task_arithmetic_and_ties_by_hand(trio, tmp_path):
    base, b, c = (state(m) for m in trio)
    run(trio[1:], [0.5, -0.25], tmp_path / "ta", method="task_arithmetic", base=str(trio[0]))
    for key, tensor in state(tmp_path / "ta").items():
        expected = base[key] + 0.5 * (b[key] - base[key]) - 0.25 * (c[key] - base[key])
        torch.testing.assert_close(tensor, expected, rtol=1e-5, atol=1e-6)
    run(trio[1:], [1.0, 1.0], tmp_path / "ties", method="ties", base=str(trio[0]), density=0.5)
    for key, tensor in state(tmp_path / "ties").items():
        deltas = []
        for model in (b, c):
            delta = model[key] - base[key]
            k = math.ceil(0.5 * delta.numel())
            threshold = delta.abs().flatten().sort(descending=True).values[k - 1]
            deltas.append(torch.where(delta.abs() >= threshold, delta, torch.zeros(())))
        sign = torch.sign(deltas[0] + deltas[1])
        agree = [(torch.sign(d) == sign) & (d != 0) for d in deltas]
        total = sum(torch.where(m, d, 0.0) for m, d in zip(agree, deltas))
        count = sum(m.float() for m in agree).clamp_min(1e-12)
        torch.testing.assert_close(tensor, base[key] + total / count, rtol=1e-5, atol=1e-6, msg=key)


def test_sharded_inputs_and_sharded_output(tiny_qwen3, tmp_path):
    a = write_copy(tiny_qwen3, tmp_path / "a-sharded", state(tiny_qwen3), shards=3)
    b = perturbed(tiny_qwen3, tmp_path / "b", seed=3)
    report = run([a, b], [0.25, 0.75], tmp_path / "out", max_shard_size="40KB")
    assert report.shards > 1 and (tmp_path / "out" / "model.safetensors.index.json").exists()
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == report.shards
    sa, sb, merged = state(tiny_qwen3), state(b), state(tmp_path / "out")
    assert set(merged) == set(sa)
    for key, tensor in merged.items():
        torch.testing.assert_close(tensor, 0.25 * sa[key] + 0.75 * sb[key], rtol=1e-6, atol=1e-7)
    # transformers loads the streamed shards as a normal checkpoint
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    for key, tensor in model.state_dict().items():
        if key in merged:
            assert torch.equal(tensor, merged[key]), key


def test_tied_embeddings(tiny_qwen3, tiny_path, tmp_path):
    # a tied model: no lm_head written, and the loaded output layer is the merged embedding
    b = perturbed(tiny_qwen3, tmp_path / "b", seed=4)
    run([tiny_qwen3, b], [0.5, 0.5], tmp_path / "tied")
    merged = state(tmp_path / "tied")
    assert "lm_head.weight" not in merged
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "tied")
    assert torch.equal(model.lm_head.weight, merged["model.embed_tokens.weight"])
    # an untied model (llama) merged with a tied sibling: its lm_head meets the sibling's embeddings
    from bidirlm_pl.core import assets

    llama = assets.tiny_model("llama")
    llama_state = state(llama)
    tied_state = {k: v + 0.1 for k, v in llama_state.items() if k != "lm_head.weight"}
    tied = write_copy(llama, tmp_path / "llama-tied", tied_state, config_update={"tie_word_embeddings": True})
    report = run([llama, tied], [0.5, 0.5], tmp_path / "mixed")
    mixed = state(tmp_path / "mixed")
    torch.testing.assert_close(mixed["lm_head.weight"],
                               0.5 * llama_state["lm_head.weight"] + 0.5 * tied_state["model.embed_tokens.weight"])
    assert report.aliased and "lm_head.weight" in report.aliased[0]


def test_bf16_inputs(tiny_qwen3, tmp_path):
    a = write_copy(tiny_qwen3, tmp_path / "a16", {k: v.bfloat16() for k, v in state(tiny_qwen3).items()})
    b = perturbed(a, tmp_path / "b16", seed=5)
    run([a, b], [0.5, 0.5], tmp_path / "out16")
    run([a, b], [0.5, 0.5], tmp_path / "out32", dtype="float32")
    sa, sb = state(a), state(b)
    out16, out32 = state(tmp_path / "out16"), state(tmp_path / "out32")
    for key in sa:
        exact = 0.5 * sa[key].float() + 0.5 * sb[key].float()  # accumulated in fp32
        assert out16[key].dtype == torch.bfloat16 and out32[key].dtype == torch.float32
        torch.testing.assert_close(out32[key], exact, rtol=0, atol=0)
        assert torch.equal(out16[key], exact.bfloat16())
    assert json.loads((tmp_path / "out32" / "config.json").read_text())["dtype"] == "float32"


def test_streaming_reads_row_blocks_only(trio, tmp_path, monkeypatch):
    """Linear merges never read more than ``block_elements`` values of a tensor at once."""
    largest = []
    original = Checkpoint.read

    def spy(self, key, rows=None):
        tensor = original(self, key, rows)
        largest.append(tensor.numel())
        return tensor

    monkeypatch.setattr(Checkpoint, "read", spy)
    run(trio, [1.0, 1.0, 1.0], tmp_path / "blocks", block_elements=700)
    embedding_rows = state(trio[0])["model.embed_tokens.weight"].shape[1]
    assert max(largest) <= max(700, embedding_rows) and len(largest) > 3 * 30
    merged, states = state(tmp_path / "blocks"), [state(m) for m in trio]
    for key, tensor in merged.items():
        torch.testing.assert_close(tensor, sum(s[key] for s in states) / 3, rtol=1e-6, atol=1e-7)
