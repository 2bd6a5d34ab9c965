"""Issue 35: the built-in text families (held-out vs training passages), confident routing, the stage-2 mixture,
compare's per-family ratios and the sweep benchmark, on tiny models."""

import importlib.util
import json
import struct
import zlib
from pathlib import Path

import pytest
import torch
import yaml

from bidirlm_pl import load_backbone, moe
from bidirlm_pl.core.assets import families
from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.data.sources import SourceSpec, open_source
from bidirlm_pl.evaluation.compare import compare
from bidirlm_pl.evaluation.suite import TaskSpec, load_suite
from bidirlm_pl.moe import UBMoEStage2, UBMoETextData
from bidirlm_pl.moe.ffn import UniBiFFN, check_confidence
from bidirlm_pl.moe.modes import load_any, split_routing

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "configs/compare/ood-families.yaml"
TINY_SUITE = REPO / "configs/compare/ood-families-tiny.yaml"


def _spanish_installed() -> bool:
    return any((r / "modules/texts/ztext" / families.SPANISH_MODULE / "nt.bzv").is_file()
               for r in families.sword_roots())


AVAILABLE = [name for name in families.FAMILIES if name != "spanish-bible" or _spanish_installed()]


# ------------------------------------------------------------------ the families

@pytest.mark.parametrize("name", AVAILABLE)
def test_family_is_deterministic_and_held_out_documents_never_train(name):
    first = {split: families.family_passages(name + suffix, split)
             for suffix in ("", "-short") for split in families.SPLITS}
    documents = families.family_documents(name)
    families.family_documents.cache_clear()
    families.family_passages.cache_clear()
    again = {split: families.family_passages(name + suffix, split)
             for suffix in ("", "-short") for split in families.SPLITS}
    assert again == first and families.family_documents(name) == documents
    held_units = {u for i, doc in enumerate(documents) if i % families.HOLDOUT_EVERY == families.HOLDOUT_EVERY - 1
                  for u in doc}
    for suffix in ("", "-short"):
        held, train = (families.family_passages(name + suffix, s) for s in ("held_out", "train"))
        assert held and train and not set(held) & set(train)
    # a short held-out passage is a unit of a held-out document; a training one never is
    assert set(families.family_passages(name + "-short", "held_out")) <= held_units
    assert not set(families.family_passages(name + "-short", "train")) & held_units


def test_the_shipped_suite_has_enough_passages_for_every_limit():
    suite = load_suite(SUITE)
    names = {t.data for t in suite.tasks}
    assert {f"{n}{s}" for n in families.FAMILIES for s in ("", "-short")} <= names
    for task in suite.tasks:
        if task.data.removesuffix("-short") in AVAILABLE:
            assert len(task.records()) == task.limit, task.name


def _ztext(folder: Path, entries: list[str]) -> None:
    """A SWORD zText module of one block per testament (``ot`` empty), as osis2mod writes it."""
    folder.mkdir(parents=True)
    for testament, items in (("ot", []), ("nt", entries)):
        raw = "".join(items).encode()
        packed = zlib.compress(raw)
        (folder / f"{testament}.bzz").write_bytes(packed)
        (folder / f"{testament}.bzs").write_bytes(struct.pack("<III", 0, len(packed), len(raw)) if items else b"")
        index, start = [struct.pack("<IIH", 0, 0, 0)], 0  # slot 0 is empty in every module
        for item in items:
            index.append(struct.pack("<IIH", 0, start, len(item.encode())))
            start += len(item.encode())
        (folder / f"{testament}.bzv").write_bytes(b"".join(index))


def test_spanish_bible_reads_a_sword_module_and_a_missing_one_is_one_line(tmp_path, monkeypatch):
    entries = ['<milestone type="x-importer"/>',
               '<div type="book" sID="b1"/> <title type="main">San Mateo</title>',
               '<chapter n="1" osisID="Matt.1" sID="Matt.1"/>',
               '<w lemma="strong:G0976">LIBRO</w> <w lemma="strong:G1078">de la generación</w> .',
               'Y <transChange type="added">dijo</transChange><note type="x">a note</note>: Hágase.',
               '<chapter n="2" osisID="Matt.2" sID="Matt.2"/>',
               '<w>Y como</w> fué nacido Jesús.']
    _ztext(tmp_path / "sword/modules/texts/ztext" / families.SPANISH_MODULE, entries)
    monkeypatch.setenv("SWORD_PATH", str(tmp_path / "sword"))
    assert families.FAMILIES["spanish-bible"].read() == [["LIBRO de la generación.", "Y dijo: Hágase."],
                                                         ["Y como fué nacido Jesús."]]
    monkeypatch.setattr(families, "sword_roots", lambda: [tmp_path / "nowhere"])
    with pytest.raises(BidirLMError, match="apt-get install sword-text-sparv") as err:
        families.FAMILIES["spanish-bible"].read()
    assert "\n" not in str(err.value)


