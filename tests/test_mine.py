"""``bidirlm mine``: the chosen negatives equal a brute-force reference across shards, a killed run resumes from its
shards to the same result, the output is a pair source as given, bad input is one line."""

import json
import re
import shutil
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from bidirlm_pl.cli.main import main
from bidirlm_pl.core import assets
from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.data.pairs import PairsDataModule, PairSource, load_rows
from bidirlm_pl.evaluation.mining import MiningSpec, mine
from bidirlm_pl.evaluation.mining_filters import NegativeRule
from bidirlm_pl.models.encoder import Encoder

SHARD = 7  # smaller than the corpus and than range_max: the top-k merges across shards


def _pairs_and_corpus(tmp):
    """24 rows (two share an anchor, one positive repeats) and an extra corpus with a duplicate of a positive, a
    query's own text and a repeated text."""
    docs = [d for d in assets.lee_background() if len(d) > 300][:40]
    rows = [{"anchor": d[:120], "positive": d[120:400], "negatives": []} for d in docs[:22]]
    rows.append({"anchor": rows[0]["anchor"], "positive": docs[22][120:400]})  # a second positive of query 0
    rows.append({"anchor": docs[23][:120], "positive": rows[5]["positive"]})  # a positive shared by two queries
    extra = [d[:280] for d in docs[24:40]] + [rows[3]["positive"], rows[7]["anchor"], docs[24][:280]]
    pairs, corpus = tmp / "pairs.jsonl", tmp / "corpus.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in extra))
    return rows, extra, pairs, corpus


@pytest.fixture(scope="module")
def mined(tmp_path_factory, tiny_qwen3):
    """One complete run with its shard cache kept: the data, the spec and the report."""
    tmp = tmp_path_factory.mktemp("mine")
    rows, extra, pairs, corpus = _pairs_and_corpus(tmp)
    spec = MiningSpec(model=str(tiny_qwen3), pairs=str(pairs), corpus=str(corpus), output=str(tmp / "out"),
                      num_negatives=3, range_min=1, range_max=12, relative_margin=None, absolute_margin=-0.02,
                      shard_size=SHARD, batch_size=4, max_length=32, cache_dir=str(tmp / "cache"), keep_cache=True,
                      progress=False)
    report = mine(spec)
    return {"tmp": tmp, "rows": rows, "extra": extra, "spec": spec, "report": report}


def _read(folder):
    return [json.loads(line) for line in (folder / "pairs.jsonl").read_text().splitlines()]


def _cached(cache, name):
    files = sorted(cache.glob(f"{name}-*.safetensors"))
    return torch.cat([load_file(str(f))["embeddings"] for f in files]), len(files)


def _reference(rows, corpus, queries_QD, corpus_CD, rule):
    """The rules in plain Python over the full score matrix."""
    anchors = list(dict.fromkeys(r["anchor"] for r in rows))
    full = torch.nn.functional.normalize(queries_QD, dim=-1) @ torch.nn.functional.normalize(corpus_CD, dim=-1).T
    chosen = []
    for row in rows:
        q = anchors.index(row["anchor"])
        equal = {r["positive"] for r in rows if r["anchor"] == row["anchor"]} | {row["anchor"]}
        positive = full[q, corpus.index(row["positive"])].item()
        ranked = sorted(range(len(corpus)), key=lambda c: -full[q, c].item())
        ranked = [c for c in ranked if corpus[c] not in equal]
        kept = []
        for c in ranked[rule.range_min: rule.range_max]:
            score = full[q, c].item()
            if rule.relative_margin is not None and not score < rule.relative_margin * positive:
                continue
            if rule.absolute_margin is not None and not score < positive - rule.absolute_margin:
                continue
            kept.append(corpus[c])
            if len(kept) == rule.num_negatives:
                break
        chosen.append(kept)
    return chosen


