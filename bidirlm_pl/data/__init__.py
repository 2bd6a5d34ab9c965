"""Data: text sources, weighted resumable mixture, packing, MNTP masking, the text DataModule.

Public API reused by other stages (contrastive SimCSE, UBMoE causal LM):

* :func:`bidirlm_pl.data.sources.load_texts` / :class:`SourceSpec` / :func:`open_source`
* :class:`bidirlm_pl.data.mixture.Mixture`
* :func:`bidirlm_pl.data.packing.pack_documents`, :func:`pack_batches`, :func:`collate_rows`

What every data module does one way: it names its sources in ``sources``, loads its tokenizer with
:func:`bidirlm_pl.data.tokenizer.load_tokenizer`, holds rows out with :mod:`bidirlm_pl.data.splits`
and shares validation over processes with :func:`bidirlm_pl.data.validation.rank_loader`.
"""

from bidirlm_pl.data.mixture import Mixture
from bidirlm_pl.data.packing import PackedRow, Packer, collate_rows, pack_batches, pack_documents
from bidirlm_pl.data.sources import SourceSpec, TextSource, load_texts, open_source

__all__ = [
    "Mixture",
    "PackedRow",
    "Packer",
    "SourceSpec",
    "TextSource",
    "collate_rows",
    "load_texts",
    "open_source",
    "pack_batches",
    "pack_documents",
]
