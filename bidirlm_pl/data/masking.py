"""MNTP masking of packed batches: which tokens to hide, what replaces them, and the labels.

Eligible positions are real tokens (``seq_ids >= 0``) that are not special tokens (BOS, EOS, PAD,
the mask token, any added special token) and not the first token of a document segment
(``position_ids == 0``): MNTP predicts token *i* from the hidden state at *i - 1*, and the first
token of a document has no predecessor in its own document. Each row masks
``round(ratio * eligible)`` positions (at least one when any is eligible), chosen uniformly.

Replacement: ``all_mask`` puts the mask token everywhere (the BidirLM authors' recipe);
``80/10/10`` uses the mask token for 80%, a random real-vocabulary token for 10% (never a special
or added token) and keeps the original for 10% (LLM2Vec, BERT). ``labels`` hold the original token at
masked positions and -100 elsewhere.

Mask ratio schedule (mmBERT anneals the ratio): ``ratio`` at batch 0, moving linearly to
``final_ratio`` at batch ``schedule_steps`` and staying there.

>>> import torch
>>> from bidirlm_pl.data.masking import MaskSpec, Masker
>>> masker = Masker(MaskSpec(ratio=0.5), mask_token_id=4, special_ids=[0, 1, 2, 3, 4], vocab_size=32)
>>> batch = {"input_ids": torch.tensor([[1, 10, 11, 12, 13, 1, 14, 15]]),
...          "position_ids": torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2]]),
...          "seq_ids": torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1]])}
>>> out = masker(batch, generator=torch.Generator().manual_seed(0))
>>> int((out["labels"] != -100).sum()), int((out["input_ids"] == 4).sum())
(3, 3)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bidirlm_pl.core.errors import BidirLMError

REPLACEMENTS = ("all_mask", "80/10/10")
IGNORE_INDEX = -100


@dataclass
class MaskSpec:
    """How MNTP masks tokens.

    Args:
        ratio: share of eligible tokens masked (at the start of a schedule).
        replacement: ``all_mask`` or ``80/10/10``.
        mask_token: the mask token as a string (``<mask>``) or id (Qwen3: a reserved id, e.g. 151663);
            ``None`` takes the tokenizer's own mask token.
        final_ratio: with ``schedule_steps``, the ratio reached linearly after that many batches.
        schedule_steps: length of the ratio schedule in training batches (0 = constant ratio).
    """

    ratio: float = 0.3
    replacement: str = "all_mask"
    mask_token: str | int | None = None
    final_ratio: float | None = None
    schedule_steps: int = 0

    def validate(self) -> None:
        for name, value in (("ratio", self.ratio), ("final_ratio", self.final_ratio)):
            if value is not None and not 0.0 < value <= 1.0:
                raise BidirLMError(f"mask {name} {value} is outside (0, 1]")
        if self.replacement not in REPLACEMENTS:
            raise BidirLMError(f"mask replacement '{self.replacement}' is not one of {list(REPLACEMENTS)}")
        if self.schedule_steps < 0:
            raise BidirLMError(f"mask schedule_steps {self.schedule_steps} is negative")

    def ratio_at(self, batch_index: int) -> float:
        if self.final_ratio is None or self.schedule_steps <= 0:
            return self.ratio
        t = min(1.0, batch_index / self.schedule_steps)
        return self.ratio + (self.final_ratio - self.ratio) * t


def resolve_mask_token(tokenizer, mask_token: str | int | None, *, vocab_size: int | None = None,
                       model: str = "the model") -> int:
    """The mask token id from the config or the tokenizer; a one-line error when there is none."""
    if mask_token is None:
        if tokenizer.mask_token_id is None:
            raise BidirLMError(
                f"the tokenizer of {model} has no mask token; set data mask.mask_token to a token string or id "
                "(Qwen3: a reserved token such as 151663)"
            )
        token_id = int(tokenizer.mask_token_id)
    elif isinstance(mask_token, int) or (isinstance(mask_token, str) and mask_token.isdigit()):
        token_id = int(mask_token)
    else:
        token_id = tokenizer.convert_tokens_to_ids(mask_token)
        if token_id is None or (token_id == tokenizer.unk_token_id and mask_token != tokenizer.unk_token):
            raise BidirLMError(f"mask_token '{mask_token}' is not a token of the tokenizer of {model}")
    limit = vocab_size if vocab_size is not None else len(tokenizer)
    if not 0 <= token_id < limit:
        raise BidirLMError(f"mask_token id {token_id} is outside the vocabulary [0, {limit}) of {model}")
    return token_id


def special_token_ids(tokenizer) -> list[int]:
    """Ids never masked and never used as random replacements: special and added tokens."""
    ids = {int(i) for i in tokenizer.all_special_ids}
    ids.update(int(i) for i in getattr(tokenizer, "added_tokens_decoder", {}) or {})
    return sorted(ids)


def replacement_ids(tokenizer, special_ids: list[int], vocab_size: int | None = None) -> torch.Tensor:
    """Real vocabulary ids for random replacement: the base vocabulary minus special/added tokens."""
    limit = min(tokenizer.vocab_size, vocab_size or tokenizer.vocab_size)
    keep = torch.ones(limit, dtype=torch.bool)
    special = torch.tensor([i for i in special_ids if i < limit], dtype=torch.long)
    keep[special] = False
    return keep.nonzero().squeeze(1)


class Masker:
    """Apply MNTP masking to a packed batch dict; returns a new dict with ``labels``.

    Args:
        spec: the :class:`MaskSpec`.
        mask_token_id: id written at masked positions.
        special_ids: ids never masked.
        vocab_size / candidates: random replacements are drawn from ``candidates`` (a 1D id tensor),
            by default ``range(vocab_size)`` minus ``special_ids``.
    """

    def __init__(self, spec: MaskSpec, *, mask_token_id: int, special_ids: list[int], vocab_size: int,
                 candidates: torch.Tensor | None = None):
        spec.validate()
        self.spec = spec
        self.mask_token_id = int(mask_token_id)
        self.special_ids = torch.tensor(sorted(set(special_ids) | {self.mask_token_id}), dtype=torch.long)
        if candidates is None:
            keep = torch.ones(vocab_size, dtype=torch.bool)
            keep[self.special_ids[self.special_ids < vocab_size]] = False
            candidates = keep.nonzero().squeeze(1)
        self.candidates = candidates

    def eligible(self, batch: dict) -> torch.Tensor:
        input_ids_BT = batch["input_ids"]
        ok_BT = ~torch.isin(input_ids_BT, self.special_ids)
        if batch.get("seq_ids") is not None:
            ok_BT &= batch["seq_ids"] >= 0
        if batch.get("position_ids") is not None:
            ok_BT &= batch["position_ids"] > 0
        else:
            ok_BT[:, 0] = False
        if batch.get("attention_mask") is not None:
            ok_BT &= batch["attention_mask"].bool()
        return ok_BT

    def __call__(self, batch: dict, *, generator: torch.Generator, ratio: float | None = None) -> dict:
        ratio = self.spec.ratio if ratio is None else ratio
        input_ids_BT = batch["input_ids"]
        eligible_BT = self.eligible(batch)
        # exact count per row: rank eligible positions by a random score, keep the top-k
        scores_BT = torch.rand(input_ids_BT.shape, generator=generator).masked_fill(~eligible_BT, 2.0)
        n_eligible_B = eligible_BT.sum(1)
        k_B = torch.clamp((n_eligible_B.double() * ratio).round().long(), min=1)
        k_B = torch.minimum(k_B, n_eligible_B)
        ranks_BT = scores_BT.argsort(dim=1).argsort(dim=1)
        masked_BT = (ranks_BT < k_B[:, None]) & eligible_BT
        labels_BT = torch.full_like(input_ids_BT, IGNORE_INDEX)
        labels_BT[masked_BT] = input_ids_BT[masked_BT]
        new_ids_BT = input_ids_BT.clone()
        if self.spec.replacement == "all_mask":
            new_ids_BT[masked_BT] = self.mask_token_id
        else:
            u_BT = torch.rand(input_ids_BT.shape, generator=generator)
            to_mask_BT = masked_BT & (u_BT < 0.8)
            to_random_BT = masked_BT & (u_BT >= 0.8) & (u_BT < 0.9)
            new_ids_BT[to_mask_BT] = self.mask_token_id
            picks = torch.randint(len(self.candidates), (int(to_random_BT.sum()),), generator=generator)
            new_ids_BT[to_random_BT] = self.candidates[picks]
        out = dict(batch)
        out["input_ids"] = new_ids_BT
        out["labels"] = labels_BT
        return out