@pytest.mark.parametrize("margins", [(None, -0.02), (0.97, None), (0.99, 0.01)])
def test_negatives_equal_a_brute_force_reference_across_shards(mined, tiny_qwen3, margins):
    rows, extra, spec = mined["rows"], mined["extra"], mined["spec"]
    cache = mined["tmp"] / "cache"
    spec = replace(spec, relative_margin=margins[0], absolute_margin=margins[1],
                   output=str(mined["tmp"] / f"out-{margins}"))
    report = mine(spec)  # same embeddings (the key holds no rule): every shard is reused
    assert report["shards"]["corpus"]["embedded"] == 0 and report["shards"]["queries"]["embedded"] == 0
    corpus = list(dict.fromkeys([r["positive"] for r in rows] + extra))
    assert [t for f in sorted(cache.glob("corpus-*.texts.jsonl"))
            for t in map(json.loads, f.read_text().splitlines())] == corpus
    queries_QD, n_query_shards = _cached(cache, "queries")
    corpus_CD, n_corpus_shards = _cached(cache, "corpus")
    assert n_corpus_shards == -(-len(corpus) // SHARD) > 1 and n_query_shards > 1
    encoder = Encoder.from_pretrained(tiny_qwen3)  # the shards hold the encoder's own embeddings
    direct = encoder.encode(corpus[:5], batch_size=2, max_length=32, normalize=True, convert_to_numpy=False)
    assert torch.allclose(direct, torch.nn.functional.normalize(corpus_CD[:5], dim=-1), atol=1e-4)

    expected = _reference(rows, corpus, queries_QD, corpus_CD, spec.rule)
    written = _read(mined["tmp"] / f"out-{margins}")
    assert [r["negatives"] for r in written] == expected
    assert [(r["anchor"], r["positive"]) for r in written] == [(r["anchor"], r["positive"]) for r in rows]
    assert any(len(n) == 3 for n in expected) and any(len(n) < 3 for n in expected)
    assert report["rows"]["incomplete"] == sum(len(n) < 3 for n in expected)
    assert report["corpus"] == {"size": len(corpus), "positives": 23, "extra": 17, "extra_duplicates_skipped": 2}
    assert report["dropped"]["same_text"] > 0 and report["dropped"]["rank"] == len(rows)
    for row in written:
        assert row["negative_scores"] == sorted(row["negative_scores"], reverse=True)
    report_md = (mined["tmp"] / f"out-{margins}" / "report" / "report.md").read_text()
    assert "kept negatives" in report_md and "dropped (rank)" in report_md


def test_a_killed_run_resumes_from_its_shards_to_the_same_result(mined, monkeypatch):
    spec = replace(mined["spec"], output=str(mined["tmp"] / "killed"), cache_dir=str(mined["tmp"] / "killed-cache"),
                   keep_cache=False)
    n_query_shards = mined["report"]["shards"]["queries"]["total"]
    calls = []
    original = Encoder.encode

    def dies_after_the_first_corpus_shard(self, texts, *args, **kwargs):
        if len(calls) == n_query_shards + 1:
            raise KeyboardInterrupt("killed")
        calls.append(len(texts))
        return original(self, texts, *args, **kwargs)

    monkeypatch.setattr(Encoder, "encode", dies_after_the_first_corpus_shard)
    with pytest.raises(KeyboardInterrupt):
        mine(spec)
    cache = mined["tmp"] / "killed-cache"
    assert not (mined["tmp"] / "killed").exists() and not list(mined["tmp"].glob(".killed.tmp-*"))
    assert len(list(cache.glob("queries-*.safetensors"))) == n_query_shards
    assert [p.name for p in cache.glob("corpus-*.safetensors")] == ["corpus-00000.safetensors"]

    monkeypatch.setattr(Encoder, "encode", original)
    report = mine(spec)
    total = mined["report"]["shards"]["corpus"]["total"]
    assert report["shards"]["queries"] == {"reused": n_query_shards, "embedded": 0, "total": n_query_shards}
    assert report["shards"]["corpus"] == {"reused": 1, "embedded": total - 1, "total": total}
    assert _read(mined["tmp"] / "killed") == _read(mined["tmp"] / "out")  # as the uninterrupted run
    assert not cache.exists()  # a complete run removes its cache


def test_a_changed_setting_does_not_reuse_shards(mined):
    spec = replace(mined["spec"], output=str(mined["tmp"] / "other-prompt"), query_prompt="Query: ",
                   cache_dir=str(mined["tmp"] / "cache-copy"))
    shutil.copytree(mined["tmp"] / "cache", mined["tmp"] / "cache-copy")
    report = mine(spec)
    assert report["shards"]["queries"]["reused"] == 0 and report["shards"]["corpus"]["reused"] == 0


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_the_output_is_a_pair_source_as_given(mined, tiny_qwen3, fmt, capsys):
    out = mined["tmp"] / f"given-{fmt}"
    code = main(["mine", "--model", str(tiny_qwen3), "--pairs", str(mined["tmp"] / "pairs.jsonl"),
                 "--corpus", str(mined["tmp"] / "corpus.jsonl"), "--output", str(out), "--num-negatives", "2",
                 "--range-max", "12", "--relative-margin", "none", "--absolute-margin", "-0.5", "--drop-incomplete",
                 "--shard-size", str(SHARD), "--batch-size", "4", "--max-length", "32", "--format", fmt,
                 "--cache-dir", str(mined["tmp"] / "cache"), "--keep-cache", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert "mined" in capsys.readouterr().out
    rows = load_rows(PairSource(name="mined", path=str(out), num_negatives=2))
    assert len(rows) == json.loads((out / "report" / "report.json").read_text())["rows"]["written"] > 4
    assert all(len(r["negatives"]) == 2 for r in rows)
    dm = PairsDataModule(tokenizer=str(tiny_qwen3), batch_size=4, max_length=32,
                         sources=[{"name": "mined", "path": str(out), "num_negatives": 2}])
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["n_negatives"] == 2 and batch["negatives"]["input_ids"].shape[0] == 4 * 2


@pytest.mark.parametrize("change, message", [
    ({"num_negatives": 0}, "num_negatives 0 must be >= 1"),
    ({"relative_margin": 1.5}, "relative_margin 1.5 must be in (0, 1]"),
    ({"absolute_margin": 3.0}, "absolute_margin 3.0 must be in [-1, 1]"),
    ({"range_min": 10, "range_max": 10}, "range_max 10 must be >= range_min 10 + num_negatives"),
    ({"model": "no-such-model"}, "model path 'no-such-model' does not exist"),
    ({"pairs": "missing.jsonl"}, "--pairs file 'missing.jsonl' does not exist"),
    ({"pairs": "{paht: x.jsonl}"}, "--pairs: 'paht' is not a PairSource field"),
    ({"pairs": "EMPTY"}, "is empty; expected JSONL lines"),
    ({"format": "csv"}, "format 'csv' is not one of"),
    ({"output": "EXISTS"}, "already exists; pass --overwrite"),
])
def test_bad_input_is_one_line(tmp_path, tiny_qwen3, change, message):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "exists").mkdir()
    change = {k: {"EMPTY": str(tmp_path / "empty.jsonl"), "EXISTS": str(tmp_path / "exists")}.get(v, v)
              for k, v in change.items()}
    spec = MiningSpec(model=str(tiny_qwen3), pairs="lee", output=str(tmp_path / "out"), progress=False)
    with pytest.raises(BidirLMError, match=re.escape(message)) as info:
        mine(replace(spec, **change))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_bad_flags_are_one_line_errors(capsys):
    assert main(["mine", "--model", "tiny-qwen3", "--pairs", "lee", "--output", "x", "--relative-margin", "a"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "'a' is not a number or 'none'" in err
    with pytest.raises(BidirLMError, match="num_negatives 1 must be >= 1|range_max"):
        NegativeRule(num_negatives=1, range_min=0, range_max=0).check()
