"""Serving an exported folder: which runtimes run it bidirectionally, and the config flags that make more of them do.

An export says "bidirectional" with ``"is_causal": false`` in ``config.json`` (transformers >= 5.2). Not every
runtime reads that key: Text Embeddings Inference reads ``use_bidirectional_attention`` instead, and vLLM derives a
Gemma3 model's attention from ``use_bidirectional_attention`` alone. A runtime that ignores both runs the decoder
causally and returns wrong embeddings without an error. :func:`runtime_support` is the table of docs/serving.md for
one folder's ``config.json``; :func:`serving_section` is the model card's "Serving" section built from it.

:func:`prepare_for_serving` adds the flags: ``use_bidirectional_attention: true`` beside ``is_causal: false`` on
Qwen3 and Llama (transformers does not read it there: the model is unchanged; TEI does), and on request EmbeddingGemma's
semantics for Gemma3, which halve the sliding window (identical up to ``sliding_window // 2 + 1`` tokens; see
docs/serving.md). :func:`export_onnx` writes ``onnx/model.onnx``, which onnxruntime, OpenVINO and
sentence-transformers' ONNX backend run bidirectionally.

>>> prepare_for_serving("runs/contrastive/hf")  # doctest: +SKIP
>>> export_onnx("runs/contrastive/hf")  # doctest: +SKIP
PosixPath('runs/contrastive/hf/onnx/model.onnx')
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bidirlm_pl.core.checkpoint_io import replace_path
from bidirlm_pl.core.errors import BidirLMError

BIDIRECTIONAL, CAUSAL, FAILS, UNKNOWN = "bidirectional", "causal", "fails to load", "not established"
# runtime key -> its name in the card and in docs/serving.md
RUNTIMES = {
    "transformers": "transformers >= 5.2 (`AutoModel`)",
    "st": "sentence-transformers, torch backend",
    "st_onnx": "sentence-transformers `backend=\"onnx\"`",
    "st_openvino": "sentence-transformers `backend=\"openvino\"`",
    "onnx_file": "`onnx/model.onnx` from `export_onnx` (onnxruntime, OpenVINO)",
    "tei": "Text Embeddings Inference",
    "vllm": "vLLM",
    "llama_cpp": "llama.cpp (`convert_hf_to_gguf.py`, `llama-embedding`)",
    "infinity": "Infinity",
}
ARCHITECTURES = {"qwen3": "qwen3", "llama": "llama", "gemma3_text": "gemma3"}  # config.json model_type -> ours


def _flags(config: dict) -> tuple[str | None, bool, bool]:
    """(architecture, bidirectional by ``is_causal``, ``use_bidirectional_attention``) of a ``config.json``."""
    return (ARCHITECTURES.get(config.get("model_type")), config.get("is_causal", True) is False,
            bool(config.get("use_bidirectional_attention", False)))


def runtime_support(config: dict) -> dict[str, tuple[str, str]]:
    """For each runtime of :data:`RUNTIMES`: (status, why) for a folder with this ``config.json``.

    Status is :data:`BIDIRECTIONAL`, :data:`CAUSAL` (runs, silently wrong), :data:`FAILS` or :data:`UNKNOWN`;
    docs/serving.md cites the code each entry was read from, and which entries were measured.
    """
    arch, is_causal_false, ubi = _flags(config)
    bidirectional = is_causal_false or (arch == "gemma3" and ubi)
    mode = BIDIRECTIONAL if bidirectional else CAUSAL
    window = ""
    if arch == "gemma3" and bidirectional:
        window = ("; EmbeddingGemma's window, |i-j| <= sliding_window/2" if ubi and not is_causal_false else
                  "; window |i-j| <= sliding_window/2 + 1 (set one flag only)" if ubi else
                  "; window |i-j| <= sliding_window")
    table = {
        "transformers": (mode, "reads `is_causal`" + (" and `use_bidirectional_attention`" if arch == "gemma3" else "")
                         + window),
        "st": (mode, "loads the folder with transformers' `AutoModel`" + window),
        "st_onnx": (FAILS, ("optimum-onnx 0.1.0 pins transformers < 4.58, which ignores `is_causal`, and does not "
                           "import with transformers 5.x")),
        "st_openvino": (FAILS, "optimum-intel 2.2.0 pins transformers < 5.6 and does not import with 5.25"),
        "onnx_file": (mode, "the graph is traced from transformers with this config (measured)" + window),
        "infinity": ((UNKNOWN, "pins transformers <= 5.0; EmbeddingGemma's flag exists there, not run") if ubi and
                     arch == "gemma3" else (CAUSAL, "pins transformers <= 5.0, which ignores `is_causal`")),
    }
    architecture = (config.get("architectures") or [""])[0]
    not_checked = (UNKNOWN, f"architecture `{architecture}` not checked")
    if arch == "qwen3":
        table["tei"] = ((BIDIRECTIONAL, "reads `use_bidirectional_attention`") if ubi else
                        (CAUSAL, "reads `use_bidirectional_attention` only, which `prepare_for_serving` adds"))
        table["vllm"] = ((mode, "its `Qwen3ForCausalLM` reads `is_causal`") if architecture == "Qwen3ForCausalLM" else
                         (UNKNOWN, ("`Qwen3Model` is not in vLLM's registry; its Transformers backend takes the "
                                   "attention type from the layers, which are causal")))
        table["llama_cpp"] = (mode, "the converter writes `causal_attention` from `is_causal`")
    elif arch == "llama":
        table["tei"] = ((BIDIRECTIONAL, "CUDA only; reads `use_bidirectional_attention`") if ubi else
                        (CAUSAL, "CUDA only; reads `use_bidirectional_attention` only, which `prepare_for_serving` adds"))
        table["vllm"] = (mode, f"`{architecture or 'LlamaModel'}` reads `is_causal`")
        table["llama_cpp"] = ((mode, "the converter writes `causal_attention` from `is_causal`")
                              if architecture == "LlamaForCausalLM" else
                              (UNKNOWN, "the converter reads `is_causal`; its accepting `LlamaModel` was not established"))
    elif arch == "gemma3" and architecture in ("Gemma3TextModel", ""):
        table["tei"] = (FAILS, "its Gemma3 config needs `rope_local_base_freq`, which transformers 5 does not write")
        table["vllm"] = ((BIDIRECTIONAL, "reads `use_bidirectional_attention`; EmbeddingGemma's window") if ubi else
                         (CAUSAL, ("sets `is_causal = not use_bidirectional_attention` for `Gemma3TextModel`; "
                                  "`prepare_for_serving(..., gemma3_attention=\"embeddinggemma\")` sets the flag")))
        table["llama_cpp"] = (BIDIRECTIONAL, "converts `Gemma3TextModel` to gemma-embedding: always bidirectional, "
                                             "window |i-j| <= sliding_window/2"
                              + ("" if ubi and not is_causal_false else ", narrower than this folder's"))
    elif arch == "gemma3":
        table["tei"] = (FAILS, "its Gemma3 config needs `rope_local_base_freq`, which transformers 5 does not write")
        table["vllm"] = table["llama_cpp"] = not_checked
    else:
        for key in ("tei", "vllm", "llama_cpp"):
            table[key] = (UNKNOWN, "not checked for this architecture")
    return {key: table[key] for key in RUNTIMES}


def serving_section(config: dict) -> list[str]:
    """The model card's "Serving" section (Markdown lines) for a folder with this ``config.json``."""
    arch, is_causal_false, ubi = _flags(config)
    if not (is_causal_false or ubi):
        return []
    support = runtime_support(config)
    groups = {status: [f"{RUNTIMES[key]}: {why}" for key, (s, why) in support.items() if s == status]
              for status in (BIDIRECTIONAL, CAUSAL, FAILS, UNKNOWN)}
    flags = " and ".join(f"`\"{key}\": {json.dumps(value)}`" for key, value, on in (
        ("is_causal", False, is_causal_false), ("use_bidirectional_attention", True, ubi)) if on)
    lines = ["", "## Serving", "", (f"This {arch or config.get('model_type', 'model')} folder is bidirectional "
             f"through {flags} in `config.json` (bidirlm-pl's docs/serving.md has the sources).")]
    labels = {BIDIRECTIONAL: "Run it bidirectionally", FAILS: "Fail to load it", UNKNOWN: "Not established"}
    if groups[BIDIRECTIONAL]:
        lines += ["", f"{labels[BIDIRECTIONAL]}:", "", *(f"- {item}" for item in groups[BIDIRECTIONAL])]
    if groups[CAUSAL]:
        lines += ["", ("**Warning: these runtimes load it and run it causally, returning wrong embeddings without an "
                  "error:**"), "", *(f"- {item}" for item in groups[CAUSAL])]
    for status in (FAILS, UNKNOWN):
        if groups[status]:
            lines += ["", f"{labels[status]}:", "", *(f"- {item}" for item in groups[status])]
    if arch in ("qwen3", "llama") and not ubi:
        lines += ["", ("`bidirlm_pl.core.serving.prepare_for_serving(folder)` adds `\"use_bidirectional_attention\": "
                  "true` for Text Embeddings Inference (transformers does not read it for this architecture).")]
    if arch == "gemma3" and not ubi:
        lines += ["", ("`prepare_for_serving(folder, gemma3_attention=\"embeddinggemma\")` switches to EmbeddingGemma's "
                  "`use_bidirectional_attention` (served by vLLM, matched by llama.cpp); it halves the sliding window, "
                  "so inputs longer than `sliding_window // 2 + 1` tokens embed differently.")]
    return lines + [""]


