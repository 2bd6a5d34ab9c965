"""Pairs data: JSONL/parquet/datasets rows, SimCSE and halves from raw text, validation errors, mixing, prefixes."""

import json

import pytest
import torch

from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.data.pairs import PairsDataModule, PairSource, SourceBatches, load_rows


def _jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def _rows(n=12, negs=1):
    return [{"anchor": f"question {i} about topic {i}", "positive": f"answer {i} on topic {i}",
             "negatives": [f"unrelated text {i} {k}" for k in range(negs)]} for i in range(n)]


def test_jsonl_parquet_and_datasets_give_the_same_rows(tmp_path):
    import datasets

    rows = _rows()
    jsonl = _jsonl(tmp_path / "p.jsonl", rows)
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "p.parquet"))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    expected = [{"anchor": r["anchor"], "positive": r["positive"], "negatives": r["negatives"]} for r in rows]
    for spec in (PairSource(name="j", path=jsonl, num_negatives=1),
                 PairSource(name="p", path=str(tmp_path / "p.parquet"), num_negatives=1),
                 PairSource(name="d", path=str(tmp_path / "saved"), num_negatives=1),
                 PairSource(name="h", kind="hf", dataset="json", data_files=[jsonl], num_negatives=1)):
        assert load_rows(spec) == expected


def test_custom_field_names_and_single_negative_column(tmp_path):
    path = _jsonl(tmp_path / "t.jsonl", [{"q": "a", "d": "b", "neg": "c"}])
    rows = load_rows(PairSource(name="t", path=path, anchor_field="q", positive_field="d",
                                negatives_field="neg", num_negatives=1))
    assert rows == [{"anchor": "a", "positive": "b", "negatives": ["c"]}]


@pytest.mark.parametrize("row, message", [
    ({"positive": "b"}, "source 'bad' row 1 has no 'anchor'"),
    ({"anchor": "a"}, "source 'bad' row 1 has no 'positive'"),
    ({"anchor": "  ", "positive": "b"}, "source 'bad' row 1 has an empty 'anchor'"),
    ({"anchor": "a", "positive": ""}, "source 'bad' row 1 has an empty 'positive'"),
])
def test_bad_rows_name_the_row(tmp_path, row, message):
    path = _jsonl(tmp_path / "bad.jsonl", [{"anchor": "x", "positive": "y"}, row])
    with pytest.raises(BidirLMError, match=message) as err:
        load_rows(PairSource(name="bad", path=path))
    assert "\n" not in str(err.value)


def test_varying_negative_count_when_fixed_names_the_row(tmp_path):
    rows = _rows(4, negs=2)
    rows[2]["negatives"] = ["only one"]
    path = _jsonl(tmp_path / "n.jsonl", rows)
    with pytest.raises(BidirLMError, match="source 'n' row 2 has 1 hard negatives; num_negatives is fixed at 2"):
        load_rows(PairSource(name="n", path=path, num_negatives=2))
    rows[2]["negatives"] = ["a", "b", "c"]
    path = _jsonl(tmp_path / "n.jsonl", rows)
    with pytest.raises(BidirLMError, match="row 2 has 3 hard negatives"):
        load_rows(PairSource(name="n", path=path, num_negatives=2))
    # not fixed: extra negatives are cut to num_negatives
    assert all(len(r["negatives"]) == 2 for r in load_rows(PairSource(name="n", path=path, num_negatives=2,
                                                                       fixed_negatives=False)))


