"""ONNX: ``export_onnx`` traces an export bidirectionally; onnxruntime embeds within 1e-4 of sentence-transformers'
torch backend (and far from the causal model), for Qwen3 and for Gemma3 inputs shorter and longer than its sliding
window, padded or not. Skipped without ``pip install 'bidirlm-pl[serving]'``."""

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime")

from sentence_transformers import SentenceTransformer
from test_serving import encoder_export

from bidirlm_pl.core.serving import export_onnx

BATCHES = [
    ["The bank by the river was flooded after the storm last night.", "A short one."],  # padded; longer than 8
    ["Two words"],  # shorter than the tiny Gemma3's sliding window, no padding
]


def onnx_embeddings(session, tokenizer, texts):
    """Mean pooling and normalisation of the ONNX graph's hidden states (the export's Sentence-Transformers modules)."""
    batch = tokenizer(texts, padding=True, return_tensors="np")
    hidden = session.run(None, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})[0]
    mask = batch["attention_mask"][..., None].astype(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)


@pytest.mark.parametrize("arch", ["qwen3", "gemma3"])
def test_onnx_export_embeds_as_the_torch_backend(tmp_path, arch):
    folder = encoder_export(arch, tmp_path / f"{arch}-encoder")
    path = export_onnx(folder)
    assert path == folder / "onnx" / "model.onnx"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    model = SentenceTransformer(str(folder), device="cpu")
    for texts in BATCHES:
        torch_backend = model.encode(texts)
        got = onnx_embeddings(session, model.tokenizer, texts)
        np.testing.assert_allclose(got, torch_backend, atol=1e-4)
    model[0].auto_model.config.is_causal = True
    causal = model.encode(BATCHES[0])
    assert np.abs(onnx_embeddings(session, model.tokenizer, BATCHES[0]) - causal).max() > 1e-2


def test_sentence_transformers_onnx_backend_loads_the_exported_file(tmp_path):
    """Needs an optimum-onnx that imports with transformers 5 (0.1.0 does not); then no re-export happens."""
    pytest.importorskip("optimum.onnxruntime", exc_type=ImportError)
    folder = encoder_export("qwen3", tmp_path / "qwen3-encoder")
    export_onnx(folder)
    expected = SentenceTransformer(str(folder), device="cpu").encode(BATCHES[0])
    with torch.no_grad():
        got = SentenceTransformer(str(folder), backend="onnx", device="cpu").encode(BATCHES[0])
    np.testing.assert_allclose(got, expected, atol=1e-4)