def add_serving_flags(folder: str | Path) -> None:
    """What every export gets: ``use_bidirectional_attention: true`` beside ``is_causal: false`` for Qwen3 and Llama.

    Text Embeddings Inference reads only that flag; transformers ignores it for these architectures, so the model
    is unchanged. Gemma3 is left alone: there the flag changes the sliding window (:func:`prepare_for_serving`).
    """
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text())
    arch, is_causal_false, ubi = _flags(config)
    if arch in ("qwen3", "llama") and is_causal_false and not ubi:
        config["use_bidirectional_attention"] = True
        _write_text(path, json.dumps(config, indent=2, sort_keys=True) + "\n")


def prepare_for_serving(folder: str | Path, *, gemma3_attention: str = "is_causal") -> dict:
    """Add the config flags that more runtimes read, in place; the model card's "Serving" section follows.

    Qwen3 and Llama with ``is_causal: false`` get ``use_bidirectional_attention: true`` (read by Text Embeddings
    Inference; transformers ignores it there, so the model is unchanged). A Gemma3 folder keeps its semantics unless
    ``gemma3_attention="embeddinggemma"``: then ``use_bidirectional_attention: true`` replaces ``is_causal: false``
    (what vLLM reads), which halves the sliding window. Returns the new ``config.json``.
    """
    if gemma3_attention not in ("is_causal", "embeddinggemma"):
        raise BidirLMError(f"gemma3_attention '{gemma3_attention}' is not one of ['is_causal', 'embeddinggemma']")
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise BidirLMError(f"'{folder}' has no config.json; expected an exported model folder")
    config = json.loads(path.read_text())
    arch, is_causal_false, ubi = _flags(config)
    if gemma3_attention == "embeddinggemma" and arch != "gemma3":
        raise BidirLMError(f"gemma3_attention='embeddinggemma' needs a Gemma3 folder; '{folder}' is "
                           f"{config.get('model_type')}")
    if not (is_causal_false or ubi):
        raise BidirLMError(f"'{folder}' is causal (no \"is_causal\": false in config.json); expected a bidirectional export")
    before = dict(config)
    if arch in ("qwen3", "llama"):
        config["use_bidirectional_attention"] = True
    elif arch == "gemma3" and gemma3_attention == "embeddinggemma":
        config["use_bidirectional_attention"] = True
        config.pop("is_causal", None)  # both flags would give a window one token wider than EmbeddingGemma's
    if config != before:
        _write_text(path, json.dumps(config, indent=2, sort_keys=True) + "\n")
    _replace_card_section(Path(folder) / "README.md", serving_section(config))
    return config


