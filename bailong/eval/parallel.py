"""What the parallel set (``parallel.*``, bailong/eval/parallel_set.py) measures: the paper's cross-lingual
transfer on parallel text.

``parallel_bpc``: bits per character of each side of the same pairs, each paragraph scored as its own document
(``parallel/tc_bpc``, ``parallel/en_bpc``, tokens per character), and the *information parity* of Tsvetkov &
Kipnis (2024), ``parallel/information_parity`` = bits of the English side / bits of the Traditional side, summed
over the pairs: 1 when the model needs as many bits to say the same thing in Traditional Chinese as in English,
below 1 when Traditional costs more. Extending the vocabulary and training on Traditional text should raise it.

``translation``: the first ``parallel.translate_pairs`` pairs translated each way, greedily, through the chat
template (``bailong.eval.generate``; a base model's plain layout before SFT); the first non-empty line of the
answer is the hypothesis, scored against the other side by corpus chrF (sacrebleu's defaults: character 6-grams,
beta 2, which needs no word segmentation for Chinese): ``translation/en2tc_chrf``, ``translation/tc2en_chrf``,
and the share of answers in the target language (``_lang``; Simplified is not Traditional). Writes
``translation/generations.jsonl``.
"""

from __future__ import annotations

from bailong.data.corpus import write_jsonl
from bailong.eval.bpc import evaluate_texts
from bailong.eval.consistency import identify_language
from bailong.eval.evaluators import EvalContext, Evaluator, register_evaluator
from bailong.eval.generate import generate
from bailong.eval.parallel_set import load_pairs

# direction -> (source side, target side, the instruction, in the source's language)
DIRECTIONS = {
    "en2tc": ("en", "tc", "Translate the following English into Traditional Chinese:\n{text}"),
    "tc2en": ("tc", "en", "將下列繁體中文翻譯成英文：\n{text}"),
}


def first_line(answer: str) -> str:
    """The answer's first non-empty line (a base model goes on after its translation)."""
    return next((line.strip() for line in answer.splitlines() if line.strip()), "")


@register_evaluator
class ParallelBitsPerChar(Evaluator):
    """Bits per character of the same content in each language, and the information parity."""

    name = "parallel_bpc"

    def __call__(self, ctx: EvalContext) -> dict[str, float]:
        pairs = load_pairs(ctx.parallel.file, ctx.parallel.split)[: ctx.parallel.max_pairs]
        texts = {lang: [p[lang] for p in pairs] for lang in ("tc", "en")}
        scores = evaluate_texts(
            ctx.model, ctx.tokenizer, texts, seq_len=ctx.eval.seq_len, batch_size=ctx.eval.batch_size
        )
        return {
            "parallel/tc_bpc": scores["tc_bpc"],
            "parallel/en_bpc": scores["en_bpc"],
            "parallel/tc_tokens_per_char": scores["tc_tokens_per_char"],
            "parallel/en_tokens_per_char": scores["en_tokens_per_char"],
            "parallel/information_parity": scores["en_bits"] / scores["tc_bits"],
            "parallel/n": float(len(pairs)),
        }


@register_evaluator
class Translation(Evaluator):
    """EN->TC and TC->EN translation of held-out pairs, chrF."""

    name = "translation"

    def __call__(self, ctx: EvalContext) -> dict[str, float]:
        import sacrebleu

        settings = ctx.parallel
        pairs = load_pairs(settings.file, settings.split)[: settings.translate_pairs]
        metrics: dict[str, float] = {"translation/n": float(len(pairs))}
        records = []
        for direction, (source, target, instruction) in DIRECTIONS.items():
            hypotheses = []
            for pair in pairs:
                messages = [{"role": "user", "content": instruction.format(text=pair[source])}]
                answer = generate(
                    ctx.model, ctx.tokenizer, messages, max_new_tokens=settings.max_new_tokens, do_sample=False
                )
                hypotheses.append(first_line(answer))
                records.append(
                    {
                        "direction": direction,
                        "source": pair[source],
                        "reference": pair[target],
                        "answer": answer,
                        "hypothesis": hypotheses[-1],
                        "page": pair["page"],
                        "id": pair["id"],
                    }
                )
            references = [pair[target] for pair in pairs]
            metrics[f"translation/{direction}_chrf"] = sacrebleu.corpus_chrf(hypotheses, [references]).score
            metrics[f"translation/{direction}_lang"] = sum(identify_language(h) == target for h in hypotheses) / len(
                hypotheses
            )
        write_jsonl(records, ctx.out_dir / "translation" / "generations.jsonl")
        return metrics