def test_unknown_family_names_are_one_line_errors():
    for call in (lambda: families.family_passages("klingon", "held_out"),
                 lambda: families.family_passages("kjv", "test"),
                 lambda: TaskSpec(name="x", kind="perplexity", data="klingon"),
                 lambda: open_source(SourceSpec("x", kind="family", dataset="klingon")),
                 lambda: open_source(SourceSpec("x", kind="family")),
                 lambda: open_source(SourceSpec("x", kind="family", dataset="kjv", path="a.txt"))):
        with pytest.raises(BidirLMError) as err:
            call()
        assert "\n" not in str(err.value)


def test_family_source_reads_the_training_passages():
    source = open_source(SourceSpec("code", kind="family", dataset="python-code-short"))
    assert list(source.docs) == list(families.family_passages("python-code-short", "train"))


# ------------------------------------------------------------------ confident routing

def _routed(tiny_qwen3, scale=0.3):
    """A tiny UBMoE model whose expert 1 and routers differ from the identity (as after both stages)."""
    model, tok = load_backbone(tiny_qwen3, bidirectional=False)
    moe.convert_to_ubmoe(model)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for ffn in moe.ubmoe_ffns(model):
            for p in ffn.experts[1].parameters():
                p.add_(torch.randn(p.shape, generator=g) * scale)
            ffn.router.weight.normal_(0, 2.0, generator=g)
    return model, tok


@torch.no_grad()
def test_confident_routing_limits_are_forced0_and_soft_token_for_token(tiny_qwen3):
    model, tok = _routed(tiny_qwen3)
    ids = tok(["The river rose over the banks of the town", "Rates fell"], return_tensors="pt",
              padding=True).input_ids
    kw = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": tok.pad_token_id}

    def run(routing, confidence=None):
        if confidence is not None:
            moe.set_confidence(model, confidence)
        moe.set_routing(model, routing)
        return model(input_ids=ids).logits, model.generate(ids, **kw)

    for (logits, tokens), reference in ((run("confident", 1.0), run("forced0")), (run("confident", 0.0), run("soft"))):
        assert torch.equal(logits, reference[0]) and torch.equal(tokens, reference[1])
    between, _ = run("confident", 0.6)
    assert not torch.equal(between, run("soft")[0]) and not torch.equal(between, run("forced0")[0])


@torch.no_grad()
def test_confident_routing_mixes_only_the_sure_tokens():
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
    ffn = UniBiFFN(mlp, hidden_size=8, routing="soft", router_init="normal", router_std=1.0, confidence=0.5)
    with torch.no_grad():
        for p in ffn.experts[1].parameters():
            p.add_(0.3)
    x = torch.randn(2, 7, 8, generator=torch.Generator().manual_seed(0))
    soft, p1 = ffn(x), ffn.router_probs(x)[..., 1]
    ffn.routing = "confident"
    sure = p1 > 0.5
    assert 0 < int(sure.sum()) < sure.numel()
    expected = torch.where(sure[..., None], soft, mlp(x))
    assert torch.allclose(ffn(x), expected, atol=1e-6)
    assert torch.equal(ffn.last_choice_BT, sure.long())


def test_bad_thresholds_and_confident_training_are_one_line_errors(tiny_qwen3, tmp_path):
    mlp = torch.nn.Linear(4, 4)
    calls = [lambda: check_confidence("high"), lambda: check_confidence(1.5), lambda: check_confidence(-0.1),
             lambda: UniBiFFN(mlp, 4, confidence=2), lambda: moe.UBMoESpec(confidence=-1).validate(),
             lambda: split_routing("runs/x/hf@confident=abc"), lambda: split_routing("runs/x/hf@confident=1.2"),
             lambda: UBMoEStage2(backbone=str(tiny_qwen3), routing="confident")]
    for call in calls:
        with pytest.raises(BidirLMError) as err:
            call()
        assert "\n" not in str(err.value)