def export_onnx(folder: str | Path, *, opset: int = 18) -> Path:
    """Trace the folder's transformers model (fp32, its own attention flags) to ``folder/onnx/model.onnx``.

    Inputs ``input_ids`` and ``attention_mask`` (dynamic batch and length), output ``last_hidden_state``: the layout
    sentence-transformers' ONNX backend and ``optimum``'s ``ORTModelForFeatureExtraction`` load without exporting.
    The trace uses a padded batch longer than the sliding window, so padding and the window stay in the graph.
    """
    from transformers import AutoConfig, AutoModel

    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()
    window = getattr(config, "sliding_window", None) or 0
    length = max(16, window + 2)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, config.vocab_size, (2, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, length // 2:] = 0

    class LastHiddenState(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state

    target = folder / "onnx" / "model.onnx"
    target.parent.mkdir(exist_ok=True)
    dynamic = {name: {0: "batch", 1: "sequence"} for name in ("input_ids", "attention_mask", "last_hidden_state")}
    with torch.no_grad():
        torch.onnx.export(LastHiddenState(model), (input_ids, attention_mask), str(target), dynamo=False,
                          input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"],
                          dynamic_axes=dynamic, opset_version=opset)
    return target


def _write_text(path: Path, text: str) -> None:
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(text)
    replace_path(staging, path)


def _replace_card_section(card: Path, section: list[str]) -> None:
    """Put ``section`` in place of the card's "## Serving" section (or at its end); no card, nothing to do."""
    if not card.is_file():
        return
    lines = card.read_text().splitlines()
    if "## Serving" in lines:
        start = lines.index("## Serving")
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        while start > 0 and not lines[start - 1].strip():
            start -= 1
        lines = lines[:start] + lines[end:]
    _write_text(card, "\n".join(lines).rstrip("\n") + "\n" + "\n".join(section))
