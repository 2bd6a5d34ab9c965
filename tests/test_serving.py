"""Serving: the model card names the runtimes that run an export bidirectionally and warns about those that would
run it causally; ``prepare_for_serving`` adds the flags other runtimes read without changing what transformers
computes (Qwen3, Llama) or with EmbeddingGemma's halved window, only on request (Gemma3)."""

import json

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.core.model_card import write_model_card
from bidirlm_pl.core.serving import (
    BIDIRECTIONAL,
    CAUSAL,
    FAILS,
    RUNTIMES,
    prepare_for_serving,
    runtime_support,
    serving_section,
)

TEXTS = ["The bank by the river was flooded after the storm.", "A short one."]


def encoder_export(arch: str, target):
    """A tiny random decoder of ``arch`` exported as ours are: ``is_causal: false`` plus Sentence-Transformers files."""
    from bidirlm_pl.backbone.attention import set_bidirectional
    from bidirlm_pl.core import assets
    from bidirlm_pl.core.export import save_hf_folder
    from bidirlm_pl.models.encoder import write_encoder_files

    source = assets.tiny_model(arch)
    model, tokenizer = AutoModel.from_pretrained(source), AutoTokenizer.from_pretrained(source)
    set_bidirectional(model, True)
    save_hf_folder(model, tokenizer, target, extra=lambda d: write_encoder_files(d, hidden_size=model.config.hidden_size))
    return target


def card(folder) -> str:
    write_model_card(folder, name=folder.name, model="Qwen/Qwen3-0.6B", model_folder=None, stage="ContrastiveStage",
                     steps=1, data=[], encoder=True)
    return (folder / "README.md").read_text()


def section(text: str, title: str) -> str:
    """The bullet list that follows ``title`` in the card."""
    block = text.split(title, 1)[1].split("\n\n", 2)[1]
    return block


def config_folder(tmp_path, model_type, **flags):
    folder = tmp_path / model_type
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": model_type, **flags}))
    return folder


@pytest.mark.parametrize(("model_type", "bidirectional", "causal"), [
    ("qwen3", ["transformers >= 5.2", "sentence-transformers, torch backend", "onnx/model.onnx", "llama.cpp"],
     ["Text Embeddings Inference", "Infinity"]),
    ("llama", ["transformers >= 5.2", "sentence-transformers, torch backend", "onnx/model.onnx", "vLLM"],
     ["Text Embeddings Inference", "Infinity"]),
    ("gemma3_text", ["transformers >= 5.2", "sentence-transformers, torch backend", "onnx/model.onnx", "llama.cpp"],
     ["vLLM", "Infinity"]),
])
def test_the_card_of_an_export_names_its_runtimes_and_warns_about_causal_ones(tmp_path, model_type, bidirectional,
                                                                              causal):
    text = card(config_folder(tmp_path, model_type, is_causal=False))
    assert text.count("## Serving") == 1 and '`"is_causal": false`' in text
    runs = section(text, "Run it bidirectionally:")
    warned = section(text, "run it causally, returning wrong embeddings without an error:**")
    assert all(name in runs for name in bidirectional), runs
    assert all(name in warned for name in causal) and not any(name in runs for name in causal), warned
    assert "sentence-transformers `backend=\"onnx\"`" in section(text, "Fail to load it:")


def test_every_runtime_has_a_status_for_every_architecture():
    for model_type in ("qwen3", "llama", "gemma3_text", "mistral"):
        support = runtime_support({"model_type": model_type, "is_causal": False})
        assert list(support) == list(RUNTIMES) and all(status and why for status, why in support.values())
    # vLLM has its own Qwen3 for an MNTP export's Qwen3ForCausalLM, none for an encoder's Qwen3Model
    qwen3 = {"model_type": "qwen3", "is_causal": False}
    assert runtime_support({**qwen3, "architectures": ["Qwen3ForCausalLM"]})["vllm"][0] == BIDIRECTIONAL
    assert runtime_support({**qwen3, "architectures": ["Qwen3Model"]})["vllm"][0] != BIDIRECTIONAL


