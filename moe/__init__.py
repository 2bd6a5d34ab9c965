"""UBMoE (Uni-Bi Mixture of Experts): original causal FFN + bidirectional FFN copy + router per layer.

>>> from bidirlm_pl import moe  # doctest: +SKIP
>>> moe.convert_to_ubmoe(model, routing="forced0")  # doctest: +SKIP
>>> moe.save_ubmoe(model, tokenizer, "out/ubmoe"); model, tok = moe.load_ubmoe("out/ubmoe")  # doctest: +SKIP
"""

from bidirlm_pl.moe.convert import (
    UBMoESpec,
    clear_routing_records,
    convert_to_ubmoe,
    decoder_layers,
    is_ubmoe,
    load_ubmoe,
    save_ubmoe,
    set_confidence,
    set_routing,
    spec_of,
    to_plain,
    ubmoe_ffns,
)
from bidirlm_pl.moe.ffn import ROUTING_MODES, UniBiFFN, load_balancing_loss
from bidirlm_pl.moe.modes import current_mode, mode, set_mode, set_mode_routing

# The stages and data modules (Lightning, upper layers) load on first use: a lower layer importing
# bidirlm_pl.moe.convert (callbacks, evaluation) must not pull the stage layer in through this package.
_LAZY = {"UBMoEPairsData": "bidirlm_pl.moe.data", "UBMoETextData": "bidirlm_pl.moe.data",
         "UBMoEStage1": "bidirlm_pl.moe.stages", "UBMoEStage2": "bidirlm_pl.moe.stages",
         "apply_moe_trainable": "bidirlm_pl.moe.stages"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'bidirlm_pl.moe' has no attribute '{name}'")


__all__ = [
    "ROUTING_MODES",
    "UBMoEPairsData",
    "UBMoESpec",
    "UBMoEStage1",
    "UBMoEStage2",
    "UBMoETextData",
    "UniBiFFN",
    "apply_moe_trainable",
    "clear_routing_records",
    "convert_to_ubmoe",
    "current_mode",
    "decoder_layers",
    "is_ubmoe",
    "load_balancing_loss",
    "load_ubmoe",
    "mode",
    "save_ubmoe",
    "set_confidence",
    "set_mode",
    "set_mode_routing",
    "set_routing",
    "spec_of",
    "to_plain",
    "ubmoe_ffns",
]
