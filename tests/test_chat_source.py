"""Chat-format text sources: each row's ``messages`` (role/content turns) rendered by the tokenizer's chat template;
a bad turn, a missing tokenizer or a tokenizer without a template is one line."""

import json
from pathlib import Path

import pytest
import yaml

from bidirlm_pl.core.errors import BidirLMError
from bidirlm_pl.data.sources import SourceSpec, describe_source, load_texts, open_source

ROOT = Path(__file__).resolve().parent.parent
# words and punctuation the tiny BPE vocabulary (trained on Lee) spells, so rendered chats survive tokenization
TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}. {% endfor %}"
CHATS = [
    [{"role": "user", "content": "What burned near Sydney?"}, {"role": "assistant", "content": "Bushfires."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}],
]
RENDERED = ["user: What burned near Sydney?. assistant: Bushfires.. ",
            "system: Be brief.. user: Hi. assistant: Hello.. "]


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory):
    """tiny-qwen3 (a model folder, as a model reference resolves to) whose tokenizer is given a chat template."""
    import shutil

    from bidirlm_pl.core import assets
    from bidirlm_pl.data.tokenizer import load_tokenizer

    folder = tmp_path_factory.mktemp("chat") / "tiny-qwen3-chat"
    shutil.copytree(assets.tiny_model("qwen3"), folder)
    tokenizer = load_tokenizer(str(folder), owner="test")
    assert not tokenizer.chat_template  # the asset has none: the template below is the only one
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(folder)
    return load_tokenizer(str(folder), owner="test")


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_messages_render_with_the_chat_template(tmp_path, chat_tokenizer):
    import datasets

    rows = [{"id": str(i), "dataset": "demo", "messages": m} for i, m in enumerate(CHATS)]  # tulu-v2's columns
    path = _jsonl(tmp_path / "chats.jsonl", rows)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    assert [chat_tokenizer.apply_chat_template(m, tokenize=False) for m in CHATS] == RENDERED
    for spec in (SourceSpec("sft", path=str(path), messages_field="messages"),
                 SourceSpec("sft", path=str(path), messages_field="messages", streaming=True),
                 SourceSpec("sft", path=str(tmp_path / "saved"), messages_field="messages"),
                 SourceSpec("sft", kind="hf", dataset="json", data_files=[str(path)], messages_field="messages")):
        assert list(load_texts(spec, chat_tokenizer)) == RENDERED, spec
    line = describe_source(open_source(SourceSpec("sft", path=str(path), messages_field="messages"), chat_tokenizer))
    assert line == (f"source 'sft': kind jsonl, {path}, 2 documents, chats from 'messages' rendered by the chat "
                    "template, weight 1.0")


@pytest.mark.parametrize("turn, message", [
    ({"content": "no role"}, r"source 'sft' row 1: turn 1 has no 'role' string \(keys \['content'\]\)"),
    ({"role": "assistant"}, r"source 'sft' row 1: turn 1 has no 'content' string \(keys \['role'\]\)"),
    ({"role": "assistant", "content": None}, r"row 1: turn 1 has no 'content' string \(keys \['role'\]\)"),
    ("just text", r"source 'sft' row 1: turn 1 is str, expected a \{role, content\} mapping"),
])
def test_a_bad_turn_is_one_line_naming_row_and_turn(tmp_path, chat_tokenizer, turn, message):
    path = _jsonl(tmp_path / "chats.jsonl", [{"messages": CHATS[0]}, {"messages": [CHATS[0][0], turn]}])
    with pytest.raises(BidirLMError, match=message) as err:
        list(load_texts(SourceSpec("sft", path=str(path), messages_field="messages"), chat_tokenizer))
    assert "\n" not in str(err.value)


def test_a_bad_turn_in_a_dataset_column_is_one_line(tmp_path, chat_tokenizer):
    """A list-of-struct column fills a turn's missing key with None: still named, as in JSONL."""
    import datasets

    rows = [{"messages": CHATS[0]}, {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant"}]}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(BidirLMError, match=r"source 'sft' row 1: turn 1 has no 'content' string \(keys \['role'\]\)"):
        list(load_texts(SourceSpec("sft", path=str(tmp_path / "saved"), messages_field="messages"), chat_tokenizer))


def test_no_tokenizer_no_template_no_column_are_one_line(tmp_path, chat_tokenizer):
    from bidirlm_pl.data.tokenizer import load_tokenizer

    path = _jsonl(tmp_path / "chats.jsonl", [{"messages": m} for m in CHATS])
    spec = SourceSpec("sft", path=str(path), messages_field="messages")
    with pytest.raises(BidirLMError, match="messages_field 'messages' is rendered by a tokenizer's chat template"):
        list(load_texts(spec))
    with pytest.raises(BidirLMError, match="has no chat template to render messages_field"):
        list(load_texts(spec, load_tokenizer("tiny-qwen3", owner="test")))
    with pytest.raises(BidirLMError, match=r"chats.jsonl:1: record has no messages field 'turns' .*set messages_field"):
        list(load_texts(SourceSpec("sft", path=str(path), messages_field="turns"), chat_tokenizer))
    with pytest.raises(BidirLMError, match=r"kind 'lee' takes no \['messages_field'\]"):
        list(load_texts(SourceSpec("sft", kind="lee", messages_field="messages"), chat_tokenizer))


def test_ubmoe_stage2_packs_rendered_conversations(tmp_path, chat_tokenizer):
    from bidirlm_pl.moe import UBMoETextData

    chats = [[{"role": "user", "content": f"Question {i} about the fires?"},
              {"role": "assistant", "content": f"Answer {i}: the fires burned for days."}] for i in range(8)]
    path = _jsonl(tmp_path / "sft.jsonl", [{"messages": m} for m in chats])
    data = UBMoETextData(tokenizer=chat_tokenizer.name_or_path, max_length=64, batch_size=2, holdout=2,
                         source={"name": "sft", "kind": "jsonl", "path": str(path), "messages_field": "messages"})
    data.setup("fit")
    text = chat_tokenizer.decode(data.train_rows[0].input_ids)
    assert "user: Question" in text and "assistant: Answer" in text and "<unk>" not in text
    assert len(data.val_rows) >= 1 and next(iter(data.train_dataloader()))["input_ids"].shape == (2, 64)


def test_gpu_ubmoe_stage2_reads_tulu_v2_messages():
    """The GPU recipe's stage 2 trains the routers on the UBMoE authors' SFT data, rendered as chats."""
    recipe = yaml.safe_load((ROOT / "configs/recipes/ubmoe-qwen3-0.6b.yaml").read_text())
    stage2 = next(s for s in recipe["stages"] if s["name"] == "stage2")
    config = yaml.safe_load((ROOT / stage2["fit"]).read_text())
    source = SourceSpec(**config["data"]["init_args"]["source"])
    assert (source.kind, source.dataset, source.messages_field) == ("hf", "allenai/tulu-v2-sft-mixture", "messages")
    assert "https://huggingface.co/datasets/allenai/tulu-v2-sft-mixture" in (ROOT / stage2["fit"]).read_text()
