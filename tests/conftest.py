import os
import re

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

ARCHS = ("qwen3", "gemma3", "llama")


@pytest.fixture(scope="session", params=ARCHS)
def tiny_path(request):
    """A tiny random causal LM of each real architecture, with a BPE tokenizer trained on Lee."""
    from bidirlm_pl.core import assets

    return assets.tiny_model(request.param)


@pytest.fixture(scope="session")
def tiny_qwen3():
    from bidirlm_pl.core import assets

    return assets.tiny_model("qwen3")


@pytest.fixture(scope="session")
def gemma3_270m():
    """The real Gemma3-270M, converted once from its PyPI parts and cached."""
    from bidirlm_pl.core import assets

    return assets.gemma3_270m()


# Every one-line error the suite triggers stays short: it names the bad value and what was expected in about
# 200 characters (details belong behind --help or in the docs). Errors raised in this process are recorded,
# absolute paths counted as 5 characters (a user's own path is as long as it is); the session fails if any
# is longer.
ERROR_LIMIT = 200
_long_errors: dict[str, int] = {}


@pytest.fixture(autouse=True, scope="session")
def _record_error_lengths():
    from bidirlm_pl.core.errors import BidirLMError

    original = BidirLMError.__init__

    def recording(self, *args, **kwargs):
        original(self, *args, **kwargs)
        text = str(self)
        length = len(re.sub(r"/[^\s'\"]+", "/PATH", text))
        if length > ERROR_LIMIT:
            _long_errors[text] = length

    BidirLMError.__init__ = recording
    yield
    BidirLMError.__init__ = original


def pytest_sessionfinish(session, exitstatus):
    if _long_errors:
        lines = "\n".join(f"  {n} chars: {text}" for text, n in sorted(_long_errors.items(), key=lambda x: -x[1]))
        print(f"\nerror messages over {ERROR_LIMIT} characters:\n{lines}")
        session.exitstatus = 1