def test_folder_at_confident_sets_generate_only_and_stage2_records_it(tiny_qwen3, tmp_path):
    model, tok = _routed(tiny_qwen3)
    folder = moe.save_ubmoe(model, tok, tmp_path / "stage1")
    loaded, _ = load_any(f"{folder}@confident=0.75")
    spec = moe.spec_of(loaded)
    assert spec.mode_routing == {"generate": "confident", "embed": "forced1"} and spec.confidence == 0.75
    assert split_routing(f"{folder}@confident") == (str(folder), "confident")
    assert moe.spec_of(load_any(f"{folder}@confident")[0]).confidence == 0.9  # the folder's recorded threshold
    stage = UBMoEStage2(backbone=str(folder), generate_routing="confident", confidence=0.8)
    stage.configure_model()
    stage.export_hf(tmp_path / "stage2")
    exported, _ = moe.load_ubmoe(tmp_path / "stage2")
    spec = moe.spec_of(exported)
    assert spec.mode_routing["generate"] == "confident" and spec.confidence == 0.8 and spec.routing == "soft"
    moe.set_mode(exported, "generate")
    assert {f.routing for f in moe.ubmoe_ffns(exported)} == {"confident"}
    assert {f.confidence for f in moe.ubmoe_ffns(exported)} == {0.8}


# ------------------------------------------------------------------ the stage-2 mixture

def test_stage2_mixture_draws_from_every_source(tiny_qwen3):
    sources = [SourceSpec("lee", kind="lee", weight=0.5),
               SourceSpec("kjv", kind="family", dataset="kjv-short", weight=0.25),
               SourceSpec("code", kind="family", dataset="python-code", weight=0.25)]
    data = UBMoETextData(tokenizer=str(tiny_qwen3), sources=sources, mixture_documents=80, holdout=5,
                         max_length=64, batch_size=2)
    data.setup("fit")
    assert set(data.mixture_counts) == {"lee", "kjv", "code"} and all(data.mixture_counts.values())
    assert sum(data.mixture_counts.values()) == 80 and data.train_rows and data.val_rows
    again = UBMoETextData(tokenizer=str(tiny_qwen3), sources=sources, mixture_documents=80, holdout=5,
                          max_length=64, batch_size=2)
    again.setup("fit")
    assert [r.input_ids for r in again.train_rows] == [r.input_ids for r in data.train_rows]
    batch = next(iter(data.train_dataloader()))
    assert batch["input_ids"].shape == (2, 64)
    for bad in ({"source": SourceSpec("lee", kind="lee"), "sources": sources},
                {"sources": [sources[0], sources[0]]}, {"sources": sources, "mixture_documents": 0}):
        with pytest.raises(BidirLMError):
            UBMoETextData(tokenizer=str(tiny_qwen3), **bad)


# ------------------------------------------------------------------ compare and the benchmark

def test_compare_reports_every_family_as_a_ratio_to_the_base(tiny_qwen3, tmp_path):
    model, tok = _routed(tiny_qwen3)
    folder = moe.save_ubmoe(model, tok, tmp_path / "ub")
    out = tmp_path / "report"
    compare([str(tiny_qwen3), f"{folder}@forced0", f"{folder}@confident=1.0", str(folder)],
            ["base", "forced0", "confident1", "soft"], config=str(TINY_SUITE), output=str(out), progress=False)
    report = json.loads((out / "report.json").read_text())
    ratios = report["family_ratios"]
    tasks = [t["name"] for t in yaml.safe_load(TINY_SUITE.read_text())["tasks"]]
    assert list(ratios["forced0"]) == tasks
    for name in ("forced0", "confident1"):
        assert all(r == pytest.approx(1.0, abs=1e-5) for r in ratios[name].values()), ratios[name]
    assert any(abs(r - 1) > 1e-3 for r in ratios["soft"].values())
    table = (out / "report.md").read_text()
    assert "Generation per text family" in table and "| worst out of domain |" in table


def test_benchmark_measures_every_family_for_a_routing_setting(tiny_qwen3, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("ubmoe_ood", REPO / "benchmarks" / "ubmoe_ood.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model, tok = _routed(tiny_qwen3)
    moe.save_ubmoe(model, tok, tmp_path / "out" / "shipped" / "hf")  # stands in for a trained setting (--reuse)
    bench.main(["--base", str(tiny_qwen3), "--stage1", str(tmp_path / "unused"), "--suite", str(TINY_SUITE),
                "--output", str(tmp_path / "out"), "--reuse", "--setting", "shipped=",
                "--setting", "conf1=shipped@confident=1.0"])
    results = json.loads((tmp_path / "out" / "results.json").read_text())["settings"]
    assert all(r == pytest.approx(1.0, abs=1e-5) for r in results["conf1"]["ratios"]["per_task"].values())
    assert results["conf1"]["ratios"]["expert1_share"]["out"] == 0.0
    assert results["shipped"]["ratios"]["expert1_share"]["out"] > 0
    printed = capsys.readouterr().out
    assert "| conf1 `shipped@confident=1.0` |" in printed and "worst family" in printed

