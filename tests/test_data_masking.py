"""MNTP masking invariants: what may be masked, how many, what replaces it, and the mask token."""

import json
import shutil

import pytest
import torch
from transformers import AutoTokenizer

from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.data.masking import (
    IGNORE_INDEX,
    Masker,
    MaskSpec,
    replacement_ids,
    resolve_mask_token,
    special_token_ids,
)
from bidirlm_pl.data.packing import pack_batches


@pytest.fixture(scope="module")
def tok(tiny_qwen3):
    return AutoTokenizer.from_pretrained(tiny_qwen3)


@pytest.fixture(scope="module")
def batch(tok):
    from bidirlm_pl.core.assets import lee_background

    docs = [tok(t)["input_ids"][:40] for t in lee_background()[:30]]
    docs += [[tok.bos_token_id, 50, tok.eos_token_id, 60, tok.pad_token_id, 70]]  # specials inside a document
    return next(pack_batches(docs[::-1], max_length=64, batch_size=8, pad_token_id=tok.pad_token_id))


def _masker(tok, **kw):
    specials = special_token_ids(tok)
    return Masker(MaskSpec(**kw), mask_token_id=resolve_mask_token(tok, None), special_ids=specials,
                  vocab_size=len(tok), candidates=replacement_ids(tok, specials))


@pytest.mark.parametrize("replacement", ["all_mask", "80/10/10"])
@pytest.mark.parametrize("ratio", [0.15, 0.3, 1.0])
def test_masking_invariants(tok, batch, replacement, ratio):
    masker = _masker(tok, ratio=ratio, replacement=replacement)
    out = masker(batch, generator=torch.Generator().manual_seed(0))
    masked_BT = out["labels"] != IGNORE_INDEX
    specials = torch.tensor(special_token_ids(tok))
    # never: special tokens, padding, the first token of a document
    assert not (masked_BT & torch.isin(batch["input_ids"], specials)).any()
    assert not (masked_BT & (batch["seq_ids"] < 0)).any()
    assert not (masked_BT & (batch["position_ids"] == 0)).any()
    # labels are the original tokens; unmasked tokens are untouched
    assert torch.equal(out["labels"][masked_BT], batch["input_ids"][masked_BT])
    assert torch.equal(out["input_ids"][~masked_BT], batch["input_ids"][~masked_BT])
    # exact count per row
    eligible_BT = masker.eligible(batch)
    expected = torch.clamp((eligible_BT.sum(1).double() * ratio).round().long(), min=1)
    assert torch.equal(masked_BT.sum(1), torch.minimum(expected, eligible_BT.sum(1)))
    new = out["input_ids"][masked_BT]
    if replacement == "all_mask":
        assert (new == tok.mask_token_id).all()
    else:
        random_ids = new[(new != tok.mask_token_id) & (new != batch["input_ids"][masked_BT])]
        assert not torch.isin(random_ids, specials).any()
        assert bool((random_ids < tok.vocab_size).all())


def test_eighty_ten_ten_shares(tok, batch):
    masker = _masker(tok, ratio=1.0, replacement="80/10/10")
    g = torch.Generator().manual_seed(1)
    counts = torch.zeros(3)
    for _ in range(20):
        out = masker(batch, generator=g)
        m = out["labels"] != IGNORE_INDEX
        new, old = out["input_ids"][m], batch["input_ids"][m]
        counts += torch.tensor([(new == tok.mask_token_id).sum(), ((new != tok.mask_token_id) & (new != old)).sum(),
                                (new == old).sum()], dtype=torch.float)
    shares = counts / counts.sum()
    assert abs(shares[0] - 0.8) < 0.03 and abs(shares[2] - 0.1) < 0.03 and abs(shares[1] - 0.1) < 0.03


def test_same_generator_seed_same_masks(tok, batch):
    masker = _masker(tok)
    a = masker(batch, generator=torch.Generator().manual_seed(5))
    b = masker(batch, generator=torch.Generator().manual_seed(5))
    c = masker(batch, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a["input_ids"], b["input_ids"]) and not torch.equal(a["labels"], c["labels"])


def test_replacement_ids_are_real_vocabulary(gemma3_270m):
    gemma = AutoTokenizer.from_pretrained(gemma3_270m)
    specials = special_token_ids(gemma)
    ids = replacement_ids(gemma, specials)
    assert not torch.isin(ids, torch.tensor(specials)).any()
    added = torch.tensor(sorted(gemma.added_tokens_decoder))
    assert not torch.isin(ids, added).any() and len(ids) == gemma.vocab_size - len(set(specials) | set(added.tolist()))
    assert resolve_mask_token(gemma, None) == gemma.convert_tokens_to_ids("<mask>")


def test_mask_token_by_string_or_id(tok):
    assert resolve_mask_token(tok, "<mask>") == tok.mask_token_id
    assert resolve_mask_token(tok, 7) == 7 and resolve_mask_token(tok, "7") == 7
    with pytest.raises(BidirLMError, match="mask_token '<nope>' is not a token"):
        resolve_mask_token(tok, "<nope>")
    with pytest.raises(BidirLMError, match=r"mask_token id 151663 is outside the vocabulary \[0, 512\)"):
        resolve_mask_token(tok, 151663)


def test_no_mask_token_is_a_clear_error(tiny_qwen3, tmp_path):
    folder = tmp_path / "no-mask"
    shutil.copytree(tiny_qwen3, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("mask_token")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    no_mask = AutoTokenizer.from_pretrained(folder)
    assert no_mask.mask_token_id is None
    with pytest.raises(BidirLMError, match="has no mask token; set data mask.mask_token") as err:
        resolve_mask_token(no_mask, None)
    assert "\n" not in str(err.value)
    assert resolve_mask_token(no_mask, 4) == 4  # Qwen3 style: a reserved id from the config


def test_ratio_schedule():
    spec = MaskSpec(ratio=0.3, final_ratio=0.1, schedule_steps=100)
    assert spec.ratio_at(0) == 0.3 and spec.ratio_at(50) == pytest.approx(0.2) and spec.ratio_at(500) == 0.1
    assert MaskSpec(ratio=0.2).ratio_at(10_000) == 0.2


@pytest.mark.parametrize("kw, message", [
    ({"ratio": 0.0}, "mask ratio 0.0 is outside"),
    ({"ratio": 1.5}, "mask ratio 1.5 is outside"),
    ({"replacement": "bert"}, "replacement 'bert' is not one of"),
    ({"final_ratio": 2.0, "schedule_steps": 3}, "final_ratio 2.0"),
])
def test_bad_mask_specs(kw, message):
    with pytest.raises(BidirLMError, match=message):
        MaskSpec(**kw).validate()
