"""The compare suite: metrics against hand-computed values, task data, config errors, the report files."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from bidirlm_pl import BidirLMError
from bidirlm_pl.core import assets
from bidirlm_pl.evaluation import metrics, task_data
from bidirlm_pl.evaluation.compare import compare
from bidirlm_pl.evaluation.embedding import spearman
from bidirlm_pl.evaluation.suite import TaskSpec, default_tasks, load_suite, model_embedder
from bidirlm_pl.moe.modes import load_any
from bidirlm_pl.stages.contrastive import ContrastiveStage

REPO = Path(__file__).resolve().parents[1]
INSTRUCTION = "Represent the news article: "


def test_retrieval_recall_and_ndcg_equal_hand_computed_values():
    scores = [[0.9, 0.5, 0.1],   # query 0: relevant document 1 ranks second
              [0.8, 0.7, 0.6]]   # query 1: relevant documents 0 and 2 rank first and third
    relevant = [[False, True, False], [True, False, True]]
    out = metrics.retrieval_scores(scores, relevant)
    assert out["recall@1"] == pytest.approx((0 + 0.5) / 2)
    assert out["recall@10"] == pytest.approx(1.0)
    ndcg0 = (1 / math.log2(3)) / 1.0
    ndcg1 = (1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3))
    assert out["ndcg@10"] == pytest.approx((ndcg0 + ndcg1) / 2, rel=1e-6)


def test_probe_accuracy_separates_and_fails_as_expected():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 5))
    separable = (x[:, 0] > 0).astype(int)
    x[:, 0] += np.where(separable == 1, 2.0, -2.0)  # a margin: every fold's probe must separate it
    assert metrics.probe_accuracy(x, separable) == pytest.approx(1.0)
    noise_labels = rng.integers(0, 2, size=40)
    assert metrics.probe_accuracy(rng.normal(size=(40, 5)), noise_labels) < 0.8


def test_v_measure_equals_the_hand_computed_entropies():
    # two well-separated groups of 4 points; labels: group A all "x", group B two "x" and two "y"
    a = np.array([[1.0, 0.0]] * 4) + 0.01 * np.arange(4)[:, None]
    b = np.array([[0.0, 1.0]] * 4) + 0.01 * np.arange(4)[:, None]
    labels = ["x"] * 4 + ["x", "x", "y", "y"]
    # clusters K = {A, B}; classes C = {x: 6, y: 2}
    H = lambda ps: -sum(p * math.log(p) for p in ps if p > 0)
    h_c = H([6 / 8, 2 / 8])
    h_c_given_k = 0.5 * 0 + 0.5 * H([0.5, 0.5])
    h_k = H([0.5, 0.5])
    h_k_given_c = (6 / 8) * H([4 / 6, 2 / 6]) + (2 / 8) * 0
    homogeneity, completeness = 1 - h_c_given_k / h_c, 1 - h_k_given_c / h_k
    expected = 2 * homogeneity * completeness / (homogeneity + completeness)
    assert metrics.cluster_v_measure(np.vstack([a, b]), labels) == pytest.approx(expected, rel=1e-9)
    assert metrics.cluster_v_measure(np.vstack([a, b]), ["p"] * 4 + ["q"] * 4) == pytest.approx(1.0)


def test_choice_logprobs_equal_full_logits(tiny_path):
    from bidirlm_pl import load_backbone
    from bidirlm_pl.evaluation.generation import continuation_logprobs, multiple_choice_accuracy

    model, tok = load_backbone(tiny_path, head="causal_lm", bidirectional=False)
    model.eval()
    context, choices = "Athens is the capital of", [" Greece", " the old kingdom of Macedon"]
    reference = []
    for choice in choices:
        ids = tok(context)["input_ids"]
        n = len(ids)
        ids = ids + tok(choice, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        reference.append(float(sum(lp[i - 1, ids[i]] for i in range(n, len(ids)))))
    scored = continuation_logprobs(model, tok, [(context, choice) for choice in choices])
    assert scored == pytest.approx(reference, rel=1e-4, abs=1e-4)
    best = int(np.argmax(reference))
    assert multiple_choice_accuracy(model, tok, [{"context": context, "choices": choices, "answer": best}]) == 1.0
    with pytest.raises(BidirLMError, match="answer 5 is not an index"):
        multiple_choice_accuracy(model, tok, [{"context": context, "choices": choices, "answer": 5}])


def test_builtin_data_shapes():
    news = task_data.builtin("newsgroups")
    assert len(news) == 186 and {r["label"] for r in news} == {"alt.atheism", "sci.space"}
    assert all(not r["text"].startswith(("Newsgroups:", "Path:", "Xref:")) for r in news)
    polarity = task_data.builtin("polarity")
    assert len(polarity) == 200 and sorted({r["label"] for r in polarity}) == ["neg", "pos"]
    capitals = task_data.builtin("capitals")
    assert capitals[0]["context"] == "Abuja is the capital of"
    assert capitals[0]["choices"][capitals[0]["answer"]] == " Nigeria"
    assert len(task_data.builtin("lee-sts")) == 1225
    with pytest.raises(BidirLMError, match="unknown built-in evaluation data 'nope'"):
        task_data.builtin("nope")


def test_jsonl_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"query": "a", "document": "b"}\nnot json\n')
    with pytest.raises(BidirLMError, match=r"pairs.jsonl:2: not JSON"):
        task_data.read_jsonl(bad, task_data.FIELDS["retrieval"])
    bad.write_text('{"query": "a"}\n')
    with pytest.raises(BidirLMError, match=r"pairs.jsonl:1: record has no \['document'\]"):
        task_data.read_jsonl(bad, task_data.FIELDS["retrieval"])
    bad.write_text("\n")
    with pytest.raises(BidirLMError, match="no records"):
        task_data.read_jsonl(bad, task_data.FIELDS["retrieval"])
    bad.write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(BidirLMError, match="not UTF-8"):
        task_data.read_jsonl(bad, ("text",))
    with pytest.raises(BidirLMError, match="does not exist"):
        task_data.read_jsonl(tmp_path / "missing.jsonl", ("text",))


@pytest.mark.parametrize("entry, message", [
    ({"name": "t", "kind": "sts", "data": "lee-sts", "path": "x.jsonl"}, "give 'data'.*or 'path'.*not both"),
    ({"name": "t", "kind": "tagging"}, "unknown kind 'tagging'"),
    ({"name": "t", "kind": "clustering", "data": "polarity"}, "does not fit kind 'clustering'"),
    ({"name": "t", "kind": "sts", "prompts": ["x"]}, "'prompts' belongs to continuation"),
    ({"name": "t", "kind": "continuation", "data": "lee"}, "takes 'prompts', not data"),
    ({"name": "t", "kind": "perplexity", "domain": "inside"}, "domain 'inside' is for perplexity tasks, one of"),
    ({"name": "t", "kind": "sts", "domain": "out"}, "domain 'out' is for perplexity tasks"),
])
def test_contradictory_task_fields_are_one_line_errors(entry, message):
    with pytest.raises(BidirLMError, match=message):
        TaskSpec(**entry)


def test_suite_file_errors(tmp_path):
    path = tmp_path / "suite.yaml"
    path.write_text("tasks:\n  - {name: a, kind: sts, colour: red}\n")
    with pytest.raises(BidirLMError, match=r"task 'a' has unknown keys \['colour'\]"):
        load_suite(path)
    path.write_text("tasks:\n  - {name: a, kind: perplexity, limt: 3}\n")
    with pytest.raises(BidirLMError, match=r"unknown keys \['limt'\]; did you mean 'limit'\?"):
        load_suite(path)
    path.write_text("tasks: []\n")
    with pytest.raises(BidirLMError, match="lists no tasks"):
        load_suite(path)
    with pytest.raises(BidirLMError, match="does not exist"):
        load_suite(tmp_path / "missing.yaml")


def test_default_suite_is_the_shipped_default_config():
    shipped = yaml.safe_load((REPO / "configs/compare/default.yaml").read_text())
    assert [TaskSpec(**t) for t in shipped["tasks"]] == [TaskSpec(**t) for t in default_tasks()]
    for path in (REPO / "configs/compare").glob("*.yaml"):
        load_suite(path)


def test_compare_writes_table_json_and_plot(tiny_qwen3, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"query": f"q{i}", "document": f"document number {i}"}) + "\n"
                             for i in range(6)))
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({"max_length": 32, "tasks": [
        {"name": "ppl", "kind": "perplexity", "limit": 4},
        {"name": "mine", "kind": "retrieval", "path": str(pairs)},
        {"name": "topics", "kind": "classification", "data": "newsgroups", "limit": 20},
    ]}))
    out = tmp_path / "report"
    results = compare([str(tiny_qwen3), str(tiny_qwen3)], ["causal", "bi"], attention=["causal", "bidirectional"],
                      config=str(suite), output=str(out), progress=False)
    report = json.loads((out / "report.json").read_text())
    assert [m["name"] for m in report["models"]] == ["causal", "bi"]
    assert report["tasks"][1]["source"] == str(pairs)
    causal, bi = results
    assert causal.results["ppl"] == bi.results["ppl"]              # generation ignores the embedding attention
    assert causal.results["mine"]["documents"] == 6
    assert causal.results["mine"] != bi.results["mine"] or causal.results["topics"] != bi.results["topics"]
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert "| causal | causal |" in (out / "report.md").read_text()
    with pytest.raises(BidirLMError, match="--attention has 1 entries for 2 models"):
        compare([str(tiny_qwen3), str(tiny_qwen3)], attention=["causal"], config=str(suite))
    with pytest.raises(BidirLMError, match="already exists"):
        compare([str(tiny_qwen3)], config=str(suite), output=str(out))


def test_wiki_is_out_of_domain_english_with_markup_stripped():
    from bidirlm_pl.evaluation.task_data import builtin

    records = builtin("wiki")
    assert len(records) == 96 and records[0]["text"].startswith("Anarchism is a political philosophy")
    text = " ".join(r["text"] for r in records)
    assert not any(mark in text for mark in ("[[", "]]", "{{", "''", "<ref"))
    assert all(500 <= len(r["text"]) <= 1000 for r in records)


@pytest.fixture(scope="module", params=[("last", None), ("mean", INSTRUCTION)], ids=["last-token", "instructed"])
def contrastive_export(request, tmp_path_factory):
    """A tiny contrastive encoder as the stage exports it: last-token pooling, or mean pooling with a query prompt."""
    pooling, instruction = request.param
    torch.manual_seed(0)
    stage = ContrastiveStage("tiny-qwen3", pooling=pooling, export_max_length=96, query_instruction=instruction)
    stage.configure_model()
    folder = tmp_path_factory.mktemp(f"export-{pooling}") / "hf"
    stage.export_hf(folder)
    return folder


def _queries_and_documents():
    docs = assets.lee_documents()
    queries = ["what burned near Sydney?", "rates rose again", docs[5][:60], "letters"]
    documents = [docs[0], "short", docs[2][:300], "x y z"]  # docs[0] is longer than the export's 96 tokens
    return queries, documents


def test_compare_embeds_an_export_as_sentence_transformers_does(contrastive_export):
    """compare's embeddings of an export == SentenceTransformer(folder)'s: its pooling, normalisation and token
    limit; the query prompt on queries only (documents and symmetric tasks get none)."""
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(contrastive_export), device="cpu")
    model, tok = load_any(str(contrastive_export))  # as compare loads it: a causal LM over the exported decoder
    embed = model_embedder(str(contrastive_export), model, tok, bidirectional=True, batch_size=3)
    queries, documents = _queries_and_documents()
    assert np.abs(embed(queries, 256, prompt_name="query") - st.encode_query(queries)).max() <= 1e-5
    assert np.abs(embed(documents, 256, prompt_name="document") - st.encode_document(documents)).max() <= 1e-5
    assert np.abs(embed(documents, 256) - st.encode(documents)).max() <= 1e-5
    assert np.abs(embed(documents, 32) - st.encode(documents)).max() > 1e-3  # a shorter task limit still cuts


def test_compare_scores_an_export_from_the_sentence_transformers_embeddings(contrastive_export, tmp_path):
    """compare's retrieval and STS scores of an export are those of SentenceTransformer(folder)'s embeddings."""
    from sentence_transformers import SentenceTransformer

    queries, documents = _queries_and_documents()
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"query": q, "document": d}) + "\n" for q, d in zip(queries, documents)))
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({"max_length": 256, "tasks": [
        {"name": "mine", "kind": "retrieval", "path": str(pairs)},
        {"name": "lee-sts", "kind": "sts", "limit": 45},
    ]}))
    [result] = compare([str(contrastive_export)], config=str(suite), progress=False)
    st = SentenceTransformer(str(contrastive_export), device="cpu")
    relevant = np.eye(len(queries), len(documents), dtype=bool)
    expected = metrics.retrieval_scores(metrics.cosine_matrix(st.encode_query(queries), st.encode_document(documents)),
                                        relevant)
    assert {k: result.results["mine"][k] for k in expected} == pytest.approx(expected, abs=1e-6)
    records = task_data.builtin("lee-sts")[:45]
    a, b = (st.encode([r[k] for r in records]) for k in ("text1", "text2"))
    cos = np.sum(metrics.unit_rows(a) * metrics.unit_rows(b), axis=1)
    assert result.results["lee-sts"]["spearman"] == pytest.approx(spearman(cos, [r["score"] for r in records]), abs=1e-6)
