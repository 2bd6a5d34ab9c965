"""The tokenizer of every data module: the model reference the CLI links from ``backbone.model``, loaded once.

>>> tok = load_tokenizer("tiny-qwen3", owner="PairsDataModule")  # doctest: +SKIP
>>> tok.pad_token is not None  # doctest: +SKIP
True
"""

from __future__ import annotations

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from bidirlm_pl.backbone.load import resolve_model_path
from bidirlm_pl.core.errors import BidirLMError


def load_tokenizer(reference: str | None, *, owner: str) -> PreTrainedTokenizerBase:
    """The tokenizer of a model reference (hub id, folder or asset name), with ``pad_token`` = EOS when it has none.

    ``owner`` names the data module in the error raised when no reference was given. The folder it was
    read from is ``tokenizer.name_or_path`` (the model config beside it).
    """
    if reference is None:
        raise BidirLMError(f"{owner} needs 'tokenizer' (a model folder, asset or hub id; the CLI links it to the model)")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(reference))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
