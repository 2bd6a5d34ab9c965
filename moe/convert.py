"""Turn a Qwen3, Gemma3 or Llama transformers model into its UBMoE form in place, save, reload, go back.

The conversion replaces each decoder layer's ``mlp`` by a :class:`UniBiFFN` whose expert 0 is the
original module and expert 1 a copy. Everything else (attention, norms, embeddings, ``generate()``)
is the unmodified transformers model. ``config.ubmoe`` records the MoE (a plain dict, written to
``config.json`` by ``save_pretrained``) so that :func:`load_ubmoe` rebuilds it with no guesswork and
no remote code::

    "ubmoe": {"version": 1, "layers": [0, 1], "routing": "soft",
              "mode_routing": {"generate": "soft", "embed": "forced1"},
              "top1_gradient": "straight_through", "router_init": "zeros", "router_std": 0.02,
              "prior_expert0": 0.5, "confidence": 0.9}

A UBMoE folder is *not* loadable by a plain ``AutoModelForCausalLM.from_pretrained`` (its FFN
weights live under ``mlp.experts.{0,1}``); use :func:`load_ubmoe`, or export a plain model with
:func:`to_plain` first.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from bidirlm_pl.backbone import attention
from bidirlm_pl.backbone.load import resolve_backend, resolve_dtype, resolve_model_path
from bidirlm_pl.core import assets
from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.core.export import save_hf_folder
from bidirlm_pl.core.hub import is_hub_id, resolve_model_folder
from bidirlm_pl.core.specs import SUPPORTED_MODEL_TYPES
from bidirlm_pl.moe.ffn import (
    NUM_EXPERTS,
    ROUTER_INITS,
    TOP1_GRADIENTS,
    UniBiFFN,
    check_confidence,
    check_routing,
)

FFN_LAYOUT = ("gate_proj", "up_proj", "down_proj")  # gated FFN of Qwen3 / Gemma3 / Llama
ATTENTION_MODES = ("generate", "embed")
FORMAT_VERSION = 1


@dataclass
class UBMoESpec:
    """How a model is turned into UBMoE; stored as ``config.ubmoe``.

    Args:
        routing: the routing mode active now (``soft``, ``top1``, ``forced0``, ``forced1``, ``confident``).
        mode_routing: routing used by :func:`bidirlm_pl.moe.set_mode` for ``generate`` (causal
            attention) and ``embed`` (bidirectional attention).
        top1_gradient: ``straight_through`` or ``switch``.
        router_init, router_std, prior_expert0: router initialisation (see ``UniBiFFN``).
        layers: decoder layer indices to convert (None = all).
        confidence: the threshold of ``confident`` routing (expert 1's probability above which a token takes the
            soft mixture; 0 = soft, 1 = forced0). Folders written before it existed read 0.9.
    """

    routing: str = "soft"
    mode_routing: dict[str, str] = field(default_factory=lambda: {"generate": "soft", "embed": "forced1"})
    top1_gradient: str = "straight_through"
    router_init: str = "zeros"
    router_std: float = 0.02
    prior_expert0: float = 0.5
    layers: list[int] | None = None
    confidence: float = 0.9

    def validate(self) -> UBMoESpec:
        check_routing(self.routing)
        self.confidence = check_confidence(self.confidence)
        unknown = set(self.mode_routing) - set(ATTENTION_MODES)
        if unknown:
            raise BidirLMError(f"mode_routing keys {sorted(unknown)} are not among {list(ATTENTION_MODES)}")
        for mode in ATTENTION_MODES:
            check_routing(self.mode_routing.setdefault(mode, "soft" if mode == "generate" else "forced1"))
        if self.top1_gradient not in TOP1_GRADIENTS:
            raise BidirLMError(f"top1_gradient '{self.top1_gradient}' is not one of {list(TOP1_GRADIENTS)}")
        if self.router_init not in ROUTER_INITS:
            raise BidirLMError(f"router_init '{self.router_init}' is not one of {list(ROUTER_INITS)}")
        return self

    def to_dict(self) -> dict:
        return {"version": FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> UBMoESpec:
        data = dict(data)
        version = data.pop("version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise BidirLMError(f"ubmoe format version {version} is not supported; expected {FORMAT_VERSION}")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise BidirLMError(f"ubmoe config keys {sorted(unknown)} are unknown; expected some of {sorted(known)}")
        return cls(**data).validate()


# ------------------------------------------------------------------ structure

def _model_type(model: nn.Module) -> str:
    return getattr(getattr(model, "config", None), "model_type", type(model).__name__)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a supported causal LM or bare decoder (one-line error otherwise)."""
    model_type = _model_type(model)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise BidirLMError(
            f"architecture '{model_type}' has no known UBMoE conversion; expected one of {list(SUPPORTED_MODEL_TYPES)}"
        )
    base = model.get_base_model() if hasattr(model, "peft_config") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else base
    if hasattr(decoder, "language_model"):  # multimodal Gemma3: convert the text tower
        decoder = decoder.language_model
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise BidirLMError(f"model '{model_type}' has no decoder 'layers' list; cannot place UBMoE experts")
    return layers


