"""bidirlm-pl: turn causal decoder LLMs into bidirectional encoders with PyTorch Lightning."""

from bidirlm_pl.attention import set_bidirectional
from bidirlm_pl.backbone import LoraSpec, load_backbone
from bidirlm_pl.encoder import Encoder
from bidirlm_pl.errors import BidirLMError

__all__ = ["BidirLMError", "Encoder", "LoraSpec", "load_backbone", "set_bidirectional"]
__version__ = "0.1.0"
