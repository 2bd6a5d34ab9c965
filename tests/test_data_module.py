"""TextDataModule: packed masked batches, deterministic and resumable; bad input fails before training."""

import itertools
import json
import shutil

import lightning as L
import pytest
import torch

from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.data.masking import IGNORE_INDEX, MaskSpec
from bidirlm_pl.data.sources import SourceSpec
from bidirlm_pl.data.text_module import STATE_KEY, TextDataModule

SOURCES = [SourceSpec("lee", kind="lee", weight=0.7), SourceSpec("lee50", kind="lee_documents", weight=0.3)]


def _dm(**kw):
    args = {"tokenizer": "tiny-qwen3", "sources": SOURCES, "max_length": 48, "batch_size": 3, "val_fraction": 0.1,
                "val_max_batches": 2, "seed": 0, "check_documents": 50}
    args.update(kw)
    return TextDataModule(**args)


def _strip(batch):
    return {k: v for k, v in batch.items() if k != STATE_KEY}


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_batches_follow_the_convention():
    dm = _dm()
    batch = next(dm.train_batches())
    assert set(_strip(batch)) == {"input_ids", "position_ids", "seq_ids", "labels"}
    assert all(v.shape == (3, 48) for v in _strip(batch).values())
    assert (batch["seq_ids"] >= 0).all()  # training rows are full: no padding (flash varlen can take them)
    masked = batch["labels"] != IGNORE_INDEX
    assert (batch["input_ids"][masked] == dm.tokenizer.mask_token_id).all()
    assert not (masked & (batch["position_ids"] == 0)).any()
    assert 0.2 < masked.sum() / ((batch["seq_ids"] >= 0) & (batch["position_ids"] > 0)).sum() < 0.4
    val = dm.val_dataloader()
    assert len(val) == 2 and "labels" in next(iter(val))


def test_validation_documents_are_held_out_of_training():
    dm = _dm(sources=[SourceSpec("lee", kind="lee")], val_fraction=0.1)
    train, val = dm._train_sources[0].docs, dm._open_sources()[1][0].docs
    assert len(val) == 30 and len(train) == 270
    assert not set(val.indices) & set(train.indices) and len(set(val.indices) | set(train.indices)) == 300


def test_same_seed_same_batches():
    a = list(itertools.islice(_dm().train_batches(), 4))
    b = list(itertools.islice(_dm().train_batches(), 4))
    c = list(itertools.islice(_dm(seed=1).train_batches(), 4))
    assert all(_equal(_strip(x), _strip(y)) for x, y in zip(a, b))
    assert not _equal(_strip(a[0]), _strip(c[0]))


def test_resume_from_state_gives_the_same_next_batches():
    stream = _dm().train_batches()
    seen = list(itertools.islice(stream, 5))
    expected = list(itertools.islice(stream, 4))
    dm = _dm()
    dm.load_state_dict({"train": seen[-1][STATE_KEY]})
    resumed = list(itertools.islice(dm.train_dataloader(), 4))
    assert all(_equal(_strip(x), _strip(y)) for x, y in zip(resumed, expected))


def test_realised_proportions_are_in_the_state():
    batches = list(itertools.islice(_dm().train_batches(), 30))
    props = batches[-1][STATE_KEY]["proportions"]
    assert abs(props["lee"]["documents"] - 0.7) < 0.12 and props["lee"]["weight"] == pytest.approx(0.7)
    assert sum(p["tokens"] for p in props.values()) == pytest.approx(1.0)


def test_mask_ratio_schedule_applies_per_batch():
    dm = _dm(mask=MaskSpec(ratio=0.5, final_ratio=0.1, schedule_steps=4), batch_size=4)
    batches = list(itertools.islice(dm.train_batches(), 6))
    shares = [float((b["labels"] != IGNORE_INDEX).sum() / dm.masker.eligible(
        {**b, "input_ids": torch.where(b["labels"] != IGNORE_INDEX, b["labels"], b["input_ids"])}).sum())
        for b in batches]
    assert shares[0] == pytest.approx(0.5, abs=0.02) and shares[5] == pytest.approx(0.1, abs=0.02)
    assert shares[0] > shares[2] > shares[4]


# ---------------------------------------------------------------- Lightning: resume from a checkpoint


