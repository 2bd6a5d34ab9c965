"""The omni backbone's positions (docs/omni.md): interleaved MRoPE with Qwen3-VL's rotary base, on tiny stand-ins with
the real configs' position settings (Qwen3 and Qwen3-ASR 1e6, Qwen3-VL 5e6 with an interleaved mrope_section).

* text-only input embeds exactly as the composed text model (a plain Qwen3 of rope_theta 5e6, 1-D positions);
* image placeholders get Qwen3-VL's 3-D (t, h, w) positions (``Qwen3VLModel.get_rope_index``) and its rotary;
* audio inputs get 1-D positions, as Qwen3-ASR's ``get_rope_index`` gives them.
"""

import json

import numpy as np
import pytest
import torch
from transformers import Qwen3Config, Qwen3VLConfig
from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel, Qwen3VLTextRotaryEmbedding

from bidirlm_pl.backbone import attention
from bidirlm_pl.backbone.load import load_backbone
from bidirlm_pl.cli.compose import OmniSpec, compose
from bidirlm_pl.core import assets
from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.data.omni import shape_image, tone
from bidirlm_pl.models.omni.model import OmniEncoder
from bidirlm_pl.models.omni.positions import OmniRotary, image_positions

TEXTS = ["a story about the stock market", "short", "the cat sat on the mat while it rained outside"]


@pytest.fixture(scope="module")
def composed(tmp_path_factory):
    return compose(OmniSpec.load("configs/omni/qwen3-standins.yaml", output=str(tmp_path_factory.mktemp("pos") / "c")))


@pytest.fixture(scope="module")
def encoder(composed):
    return OmniEncoder.from_folder(composed).eval()


def _vl_config():
    return Qwen3VLConfig(**json.loads((assets.ASSETS["tiny-qwen3-vl"]() / "config.json").read_text()))


def test_the_composed_folder_takes_qwen3_vl_rotary(composed):
    record = json.loads((composed / "omni_config.json").read_text())
    vl = _vl_config().text_config.rope_parameters
    assert record["positions"]["scheme"] == "mrope_interleaved"
    assert record["positions"]["rope_theta"] == vl["rope_theta"] == 5e6
    assert record["positions"]["mrope_section"] == vl["mrope_section"]
    assert record["positions"]["source_rope_thetas"] == {"text": 1e6, "vision": 5e6, "audio": 1e6}
    assert json.loads((composed / "config.json").read_text())["rope_parameters"]["rope_theta"] == 5e6


def test_equal_axes_are_plain_rope_and_3d_axes_are_qwen3_vl_rotary():
    text = _vl_config().text_config
    rotary = OmniRotary(text.head_dim, text.rope_parameters["rope_theta"], text.rope_parameters["mrope_section"])
    x = torch.zeros(1, dtype=torch.float32)
    ids_BT = torch.arange(40).view(2, 20)
    plain = Qwen3RotaryEmbedding(Qwen3Config(head_dim=text.head_dim, hidden_size=64, num_attention_heads=4,
                                             rope_parameters={"rope_type": "default", "rope_theta": 5e6}))
    for got, want in zip(rotary(x, ids_BT), plain(x, ids_BT)):
        assert torch.allclose(got, want, atol=1e-6)
    ids_3BT = torch.randint(0, 50, (3, 2, 20))
    with rotary.positions(ids_3BT):
        got = rotary(x, ids_BT)
    for g, want in zip(got, Qwen3VLTextRotaryEmbedding(text)(x, ids_3BT)):
        assert torch.allclose(g, want, atol=1e-6)
    assert not torch.allclose(got[0], rotary(x, ids_BT)[0])  # the stored 3-D positions were used


def test_text_only_input_embeds_as_the_plain_text_model(encoder, composed):
    """The text path it equals: the folder's Qwen3 (rope_theta 5e6, stock 1-D rotary), bidirectional, mean-pooled."""
    backbone, _ = load_backbone(composed, bidirectional=True, head="base", dtype="float32")
    assert type(backbone.rotary_emb).__name__ == "Qwen3RotaryEmbedding"
    assert backbone.config.rope_parameters["rope_theta"] == 5e6
    batch = encoder.prepare(TEXTS)
    assert encoder.position_ids(batch) is None

    def pooled(model, theta=None):
        if theta is not None:
            model.config.rope_parameters["rope_theta"] = theta
            model.rotary_emb = Qwen3RotaryEmbedding(model.config)
        kwargs = attention.model_inputs(model.config, attention_mask_BT=batch["attention_mask"], bidirectional=True)
        hidden = model(input_ids=batch["input_ids"], **kwargs).last_hidden_state
        weights = batch["attention_mask"][..., None].float()
        return (hidden * weights).sum(1) / weights.sum(1)

    with torch.no_grad():
        got = encoder(batch)
        assert torch.allclose(got, pooled(backbone), atol=1e-5)
        assert not torch.allclose(got, pooled(backbone, theta=1e6), atol=1e-3)  # the base matters


def test_image_inputs_get_qwen3_vl_3d_positions(encoder):
    wide = shape_image("blue", "circle")
    images = [shape_image("red", "square"), np.concatenate([wide, wide[:, :32]], axis=1)]  # 64 x 64, 64 x 96
    batch = encoder.prepare(["a red square", None], images=images)
    ids = encoder.position_ids(batch)
    vl = Qwen3VLModel(_vl_config())
    want, _ = vl.get_rope_index(batch["input_ids"], mm_token_type_ids=(batch["input_ids"] == encoder.ids["image"]).int(),
                                image_grid_thw=batch["image_grid_thw"], attention_mask=batch["attention_mask"])
    assert torch.equal(ids, want)
    assert not torch.equal(ids[1], ids[2])  # rows and columns differ: really 3-D
    with torch.no_grad():
        got = encoder(batch)
        with encoder.rotary.positions(want):
            assert torch.allclose(got, _pooled_with(encoder, batch, want), atol=1e-6)
        assert not torch.allclose(got, _pooled_with(encoder, batch, None), atol=1e-4)  # 1-D would differ


def _pooled_with(encoder, batch, ids_3BT):
    """The encoder's forward with the given rotary positions (None: 1-D) instead of its own."""
    original = encoder.position_ids
    encoder.position_ids = lambda _: ids_3BT
    try:
        return encoder(batch)
    finally:
        encoder.position_ids = original


def test_audio_inputs_get_qwen3_asr_1d_positions(encoder):
    batch = encoder.prepare(["a tone", None], audio=[tone("high", "short"), tone("low", "long")])
    assert encoder.position_ids(batch) is None
    mask = batch["attention_mask"]
    asr = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1).unsqueeze(0).expand(3, -1, -1)  # Qwen3-ASR get_rope_index
    with torch.no_grad():
        assert torch.allclose(encoder(batch), _pooled_with(encoder, batch, asr), atol=1e-6)


def test_bad_image_grids_are_one_line():
    ids = torch.tensor([[5, 9, 9, 9, 6]])
    with pytest.raises(BidirLMError, match=r"needs 4 placeholder tokens, the batch has 3"):
        image_positions(ids, torch.ones_like(ids), torch.tensor([[1, 4, 4]]), 9, 2)
    with pytest.raises(BidirLMError, match="more runs of image tokens than image grids"):
        image_positions(ids, torch.ones_like(ids), torch.zeros(0, 3, dtype=torch.long), 9, 2)
