import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

ARCHS = ("qwen3", "gemma3", "llama")


@pytest.fixture(scope="session", params=ARCHS)
def tiny_path(request):
    """A tiny random causal LM of each real architecture, with a BPE tokenizer trained on Lee."""
    from bidirlm_pl import assets

    return assets.tiny_model(request.param)


@pytest.fixture(scope="session")
def tiny_qwen3():
    from bidirlm_pl import assets

    return assets.tiny_model("qwen3")


@pytest.fixture(scope="session")
def gemma3_270m():
    """The real Gemma3-270M, converted once from its PyPI parts and cached."""
    from bidirlm_pl import assets

    return assets.gemma3_270m()
