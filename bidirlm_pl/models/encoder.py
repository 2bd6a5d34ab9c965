"""Encoder: embed texts with an exported model; the Sentence-Transformers files of an export; an MTEB wrapper.

An exported folder is a plain Hugging Face folder (``config.json`` with ``is_causal: false``,
safetensors, tokenizer) plus the Sentence-Transformers modules (``modules.json``, ``1_Pooling``,
``2_Normalize``, ``sentence_bert_config.json``, ``config_sentence_transformers.json``) and our
``bidirlm_encoder.json``. ``SentenceTransformer(folder)`` and ``AutoModel.from_pretrained(folder)``
load it without remote code; :class:`Encoder` embeds identically, faster on mixed lengths.

>>> enc = Encoder.from_pretrained("runs/contrastive/hf")  # doctest: +SKIP
>>> enc.encode(["a first text", "another one"], batch_size=32).shape  # doctest: +SKIP
(2, 640)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.models.pooling import ST_MODES, Pooling

ENCODER_CONFIG = "bidirlm_encoder.json"
LATENT_WEIGHTS = "latent_pooling.safetensors"
PROGRESS_MIN_TEXTS = 256


def write_encoder_files(folder: str | Path, *, hidden_size: int, pooling: str = "mean", normalize: bool = True,
                        max_length: int = 512, query_instruction: str | None = None,
                        latent_state: dict | None = None, latent_config: dict | None = None) -> None:
    """Add the Sentence-Transformers modules and our encoder config to an HF folder (classic ST layout).

    Latent-attention pooling has no Sentence-Transformers equivalent: its weights go to
    ``latent_pooling.safetensors`` for :class:`Encoder`, and no ST modules are written.
    """
    folder = Path(folder)
    config = {"pooling": pooling, "normalize": normalize, "max_length": max_length,
              "query_instruction": query_instruction, "latent": latent_config}
    (folder / ENCODER_CONFIG).write_text(json.dumps(config, indent=2))
    if pooling not in ST_MODES:
        from safetensors.torch import save_file

        assert latent_state is not None, "latent-attention pooling exports its weights"
        save_file({k: v.detach().cpu().contiguous() for k, v in latent_state.items()}, str(folder / LATENT_WEIGHTS))
        return
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (folder / "2_Normalize").mkdir(exist_ok=True)
    (folder / "modules.json").write_text(json.dumps(modules, indent=2))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    flags = {f"pooling_mode_{m}": False for m in
             ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens", "weightedmean_tokens", "lasttoken")}
    flags[{"mean": "pooling_mode_mean_tokens", "last": "pooling_mode_lasttoken",
           "weighted_mean": "pooling_mode_weightedmean_tokens"}[pooling]] = True
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": hidden_size, **flags, "include_prompt": False}, indent=2))
    (folder / "sentence_bert_config.json").write_text(json.dumps(
        {"max_seq_length": max_length, "do_lower_case": False}, indent=2))
    prompts = {"query": query_instruction or "", "document": ""}
    (folder / "config_sentence_transformers.json").write_text(json.dumps(
        {"prompts": prompts, "default_prompt_name": None, "similarity_fn_name": "cosine"}, indent=2))


def prompt_length(tokenizer, prompt: str | None) -> int:
    """Tokens of a prompt alone with special tokens (trailing EOS dropped), as sentence-transformers counts it."""
    if not prompt:
        return 0
    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if tokenizer.eos_token_id is not None and ids and ids[-1] == tokenizer.eos_token_id:
        ids = ids[:-1]
    return len(ids)


def _read_config(folder: Path) -> dict:
    if (folder / ENCODER_CONFIG).exists():
        return json.loads((folder / ENCODER_CONFIG).read_text())
    config = {"pooling": "mean", "normalize": False, "max_length": 512, "query_instruction": None}
    pool_file = folder / "1_Pooling" / "config.json"
    if pool_file.exists():  # a Sentence-Transformers folder from elsewhere
        pool = json.loads(pool_file.read_text())
        by_flag = {"pooling_mode_lasttoken": "last", "pooling_mode_weightedmean_tokens": "weighted_mean"}
        config["pooling"] = next((m for f, m in by_flag.items() if pool.get(f)), "mean")
        config["normalize"] = (folder / "2_Normalize").exists()
    return config


class Encoder:
    """Embed texts with a bidirectional (or causal) decoder and a pooler.

    Texts are tokenized once, sorted by length and batched so that padding is minimal; with
    ``pack=True`` (or ``"auto"`` on varlen/flash backends, where no mask is materialised) each batch
    is one packed row of documents with a leak-free block-diagonal attention.

    Args:
        model: a transformers decoder (``...Model``) or causal LM (its decoder is used).
        tokenizer: its tokenizer.
        pooling: a :class:`~bidirlm_pl.models.pooling.Pooling` module or mode name.
        normalize: L2-normalise the embeddings.
        max_length: token limit per text (prompt included).
        query_instruction: prompt used by ``encode_queries`` (excluded from pooling).
    """

    def __init__(self, model, tokenizer, pooling: Pooling | str = "mean", normalize: bool = True,
                 max_length: int = 512, query_instruction: str | None = None):
        from bidirlm_pl.backbone.load import decoder_of

        self.model = decoder_of(model)
        self.tokenizer = tokenizer
        self.pooler = Pooling(pooling) if isinstance(pooling, str) else pooling
        self.normalize = normalize
        self.max_length = max_length
        self.query_instruction = query_instruction
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token

    @classmethod
    def from_pretrained(cls, folder: str | Path, *, device: str = "cpu", dtype: str = "float32",
                        attn_implementation: str = "sdpa", **overrides) -> Encoder:
        """Load an exported folder (ours, or any ST/HF folder of a supported decoder). Never remote code."""
        from transformers import AutoModel, AutoTokenizer

        from bidirlm_pl.backbone.load import resolve_backend, resolve_dtype, resolve_model_path

        folder = resolve_model_path(folder)
        config = {**_read_config(folder), **overrides}
        model = AutoModel.from_pretrained(folder, dtype=resolve_dtype(dtype),
                                          attn_implementation=resolve_backend(attn_implementation))
        model.to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        hidden = model.config.get_text_config().hidden_size
        latent = config.get("latent") or {}
        pooler = Pooling(config["pooling"], hidden_size=hidden, num_latents=latent.get("num_latents", 512),
                         num_heads=latent.get("num_heads", 8))
        if pooler.latent is not None:
            from safetensors.torch import load_file

            pooler.latent.load_state_dict(load_file(str(folder / LATENT_WEIGHTS)))
        pooler.to(device=device, dtype=model.dtype)
        return cls(model, tokenizer, pooler, normalize=config["normalize"], max_length=config["max_length"],
                   query_instruction=config.get("query_instruction"))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _batches(self, lengths: list[int], batch_size: int, pack: bool) -> list[list[int]]:
        """Indices of texts per batch, longest first; packed batches hold up to ``batch_size * longest`` tokens."""
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        if not pack:
            return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        batches, current, budget = [], [], 0
        for i in order:
            if current and sum(lengths[j] for j in current) + lengths[i] > budget:
                batches.append(current)
                current = []
            if not current:
                budget = batch_size * lengths[i]
            current.append(i)
        if current:
            batches.append(current)
        return batches

    def _forward(self, ids: list[list[int]], prefixes: list[int], pack: bool) -> torch.Tensor:
        from bidirlm_pl.backbone import attention

        pad = self.tokenizer.pad_token_id
        device = self.device
        if pack:
            flat = [t for seq in ids for t in seq]
            seq_ids = torch.tensor([[k for k, seq in enumerate(ids) for _ in seq]], device=device)
            positions = torch.tensor([[p for seq in ids for p in range(len(seq))]], device=device)
            pool = torch.tensor([[int(p >= min(prefixes[k], len(seq) - 1)) for k, seq in enumerate(ids)
                                  for p in range(len(seq))]], device=device)
            kwargs = attention.model_inputs(self.model.config, seq_ids_BT=seq_ids, bidirectional=not getattr(
                self.model.config, "is_causal", True), dtype=self.model.dtype)
            hidden = self.model(input_ids=torch.tensor([flat], device=device), position_ids=positions,
                                **kwargs).last_hidden_state
            return self.pooler(hidden, pool, seq_ids)
        T = max(len(s) for s in ids)
        input_ids = torch.full((len(ids), T), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), T), dtype=torch.long)
        for k, seq in enumerate(ids):
            input_ids[k, :len(seq)] = torch.tensor(seq)
            mask[k, :len(seq)] = 1
        pool = mask.clone()
        for k, p in enumerate(prefixes):
            pool[k, :min(p, len(ids[k]) - 1)] = 0
        hidden = self.model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        return self.pooler(hidden, pool.to(device))

    def encode(self, texts: Sequence[str] | str, batch_size: int = 32, *, prompt: str | None = None,
               normalize: bool | None = None, pack: bool | str = "auto", show_progress_bar: bool | None = None,
               convert_to_numpy: bool = True) -> np.ndarray | torch.Tensor:
        """Embeddings (N, D) of ``texts``, in input order; ``prompt`` is prepended and excluded from pooling.

        >>> Encoder.from_pretrained("tiny-qwen3").encode(["hello"]).shape  # doctest: +SKIP
        (1, 64)
        """
        from tqdm.auto import tqdm

        from bidirlm_pl.backbone import attention

        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        if batch_size < 1:
            raise BidirLMError(f"batch_size {batch_size} must be >= 1")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise BidirLMError(f"text {i} is a {type(t).__name__}, expected a string")
        if pack == "auto":
            pack = attention.uses_varlen(self.model.config)
        normalize = self.normalize if normalize is None else normalize
        dim = self.model.config.get_text_config().hidden_size
        if not texts:
            empty = torch.zeros(0, dim)
            return empty.numpy() if convert_to_numpy else empty
        full = [(prompt or "") + t for t in texts]
        ids = self.tokenizer(full, truncation=True, max_length=self.max_length, add_special_tokens=True)["input_ids"]
        ids = [seq if seq else [self.tokenizer.pad_token_id] for seq in ids]
        prefix = prompt_length(self.tokenizer, prompt)
        batches = self._batches([len(s) for s in ids], batch_size, bool(pack))
        out = torch.empty(len(texts), dim, dtype=torch.float32)
        show = len(texts) >= PROGRESS_MIN_TEXTS if show_progress_bar is None else show_progress_bar
        was_training = self.model.training
        self.model.eval()
        self.pooler.eval()
        try:
            # FSDP2 keeps its all-gather buffers across calls: tensors made in inference mode would poison training
            sharded = any(hasattr(m, "set_requires_gradient_sync") for m in self.model.modules())
            with torch.no_grad() if sharded else torch.inference_mode():
                for batch in tqdm(batches, desc="encode", disable=not show, unit="batch"):
                    emb = self._forward([ids[i] for i in batch], [prefix] * len(batch), bool(pack)).float()
                    if normalize:
                        emb = torch.nn.functional.normalize(emb, dim=-1)
                    out[torch.tensor(batch)] = emb.cpu()
        finally:
            self.model.train(was_training)
            self.pooler.train(was_training)
        if single:
            out = out[0]
        return out.numpy() if convert_to_numpy else out

    def encode_queries(self, texts: Sequence[str], **kwargs) -> np.ndarray:
        """``encode`` with the exported query instruction as prompt."""
        return self.encode(texts, prompt=self.query_instruction, **kwargs)


# ---------------------------------------------------------------- MTEB

def mteb_model(encoder: Encoder, name: str = "bidirlm-pl/encoder", revision: str = "local"):
    """Wrap an :class:`Encoder` so that ``mteb.evaluate(model, tasks)`` runs it (queries get the instruction).

    >>> results = mteb.evaluate(mteb_model(Encoder.from_pretrained(folder)), tasks, cache=None)  # doctest: +SKIP
    """
    from mteb.models.abs_encoder import AbsEncoder
    from mteb.models.model_meta import ModelMeta, ScoringFunction
    from mteb.types import PromptType

    class MTEBEncoder(AbsEncoder):
        def __init__(self):
            self.model = encoder
            n_params = sum(p.numel() for p in encoder.model.parameters())
            self.mteb_model_meta = ModelMeta.create_empty(overwrites={
                "name": name, "revision": revision, "n_parameters": n_params,
                "similarity_fn_name": ScoringFunction.COSINE,
                "embed_dim": encoder.model.config.get_text_config().hidden_size,
                "max_tokens": encoder.max_length, "modalities": ["text"], "framework": ["PyTorch"],
            })

        def encode(self, inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs: Any):
            texts = [t for batch in inputs for t in batch["text"]]
            prompt = encoder.query_instruction if prompt_type == PromptType.query else None
            return encoder.encode(texts, batch_size=kwargs.get("batch_size", 32), prompt=prompt,
                                  show_progress_bar=False)

    return MTEBEncoder()
