"""Omni composition on tiny random models of the real classes (Qwen3, Qwen3-VL, Qwen3-ASR): the merge
is the weighted average, the towers are the sources' and stay frozen, every modality embeds, gradients
reach the backbone only, a tiny multimodal contrastive run lowers its loss, bad input is one line."""

import csv
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from bidirlm_pl.cli import main as cli
from bidirlm_pl.cli.compose import OmniSource, OmniSpec, compose
from bidirlm_pl.core import assets
from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.data.omni import shape_image, tone
from bidirlm_pl.models.omni.model import OmniEncoder

TOWERS = {"vision": ["model.visual."], "audio": ["model.audio_tower.", "model.multi_modal_projector."]}


def _spec(output, **changes):
    sources = {"text": {"model": "tiny-omni-text"},
               "vision": {"model": "tiny-qwen3-vl", "key_map": {"model.language_model.": "model."},
                          "towers": TOWERS["vision"]},
               "audio": {"model": "tiny-qwen3-asr", "key_map": {"model.language_model.": "model."},
                         "towers": TOWERS["audio"]}}
    for role, fields in changes.items():
        sources[role] = {**sources[role], **fields}
    return OmniSpec(output=str(output), sources={r: OmniSource(**s) for r, s in sources.items()})


@pytest.fixture(scope="module")
def composed(tmp_path_factory):
    return compose(_spec(tmp_path_factory.mktemp("omni") / "composed"))


def _weights(name):
    return load_file(assets.ASSETS[name]() / "model.safetensors")


def test_merged_backbone_is_the_average_and_towers_are_the_sources(composed):
    out = load_file(composed / "model.safetensors")
    text, vl, asr = _weights("tiny-omni-text"), _weights("tiny-qwen3-vl"), _weights("tiny-qwen3-asr")
    backbone = [k for k in text if k.startswith("model.")]
    assert backbone and all(k in out for k in backbone)
    for key in backbone:
        mapped = "model.language_model." + key[len("model."):]
        expected = (text[key] + vl[mapped] + asr[mapped]) / 3
        assert torch.allclose(out[key], expected, atol=1e-6), key
    for source, prefixes in ((vl, TOWERS["vision"]), (asr, TOWERS["audio"])):
        keys = [k for k in source if any(k.startswith(p) for p in prefixes)]
        assert keys and all(torch.equal(out[k], source[k]) for k in keys)
    record = json.loads((composed / "omni_config.json").read_text())
    assert record["provenance"]["backbone"]["weights"] == pytest.approx({"text": 1 / 3, "vision": 1 / 3, "audio": 1 / 3})
    assert record["provenance"]["towers"]["vision"]["tensors"]["model.visual."] == \
        sum(k.startswith("model.visual.") for k in vl)
    assert (composed / "vision_processor" / "preprocessor_config.json").is_file()


