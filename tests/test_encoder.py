"""Encoder: export round trip through SentenceTransformer and plain AutoModel, packing, prompts, MTEB, Lee score."""

import json

import numpy as np
import pytest
import torch

from bidirlm_pl.core import assets
from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.evaluation.harness import mteb_model
from bidirlm_pl.models.encoder import Encoder, read_encoder_config
from bidirlm_pl.stages.contrastive import ContrastiveStage

INSTRUCTION = "Represent the news article: "


def _texts():
    docs = assets.lee_documents()
    return [docs[0][:40], docs[1], "short", docs[2][:300], docs[3][:120], "x y z"]


@pytest.fixture(scope="module", params=["mean", "last", "weighted_mean"])
def exported(request, tmp_path_factory):
    torch.manual_seed(0)
    stage = ContrastiveStage("tiny-qwen3", pooling=request.param, export_max_length=96, query_instruction=INSTRUCTION)
    stage.configure_model()
    folder = tmp_path_factory.mktemp(f"enc-{request.param}") / "model"
    stage.export_hf(folder)
    return request.param, folder


def test_sentence_transformers_loads_the_export_and_matches_our_encoder(exported):
    from sentence_transformers import SentenceTransformer

    _, folder = exported
    assert json.loads((folder / "config.json").read_text())["is_causal"] is False
    st = SentenceTransformer(str(folder), device="cpu", trust_remote_code=False)
    enc = Encoder.from_pretrained(folder)
    texts = _texts()
    ours = enc.encode(texts, batch_size=4)
    theirs = st.encode(texts, batch_size=4)
    assert ours.shape == theirs.shape == (len(texts), 64)
    assert np.abs(ours - theirs).max() <= 1e-5
    assert np.allclose(np.linalg.norm(ours, axis=1), 1, atol=1e-5)
    # the query prompt is excluded from pooling the same way
    ours_q = enc.encode_queries(texts, batch_size=4)
    theirs_q = st.encode_query(texts, batch_size=4)
    assert np.abs(ours_q - theirs_q).max() <= 1e-5
    assert np.abs(ours_q - ours).max() > 1e-3
    assert np.abs(enc.encode_documents(texts, batch_size=4) - st.encode_document(texts, batch_size=4)).max() <= 1e-5


def test_plain_automodel_gives_the_same_embeddings(exported):
    from transformers import AutoModel, AutoTokenizer

    from bidirlm_pl.models.pooling import Pooling

    mode, folder = exported
    model = AutoModel.from_pretrained(folder).eval()  # no remote code: is_causal false is native
    tok = AutoTokenizer.from_pretrained(folder)
    texts = _texts()
    batch = tok(texts, padding=True, truncation=True, max_length=96, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    pooled = torch.nn.functional.normalize(Pooling(mode)(hidden, batch["attention_mask"]), dim=-1)
    ours = Encoder.from_pretrained(folder).encode(texts, batch_size=2)
    assert np.abs(pooled.numpy() - ours).max() <= 1e-5


def test_packed_encoding_equals_padded(exported):
    _, folder = exported
    enc = Encoder.from_pretrained(folder)
    texts = _texts()
    padded = enc.encode(texts, batch_size=3, pack=False)
    packed = enc.encode(texts, batch_size=3, pack=True)
    assert np.abs(padded - packed).max() <= 1e-5
    prompted = [enc.encode(texts, batch_size=3, pack=p, prompt=INSTRUCTION) for p in (False, True)]
    assert np.abs(prompted[0] - prompted[1]).max() <= 1e-5
    # order is the input order whatever the length sort did
    single = np.stack([enc.encode(t) for t in texts])
    assert np.abs(single - padded).max() <= 1e-5


def test_encode_rejects_non_strings(exported):
    enc = Encoder.from_pretrained(exported[1])
    with pytest.raises(BidirLMError, match="text 1 is a int"):
        enc.encode(["fine", 3])
    assert enc.encode([]).shape == (0, 64)


def test_progress_bar_for_long_inputs(exported, capsys):
    enc = Encoder.from_pretrained(exported[1])
    enc.encode(["a b c"] * 300, batch_size=64)
    assert "encode" in capsys.readouterr().err
    enc.encode(["a b c"] * 3)
    assert "encode" not in capsys.readouterr().err


def test_mteb_evaluate_runs_on_a_local_lee_task_and_agrees_with_lee_spearman(exported, tmp_path):
    import mteb

    from bidirlm_pl.evaluation.embedding import lee_spearman, lee_sts_task

    mode, folder = exported
    if mode != "mean":
        pytest.skip("one pooling mode is enough for MTEB")
    enc = Encoder.from_pretrained(folder)
    result = mteb.evaluate(mteb_model(enc), [lee_sts_task(n_docs=12)], cache=None, show_progress_bar=False)
    score = result.task_results[0].get_score()
    ours = lee_spearman(enc, n_docs=12)
    assert -1 <= ours <= 1
    assert abs(score - ours) < 1e-6


def test_a_sentence_transformers_folder_from_elsewhere_embeds_as_sentence_transformers(exported, tmp_path):
    """No bidirlm_encoder.json: pooling, include_prompt, normalisation, prompts and length come from the ST files."""
    import shutil

    from sentence_transformers import SentenceTransformer

    mode, folder = exported
    if mode != "mean":
        pytest.skip("one pooling mode is enough")
    foreign = tmp_path / "foreign"
    shutil.copytree(folder, foreign)
    (foreign / "bidirlm_encoder.json").unlink()
    pool = json.loads((foreign / "1_Pooling" / "config.json").read_text())
    (foreign / "1_Pooling" / "config.json").write_text(json.dumps({**pool, "include_prompt": True}))
    (foreign / "config_sentence_transformers.json").write_text(json.dumps(
        {"prompts": {"query": "query: ", "passage": "passage: "}, "default_prompt_name": None}))
    (foreign / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 24}))
    config = read_encoder_config(foreign)
    assert (config["pooling"], config["normalize"], config["include_prompt"], config["max_length"]) == \
        ("mean", True, True, 24)
    enc, st = Encoder.from_pretrained(foreign), SentenceTransformer(str(foreign), device="cpu")
    texts = _texts()
    assert np.abs(enc.encode_queries(texts) - st.encode_query(texts)).max() <= 1e-5
    assert np.abs(enc.encode_documents(texts) - st.encode_document(texts)).max() <= 1e-5  # "document": "" by default
    passages = enc.encode(texts, prompt_name="passage")
    assert np.abs(passages - st.encode(texts, prompt_name="passage")).max() <= 1e-5
    assert np.abs(passages - enc.encode(texts)).max() > 1e-3
    assert np.abs(enc.encode(texts) - st.encode(texts)).max() <= 1e-5
    (foreign / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": "cls"}))
    with pytest.raises(BidirLMError, match=r"pooling \['cls'\] is not one of"):
        read_encoder_config(foreign)
