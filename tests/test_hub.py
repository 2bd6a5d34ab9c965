"""Hub ids for models and datasets, through the real huggingface_hub, transformers and datasets code.

A loopback stand-in (tests/hub_standin.py) plays huggingface.co; each command runs as a user would run
it, in its own process with ``HF_ENDPOINT`` pointing at the stand-in and a temporary ``HF_HOME``. The
login-node route is the real ``hf download`` CLI; the compute-node route is ``HF_HUB_OFFLINE=1`` with
the endpoint unreachable.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hub_standin import HubStandIn
from safetensors.torch import load_file

from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.core.hub import hub_model_folder, split_hub_id
from bidirlm_pl.data.text_module import TextDataModule
from bidirlm_pl.stages.mntp import MNTPStage

REPO = Path(__file__).resolve().parents[1]
HF = str(Path(sys.executable).with_name("hf"))
UNREACHABLE = "http://127.0.0.1:9"
RESOLVE = "import sys; from bidirlm_pl.core.hub import resolve_model_folder as r; print(r(sys.argv[1]))"


def run(args, env, cwd, timeout=600):
    return subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)


def bidirlm(*args, env, cwd):
    return run([sys.executable, "-m", "bidirlm_pl.cli.main", *args], env, cwd)


def last_line(proc) -> str:
    return proc.stderr.strip().splitlines()[-1]


def environment(home: Path, endpoint: str, offline: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE"))}
    return {**env, "HF_HOME": str(home), "HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "1" if offline else "0",
            "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false"}


def docs_repo(root: Path) -> Path:
    """A dataset repo with two configs declared in its card, as hub datasets do."""
    for config, word in (("en", "news"), ("fr", "nouvelles")):
        (root / "data" / config).mkdir(parents=True)
        rows = [{"text": f"{word} {i}: " + " ".join(f"w{(i * 7 + j) % 50}" for j in range(40))} for i in range(40)]
        (root / "data" / config / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "README.md").write_text(
        "---\nconfigs:\n"
        "- config_name: en\n  data_files:\n  - split: train\n    path: data/en/*.jsonl\n"
        "- config_name: fr\n  data_files:\n  - split: train\n    path: data/fr/*.jsonl\n---\n# docs\n")
    return root


def test_hub_id_shapes():
    assert split_hub_id("Qwen/Qwen3-0.6B") == ("Qwen/Qwen3-0.6B", None)
    assert split_hub_id("google/gemma-3-270m@main") == ("google/gemma-3-270m", "main")
    assert split_hub_id("org/name@0123abcd") == ("org/name", "0123abcd")
    for not_an_id in ("tiny-qwen3", "random:qwen3-0.6b", "runs/quickstart/contrastive/hf", "/abs/x", "./a/b"):
        assert split_hub_id(not_an_id) is None, not_an_id


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, tiny_qwen3):
    """A Hugging Face cache filled from the stand-in by the real `hf download` (the login-node route)."""
    root = tmp_path_factory.mktemp("hub")
    home = root / "hf-home"
    weights = tiny_qwen3 / "model.safetensors"
    model_repo = root / "repo-model"
    model_repo.mkdir()
    for f in tiny_qwen3.iterdir():
        if f.is_file():
            (model_repo / f.name).write_bytes(f.read_bytes())
    (model_repo / "pytorch_model.bin").write_bytes(b"pickled weights must never be fetched")
    with HubStandIn() as hub:
        hub.add("acme/tiny-qwen3", model_repo)
        hub.add("acme/gated-qwen3", model_repo, gated=True)
        hub.add("acme/docs", docs_repo(root / "repo-docs"), repo_type="dataset")
        hub.add("acme/gated-docs", docs_repo(root / "repo-gated-docs"), repo_type="dataset", gated=True)
        online = environment(home, hub.url, offline=False)
        # Our resolver fetches the model online (configs, tokenizer, safetensors only) ...
        fetched = run([sys.executable, "-c", RESOLVE, "acme/tiny-qwen3"], online, root)
        assert fetched.returncode == 0, fetched.stderr[-2000:]
        # ... and the dataset is fetched with the hub's own CLI, as on a login node.
        got = run([HF, "download", "--repo-type", "dataset", "acme/docs"], online, root)
        assert got.returncode == 0, got.stderr[-2000:]
        gated_model = bidirlm("merge", "--models", "acme/gated-qwen3", "tiny-qwen3", "--weights", "0.5", "0.5", "--output", str(root / "m"),
                              env=online, cwd=root)
        gated_data = run([sys.executable, "-c", PRINT_BATCH, "acme/gated-docs", "en"], online, root)
        streamed = run([sys.executable, "-c", PRINT_BATCH, "acme/docs", "fr", "stream"], online, root)
        requests = list(hub.requests)
    yield {"root": root, "home": home, "snapshot": Path(fetched.stdout.strip().splitlines()[-1]),
           "weights": weights, "gated_model": gated_model, "gated_data": gated_data, "streamed": streamed,
           "requests": requests}


PRINT_BATCH = """
import sys
from bidirlm_pl.data.text_module import TextDataModule
source = {"name": "docs", "kind": "hf", "dataset": sys.argv[1], "config": sys.argv[2],
          "streaming": len(sys.argv) > 3}