def test_every_modality_embeds_and_only_the_backbone_gets_gradients(composed):
    enc = OmniEncoder.from_folder(composed)
    enc.train()
    batches = [enc.prepare(["a sentence", "another sentence, longer"]),
               enc.prepare(["a red square", None], images=[shape_image("red", "square"), shape_image("blue", "circle")]),
               enc.prepare(["a tone", None], audio=[tone("high", "short"), tone("low", "long")])]
    total = 0
    for batch in batches:
        emb = enc(batch)
        assert emb.shape == (2, enc.backbone.config.hidden_size) and torch.isfinite(emb).all()
        total = total + emb.pow(2).sum()
    assert not torch.allclose(enc(batches[1])[0], enc(batches[1])[1])  # the images matter
    total.backward()
    grads = [p.grad for p in enc.backbone.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    for tower in enc.towers():
        assert all(p.grad is None and not p.requires_grad for p in tower.parameters())
    # the encode API: one unit vector per input
    for emb in (enc.encode(["x"]), enc.encode_images([shape_image("green", "stripe")]), enc.encode_audio([tone("low", "short")])):
        assert emb.shape == (1, enc.backbone.config.hidden_size) and torch.allclose(emb.norm(dim=-1), torch.ones(1))


def test_tiny_omni_contrastive_run_lowers_its_loss_and_keeps_the_towers(composed, tmp_path):
    root = tmp_path / "fit"
    assert cli.main(["fit", "--config", "configs/omni/contrastive-tiny.yaml", "--model.init_args.backbone.model",
                     str(composed), "--trainer.default_root_dir", str(root), "--trainer.max_steps", "30",
                     "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
                     "--trainer.logger.save_dir", str(root)]) == 0
    with open(next(root.glob("**/metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 30
    assert np.mean(losses[-8:]) < 0.8 * np.mean(losses[:8]), losses
    exported = next(root.glob("**/hf"))
    before, after = load_file(composed / "model.safetensors"), load_file(exported / "model.safetensors")
    towers = [k for k in before if not k.startswith("model.") or k.startswith(("model.visual.", "model.audio_tower.",
                                                                                 "model.multi_modal_projector."))]
    assert towers and all(torch.equal(before[k], after[k]) for k in towers)
    assert not torch.equal(before["model.norm.weight"], after["model.norm.weight"])  # the backbone trained
    record = json.loads((exported / "omni_config.json").read_text())
    assert record["provenance"]["training"]["steps"] == 30
    assert OmniEncoder.from_folder(exported).encode_images([shape_image("red", "circle")]).shape[0] == 1


def test_bad_sources_and_inputs_are_one_line(composed, tmp_path):
    with pytest.raises(BidirLMError, match=r"source 'vision' \(tiny-qwen3-vl\) has no tensor under 'model.vision.'"):
        compose(_spec(tmp_path / "a", vision={"towers": ["model.vision."]}))
    # a text backbone of another shape (the 512-token tiny Qwen3 vs the 519-token omni sources)
    with pytest.raises(BidirLMError, match="embed_tokens"):
        compose(_spec(tmp_path / "b", text={"model": "tiny-qwen3"}))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    enc = OmniEncoder.from_folder(composed)
    with pytest.raises(BidirLMError, match="the vision processor rejected an image"):
        enc.encode_images([np.zeros((2, 3, 4, 5, 6), dtype=np.uint8)])
    with pytest.raises(BidirLMError, match=r"audio clip 0 has shape \(2, 100\)"):
        enc.encode_audio([np.zeros((2, 100), dtype=np.float32)])


def test_omni_ddp_two_processes_equal_one_process_and_resume_exactly(composed, tmp_path):
    """The omni stage scales out like the others: 2 x 4 pairs == 1 x 8 pairs; a resumed run continues exactly."""
    from scale_out_runs import fit, losses, max_difference, weights

    config = "configs/omni/contrastive-tiny.yaml"
    # Adam divides by sqrt(v) + eps: float noise from different padding widths (1 x 8 vs 2 x 4 rows) in
    # near-zero gradients becomes steps of up to lr; lr 2e-4 and eps 1e-6 keep the comparison about the
    # gradients (at the config's lr 2e-3 the weights differ by 1e-5 after 4 steps, the losses by < 1e-6)
    args = ["--model.init_args.backbone.model", str(composed), "--data.init_args.global_batch_size", "8",
            "--model.init_args.optimizer.init_args.eps", "1e-6", "--model.init_args.optimizer.init_args.lr", "2e-4"]
    one = fit(tmp_path / "one", config, *args, checkpoints=True)
    ddp = fit(tmp_path / "ddp", config, *args, "--trainer.strategy", "ddp", devices=2)
    ref, got = losses(one), losses(ddp)
    assert sorted(ref) == sorted(got) == [0, 1, 2, 3]
    assert all(abs(ref[s] - got[s]) <= 1e-5 for s in ref), (ref, got)
    assert max_difference(weights(one / "hf"), weights(ddp / "hf")) <= 1e-5
    resumed = fit(tmp_path / "resumed", config, *args, "--ckpt_path", str(one / "ckpt" / "step=2.ckpt"))
    assert [losses(resumed)[s] for s in (2, 3)] == [ref[s] for s in (2, 3)]
