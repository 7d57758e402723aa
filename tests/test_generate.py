"""generate(): the chat template (or the documented plain format), only new tokens returned, greedy equal to
an argmax loop, seeded sampling repeatable without touching the global RNG, and a peft model on a 4-bit base."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bailong.eval.generate import PLAIN_CHAT_TEMPLATE, PromptTooLongError, chat_prompt_ids, generate
from bailong.model.config import LoraConfig, QuantConfig
from conftest import ROOT, base_config

MINI = ROOT / "models" / "mini-base"
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Say hello."},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Again?"},
]


@pytest.fixture(scope="module")
def mini():
    return AutoModelForCausalLM.from_pretrained(MINI).eval(), AutoTokenizer.from_pretrained(MINI)


def test_plain_format_without_a_chat_template(mini):
    _, tok = mini
    assert not tok.chat_template
    text = tok.apply_chat_template(CHAT, chat_template=PLAIN_CHAT_TEMPLATE, add_generation_prompt=True, tokenize=False)
    assert text == "<s>System: Be brief.\nUser: Say hello.\nAssistant: Hello.</s>\nUser: Again?\nAssistant:"
    ids = chat_prompt_ids(tok, CHAT)
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1 and ids.count(tok.eos_token_id) == 1


def test_the_tokenizer_chat_template_is_used(mini):
    _, tok = mini
    templated = AutoTokenizer.from_pretrained(MINI)
    templated.chat_template = (
        "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant]"
    )
    ids = chat_prompt_ids(templated, CHAT[1:2])
    assert ids == templated("<s>[user] Say hello.\n[assistant]", add_special_tokens=False)["input_ids"]
    assert ids.count(tok.bos_token_id) == 1  # the template's BOS, not a second one from the encoder


def test_greedy_equals_an_argmax_loop_and_returns_only_new_text(mini):
    model, tok = mini
    ids = chat_prompt_ids(tok, CHAT[:2])
    seq = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(12):
            logits = model(seq).logits[0, -1]
            next_id = int(logits.argmax())
            if next_id == tok.eos_token_id:
                break
            seq = torch.cat([seq, torch.tensor([[next_id]])], dim=1)
    # repetition_penalty=1.0: a pure argmax loop
    out = generate(model, tok, CHAT[:2], max_new_tokens=12, do_sample=False, repetition_penalty=1.0)
    assert out == tok.decode(seq[0, len(ids) :], skip_special_tokens=True).strip()


def test_seeded_sampling_repeats_and_leaves_the_global_rng_alone(mini):
    model, tok = mini
    model.train()
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a = generate(model, tok, CHAT[:2], max_new_tokens=16, seed=7)
    b = generate(model, tok, CHAT[:2], max_new_tokens=16, seed=7)
    assert a == b and isinstance(a, str)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert model.training  # the caller's mode is restored
    model.eval()


def test_bad_chats_fail_clearly(mini):
    model, tok = mini
    with pytest.raises(ValueError, match="non-empty list"):
        generate(model, tok, "hello")
    with pytest.raises(ValueError, match=r"messages\[0\]"):
        generate(model, tok, [{"role": "bot", "content": "x"}])
    with pytest.raises(ValueError, match="last message must be the user's"):
        generate(model, tok, CHAT[:3])
    with pytest.raises(PromptTooLongError, match="exceeds the model's 1024 positions"):
        generate(model, tok, [{"role": "user", "content": "word " * 1100}], max_new_tokens=8)


def test_peft_model_on_a_4bit_base(mini):
    from bailong.model.build import build_model

    _, tok = mini
    quant = QuantConfig(name="nf4")
    lora = LoraConfig(r=4, alpha=8, dropout=0.0, embeddings="frozen")
    model = build_model(
        base_config(str(MINI)), vocab_size=len(tok), num_base=len(tok), rows=None, quant=quant, lora=lora
    )
    model.train()
    out = generate(model, tok, CHAT[:2], max_new_tokens=8, seed=0)
    assert isinstance(out, str) and out == generate(model, tok, CHAT[:2], max_new_tokens=8, seed=0)
    assert model.training