def test_a_causal_folder_has_no_serving_section(tmp_path):
    assert serving_section({"model_type": "qwen3"}) == []
    assert "## Serving" not in card(config_folder(tmp_path, "qwen3"))


def test_an_export_carries_the_tei_flag_which_changes_nothing_transformers_computes(tmp_path):
    folder = encoder_export("qwen3", tmp_path / "qwen3-encoder")
    config = json.loads((folder / "config.json").read_text())
    assert config["use_bidirectional_attention"] is True and config["is_causal"] is False
    assert runtime_support(config)["tei"][0] == BIDIRECTIONAL
    tokenizer = AutoTokenizer.from_pretrained(folder)
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        exported = AutoModel.from_pretrained(folder)(**batch).last_hidden_state
        del config["use_bidirectional_attention"]
        (folder / "config.json").write_text(json.dumps(config))
        assert runtime_support(config)["tei"][0] == CAUSAL
        assert torch.equal(AutoModel.from_pretrained(folder)(**batch).last_hidden_state, exported)

    card(folder)
    assert prepare_for_serving(folder)["use_bidirectional_attention"] is True
    text = (folder / "README.md").read_text()
    assert text.count("## Serving") == 1 and "Text Embeddings Inference" in section(text, "Run it bidirectionally:")


def test_embeddinggemma_attention_halves_the_window_and_is_served_by_vllm(tmp_path):
    """Tiny Gemma3: sliding window 8. EmbeddingGemma's flag sees |i-j| <= 4: equal up to 5 tokens, then not."""
    folder = encoder_export("gemma3", tmp_path / "gemma3-encoder")
    model = AutoModel.from_pretrained(folder).eval()
    window = model.config.sliding_window
    card(folder)

    config = prepare_for_serving(folder, gemma3_attention="embeddinggemma")

    assert config["use_bidirectional_attention"] is True and "is_causal" not in config
    assert config["sliding_window"] == window  # the file keeps the full window; transformers halves it on load
    served = AutoModel.from_pretrained(folder).eval()
    assert served.config.sliding_window == window // 2 + 1
    support = runtime_support(config)
    assert support["vllm"][0] == BIDIRECTIONAL and support["transformers"][0] == BIDIRECTIONAL
    assert "vLLM" in section((folder / "README.md").read_text(), "Run it bidirectionally:")
    ids = torch.randint(5, model.config.vocab_size, (1, window * 2), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for length, same in ((window // 2 + 1, True), (window // 2 + 2, False), (window * 2, False)):
            a = model(input_ids=ids[:, :length]).last_hidden_state
            b = served(input_ids=ids[:, :length]).last_hidden_state
            assert torch.allclose(a, b, atol=1e-6) == same, length


def test_prepare_for_serving_refuses_what_it_cannot_do(tmp_path):
    qwen3 = config_folder(tmp_path, "qwen3", is_causal=False)
    with pytest.raises(BidirLMError, match="needs a Gemma3 folder"):
        prepare_for_serving(qwen3, gemma3_attention="embeddinggemma")
    with pytest.raises(BidirLMError, match="is not one of"):
        prepare_for_serving(qwen3, gemma3_attention="half")
    with pytest.raises(BidirLMError, match="is causal"):
        prepare_for_serving(config_folder(tmp_path, "llama"))
    with pytest.raises(BidirLMError, match="has no config.json"):
        prepare_for_serving(tmp_path / "missing")
    gemma3 = config_folder(tmp_path, "gemma3_text", is_causal=False)
    assert prepare_for_serving(gemma3) == {"model_type": "gemma3_text", "is_causal": False}  # unchanged by default
    assert runtime_support({"model_type": "gemma3_text", "is_causal": False})["tei"][0] == FAILS
