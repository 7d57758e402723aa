"""How closely llama.cpp reproduces an export: token ids on the parallel set's held-out text, logits and greedy
continuations of a GGUF file against the exported Hugging Face model (the figures of docs/export.md).

    python -m bailong.export outputs/sft/runs/<run> /tmp/export --gguf
    python experiments/gguf_agreement.py /tmp/export /tmp/export/export-f16.gguf [--texts 1000] [--no-repack]

Prints one JSON object. ``--no-repack``: llama.cpp's weight repacking off (needed for q8_0 on CPUs with AMX).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bailong.eval.parallel_set import load_pairs

PARALLEL = Path(__file__).resolve().parents[1] / "data" / "parallel" / "libreoffice_help.jsonl.gz"


def open_gguf(path: str, repack: bool):
    import llama_cpp

    if not repack:
        default_params = llama_cpp.llama_model_default_params

        def no_repacking():
            params = default_params()
            params.use_extra_bufts = False
            return params

        llama_cpp.llama_cpp.llama_model_default_params = no_repacking
    return llama_cpp.Llama(path, n_ctx=1024, logits_all=True, verbose=False, n_threads=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export")
    parser.add_argument("gguf")
    parser.add_argument("--texts", type=int, default=1000, help="held-out texts to tokenize (half TC, half EN)")
    parser.add_argument("--prompts", type=int, default=8, help="prompts for logits and greedy continuations")
    parser.add_argument("--no-repack", action="store_true")
    args = parser.parse_args()
    model = AutoModelForCausalLM.from_pretrained(args.export).eval()
    tok = AutoTokenizer.from_pretrained(args.export)
    llm = open_gguf(args.gguf, repack=not args.no_repack)
    pairs = load_pairs(PARALLEL, "test")
    texts = [p["tc"] for p in pairs[: args.texts // 2]] + [p["en"] for p in pairs[: args.texts // 2]]
    same = [
        llm.tokenize(t.encode("utf-8"), add_bos=False, special=False) == tok(t, add_special_tokens=False)["input_ids"]
        for t in texts
    ]
    worst, mean, argmax, greedy, margins = [], [], [], [], []
    for pair in pairs[: args.prompts]:
        messages = [{"role": "user", "content": pair["tc"]}]
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        llm.reset()
        llm.eval(ids)
        ours = np.array(llm.scores[: len(ids)])
        with torch.no_grad():
            reference = model(torch.tensor([ids])).logits[0].numpy()
            generated = model.generate(
                torch.tensor([ids]), max_new_tokens=32, do_sample=False, repetition_penalty=1.0, pad_token_id=2
            )[0, len(ids) :].tolist()
        difference = np.abs(ours - reference) / reference.std()
        worst.append(float(difference.max()))
        mean.append(float(difference.mean()))
        argmax.append(float((ours.argmax(-1) == reference.argmax(-1)).mean()))
        got = []
        for token in llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            got.append(token)
            if token == llm.token_eos() or len(got) == len(generated):
                break
        greedy.append(got == generated)
        split = next((k for k, (a, b) in enumerate(zip(got, generated)) if a != b), None)
        if split is not None:  # how close the reference's own choice was where llama.cpp chose otherwise
            with torch.no_grad():
                logits = model(torch.tensor([ids + generated[:split]])).logits[0, -1]
            margins.append(
                {
                    "prompt": len(greedy) - 1,
                    "position": split,
                    "margin_over_std": float((logits[generated[split]] - logits[got[split]]) / logits.std()),
                }
            )
    llm.close()
    print(
        json.dumps(
            {
                "gguf": args.gguf,
                "texts": len(texts),
                "token_ids_identical": sum(same),
                "prompts": len(worst),
                "logit_max_diff_over_std": max(worst),
                "logit_mean_diff_over_std": float(np.mean(mean)),
                "argmax_agreement": float(np.mean(argmax)),
                "greedy_32_identical": sum(greedy),
                "greedy_divergences": margins,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
