"""Bad merge input: a one-line BidirLMError naming the bad value, and nothing written."""

from __future__ import annotations

import pytest
from test_merging_helpers import perturbed, state, write_copy

from bidirlm_pl.cli import main as cli
from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.models.merging import MergeSpec, merge


@pytest.fixture()
def pair(tiny_qwen3, tmp_path):
    return [str(tiny_qwen3), str(perturbed(tiny_qwen3, tmp_path / "b", seed=1))]


def refuses(tmp_path, match: str, **spec) -> str:
    """Run a merge that must fail; check the message is one line and that nothing was written."""
    spec.setdefault("output", str(tmp_path / "out"))
    before = set(tmp_path.iterdir())
    with pytest.raises(BidirLMError, match=match) as info:
        merge(MergeSpec(**spec))
    message = str(info.value)
    assert "\n" not in message
    assert set(tmp_path.iterdir()) == before  # no output, no staging folder left behind
    return message


def test_negative_weight_where_the_method_forbids_it(pair, tmp_path):
    refuses(tmp_path, r"weight -0\.5 is negative; method 'linear'", models=pair, weights=[1.5, -0.5])
    refuses(tmp_path, r"method 'slerp' needs weights >= 0", models=pair, weights=[1.0, -1.0], method="slerp")


def test_weights_summing_to_zero(pair, tmp_path):
    refuses(tmp_path, r"sum to zero", models=pair, weights=[0.0, 0.0])


def test_weight_count_differs_from_model_count(pair, tmp_path):
    refuses(tmp_path, r"got 3 weights for 2 models", models=pair, weights=[0.3, 0.3, 0.4])


def test_missing_model_folder(pair, tmp_path):
    refuses(tmp_path, r"model folder '.*nowhere' does not exist", models=[pair[0], str(tmp_path / "nowhere")],
            weights=[0.5, 0.5])


def test_mismatched_architectures(pair, tmp_path):
    from bidirlm_pl.core import assets

    refuses(tmp_path, r"is a 'llama' but .* is a 'qwen3'", models=[pair[0], str(assets.tiny_model("llama"))],
            weights=[0.5, 0.5])


def test_mismatched_shape_names_the_tensor(tiny_qwen3, tmp_path):
    tensors = state(tiny_qwen3)
    tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"][:64]
    odd = write_copy(tiny_qwen3, tmp_path / "odd", tensors)
    message = refuses(tmp_path, r"tensor 'model.layers.1.mlp.up_proj.weight' has shape \[128, 64\]",
                      models=[str(tiny_qwen3), str(odd)], weights=[0.5, 0.5])
    assert "[64, 64]" in message


def test_mismatched_vocabulary_with_an_explicit_policy(tiny_qwen3, tmp_path):
    tensors = state(tiny_qwen3)
    embed = tensors["model.embed_tokens.weight"]
    tensors["model.embed_tokens.weight"] = embed[:500] + 1.0  # a smaller vocabulary
    small = write_copy(tiny_qwen3, tmp_path / "small", tensors)
    refuses(tmp_path, r"tensor 'model.embed_tokens.weight' has shape \[512, 64\]",
            models=[str(tiny_qwen3), str(small)], weights=[0.5, 0.5])
    report = merge(MergeSpec(models=[str(tiny_qwen3), str(small)], weights=[0.5, 0.5],
                             output=str(tmp_path / "rows"), shape_policy="common_rows"))
    merged = state(tmp_path / "rows")["model.embed_tokens.weight"]
    assert merged.shape == embed.shape and report.shape_policy_applied
    assert (merged[:500] - (embed[:500] + 0.5)).abs().max() < 1e-6
    assert (merged[500:] == embed[500:]).all()  # the source's extra rows, unchanged


def test_existing_output_is_refused_unless_overwrite(pair, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    refuses(tmp_path, r"output folder '.*out' already exists; pass --overwrite", models=pair, weights=[0.5, 0.5])
    assert (out / "keep.txt").read_text() == "mine"
    merge(MergeSpec(models=pair, weights=[0.5, 0.5], output=str(out), overwrite=True))
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def test_method_specific_mistakes(pair, tmp_path):
    refuses(tmp_path, r"'ties' needs a base model", models=pair, weights=[1.0, 1.0], method="ties")
    refuses(tmp_path, r"'linear' takes no base model", models=pair, weights=[1.0, 1.0], base=pair[0])
    refuses(tmp_path, r"slerp interpolates exactly 2 models; got 3", models=pair + pair[:1], weights=[1, 1, 1],
            method="slerp")
    refuses(tmp_path, r"merge method 'average' is not one of", models=pair, weights=[1.0, 1.0], method="average")


def test_cli_prints_one_line_and_exits_2(pair, tmp_path, capsys):
    code = cli.main(["merge", "--models", *pair, "--weights", "0.5", "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "got 1 weights for 2 models" in err
    assert not (tmp_path / "out").exists()