dm = TextDataModule(tokenizer="tiny-qwen3", sources=[source], max_length=32, batch_size=2, val_fraction=0.0,
                    mask={"ratio": 0.3, "replacement": "all_mask"})
dm.setup("fit")
batch = next(iter(dm.train_dataloader()))
print("batch", tuple(batch["input_ids"].shape), int((batch["labels"] != -100).sum()))
from bidirlm_pl.data.sources import load_texts
print("first", next(iter(load_texts(source)))[:12])
"""


def test_model_snapshot_has_only_safe_files(hub_cache):
    names = sorted(p.name for p in hub_cache["snapshot"].iterdir())
    assert "model.safetensors" in names and "config.json" in names and "tokenizer.json" in names
    assert "pytorch_model.bin" not in names
    assert not any("pytorch_model.bin" in r for r in hub_cache["requests"] if r.startswith("GET"))


def test_offline_fit_trains_from_the_cached_hub_snapshot(hub_cache, tmp_path):
    env = environment(hub_cache["home"], UNREACHABLE, offline=True)
    fit = bidirlm("fit", "--config", str(REPO / "configs/mntp/tiny.yaml"),
                  "--model.init_args.backbone.model", "acme/tiny-qwen3", "--trainer.max_steps", "2",
                  "--trainer.val_check_interval", "2", env=env, cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    exported = list((tmp_path / "runs").rglob("model.safetensors"))
    assert exported, "the stage exports an HF folder"
    trained, base = load_file(exported[0]), load_file(hub_cache["weights"])
    assert trained.keys() == base.keys()
    assert any(not (trained[k] == base[k]).all() for k in base), "training changed the hub model's weights"


def test_offline_merge_of_hub_ids_is_the_model_itself(hub_cache, tmp_path):
    env = environment(hub_cache["home"], UNREACHABLE, offline=True)
    merged = bidirlm("merge", "--models", "acme/tiny-qwen3", "acme/tiny-qwen3@main", "--weights", "0.5", "0.5",
                     "--output", str(tmp_path / "merged"), env=env, cwd=tmp_path)
    assert merged.returncode == 0, merged.stderr[-3000:]
    assert str(hub_cache["snapshot"]) in merged.stdout  # the resolved path is reported
    out, base = load_file(tmp_path / "merged" / "model.safetensors"), load_file(hub_cache["weights"])
    for key, tensor in base.items():
        assert (out[key] - tensor).abs().max() <= 1e-6, key


def test_uncached_id_offline_is_one_line_and_writes_nothing(hub_cache, tmp_path):
    env = environment(hub_cache["home"], UNREACHABLE, offline=True)
    proc = bidirlm("merge", "--models", "acme/not-fetched", "acme/tiny-qwen3", "--weights", "0.5", "0.5", "--output", str(tmp_path / "m"),
                   env=env, cwd=tmp_path)
    assert proc.returncode == 2
    assert last_line(proc) == ("bidirlm: error: model 'acme/not-fetched' is not in the Hugging Face cache and "
                               "HF_HUB_OFFLINE=1; fetch it where there is network: hf download acme/not-fetched")
    assert not (tmp_path / "m").exists()
    fit = bidirlm("fit", "--config", str(REPO / "configs/mntp/tiny.yaml"),
                  "--model.init_args.backbone.model", "acme/not-fetched", env=env, cwd=tmp_path)
    assert fit.returncode == 2 and "model 'acme/not-fetched' is not in the Hugging Face cache" in last_line(fit)
    assert not (tmp_path / "runs").exists(), "nothing is written before the check"


def test_gated_model_and_dataset_are_one_line(hub_cache):
    model = hub_cache["gated_model"]
    assert model.returncode == 2
    assert last_line(model) == ("bidirlm: error: model 'acme/gated-qwen3' is gated on the Hugging Face Hub: accept "
                                "its terms at https://huggingface.co/acme/gated-qwen3, then pass a token with "
                                "HF_TOKEN or `hf auth login`")
    data = hub_cache["gated_data"]
    assert data.returncode == 1
    assert last_line(data).endswith("source 'docs': dataset 'acme/gated-docs' is gated on the Hugging Face Hub: "
                                    "accept its terms at https://huggingface.co/datasets/acme/gated-docs, then "
                                    "pass a token with HF_TOKEN or `hf auth login`")


def test_hub_dataset_streams_online(hub_cache):
    proc = hub_cache["streamed"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "batch (2, 32)" in proc.stdout and "first nouvelles 0" in proc.stdout


def test_hub_dataset_yields_mntp_batches_offline_from_a_downloaded_snapshot(hub_cache):
    env = environment(hub_cache["home"], UNREACHABLE, offline=True)
    for extra in ([], ["stream"]):
        proc = run([sys.executable, "-c", PRINT_BATCH, "acme/docs", "fr", *extra], env, hub_cache["root"])
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "batch (2, 32)" in proc.stdout and "first nouvelles 0" in proc.stdout
    missing = run([sys.executable, "-c", PRINT_BATCH, "acme/other-docs", "en"], env, hub_cache["root"])
    assert missing.returncode == 1
    assert last_line(missing).endswith(
        "source 'docs': dataset 'acme/other-docs' is not in the Hugging Face cache and HF_HUB_OFFLINE=1; "
        "fetch it where there is network: hf download --repo-type dataset acme/other-docs")


def test_export_pushes_to_the_hub_with_a_model_card(tmp_path):
    offline_env = environment(tmp_path / "hf-home", UNREACHABLE, offline=True)
    fit = bidirlm("fit", "--config", str(REPO / "configs/mntp/tiny.yaml"), "--trainer.max_steps", "2",
                  "--trainer.val_check_interval", "2", env=offline_env, cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    ckpt = max((tmp_path / "runs").rglob("*.ckpt"))
    with HubStandIn(tmp_path / "uploads") as hub:
        env = {**environment(tmp_path / "hf-home", hub.url, offline=False), "HF_TOKEN": "hf_test"}
        pushed = bidirlm("export", "--ckpt", str(ckpt), "--output", str(tmp_path / "encoder"),
                         "--push-to-hub", "acme/pushed", env=env, cwd=tmp_path)
        assert pushed.returncode == 0, pushed.stderr[-3000:]
        assert "CREATE acme/pushed" in hub.requests and "COMMIT acme/pushed" in hub.requests
        fetched = run([sys.executable, "-c", RESOLVE, "acme/pushed"], env, tmp_path)
        assert fetched.returncode == 0, fetched.stderr[-2000:]
    remote = Path(fetched.stdout.strip().splitlines()[-1])
    for name in ("model.safetensors", "config.json", "README.md"):
        assert (remote / name).read_bytes() == (tmp_path / "encoder" / name).read_bytes(), name
    card = (tmp_path / "encoder" / "README.md").read_text()
    assert "MNTPStage" in card and "from `tiny-qwen3`, 2 steps" in card and "AutoModel.from_pretrained" in card
    bad = bidirlm("export", "--ckpt", str(ckpt), "--output", str(tmp_path / "x"), "--push-to-hub", "not-an-id",
                  env=offline_env, cwd=tmp_path)
    assert bad.returncode == 2
    assert last_line(bad) == "bidirlm: error: --push-to-hub 'not-an-id' is not a hub repo id; expected 'org/name'"
    assert not (tmp_path / "x").exists()


def test_model_card_inherits_the_stages_of_its_base(tmp_path):
    from bidirlm_pl.core.model_card import stage_history, write_model_card

    first, second = tmp_path / "mntp", tmp_path / "contrastive"
    first.mkdir(), second.mkdir()
    write_model_card(first, name="mntp", model="Qwen/Qwen3-0.6B", model_folder=None, stage="MNTPStage", steps=1000,
                     data=[{"name": "english", "dataset": "HuggingFaceFW/fineweb-edu"}], encoder=False)
    write_model_card(second, name="contrastive", model=str(first), model_folder=first, stage="ContrastiveStage",
                     steps=500, data=[{"name": "nli", "dataset": "sentence-transformers/all-nli"}], encoder=True)
    history = stage_history(second)
    assert [h["stage"] for h in history] == ["MNTPStage", "ContrastiveStage"]
    card = (second / "README.md").read_text()
    assert "base_model: Qwen/Qwen3-0.6B" in card and "library_name: sentence-transformers" in card
    assert "1. `MNTPStage` from `Qwen/Qwen3-0.6B`, 1000 steps; data: HuggingFaceFW/fineweb-edu" in card
    assert 'SentenceTransformer("contrastive")' in card


def test_a_hub_id_is_resolved_once_per_process(monkeypatch, tiny_qwen3, tmp_path):
    """The stage's config check, the data module's tokenizer, load_backbone and the export's model card: one
    download of the id; a failed resolution is not remembered."""
    calls = []

    def download(hub_id):
        calls.append(hub_id)
        if len(calls) == 1:
            raise BidirLMError(f"model '{hub_id}': the hub cannot be reached")
        return tiny_qwen3

    monkeypatch.setattr("bidirlm_pl.core.hub.download_model", download)
    monkeypatch.chdir(tmp_path)
    hub_model_folder.cache_clear()
    try:
        with pytest.raises(BidirLMError, match="cannot be reached"):
            MNTPStage(backbone="acme/counted-qwen3")
        stage = MNTPStage(backbone="acme/counted-qwen3")
        data = TextDataModule(tokenizer="acme/counted-qwen3", sources=[{"name": "lee50", "kind": "lee_documents"}],
                              max_length=32, batch_size=2, check_documents=5)
        stage.configure_model()
        stage.export_hf(tmp_path / "hf")
    finally:
        hub_model_folder.cache_clear()
    assert calls == ["acme/counted-qwen3"] * 2
    assert data.tokenizer.name_or_path == str(tiny_qwen3)
    assert "acme/counted-qwen3" in (tmp_path / "hf" / "README.md").read_text()