def _check_ffn_layout(mlp: nn.Module, index: int, model_type: str) -> None:
    missing = [name for name in FFN_LAYOUT if not isinstance(getattr(mlp, name, None), nn.Linear)]
    if missing:
        raise BidirLMError(
            f"layer {index} FFN '{type(mlp).__name__}' of '{model_type}' has an unknown layout (missing "
            f"{missing}); expected a gated FFN with linear {list(FFN_LAYOUT)}"
        )


def is_ubmoe(model: nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "ubmoe", None) is not None


def ubmoe_ffns(model: nn.Module) -> list[UniBiFFN]:
    """The UniBiFFN modules of a converted model, in layer order."""
    return [m for m in model.modules() if isinstance(m, UniBiFFN)]


def ubmoe_record(model: str | Path) -> dict | None:
    """The ``ubmoe`` entry of a model folder's config.json (None for plain models and assets)."""

    if str(model) in assets.ASSETS:
        return None
    config = (resolve_model_folder(model) if is_hub_id(model) else Path(model).expanduser()) / "config.json"
    return json.loads(config.read_text()).get("ubmoe") if config.is_file() else None


def spec_of(model: nn.Module) -> UBMoESpec:
    if not is_ubmoe(model):
        raise BidirLMError("this model is not a UBMoE model; convert it with convert_to_ubmoe() first")
    return UBMoESpec.from_dict(model.config.ubmoe)


def _record(model: nn.Module, spec: UBMoESpec) -> None:
    model.config.ubmoe = spec.to_dict()


# ------------------------------------------------------------------ conversion

def convert_to_ubmoe(model: nn.Module, spec: UBMoESpec | None = None, **overrides) -> nn.Module:
    """Replace every (or the chosen) decoder layer's ``mlp`` by a ``UniBiFFN``, in place; return the model.

    >>> from transformers import AutoModelForCausalLM  # doctest: +SKIP
    >>> model = AutoModelForCausalLM.from_pretrained(path)  # doctest: +SKIP
    >>> convert_to_ubmoe(model, routing="forced0").generate(ids)  # same tokens as before  # doctest: +SKIP
    """
    spec = spec or UBMoESpec()
    for key, value in overrides.items():
        if not hasattr(spec, key):
            raise BidirLMError(f"UBMoE option '{key}' does not exist; expected one of {[f.name for f in fields(spec)]}")
        setattr(spec, key, value)
    spec.validate()
    if is_ubmoe(model):
        raise BidirLMError("this model is already UBMoE; convert a plain model")
    layers = decoder_layers(model)
    model_type = _model_type(model)
    indices = list(range(len(layers))) if spec.layers is None else list(spec.layers)
    bad = [i for i in indices if not 0 <= i < len(layers)]
    if bad or not indices:
        raise BidirLMError(f"UBMoE layers {indices} are not a non-empty subset of 0..{len(layers) - 1}")
    for i in indices:
        _check_ffn_layout(layers[i].mlp, i, model_type)
    for i in indices:
        mlp = layers[i].mlp
        layers[i].mlp = UniBiFFN(
            mlp, mlp.gate_proj.in_features, routing=spec.routing, top1_gradient=spec.top1_gradient,
            router_init=spec.router_init, router_std=spec.router_std, prior_expert0=spec.prior_expert0,
            confidence=spec.confidence,
        )
    spec.layers = indices
    _record(model, spec)
    return model


