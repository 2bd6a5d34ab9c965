"""MergeStage (merge then fine-tune a classifier), the labelled DataModule, and the MergeWithBase callback."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from test_merging_helpers import perturbed, state

from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.data.labelled import LabelledTextDataModule, pang_lee_polarity, stratified_split
from bidirlm_pl.stages.merge import MergeStage


def test_pang_lee_polarity_is_a_balanced_labelled_task():
    pairs = pang_lee_polarity()
    assert len(pairs) == 200 and sorted({label for _, label in pairs}) == ["neg", "pos"]
    assert sum(label == "pos" for _, label in pairs) == 100
    labels = [int(label == "pos") for _, label in pairs]
    train, val = stratified_split(labels, 0.25, seed=0)
    assert sorted(train + val) == list(range(200)) and sum(labels[i] for i in val) == 25 == len(val) // 2


def _trainer(tmp_path, steps: int, callbacks=()):
    return L.Trainer(accelerator="cpu", devices=1, max_steps=steps, val_check_interval=2, check_val_every_n_epoch=None,
                     num_sanity_val_steps=0, logger=L.pytorch.loggers.CSVLogger(tmp_path / "logs"),
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     callbacks=list(callbacks), default_root_dir=tmp_path)


def test_merge_stage_merges_then_finetunes(tiny_qwen3, tmp_path):
    specialist = perturbed(tiny_qwen3, tmp_path / "specialist", seed=11)
    stage = MergeStage(str(tiny_qwen3), merge_with=[str(specialist)], weights=[0.5, 0.5],
                       merge_cache=str(tmp_path / "cache"),
                       optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3))
    data = LabelledTextDataModule(str(tiny_qwen3), batch_size=16, max_length=32)
    trainer = _trainer(tmp_path, steps=6)
    stage.configure_model()
    # the backbone starts as the 50/50 merge, tensor by tensor
    a, b = state(tiny_qwen3), state(specialist)
    weights = stage.backbone.state_dict()
    for key, tensor in weights.items():
        torch.testing.assert_close(tensor, 0.5 * a["model." + key] + 0.5 * b["model." + key], rtol=1e-6, atol=1e-7)
    before = {k: v.clone() for k, v in weights.items()}
    trainer.fit(stage, datamodule=data)
    assert any(not torch.equal(before[k], v) for k, v in stage.backbone.state_dict().items())  # it trained
    metrics = trainer.callback_metrics
    assert {"val/accuracy", "val/f1", "val/best_f1", "val/steps_to_target"} <= set(metrics)
    summary = json.loads((tmp_path / "logs" / "lightning_logs" / "version_0" / "convergence.json").read_text())
    steps = [h["step"] for h in summary["history"]]
    assert steps == [2, 4, 6]
    best = max(h["f1"] for h in summary["history"])
    first = next(h["step"] for h in summary["history"] if h["f1"] >= 0.93 * best)
    assert summary["best_f1"] == best and summary["steps_to_target"] == first
    # the merge is cached by spec and reused
    assert len(list((tmp_path / "cache").iterdir())) == 1


def test_merge_stage_errors_before_training(tiny_qwen3, tmp_path):
    with pytest.raises(BidirLMError, match="got 1 weights for 2 models"):
        MergeStage(str(tiny_qwen3), merge_with=[str(tiny_qwen3)], weights=[1.0])
    with pytest.raises(BidirLMError, match="does not exist"):
        MergeStage(str(tiny_qwen3), merge_with=[str(tmp_path / "missing")])
    with pytest.raises(BidirLMError, match="num_labels 1"):
        MergeStage(str(tiny_qwen3), num_labels=1)


class _CausalLMStage(L.LightningModule):
    """A minimal stage for the callback: next-token loss on random ids, with BackboneStage's export."""

    def __init__(self, model):
        super().__init__()
        from bidirlm_pl.backbone.load import load_backbone

        self.model_path = str(model)
        self.backbone, self.tokenizer = load_backbone(model, bidirectional=False)

    def training_step(self, batch, batch_idx):
        return self.backbone(input_ids=batch, labels=batch).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)

    def export_hf(self, target, overwrite=True):
        from bidirlm_pl.core.export import save_hf_folder

        return save_hf_folder(self.backbone, self.tokenizer, target, overwrite=overwrite)


def test_merge_with_base_callback(tiny_qwen3, tmp_path):
    from bidirlm_pl.callbacks import MergeWithBase

    stage = _CausalLMStage(tiny_qwen3)
    ids = torch.randint(5, 500, (8, 16), generator=torch.Generator().manual_seed(0))
    callback = MergeWithBase(dirpath=str(tmp_path / "mwb"), ratio=0.25)
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])
    trainer.fit(stage, train_dataloaders=torch.utils.data.DataLoader(ids, batch_size=4))
    trained, merged, base = (state(tmp_path / "mwb" / "trained"), state(tmp_path / "mwb" / "merged"),
                             state(tiny_qwen3))
    assert any(not torch.equal(trained[k], base[k]) for k in base)
    for key in base:
        torch.testing.assert_close(merged[key], 0.25 * trained[key] + 0.75 * base[key], rtol=1e-6, atol=1e-7)
    assert (tmp_path / "mwb" / "merged" / "tokenizer.json").exists() and callback.report.merged_tensors == len(base)
    with pytest.raises(BidirLMError, match="ratio 1.5"):
        MergeWithBase(ratio=1.5)
