"""bailong.data.chat: validation with file:line errors, the chat template, the assistant-only label mask,
packing with block-diagonal attention, hub-format loading on local files."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bailong.data.chat import (
    IGNORE_INDEX,
    ChatDataError,
    EncodedChat,
    collate_chats,
    encode_conversation,
    load_conversations,
    pack_conversations,
    set_chat_template,
)
from bailong.data.config import ChatCorpusConfig
from conftest import ROOT

MINI = ROOT / "models" / "mini-base"
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "月"},
    {"role": "assistant", "content": "光"},
]


@pytest.fixture(scope="module")
def tok():
    return set_chat_template(AutoTokenizer.from_pretrained(str(MINI)))


def test_label_mask_token_by_token(tok):
    """Loss only on each reply (its leading space and its </s>); never on system, user or role headers."""
    enc = encode_conversation(tok, CHAT)
    pieces = tok.convert_ids_to_tokens(enc.input_ids)
    got = [(p, label != IGNORE_INDEX) for p, label in zip(pieces, enc.labels)]
    header = [("A", False), ("ss", False), ("ist", False), ("ant", False), (":", False)]
    expected = (
        [
            ("<s>", False),
            ("S", False),
            ("y", False),
            ("stem", False),
            (":", False),
            ("▁Be", False),
            ("▁bri", False),
            ("ef", False),
            (".", False),
            ("<0x0A>", False),
            ("U", False),
            ("s", False),
            ("er", False),
            (":", False),
            ("▁H", False),
            ("i", False),
            ("<0x0A>", False),
        ]
        + header
        + [("▁H", True), ("ell", True), ("o", True), (".", True), ("</s>", True), ("<0x0A>", False)]
        + [("U", False), ("s", False), ("er", False), (":", False), ("▁", False), ("月", False), ("<0x0A>", False)]
        + header
        + [("▁", True), ("光", True), ("</s>", True), ("<0x0A>", False)]
    )
    assert got == expected
    # labels are the input ids where scored (the model shifts them), -100 elsewhere
    assert all(label in (IGNORE_INDEX, i) for i, label in zip(enc.input_ids, enc.labels))
    assert enc.answer_chars == len("Hello.") + len("光")


def test_labelled_spans_are_exactly_the_replies_on_the_extended_tokenizer(tok):
    """Property check on the default run's tokenizer kind (appended TC pieces): each run of labelled
    tokens decodes to one reply followed by </s>."""
    from bailong.tokenization import extend_tokenizer, load_tokenizer

    ext = extend_tokenizer(
        str(MINI),
        ["床前明月光，疑是地上霜。舉頭望明月，低頭思故鄉。"] * 50,
        16,
        ROOT / ".cache",
        character_coverage=1.0,
    )
    ext_tok = set_chat_template(load_tokenizer(ext.path))
    chat = [
        {"role": "user", "content": "請接下一句：「床前明月光」"},
        {"role": "assistant", "content": "疑是地上霜"},
        {"role": "user", "content": "Who wrote it?"},
        {"role": "assistant", "content": "It was written by 李白."},
    ]
    enc = encode_conversation(ext_tok, chat)
    spans, current = [], []
    for i, label in zip(enc.input_ids, enc.labels):
        if label != IGNORE_INDEX:
            current.append(i)
        elif current:
            spans.append(current)
            current = []
    assert [ext_tok.decode(s).strip() for s in spans] == ["疑是地上霜</s>", "It was written by 李白.</s>"]


def test_template_renders_the_generation_prompt_layout(tok):
    """Training text = the layout bailong.eval.generate prompts a template-less model with, so the
    before/after evaluations ask the same prompts; generation continues after "Assistant:"."""
    from bailong.eval.generate import PLAIN_CHAT_TEMPLATE

    ours = tok.apply_chat_template(CHAT, tokenize=False)
    assert ours == tok.apply_chat_template(CHAT, tokenize=False, chat_template=PLAIN_CHAT_TEMPLATE)
    assert ours == "<s>System: Be brief.\nUser: Hi\nAssistant: Hello.</s>\nUser: 月\nAssistant: 光</s>\n"
    prompt = tok.apply_chat_template(CHAT[:4], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("User: 月\nAssistant:")


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


GOOD = json.dumps({"messages": CHAT[1:3]})


@pytest.mark.parametrize(
    "bad, message",
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"text": "hi"}), "expected an object with a 'messages' list (found: text)"),
        (
            json.dumps({"messages": [{"role": "bot", "content": "x"}]}),
            "unknown role 'bot'; expected one of system, user, assistant",
        ),
        (
            json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}),
            "messages[1] is 'user' but 'assistant' was expected",
        ),
        (json.dumps({"messages": [{"role": "user", "content": "a"}]}), "no assistant turn"),
        (
            json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]}),
            "messages[1] (assistant) needs a non-empty string 'content'",
        ),
        (
            json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}),
            "messages[1] is 'system' but 'assistant' was expected",
        ),
        (json.dumps({"messages": []}), "'messages' must be a non-empty list"),
    ],
)
def test_bad_records_name_file_and_line(tmp_path, bad, message):
    path = write_lines(tmp_path / "chats.jsonl", [GOOD, "", bad])
    with pytest.raises(ChatDataError) as err:
        load_conversations(ChatCorpusConfig(path=str(path)))
    assert f"{path}:3:" in str(err.value)
    assert message in str(err.value)


def test_good_file_and_limits(tmp_path):
    path = write_lines(tmp_path / "chats.jsonl", [GOOD, json.dumps({"messages": CHAT, "id": 7})])
    convs = load_conversations(ChatCorpusConfig(path=str(path)))
    assert convs == [CHAT[1:3], CHAT]  # extra keys ignored, messages kept as role/content
    assert load_conversations(ChatCorpusConfig(path=str(path), max_records=1)) == [CHAT[1:3]]
    with pytest.raises(ChatDataError, match="chat file not found"):
        load_conversations(ChatCorpusConfig(path=str(tmp_path / "missing.jsonl")))
    with pytest.raises(ChatDataError, match="expected jsonl"):
        load_conversations(ChatCorpusConfig(path=str(tmp_path / "chats.csv")))


def test_hub_format_loads_through_datasets_on_a_local_file(tmp_path):
    """The hub path of conf/data/hub_chat_example.yaml, on the "json" builder with a local file."""
    good = write_lines(tmp_path / "good.jsonl", [GOOD, json.dumps({"messages": CHAT})])
    spec = dict(path="json", format="hub", split="train")
    assert load_conversations(ChatCorpusConfig(**spec, data_files=str(good))) == [CHAT[1:3], CHAT]
    bad = write_lines(tmp_path / "bad.jsonl", [GOOD, json.dumps({"messages": [{"role": "robot", "content": "x"}]})])
    with pytest.raises(ChatDataError, match=r"hub data set 'json' record 1: messages\[0\] has unknown role 'robot'"):
        load_conversations(ChatCorpusConfig(**spec, data_files=str(bad)))


def encoded(n: int, answer_from: int = 1) -> EncodedChat:
    ids = list(range(10 * n, 10 * n + n))
    return EncodedChat(ids, [IGNORE_INDEX] * answer_from + ids[answer_from:], n, n)


def test_packing_keeps_conversations_whole_and_positions_restart():
    chats = [encoded(n) for n in (5, 9, 3, 7, 4)]
    rows = pack_conversations(chats, seq_len=12, pad_id=0)
    ids, labels, pos = rows["input_ids"], rows["labels"], rows["position_ids"]
    assert ids.shape == (3, 12)  # 28 tokens: first-fit decreasing needs 3 rows of 12
    # every conversation appears exactly once, contiguous, with positions 0..n-1 and its own labels
    for chat in chats:
        n, hits = len(chat.input_ids), 0
        for r in range(ids.shape[0]):
            for start in range(12 - n + 1):
                span = slice(start, start + n)
                if ids[r, span].tolist() == chat.input_ids and pos[r, span].tolist() == list(range(n)):
                    assert labels[r, start : start + n].tolist() == chat.labels
                    hits += 1
        assert hits == 1
    # padding: never scored
    assert int((labels != IGNORE_INDEX).sum()) == sum(len(c.input_ids) - 1 for c in chats)
    one_each = pack_conversations(chats, seq_len=12, pad_id=0, packing=False)
    assert one_each["input_ids"].shape == (5, 12)
    assert one_each["input_ids"][0, :5].tolist() == chats[0].input_ids


def test_packing_truncates_long_and_drops_unscored():
    rows = pack_conversations([encoded(20), encoded(4, answer_from=4)], seq_len=8, pad_id=0)
    assert rows["input_ids"].shape == (1, 8)  # the answerless one is dropped, the long one cut
    with pytest.raises(ValueError, match="no conversation has an assistant token"):
        pack_conversations([encoded(4, answer_from=4)], seq_len=8, pad_id=0)


def test_packed_conversations_do_not_see_each_other(tok):
    """With position_ids restarting and no attention mask, each packed conversation's logits equal its
    logits alone: the block-diagonal mask transformers derives from the positions."""
    model = AutoModelForCausalLM.from_pretrained(str(MINI)).eval()
    a = encode_conversation(tok, CHAT)
    b = encode_conversation(tok, CHAT[1:3])
    rows = pack_conversations([a, b], seq_len=len(a.input_ids) + len(b.input_ids) + 3, pad_id=tok.eos_token_id)
    assert rows["input_ids"].shape[0] == 1
    with torch.no_grad():
        packed = model(input_ids=rows["input_ids"], position_ids=rows["position_ids"], use_cache=False).logits[0]
        alone_a = model(input_ids=torch.tensor([a.input_ids])).logits[0]
        alone_b = model(input_ids=torch.tensor([b.input_ids])).logits[0]
    n = len(a.input_ids)
    torch.testing.assert_close(packed[:n], alone_a, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(packed[n : n + len(b.input_ids)], alone_b, atol=1e-4, rtol=1e-4)


def test_collate_pads_right_for_scoring(tok):
    a, b = encode_conversation(tok, CHAT), encode_conversation(tok, CHAT[1:3])
    batch = collate_chats([a, b], pad_id=tok.eos_token_id)
    assert batch["attention_mask"].sum(1).tolist() == [len(a.input_ids), len(b.input_ids)]
    assert batch["chars"].tolist() == [a.answer_chars, b.answer_chars]
    assert (batch["labels"][1, len(b.input_ids) :] == IGNORE_INDEX).all()
