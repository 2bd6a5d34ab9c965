"""Task heads on a (bidirectional) decoder: transformers' own classes where they exist, a small head of ours elsewhere.

One rule decides which, and what the exported folder loads with:

* ``sequence`` / ``pair`` / ``regression`` with ``pooling: last`` build transformers'
  ``AutoModelForSequenceClassification`` class of the architecture (it pools the last non-pad token); ``token``
  builds ``AutoModelForTokenClassification`` and ``qa`` ``AutoModelForQuestionAnswering`` where transformers has
  them (Qwen3, Llama). Such an export loads with that Auto class and ``pipeline()``, no remote code, and predicts
  what the stage validated.
* ``pooling: mean`` or ``first`` (the paper's mean pooling), and ``token`` / ``qa`` on architectures without a
  class (Gemma3), train :class:`TaskHeadModel`: the bare decoder plus one linear layer. The export is the bare
  decoder (``config.json`` of the base model: ``AutoModel`` loads it) and the head in ``task_head.safetensors``
  under ``bidirlm_head.*``, so no native class finds its own head there (``AutoModelForSequenceClassification``
  reports ``score.weight`` as newly initialised instead of silently predicting with the wrong pooling).
  :func:`load_task_model` loads either kind from ``bidirlm_task.json``.

>>> model = load_task_model("runs/finetune-tiny-sequence/hf")  # doctest: +SKIP
>>> model(**tokenizer(["a text"], return_tensors="pt")).logits  # doctest: +SKIP

Every export also writes ``bidirlm_task.json`` (task, pooling, labels, metric, loader).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file
from tokenizers import processors
from torch import nn
from transformers import AutoModel
from transformers.modeling_outputs import (
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)

from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.core.hub import resolve_model_folder
from bidirlm_pl.models.pooling import last_token_pool, mean_pool

TASKS = ("sequence", "pair", "regression", "token", "qa")
SEQUENCE_TASKS = ("sequence", "pair", "regression")
POOLINGS = ("last", "mean", "first")
TASK_FILE = "bidirlm_task.json"
HEAD_FILE = "task_head.safetensors"
HEAD_PREFIX = "bidirlm_head."
LOADER = "bidirlm_pl.models.heads.load_task_model"
PIPELINE_TAGS = {"sequence": "text-classification", "pair": "text-classification", "regression": "text-classification",
                 "token": "token-classification", "qa": "question-answering"}


def check_task(task: str, pooling: str = "last") -> None:
    if task not in TASKS:
        raise BidirLMError(f"task '{task}' is not one of {list(TASKS)}")
    if pooling not in POOLINGS:
        raise BidirLMError(f"pooling '{pooling}' is not one of {list(POOLINGS)}")


def auto_class(task: str):
    """transformers' Auto class of a task (sequence, pair and regression share the sequence classifier)."""
    name = {"token": "AutoModelForTokenClassification", "qa": "AutoModelForQuestionAnswering"}.get(
        task, "AutoModelForSequenceClassification")
    return getattr(transformers, name)


def native_class(config, task: str, pooling: str = "last"):
    """transformers' head class for this config and task, or None where we train :class:`TaskHeadModel` instead."""
    if task in SEQUENCE_TASKS and pooling != "last":
        return None  # transformers' sequence classifiers pool the last non-pad token only
    return auto_class(task)._model_mapping.get(type(config), None)


def head_dropout(config) -> float:
    """transformers' token-classification dropout: ``classifier_dropout``, else ``hidden_dropout``, else 0.1."""
    for name in ("classifier_dropout", "hidden_dropout"):
        value = getattr(config, name, None)
        if value is not None:
            return float(value)
    return 0.1


def _init_linear(linear: nn.Linear, config) -> nn.Linear:
    """transformers' initialisation of a head: normal(0, initializer_range) weights, zero bias."""
    std = getattr(config.get_text_config(), "initializer_range", 0.02)
    nn.init.normal_(linear.weight, std=std)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)
    return linear


