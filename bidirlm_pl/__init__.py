"""bidirlm-pl: turn causal decoder LLMs into bidirectional encoders with PyTorch Lightning."""

from bidirlm_pl.core.errors import BidirLMError

# Heavy names (torch, transformers) load on first use, so that light commands (`bidirlm merge`,
# `bidirlm similarity`, `bidirlm --help`) start in a fraction of the time.
_LAZY = {
    "set_bidirectional": "bidirlm_pl.backbone.attention",
    "LoraSpec": "bidirlm_pl.core.specs",
    "load_backbone": "bidirlm_pl.backbone.load",
    "Encoder": "bidirlm_pl.models.encoder",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'bidirlm_pl' has no attribute '{name}'")


__all__ = ["BidirLMError", "Encoder", "LoraSpec", "load_backbone", "set_bidirectional"]
__version__ = "0.1.0"