class _Recorder(L.LightningModule):
    """A one-parameter module that records every training batch it receives."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.seen = []

    def training_step(self, batch, batch_idx):
        assert STATE_KEY not in batch
        self.seen.append(batch["input_ids"].clone())
        return self.w * batch["input_ids"].float().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _fit(tmp_path, max_steps, ckpt_path=None):
    module = _Recorder()
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1,
                                                     filename="{step}")
    trainer = L.Trainer(max_steps=max_steps, logger=False, callbacks=[checkpoint], enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, accelerator="cpu")
    trainer.fit(module, datamodule=_dm(), ckpt_path=ckpt_path)
    return module.seen


def test_lightning_resume_mid_epoch_continues_the_stream(tmp_path):
    full = _fit(tmp_path, 7)
    resumed = _fit(tmp_path / "again", 7, ckpt_path=str(tmp_path / "step=3.ckpt"))
    assert len(resumed) == 4
    assert all(torch.equal(a, b) for a, b in zip(resumed, full[3:]))


# ---------------------------------------------------------------- bad input: one line, before training


def _no_bos_model(tiny_qwen3, tmp_path):
    """tiny-qwen3 whose tokenizer adds no BOS (like the real Qwen3): a 1-character text is 1 token."""
    folder = tmp_path / "no-bos"
    shutil.copytree(tiny_qwen3, folder)
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer["post_processor"] = None
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    return str(folder)


def _no_mask_model(tiny_qwen3, tmp_path):
    folder = tmp_path / "no-mask"
    shutil.copytree(tiny_qwen3, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("mask_token")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return str(folder)


@pytest.mark.parametrize("case, message", [
    ("empty_file", "source 'empty' has no documents"),
    ("missing", "path '/nonexistent/x.jsonl' does not exist"),
    ("negative", "mixture weight of source 'lee' is -1.0"),
    ("zero", "sum to 0.0"),
    ("short", r"source 'short': document 1 \('a'\) has 1 token\(s\)"),
    ("too_long", "max_length 4096 exceeds the model's limit 256"),
    ("no_mask", "has no mask token"),
    ("no_sources", "'sources' is empty"),
    ("bad_model", "model path 'no-such-model' does not exist"),
])
def test_bad_input_fails_with_one_line(case, message, tmp_path, tiny_qwen3):
    (tmp_path / "empty.txt").write_text("\n\n   \n")
    (tmp_path / "short.txt").write_text("a long enough document\na\n")
    kw = {
        "empty_file": {"sources": [SourceSpec("empty", path=str(tmp_path / "empty.txt"))]},
        "missing": {"sources": [SourceSpec("gone", path="/nonexistent/x.jsonl")]},
        "negative": {"sources": [SourceSpec("lee", kind="lee", weight=-1.0)]},
        "zero": {"sources": [SourceSpec("lee", kind="lee", weight=0.0)]},
        "short": {"sources": [SourceSpec("short", path=str(tmp_path / "short.txt"))],
                      "tokenizer": _no_bos_model(tiny_qwen3, tmp_path)},
        "too_long": {"max_length": 4096},
        "no_mask": {"tokenizer": _no_mask_model(tiny_qwen3, tmp_path)},
        "no_sources": {"sources": []},
        "bad_model": {"tokenizer": "no-such-model"},
    }[case]
    with pytest.raises(BidirLMError, match=message) as err:
        _dm(**kw)
    assert "\n" not in str(err.value)


def test_short_documents_can_be_skipped(tmp_path):
    (tmp_path / "short.txt").write_text("a long enough document for packing\na\n" * 20)
    dm = _dm(sources=[SourceSpec("short", path=str(tmp_path / "short.txt"))], short_documents="skip", val_fraction=0)
    batch = next(dm.train_batches())
    assert (batch["seq_ids"] >= 0).any()


def test_ranks_split_each_round_of_the_single_process_stream(monkeypatch):
    def originals(batch):
        return torch.where(batch["labels"] != IGNORE_INDEX, batch["labels"], batch["input_ids"])

    single = list(itertools.islice(_dm(batch_size=6).train_batches(), 3))
    per_rank = []
    for rank in (0, 1):
        dm = _dm(batch_size=3)
        monkeypatch.setattr(dm, "_world", lambda r=rank: (2, r))
        per_rank.append(list(itertools.islice(dm.train_batches(), 3)))
    for step in range(3):
        joined = torch.cat([originals(per_rank[0][step]), originals(per_rank[1][step])])
        assert torch.equal(joined, originals(single[step]))
        # both ranks carry the same resume state (Lightning saves rank 0's)
        assert per_rank[0][step][STATE_KEY]["mixture"] == per_rank[1][step][STATE_KEY]["mixture"]
    assert not torch.equal(per_rank[0][0]["labels"] != IGNORE_INDEX, per_rank[1][0]["labels"] != IGNORE_INDEX)