def test_simcse_and_halves_from_raw_text(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text("First sentence here. Second one follows. A third.\n\nOnly one sentence\n")
    simcse = load_rows(PairSource(name="s", mode="simcse", path=str(path)))
    assert [r["anchor"] for r in simcse] == [r["positive"] for r in simcse]
    assert len(simcse) == 2
    halves = load_rows(PairSource(name="h", mode="halves", path=str(path)))
    assert halves == [{"anchor": "First sentence here.", "positive": "Second one follows. A third.", "negatives": []}]
    lee = load_rows(PairSource(name="lee", mode="simcse", kind="lee", max_rows=7))
    assert len(lee) == 7


def test_batches_come_from_one_source_with_weighted_frequency(tmp_path):
    a = [{"anchor": f"a{i}", "positive": f"a{i}+", "negatives": []} for i in range(40)]
    b = [{"anchor": f"b{i}", "positive": f"b{i}+", "negatives": []} for i in range(40)]
    srcs = [PairSource(name="a", weight=3.0), PairSource(name="b", weight=1.0)]
    ds = SourceBatches(srcs, [a, b], collator=lambda rows, instr: {"rows": rows}, batch_size=4, seed=0)
    counts = [0, 0]
    for _ in range(20):  # 20 epochs x 20 batches
        for s, idx in ds.plan(ds.epoch):
            counts[s] += 1
            assert len(idx) == 4
        ds.epoch += 1
    assert 0.68 < counts[0] / sum(counts) < 0.82
    for batch in ds:
        names = {r["anchor"][0] for r in batch["rows"]}
        assert len(names) == 1 and batch["source"] == "ab".index(names.pop())
    # two DDP ranks see disjoint batches, the same number each
    r0 = SourceBatches(srcs, [a, b], lambda rows, i: {"rows": rows}, 4, seed=0, rank=0, world_size=2)
    r1 = SourceBatches(srcs, [a, b], lambda rows, i: {"rows": rows}, 4, seed=0, rank=1, world_size=2)
    b0, b1 = list(r0), list(r1)
    assert len(b0) == len(b1) == 10
    assert all(x["rows"] != y["rows"] for x, y in zip(b0, b1))


def test_datamodule_tokenizes_with_instruction_excluded_from_pooling(tmp_path, tiny_qwen3):
    path = _jsonl(tmp_path / "p.jsonl", _rows(8, negs=2))
    dm = PairsDataModule(tokenizer=str(tiny_qwen3), batch_size=4, max_length=32, sources=[
        PairSource(name="p", path=path, num_negatives=2, query_instruction="Instruct: find the answer\nQuery: ")])
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["query"]["input_ids"].shape[0] == 4
    assert batch["negatives"]["input_ids"].shape[0] == 8 and batch["n_negatives"] == 2
    tok = dm.collator.tokenizer
    prefix = len(tok("Instruct: find the answer\nQuery: ")["input_ids"])
    q = batch["query"]
    assert torch.all(q["pool_mask"][:, :prefix] == 0)
    assert torch.equal(q["pool_mask"][:, prefix:], q["attention_mask"][:, prefix:])
    assert torch.equal(batch["positive"]["pool_mask"], batch["positive"]["attention_mask"])
    text = tok.decode(q["input_ids"][0][q["attention_mask"][0].bool()], skip_special_tokens=True)
    assert text.startswith("Instruct: find the answer")


def test_datamodule_config_errors():
    with pytest.raises(BidirLMError, match="at least one source"):
        PairsDataModule(tokenizer="tiny-qwen3", sources=[])
    with pytest.raises(BidirLMError, match="mode 'triplets'"):
        load_rows(PairSource(name="x", mode="triplets", kind="lee"))
    with pytest.raises(BidirLMError, match="weight 0"):
        load_rows(PairSource(name="x", mode="simcse", kind="lee", weight=0))


def test_validation_sources_and_held_out_fraction(tiny_qwen3):
    dm = PairsDataModule(tokenizer=str(tiny_qwen3), batch_size=4, max_length=16,
                         sources=[PairSource(name="s", mode="simcse", kind="lee", max_rows=20)],
                         val_sources=[PairSource(name="v", mode="halves", kind="lee_documents", max_rows=10)])
    dm.setup("fit")
    val = list(dm.val_dataloader())
    assert [b["query"]["input_ids"].shape[0] for b in val] == [4, 4, 2]  # in order, last batch kept
    assert sum(len(r) for r in dm.train_rows) == 20
    held = PairsDataModule(tokenizer=str(tiny_qwen3), batch_size=4, max_length=16, val_fraction=0.25,
                           sources=[PairSource(name="s", mode="simcse", kind="lee", max_rows=20)])
    held.setup("fit")
    train_texts = {r["anchor"] for r in held.train_rows[0]}
    val_texts = {r["anchor"] for r in held.val_rows[0]}
    assert len(val_texts) == 5 and len(train_texts) == 15 and not train_texts & val_texts


def test_validation_batches_keep_their_own_sources_instruction_when_a_source_holds_none_out(tiny_qwen3):
    """A one-row source holds no row out: validation of the next source still uses that source's instruction."""
    instruction = "Instruct: find the article\nQuery: "
    dm = PairsDataModule(tokenizer=str(tiny_qwen3), batch_size=4, max_length=48, val_fraction=0.25, sources=[
        PairSource(name="one", mode="simcse", kind="lee", max_rows=1),
        PairSource(name="two", mode="simcse", kind="lee", max_rows=12, query_instruction=instruction)])
    dm.setup("fit")
    assert [len(r) for r in dm.val_rows] == [3]
    val = list(dm.val_dataloader())
    assert [b["query"]["input_ids"].shape[0] for b in val] == [3]
    tok, query = dm.collator.tokenizer, val[0]["query"]
    prefix = dm.collator.prefix_length(instruction)
    assert prefix > 0 and torch.all(query["pool_mask"][:, :prefix] == 0)
    for ids, mask in zip(query["input_ids"], query["attention_mask"]):
        assert tok.decode(ids[mask.bool()], skip_special_tokens=True).startswith("Instruct: find the article")


def test_validation_over_two_ranks_is_each_ranks_slice_of_every_global_batch(tiny_qwen3):
    """2 ranks x 4 rows: global batches of 8 rows per source in order; a tail of 5 gives 2 rows each (1 dropped,
    equal shapes for InfoNCE's gather), a tail of 1 gives none; both ranks run the same number of steps."""
    from types import SimpleNamespace

    dm = PairsDataModule(tokenizer=str(tiny_qwen3), batch_size=4, max_length=32, val_sources=[
        PairSource(name="a", mode="simcse", kind="lee", max_rows=13),
        PairSource(name="b", mode="simcse", kind="lee_documents", max_rows=9, query_instruction="Q: ")], sources=[
        PairSource(name="s", mode="simcse", kind="lee", max_rows=8)])
    dm.setup("fit")
    seen = []
    for rank in range(2):
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        batches = list(dm.val_dataloader())
        a, b = ([r["anchor"] for r in rows] for rows in dm.val_rows)
        expected = [a[0:4], a[8:10], b[0:4]] if rank == 0 else [a[4:8], a[10:12], b[4:8]]
        decoded = [[dm.collator.tokenizer.decode(ids[m.bool()], skip_special_tokens=True).removeprefix("Q: ")
                    for ids, m in zip(x["query"]["input_ids"], x["query"]["attention_mask"])] for x in batches]
        assert [x["source"] for x in batches] == [0, 0, 1]
        assert [[t[:30] for t in batch] for batch in decoded] == [[t[:30] for t in rows] for rows in expected]
        seen.append(len(batches))
    assert seen == [3, 3]
    dm.trainer = None
    assert [x["query"]["input_ids"].shape[0] for x in dm.val_dataloader()] == [4, 4, 4, 1, 4, 4, 1]  # one process
