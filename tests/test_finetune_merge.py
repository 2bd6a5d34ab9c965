"""Merging inside fits: FinetuneStage's ``merge_with`` (merge, then fine-tune: the weights ``bidirlm merge`` writes,
merged once and reused from the cache), its convergence report (``val/steps_to_target``, convergence.json), the
Pang & Lee polarity set it trains on, and the MergeWithBase callback."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from test_merging_helpers import perturbed, state

from bidirlm_pl.callbacks import HFExport
from bidirlm_pl.cli.main import main
from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.data.splits import stratified_split
from bidirlm_pl.data.task_readers import pang_lee_polarity
from bidirlm_pl.data.tasks import LabelledTaskData
from bidirlm_pl.models.merging import cache
from bidirlm_pl.models.merging.cache import is_merged, merge_cache_folder
from bidirlm_pl.stages.finetune import FinetuneStage, steps_to_target

LABELS = ["neg", "pos"]


def test_pang_lee_polarity_is_a_balanced_labelled_task():
    pairs = pang_lee_polarity()
    assert len(pairs) == 200 and sorted({label for _, label in pairs}) == LABELS
    assert sum(label == "pos" for _, label in pairs) == 100
    labels = [int(label == "pos") for _, label in pairs]
    train, val = stratified_split(labels, 0.25, seed=0)
    assert sorted(train + val) == list(range(200)) and sum(labels[i] for i in val) == 25 == len(val) // 2


def _stage(model, **kwargs) -> FinetuneStage:
    return FinetuneStage(str(model), task="sequence", pooling="mean", metric="f1",
                         optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3), **kwargs)


def _data(model) -> LabelledTaskData:
    return LabelledTaskData({"kind": "pang_lee_polarity"}, tokenizer=str(model), batch_size=16, max_length=32,
                            val_fraction=0.25)


def _trainer(tmp_path, steps: int, callbacks=(), logger=True):
    logger = L.pytorch.loggers.CSVLogger(tmp_path / "logs") if logger else False
    return L.Trainer(accelerator="cpu", devices=1, max_steps=steps, val_check_interval=2, check_val_every_n_epoch=None,
                     num_sanity_val_steps=0, logger=logger, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, callbacks=list(callbacks), default_root_dir=tmp_path)


def _decoder(stage: FinetuneStage) -> dict[str, torch.Tensor]:
    """The bare decoder's weights under the causal LM's names (``model.layers...``), the head left out."""
    return {k: v for k, v in stage.backbone.state_dict().items() if k.startswith("model.")}


def test_merge_then_finetune_trains_the_weights_bidirlm_merge_writes(tiny_qwen3, tmp_path, monkeypatch):
    specialist = perturbed(tiny_qwen3, tmp_path / "specialist", seed=11)
    reference = tmp_path / "bidirlm-merge"
    assert main(["merge", "--models", str(tiny_qwen3), str(specialist), "--weights", "0.5", "0.5",
                 "--output", str(reference)]) == 0
    expected = state(reference)

    stage = _stage(tiny_qwen3, merge_with=[str(specialist)], merge_weights=[0.5, 0.5], labels=LABELS,
                   merge_cache=str(tmp_path / "cache"))
    assert not (tmp_path / "cache").exists()  # nothing is merged before the model is configured
    stage.configure_model()
    # the cached merge is `bidirlm merge`'s output, byte for byte, and the backbone starts from it
    assert state(stage.merge_spec.output).keys() == expected.keys()
    assert all(torch.equal(state(stage.merge_spec.output)[k], v) for k, v in expected.items())
    start = _decoder(stage)
    assert start and all(torch.equal(v, expected[k].to(v.dtype)) for k, v in start.items())
    start = {k: v.clone() for k, v in start.items()}

    trainer = _trainer(tmp_path, steps=6, callbacks=[HFExport(str(tmp_path / "hf"))])
    trainer.fit(stage, datamodule=_data(tiny_qwen3))
    assert any(not torch.equal(start[k], v) for k, v in _decoder(stage).items())  # it trained
    assert {"val/f1", "val/metric", "val/best_metric", "val/steps_to_target"} <= set(trainer.callback_metrics)
    summary = json.loads((tmp_path / "logs" / "lightning_logs" / "version_0" / "convergence.json").read_text())
    history = summary["history"]
    assert [h["step"] for h in history] == [2, 4, 6] and all(h["metric"] == h["f1"] for h in history)
    assert summary["metric"] == "f1" and summary["best"] == max(h["f1"] for h in history)
    assert summary["steps_to_target"] == steps_to_target([(h["step"], h["f1"]) for h in history], 0.93)
    assert float(trainer.callback_metrics["val/steps_to_target"]) == summary["steps_to_target"]
    record = json.loads((tmp_path / "hf" / "merge_config.json").read_text())  # the export says what it merged
    assert record["spec"]["models"] == [str(tiny_qwen3), str(specialist)] and record["spec"]["weights"] == [0.5, 0.5]

    # a second run with the same merge reads the cached folder: no merge runs
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [Path(stage.merge_spec.output).name]
    monkeypatch.setattr(cache, "merge", lambda spec: pytest.fail("the cached merge ran again"))
    again = _stage(tiny_qwen3, merge_with=[str(specialist)], merge_weights=[0.5, 0.5], labels=LABELS,
                   merge_cache=str(tmp_path / "cache"))
    assert again.merge_spec.output == stage.merge_spec.output
    again.configure_model()
    assert all(torch.equal(v, expected[k].to(v.dtype)) for k, v in _decoder(again).items())
    # another weighting, or a specialist rewritten in place, is another merge
    assert merge_cache_folder(again.merge_spec, None) != merge_cache_folder(
        _stage(tiny_qwen3, merge_with=[str(specialist)], merge_weights=[0.3, 0.7]).merge_spec, None)
    perturbed(tiny_qwen3, tmp_path / "specialist-2", seed=12)
    (tmp_path / "specialist-2" / "model.safetensors").replace(specialist / "model.safetensors")
    assert merge_cache_folder(stage.merge_spec, str(tmp_path / "cache")) != Path(stage.merge_spec.output)


def test_no_merge_is_plain_finetuning_and_merging_with_itself_changes_nothing(tiny_qwen3, tmp_path):
    """No ``merge_with`` (or an empty one) is the plain stage; a 50/50 merge of a model with itself is the model."""
    finals = []
    for name, kwargs in (("plain", {}), ("empty", {"merge_with": []}),
                         ("itself", {"merge_with": [str(tiny_qwen3)], "merge_cache": str(tmp_path / "cache")})):
        L.seed_everything(0)
        stage = _stage(tiny_qwen3, **kwargs)
        assert (stage.merge_spec is None) == (name != "itself")
        trainer = _trainer(tmp_path / name, steps=2, logger=False)
        trainer.fit(stage, datamodule=_data(tiny_qwen3))
        finals.append(stage.backbone.state_dict())
    for other in finals[1:]:
        assert other.keys() == finals[0].keys()
        assert all(torch.equal(finals[0][k], other[k]) for k in finals[0])


def test_steps_to_target_from_a_known_history():
    history = [(5, 0.40), (10, 0.80), (15, 0.95), (20, 0.90), (25, 1.00)]
    assert steps_to_target(history, 0.93) == 15  # 0.93 x best 1.0: first reached at step 15
    assert steps_to_target(history, 0.80) == 10 and steps_to_target(history, 1.0) == 25
    assert steps_to_target([(5, math.nan), (10, 0.5), (15, 0.5)], 0.93) == 10  # a NaN score is no score
    assert steps_to_target([(5, -0.3), (10, -0.1)], 0.93) == 10  # a best at or below 0 must be reached itself
    assert steps_to_target([], 0.93) == steps_to_target([(5, math.nan)], 0.93) == -1


class _Strategy:
    def __init__(self):
        self.barriers = []

    def barrier(self, name):
        self.barriers.append(name)


def test_several_processes_merge_on_rank_0_then_on_a_node_that_does_not_see_it(tiny_qwen3, tmp_path, monkeypatch):
    stage = _stage(tiny_qwen3, merge_with=[str(tiny_qwen3)], merge_cache=str(tmp_path / "cache"))
    merged = []
    monkeypatch.setattr(cache, "merge", lambda spec: merged.append(spec.output))

    def run(global_zero: bool, local_rank: int):
        strategy = _Strategy()
        stage._trainer = SimpleNamespace(is_global_zero=global_zero, local_rank=local_rank, strategy=strategy)
        merged.clear()
        assert stage.merged_model_path() == stage.merge_spec.output
        return len(merged), strategy.barriers

    assert run(True, 0) == (1, ["merge_with", "merge_with_node"])  # rank 0 merges (the stub writes nothing) ...
    assert run(False, 1) == (0, ["merge_with", "merge_with_node"])  # ... another process on its node waits
    assert run(False, 0) == (1, ["merge_with", "merge_with_node"])  # a node that does not see the folder merges
    folder = Path(stage.merge_spec.output)
    folder.mkdir(parents=True)
    (folder / "merge_config.json").write_text("{}")
    assert is_merged(folder) and run(False, 0)[0] == 0 and run(True, 0)[0] == 0  # a shared folder: nobody merges


def test_merge_mistakes_stop_before_training(tiny_qwen3, tmp_path):
    with pytest.raises(BidirLMError, match="got 1 weights for 2 models"):
        _stage(tiny_qwen3, merge_with=[str(tiny_qwen3)], merge_weights=[1.0])
    with pytest.raises(BidirLMError, match="does not exist"):
        _stage(tiny_qwen3, merge_with=[str(tmp_path / "missing")])
    with pytest.raises(BidirLMError, match="merge_weights given but merge_with is empty"):
        _stage(tiny_qwen3, merge_weights=[1.0])
    with pytest.raises(BidirLMError, match="needs a base"):
        _stage(tiny_qwen3, merge_with=[str(tiny_qwen3)], merge_method="ties")
    with pytest.raises(BidirLMError, match="target_fraction 0"):
        _stage(tiny_qwen3, target_fraction=0.0)
    assert not (tmp_path / "missing").exists()


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
