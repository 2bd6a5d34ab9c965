"""Encoder: embed texts with an exported model; the Sentence-Transformers files of an export.

An exported folder is a plain Hugging Face folder (``config.json`` with ``is_causal: false``,
safetensors, tokenizer) plus the Sentence-Transformers modules (``modules.json``, ``1_Pooling``,
``2_Normalize``, ``sentence_bert_config.json``, ``config_sentence_transformers.json``) and our
``bidirlm_encoder.json``. ``SentenceTransformer(folder)`` and ``AutoModel.from_pretrained(folder)``
load it without remote code; :class:`Encoder` embeds identically, faster on mixed lengths.
:func:`read_encoder_config` is how every evaluation learns a folder's pooling, normalisation, prompts
and token limit; a plain folder (a base model, an MNTP export, a UBMoE folder) gets mean pooling,
no normalisation and no prompt.

>>> enc = Encoder.from_pretrained("runs/contrastive/hf")  # doctest: +SKIP
>>> enc.encode(["a first text", "another one"], batch_size=32).shape  # doctest: +SKIP
(2, 640)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import AutoModel, AutoTokenizer

from bidirlm_pl.backbone import attention
from bidirlm_pl.backbone.load import decoder_of, resolve_backend, resolve_dtype, resolve_model_path
from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.models.pooling import ST_MODES, Pooling

ENCODER_CONFIG = "bidirlm_encoder.json"
LATENT_WEIGHTS = "latent_pooling.safetensors"
PROGRESS_MIN_TEXTS = 256
DEFAULT_MAX_LENGTH = 512
# sentence-transformers (5+) always holds these two: encode_query / encode_document use them, "" when unset
ROLE_PROMPTS = {"query": "", "document": ""}


def write_encoder_files(folder: str | Path, *, hidden_size: int, pooling: str = "mean", normalize: bool = True,
                        max_length: int = DEFAULT_MAX_LENGTH, query_instruction: str | None = None,
                        latent_state: dict | None = None, latent_config: dict | None = None,
                        matryoshka_dims: list[int] | None = None) -> None:
    """Add the Sentence-Transformers modules and our encoder config to an HF folder (classic ST layout).

    Latent-attention pooling has no Sentence-Transformers equivalent: its weights go to
    ``latent_pooling.safetensors`` for :class:`Encoder`, and no ST modules are written.
    ``matryoshka_dims``: the embedding sizes the model was trained at (Matryoshka), recorded in our config
    only: ``config_sentence_transformers.json``'s ``truncate_dim`` would make sentence-transformers cut every
    embedding by default; users pick a size with ``SentenceTransformer(folder, truncate_dim=k)``.
    """
    folder = Path(folder)
    config = {"pooling": pooling, "normalize": normalize, "max_length": max_length,
              "query_instruction": query_instruction, "latent": latent_config,
              "matryoshka_dims": sorted(matryoshka_dims) if matryoshka_dims else None}
    (folder / ENCODER_CONFIG).write_text(json.dumps(config, indent=2))
    if pooling not in ST_MODES:
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


# sentence-transformers' Pooling mode (new ``pooling_mode`` or legacy ``pooling_mode_*`` flag) -> ours
_ST_POOLING = {**{st: ours for ours, st in ST_MODES.items()}, "mean_tokens": "mean", "weightedmean_tokens": "weighted_mean"}


def _st_pooling(pool: dict, where: Path) -> str:
    modes = pool.get("pooling_mode")
    if modes is None:
        modes = [k[len("pooling_mode_"):] for k, v in pool.items() if k.startswith("pooling_mode_") and v is True]
    modes = [modes] if isinstance(modes, str) else list(modes)
    if len(modes) != 1 or modes[0] not in _ST_POOLING:
        raise BidirLMError(f"'{where}': Sentence-Transformers pooling {modes} is not one of "
                           f"{sorted(set(_ST_POOLING) - {'mean_tokens', 'weightedmean_tokens'})}")
    return _ST_POOLING[modes[0]]


def read_encoder_config(folder: str | Path) -> dict:
    """How a folder embeds: ``pooling``, ``normalize``, ``max_length``, ``prompts``, ``default_prompt_name``,
    ``include_prompt``, ``latent`` (latent-attention sizes) and ``matryoshka_dims`` (the sizes it was trained at).

    Ours (``bidirlm_encoder.json``, its query instruction as the ``query`` prompt), a Sentence-Transformers
    folder from elsewhere (``modules.json``, ``1_Pooling``, ``sentence_bert_config.json``,
    ``config_sentence_transformers.json``), or a plain folder: mean pooling, no normalisation, no prompt
    and ``max_length`` None (no token limit of its own).

    >>> read_encoder_config("runs/contrastive/hf")["prompts"]  # doctest: +SKIP
    {'query': 'Represent the news article: ', 'document': ''}
    """
    folder = Path(folder)
    st_file = folder / "config_sentence_transformers.json"
    st = json.loads(st_file.read_text()) if st_file.exists() else {}
    prompts = {**ROLE_PROMPTS, **{k: v or "" for k, v in (st.get("prompts") or {}).items()}}
    config = {"pooling": "mean", "normalize": False, "max_length": None, "prompts": prompts,
              "default_prompt_name": st.get("default_prompt_name"), "include_prompt": False, "latent": None,
              "matryoshka_dims": None}
    if (folder / ENCODER_CONFIG).exists():
        ours = json.loads((folder / ENCODER_CONFIG).read_text())
        instruction = ours.pop("query_instruction", None)
        config.update(ours)
        if instruction:
            config["prompts"]["query"] = instruction
        return config
    modules_file = folder / "modules.json"
    if not modules_file.exists():
        return config
    modules = json.loads(modules_file.read_text())  # a Sentence-Transformers folder from elsewhere
    pooling = next((m for m in modules if m.get("type", "").endswith("Pooling")), None)
    if pooling is not None:
        pool = json.loads((folder / pooling["path"] / "config.json").read_text())
        config["pooling"] = _st_pooling(pool, folder)
        config["include_prompt"] = bool(pool.get("include_prompt", True))
    config["normalize"] = any(m.get("type", "").endswith("Normalize") for m in modules)
    bert = folder / "sentence_bert_config.json"
    if bert.exists():
        config["max_length"] = json.loads(bert.read_text()).get("max_seq_length")
    return config


class Encoder:
    """Embed texts with a bidirectional (or causal) decoder and a pooler.

    Texts are tokenized once, sorted by length and batched so that padding is minimal; with
    ``pack=True`` (or ``"auto"`` on varlen/flash backends, where no mask is materialised) each batch
    is one packed row of documents with a leak-free block-diagonal attention. Prompts follow
    sentence-transformers: ``encode(prompt=...)`` or ``encode(prompt_name=...)`` (a key of ``prompts``),
    else the ``default_prompt_name``'s prompt; ``encode_queries`` / ``encode_documents`` use the
    ``query`` / ``document`` prompt (``""`` unless set) as ``encode_query`` / ``encode_document`` do.

    Args:
        model: a transformers decoder (``...Model``) or causal LM (its decoder is used).
        tokenizer: its tokenizer.
        pooling: a :class:`~bidirlm_pl.models.pooling.Pooling` module or mode name.
        normalize: L2-normalise the embeddings.
        max_length: token limit per text (prompt included).
        query_instruction: the ``query`` prompt (shorthand for ``prompts={"query": ...}``).
        prompts: named prompts (``config_sentence_transformers.json``'s), over ``{"query": "", "document": ""}``.
        default_prompt_name: the prompt used when a call names none.
        include_prompt: pool the prompt's tokens too (sentence-transformers' ``include_prompt``; ours exclude them).
        bidirectional: the attention of every call; None: the model's own (``config.is_causal``).
    """

    def __init__(self, model, tokenizer, pooling: Pooling | str = "mean", normalize: bool = True,
                 max_length: int = DEFAULT_MAX_LENGTH, query_instruction: str | None = None, *,
                 prompts: dict[str, str] | None = None, default_prompt_name: str | None = None,
                 include_prompt: bool = False, bidirectional: bool | None = None):
        self.model = decoder_of(model)
        self.tokenizer = tokenizer
        self.pooler = Pooling(pooling) if isinstance(pooling, str) else pooling
        self.normalize = normalize
        self.max_length = max_length
        self.prompts = {**ROLE_PROMPTS, **(prompts or {})}
        if query_instruction is not None:
            self.prompts["query"] = query_instruction
        if default_prompt_name is not None and default_prompt_name not in self.prompts:
            raise BidirLMError(f"default prompt '{default_prompt_name}' is not one of the prompts {sorted(self.prompts)}")
        self.default_prompt_name = default_prompt_name
        self.include_prompt = include_prompt
        self.bidirectional = bidirectional
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token

    @classmethod
    def from_pretrained(cls, folder: str | Path, *, device: str = "cpu", dtype: str = "float32",
                        attn_implementation: str = "sdpa", **overrides) -> Encoder:
        """Load an exported folder (ours, or any ST/HF folder of a supported decoder). Never remote code."""
        folder = resolve_model_path(folder)
        model = AutoModel.from_pretrained(folder, dtype=resolve_dtype(dtype),
                                          attn_implementation=resolve_backend(attn_implementation))
        model.to(device).eval()
        return cls.for_model(model, AutoTokenizer.from_pretrained(folder), folder, **overrides)

    @classmethod
    def for_model(cls, model, tokenizer, folder: str | Path, **overrides) -> Encoder:
        """The encoder ``folder`` was exported as, around a model already loaded from it (a causal LM, a UBMoE model).

        ``overrides``: any key of :func:`read_encoder_config`, ``query_instruction`` or ``bidirectional``.
        """
        config = read_encoder_config(folder)
        unknown = set(overrides) - set(config) - {"query_instruction", "bidirectional"}
        if unknown:
            raise BidirLMError(f"unknown encoder settings {sorted(unknown)}; expected some of {sorted(config)}, "
                               "query_instruction, bidirectional")
        config.update(overrides)
        hidden = model.config.get_text_config().hidden_size
        latent = config["latent"] or {}
        pooler = Pooling(config["pooling"], hidden_size=hidden, num_latents=latent.get("num_latents", 512),
                         num_heads=latent.get("num_heads", 8))
        if pooler.latent is not None:
            pooler.latent.load_state_dict(load_file(str(Path(folder) / LATENT_WEIGHTS)))
        weight = next(model.parameters())
        pooler.to(device=weight.device, dtype=weight.dtype)
        return cls(model, tokenizer, pooler, normalize=config["normalize"],
                   max_length=config["max_length"] or DEFAULT_MAX_LENGTH,
                   query_instruction=config.get("query_instruction"), prompts=config["prompts"],
                   default_prompt_name=config["default_prompt_name"], include_prompt=config["include_prompt"],
                   bidirectional=config.get("bidirectional"))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def query_instruction(self) -> str | None:
        return self.prompts.get("query") or None

    def resolve_prompt(self, prompt: str | None = None, prompt_name: str | None = None) -> str | None:
        """The text prepended to every input: ``prompt``, else ``prompts[prompt_name]``, else the default prompt."""
        if prompt is not None:
            return prompt
        if prompt_name is not None:
            if prompt_name not in self.prompts:
                raise BidirLMError(f"prompt name '{prompt_name}' is not one of the prompts {sorted(self.prompts)}")
            return self.prompts[prompt_name]
        return self.prompts.get(self.default_prompt_name) if self.default_prompt_name else None

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
        pad = self.tokenizer.pad_token_id
        device = self.device
        bidirectional = (not getattr(self.model.config, "is_causal", True) if self.bidirectional is None
                         else self.bidirectional)
        if pack:
            flat = [t for seq in ids for t in seq]
            seq_ids = torch.tensor([[k for k, seq in enumerate(ids) for _ in seq]], device=device)
            positions = torch.tensor([[p for seq in ids for p in range(len(seq))]], device=device)
            pool = torch.tensor([[int(p >= min(prefixes[k], len(seq) - 1)) for k, seq in enumerate(ids)
                                  for p in range(len(seq))]], device=device)
            kwargs = attention.model_inputs(self.model.config, seq_ids_BT=seq_ids, bidirectional=bidirectional,
                                            dtype=self.model.dtype)
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
        per_call = {} if self.bidirectional is None else {"is_causal": not self.bidirectional}
        hidden = self.model(input_ids=input_ids.to(device), attention_mask=mask.to(device), **per_call).last_hidden_state
        return self.pooler(hidden, pool.to(device))

    def encode(self, texts: Sequence[str] | str, batch_size: int = 32, *, prompt: str | None = None,
               prompt_name: str | None = None, max_length: int | None = None, normalize: bool | None = None,
               pack: bool | str = "auto", show_progress_bar: bool | None = None,
               convert_to_numpy: bool = True) -> np.ndarray | torch.Tensor:
        """Embeddings (N, D) of ``texts``, in input order; the prompt is prepended and excluded from pooling.

        ``max_length`` overrides the encoder's token limit for this call.

        >>> Encoder.from_pretrained("tiny-qwen3").encode(["hello"]).shape  # doctest: +SKIP
        (1, 64)
        """
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
        prompt = self.resolve_prompt(prompt, prompt_name)
        dim = self.model.config.get_text_config().hidden_size
        if not texts:
            empty = torch.zeros(0, dim)
            return empty.numpy() if convert_to_numpy else empty
        full = [(prompt or "") + t for t in texts]
        ids = self.tokenizer(full, truncation=True, max_length=max_length or self.max_length,
                             add_special_tokens=True)["input_ids"]
        ids = [seq if seq else [self.tokenizer.pad_token_id] for seq in ids]
        prefix = 0 if self.include_prompt else prompt_length(self.tokenizer, prompt)
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
        """``encode`` with the query prompt (the exported query instruction), as ``encode_query`` does."""
        return self.encode(texts, prompt_name="query", **kwargs)

    def encode_documents(self, texts: Sequence[str], **kwargs) -> np.ndarray:
        """``encode`` with the document prompt (none in our exports), as ``encode_document`` does."""
        return self.encode(texts, prompt_name="document", **kwargs)