def set_routing(model: nn.Module, routing: str) -> nn.Module:
    """Switch every layer's routing mode at run time (and record it in ``config.ubmoe``)."""
    spec = spec_of(model)
    spec.routing = check_routing(routing)
    for ffn in ubmoe_ffns(model):
        ffn.routing = routing
        ffn.confidence = spec.confidence
    _record(model, spec)
    return model


def set_confidence(model: nn.Module, confidence: float) -> nn.Module:
    """Set the ``confident`` routing threshold of every layer (and record it in ``config.ubmoe``)."""
    spec = spec_of(model)
    spec.confidence = check_confidence(confidence)
    for ffn in ubmoe_ffns(model):
        ffn.confidence = spec.confidence
    _record(model, spec)
    return model


def clear_routing_records(model: nn.Module) -> None:
    for ffn in ubmoe_ffns(model):
        ffn.clear_routing_record()


def to_plain(model: nn.Module, expert: int) -> nn.Module:
    """Go back to a plain transformers model whose FFNs are expert ``expert``'s, in place; return it.

    ``to_plain(model, 0)`` is the original model; ``to_plain(model, 1)`` the bidirectionally fine-tuned
    FFN model (save it with ``save_pretrained``; any transformers loader reads it).
    """
    if expert not in range(NUM_EXPERTS):
        raise BidirLMError(f"expert {expert} does not exist; expected 0 (original FFN) or 1 (bidirectional FFN)")
    spec_of(model)
    for layer in decoder_layers(model):
        if isinstance(layer.mlp, UniBiFFN):
            layer.mlp = layer.mlp.experts[expert]
    del model.config.ubmoe
    return model


# ------------------------------------------------------------------ save / load

def save_ubmoe(model: nn.Module, tokenizer, target: str | Path, *, overwrite: bool = True) -> Path:
    """Write a UBMoE model (config with ``ubmoe``, safetensors, tokenizer) atomically to ``target``."""

    spec_of(model)
    return save_hf_folder(model, tokenizer, target, overwrite=overwrite)


def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise BidirLMError(f"folder '{folder}' has no safetensors weights (model.safetensors[.index.json])")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(str(folder / name)))
    return state


def load_ubmoe(
    folder: str | Path,
    *,
    dtype: str | torch.dtype = "float32",
    attn_implementation: str = "sdpa",
    bidirectional: bool | None = None,
):
    """Rebuild a UBMoE model saved by :func:`save_ubmoe` (or ``save_pretrained``); return ``(model, tokenizer)``.

    ``bidirectional=None`` keeps the attention mode recorded in the folder's config.

    >>> model, tok = load_ubmoe("runs/ubmoe/stage2/hf")  # doctest: +SKIP
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer


    path = resolve_model_path(folder)
    config = AutoConfig.from_pretrained(path)
    if getattr(config, "ubmoe", None) is None:
        raise BidirLMError(f"'{path}' is not a UBMoE folder (config.json has no 'ubmoe' entry)")
    spec = UBMoESpec.from_dict(config.ubmoe)
    del config.ubmoe
    torch_dtype = resolve_dtype(dtype)
    config._attn_implementation = resolve_backend(attn_implementation)
    causal_lm = any(a.endswith("ForCausalLM") for a in (config.architectures or ["ForCausalLM"]))
    auto = AutoModelForCausalLM if causal_lm else AutoModel
    model = auto.from_config(config, dtype=torch_dtype, attn_implementation=config._attn_implementation)
    convert_to_ubmoe(model, spec)
    state = _read_safetensors(path)
    result = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    missing = [k for k in result.missing_keys if k not in tied and not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or result.unexpected_keys:
        raise BidirLMError(
            f"UBMoE folder '{path}' does not match its recorded layout: missing {missing[:4]}, "
            f"unexpected {result.unexpected_keys[:4]}"
        )
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.to(torch_dtype).eval()
    if bidirectional is not None:
        attention.set_bidirectional(model, bidirectional)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
