"""Tiny random models of real architectures (tests, smoke runs) and random weights of real configs (benchmarks).

Every model shares one real BPE tokenizer trained on the Lee corpus, so they build offline and
deterministically.
"""

from __future__ import annotations

from pathlib import Path

from bidirlm_pl.core.assets.cache import cache_dir, file_lock
from bidirlm_pl.core.assets.corpora import lee_background
from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.core.export import save_hf_folder

TINY_ARCHITECTURES = ("qwen3", "gemma3", "llama")
SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>", "<mask>"]


def tiny_tokenizer(vocab_size: int = 512):
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
        ids = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
                   "eos_token_id": tokenizer.eos_token_id}
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256, **ids)
    if arch == "qwen3":
        return Qwen3Config(**common, tie_word_embeddings=True)
    if arch == "gemma3":
        return Gemma3TextConfig(**common, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                                query_pre_attn_scalar=16)
    if arch == "llama":
        return LlamaConfig(**common, tie_word_embeddings=False)
    raise BidirLMError(f"tiny architecture '{arch}' is not one of {list(TINY_ARCHITECTURES)}")


def tiny_model(arch: str, target: Path | None = None, seed: int = 0) -> Path:
    """Build (once) a tiny random causal LM of a real architecture, with the Lee BPE tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    target = Path(target) if target is not None else cache_dir() / f"tiny-{arch}"
    if (target / "model.safetensors").exists():
        return target
    with file_lock(cache_dir() / f".tiny-{arch}.lock"):
        if (target / "model.safetensors").exists():
            return target
        tokenizer = tiny_tokenizer()
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tokenizer), tokenizer))
        save_hf_folder(model, tokenizer, target, overwrite=True)
    return target


# random weights of real configs (benchmarks)

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
    raise BidirLMError(f"random config '{name}' is not one of {list(RANDOM_CONFIGS)}")


RANDOM_CONFIGS = ("qwen3-0.6b", "gemma3-270m")


def random_model(name: str, seed: int = 0) -> Path:
    """Build (once) random bf16 weights of a real config with the Lee BPE tokenizer (ids < 512): for speed only."""
    import torch
    from transformers import AutoModelForCausalLM

    target = cache_dir() / f"random-{name}"
    if (target / "config.json").exists():
        return target
    with file_lock(cache_dir() / f".random-{name}.lock"):
        if (target / "config.json").exists():
            return target
        config = real_config(name)
        tokenizer = tiny_tokenizer()
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        save_hf_folder(model, tokenizer, target, overwrite=True)
    return target