def first_token_pool(hidden_BTD: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """State of the first token with ``mask_BT == 1`` of each row (left or right padding)."""
    first_B = mask_BT.long().argmax(dim=1)
    return hidden_BTD[torch.arange(hidden_BTD.shape[0], device=hidden_BTD.device), first_B]


class TaskHeadModel(nn.Module):
    """A bare decoder (``AutoModel``) and one linear head: pooled sequence scores, per-token labels or answer spans.

    Outputs are transformers' own output classes (``.logits``; ``.start_logits``/``.end_logits`` for ``qa``), so
    code written for the native heads runs on it unchanged.

    Args:
        model: the bare decoder (a transformers base model, optionally LoRA-wrapped).
        task: one of :data:`TASKS`.
        num_labels: classes (1 for regression; ignored for ``qa``, which scores start and end).
        pooling: ``mean``, ``first`` or ``last`` (sequence tasks only).
    """

    def __init__(self, model: nn.Module, task: str, num_labels: int, pooling: str = "mean"):
        super().__init__()
        check_task(task, pooling)
        self.model, self.task, self.pooling = model, task, pooling
        config = self.config.get_text_config()
        self.dropout = nn.Dropout(head_dropout(config)) if task == "token" else nn.Identity()
        # like transformers' heads: no bias on sequence scores, a bias on token and span scores
        self.head = _init_linear(nn.Linear(config.hidden_size, 2 if task == "qa" else num_labels,
                                           bias=task not in SEQUENCE_TASKS), self.config)

    @property
    def config(self):
        return self.model.config

    def gradient_checkpointing_enable(self, **kwargs):
        self.model.gradient_checkpointing_enable(**kwargs)

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def get_output_embeddings(self):
        return None  # a task head, not a vocabulary projection

    def get_decoder(self):
        decoder = self.model.get_base_model() if hasattr(self.model, "peft_config") else self.model
        return decoder.get_decoder() if hasattr(decoder, "get_decoder") else decoder

    def forward(self, input_ids=None, attention_mask=None, pool_mask=None, **kwargs):
        """``pool_mask`` (1 on tokens to pool) defaults to ``attention_mask``: pass it when the attention takes
        cumulative lengths instead of a mask (varlen backends)."""
        hidden_BTD = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        if self.task == "token":
            return TokenClassifierOutput(logits=self.head(self.dropout(hidden_BTD)))
        if self.task == "qa":
            start_BT, end_BT = self.head(hidden_BTD).unbind(dim=-1)
            return QuestionAnsweringModelOutput(start_logits=start_BT.contiguous(), end_logits=end_BT.contiguous())
        mask_BT = pool_mask if pool_mask is not None else attention_mask
        if mask_BT is None:
            mask_BT = torch.ones(hidden_BTD.shape[:2], dtype=torch.long, device=hidden_BTD.device)
        if self.pooling == "mean":
            pooled_BD = mean_pool(hidden_BTD, mask_BT)
        elif self.pooling == "first":
            pooled_BD = first_token_pool(hidden_BTD, mask_BT)
        else:
            pooled_BD = last_token_pool(hidden_BTD, mask_BT)
        return SequenceClassifierOutput(logits=self.head(pooled_BD))

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        return {HEAD_PREFIX + k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}


def set_labels(config, task: str, labels: list[str] | None) -> None:
    """``num_labels``, ``id2label``, ``label2id`` and ``problem_type`` on a config (what pipelines print and use)."""
    if task == "qa":
        return
    names = list(labels or (["score"] if task == "regression" else []))
    if task == "regression" and len(names) != 1:
        raise BidirLMError(f"a regression head has one output; got labels {names}")
    if len(names) < (1 if task == "regression" else 2):
        raise BidirLMError(f"task '{task}' needs at least 2 labels; got {names}")
    config.num_labels = len(names)
    config.id2label = dict(enumerate(names))
    config.label2id = {name: i for i, name in enumerate(names)}
    config.problem_type = "regression" if task == "regression" else "single_label_classification"


def build_task_model(base: nn.Module, task: str, *, labels: list[str] | None, pooling: str = "last",
                     pad_token_id: int | None = None, seed: int = 0) -> nn.Module:
    """Put the head of ``task`` on a loaded bare decoder (``AutoModel``); the head starts from a fixed ``seed``.

    Native classes (:func:`native_class`) are built around ``base`` (the decoder is not reloaded or copied); the
    config then carries the labels and problem type. Elsewhere a :class:`TaskHeadModel`, whose config keeps no
    labels (they go to ``bidirlm_task.json``), so a native class never mistakes the export for its own.
    """
    check_task(task, pooling)
    config = base.config
    if config.pad_token_id is None and pad_token_id is not None:
        config.pad_token_id = pad_token_id  # the sequence classifier finds the last non-pad token with it
    num_labels = 1 if task == "regression" else len(labels or [])
    cls = native_class(config, task, pooling)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # every run and every process starts from one head
        if cls is None:
            model = TaskHeadModel(base, task, num_labels, pooling)
        else:
            set_labels(config, task, labels)
            with torch.device("meta"):
                model = cls(config)
            setattr(model, model.base_model_prefix, base)
            device = next(base.parameters()).device
            for name, child in model.named_children():
                if name != model.base_model_prefix:
                    child.to_empty(device=device)
                    for module in child.modules():
                        if isinstance(module, nn.Linear):
                            _init_linear(module, config)
    dtype = next(base.parameters()).dtype
    for name, child in model.named_children():
        if name not in ("model", getattr(model, "base_model_prefix", "model")):
            child.to(dtype)
    return model


def is_native(model: nn.Module) -> bool:
    return not isinstance(model, TaskHeadModel)


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of the task head (everything outside the decoder): these always train."""
    inner = model.get_base_model() if hasattr(model, "peft_config") else model
    prefix = "model" if isinstance(inner, TaskHeadModel) else inner.base_model_prefix
    return [p for name, p in inner.named_parameters() if not name.startswith(prefix + ".")]


# ------------------------------------------------------------------ tokenizers

def prepare_tokenizer(tokenizer, task: str, max_length: int | None = None):
    """The tokenizer a task trains and exports with: a pad token, and a separator between the two texts of a pair.

    ``pair`` and ``qa`` encode ``tokenizer(text, text_pair)`` exactly as transformers' pipelines do; decoder
    tokenizers whose pair template puts nothing between the texts (Qwen3's, our tiny ones) get one: the EOS token
    (BOS where EOS is the pad token). ``regression`` gets it too when the tokenizer is fast (a regression source may
    read a text pair: Seahorse's article and summary; one text encodes as before). ``max_length`` becomes
    ``model_max_length`` so pipelines truncate as training did. Deterministic: the data module and the stage's
    export apply it to their own copies alike.
    """
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if task in ("pair", "qa") or (task == "regression" and getattr(tokenizer, "is_fast", False)):
        ensure_pair_separator(tokenizer)
    if max_length is not None:
        tokenizer.model_max_length = int(max_length)
    return tokenizer


def _specials(tokenizer, encoding) -> tuple[list[str], list[str]]:
    """Special tokens a single-text encoding adds before and after the text."""
    tokens = tokenizer.convert_ids_to_tokens(encoding["input_ids"])
    ids = encoding.sequence_ids()
    first = ids.index(0) if 0 in ids else len(ids)
    last = len(ids) - 1 - ids[::-1].index(0) if 0 in ids else len(ids) - 1
    return tokens[:first], tokens[last + 1:]


def _between_texts(tokenizer) -> list:
    """Sequence ids between the two texts of ``tokenizer("a", "b")`` ([] when it cannot encode pairs at all)."""
    try:
        ids = tokenizer("a", "b").sequence_ids()
    except Exception:  # noqa: BLE001 -- a template without a pair rule raises
        return []
    return ids[ids.index(0):ids.index(1)] if 0 in ids and 1 in ids else []


def ensure_pair_separator(tokenizer) -> bool:
    """Give a fast tokenizer a pair template with a special token between the texts; False when it had one."""
    if not getattr(tokenizer, "is_fast", False):
        raise BidirLMError("pair and qa tasks need a fast (tokenizers) tokenizer; this model's tokenizer is slow")
    if None in _between_texts(tokenizer):
        return False
    before, after = _specials(tokenizer, tokenizer("a"))
    separator = tokenizer.eos_token if tokenizer.eos_token not in (None, tokenizer.pad_token) else tokenizer.bos_token
    separator = separator or tokenizer.eos_token
    if separator is None:
        raise BidirLMError("pair and qa tasks need a separator token; this tokenizer has neither EOS nor BOS")
    middle = [] if after else [separator]
    single = [*before, "$A:0", *after]
    pair = [*before, "$A:0", *after, *(f"{t}:1" for t in middle), "$B:1", *(f"{t}:1" for t in after)]
    used = sorted(set(before + after + middle))
    template = processors.TemplateProcessing(
        single=" ".join(single), pair=" ".join(pair),
        special_tokens=[(t, tokenizer.convert_tokens_to_ids(t)) for t in used])
    backend = tokenizer.backend_tokenizer
    current = backend.post_processor
    if isinstance(current, processors.ByteLevel):  # keep its offset trimming
        backend.post_processor = processors.Sequence([current, template])
    else:
        backend.post_processor = template
    return True


# ------------------------------------------------------------------ extractive QA

def best_spans(start_BT: torch.Tensor, end_BT: torch.Tensor, context_BT: torch.Tensor,
               max_answer_tokens: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the context span ``start <= end < start + max_answer_tokens`` with the highest start + end score."""
    T = start_BT.shape[1]
    allowed_TT = torch.ones(T, T, dtype=torch.bool, device=start_BT.device).triu().tril(max_answer_tokens - 1)
    context_BT = context_BT.bool()
    scores_BTT = start_BT.float()[:, :, None] + end_BT.float()[:, None, :]
    allowed_BTT = allowed_TT[None] & context_BT[:, :, None] & context_BT[:, None, :]
    flat_B = scores_BTT.masked_fill(~allowed_BTT, float("-inf")).flatten(1).argmax(dim=1)
    return flat_B // T, flat_B % T


def span_text(context: str, offsets: list[tuple[int, int]], start: int, end: int) -> str:
    """The characters of ``context`` from token ``start`` to token ``end`` (offsets relative to the context)."""
    return context[offsets[start][0]:offsets[end][1]].strip()


def answer_question(model, tokenizer, question: str, context: str, *, max_answer_tokens: int = 30,
                    max_length: int | None = None) -> dict:
    """Extractive QA with a loaded ``qa`` model (transformers 5.3 removed the question-answering pipeline).

    The question goes first and the context second, as the stage trained; returns ``answer``, ``start``, ``end``
    (characters of ``context``) and ``score`` (start + end logit).

    >>> answer_question(AutoModelForQuestionAnswering.from_pretrained(d), AutoTokenizer.from_pretrained(d),
    ...                 "Who?", "Ann lives in Sydney.")  # doctest: +SKIP
    {'answer': 'Ann', 'start': 0, 'end': 3, 'score': 7.1}
    """
    encoding = tokenizer(question, context, truncation="only_second", return_offsets_mapping=True,
                         max_length=max_length or tokenizer.model_max_length, return_tensors="pt")
    context_BT = torch.tensor([[s == 1 for s in encoding.sequence_ids(0)]])
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model(input_ids=encoding["input_ids"].to(device), attention_mask=encoding["attention_mask"].to(device))
    start, end = best_spans(out.start_logits.cpu(), out.end_logits.cpu(), context_BT, max_answer_tokens)
    s, e = int(start[0]), int(end[0])
    offsets = encoding["offset_mapping"][0].tolist()
    begin, finish = offsets[s][0], offsets[e][1]
    text = context[begin:finish]
    begin += len(text) - len(text.lstrip())
    return {"answer": text.strip(), "start": begin, "end": begin + len(text.strip()),
            "score": float(out.start_logits[0, s] + out.end_logits[0, e])}


# ------------------------------------------------------------------ export and loading

@dataclass
class TaskInfo:
    """What ``bidirlm_task.json`` records about an exported task model."""

    task: str
    pooling: str
    labels: list[str] | None
    metric: str
    native: bool
    max_length: int | None = None
    scores: dict | None = None

    def to_json(self) -> dict:
        loader = f"transformers.{auto_class(self.task).__name__}" if self.native else LOADER
        pooling = self.pooling if self.task in SEQUENCE_TASKS else None
        return {"task": self.task, "pooling": pooling, "labels": self.labels, "metric": self.metric,
                "native": self.native, "loader": loader,
                "pipeline_tag": PIPELINE_TAGS[self.task] if self.native else None,
                "max_length": self.max_length, "scores": self.scores or {}}


def write_task_files(model: nn.Module, folder: Path, info: TaskInfo, head_state: dict | None = None) -> None:
    """``bidirlm_task.json`` and, for our own heads, ``task_head.safetensors`` (into an export's staging folder)."""
    folder = Path(folder)
    inner = model.get_base_model() if hasattr(model, "peft_config") else model
    if isinstance(inner, TaskHeadModel):
        save_file(head_state if head_state is not None else inner.head_state_dict(), str(folder / HEAD_FILE))
    (folder / TASK_FILE).write_text(json.dumps(info.to_json(), indent=2, ensure_ascii=False) + "\n")


def read_task_info(folder: str | Path) -> dict:
    path = Path(folder) / TASK_FILE
    if not path.is_file():
        raise BidirLMError(f"'{folder}' has no {TASK_FILE}; expected a folder exported by the finetune stage")
    return json.loads(path.read_text())


def load_task_model(folder: str | Path, *, dtype: torch.dtype | str | None = None,
                    attn_implementation: str | None = None) -> nn.Module:
    """Load a fine-tuned export (no remote code), in eval mode: transformers' own class when the folder is native,
    else the bare decoder with our head (:class:`TaskHeadModel`). Attention stays as exported (``is_causal``)."""
    path = resolve_model_folder(folder)
    info = read_task_info(path)
    kwargs = {k: v for k, v in {"dtype": dtype, "attn_implementation": attn_implementation}.items() if v is not None}
    if info["native"]:
        return auto_class(info["task"]).from_pretrained(path, **kwargs).eval()
    base = AutoModel.from_pretrained(path, **kwargs)
    labels = info.get("labels")
    model = TaskHeadModel(base, info["task"], 1 if info["task"] == "regression" else len(labels or []),
                          info.get("pooling") or "last")
    state = load_file(str(path / HEAD_FILE))
    model.head.load_state_dict({k[len(HEAD_PREFIX):]: v for k, v in state.items() if k.startswith(HEAD_PREFIX)})
    model.head.to(next(base.parameters()).dtype)
    if info["task"] != "qa":
        set_labels(base.config, info["task"], labels)
    return model.eval()
