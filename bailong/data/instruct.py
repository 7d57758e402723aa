"""A small real instruction set made from the Tang poems of the data pack (not written by hand).

Each poem (``text``, ``title``, ``author``) gives one conversation of one task, asked in Traditional
Chinese or in English and answered in the language asked:

- ``next``: continue the next verse line (the poem's clauses, split at ，。？！；);
- ``author`` / ``title``: name the poet or the poem a line comes from;
- ``to_sc`` / ``to_tc``: convert a line between Traditional and Simplified script with OpenCC
  (``tw2s``, Taiwan standard forms as in the data; the Traditional answer is the original line);

a share of conversations continues with follow-up turns about the same poem (who wrote it, its
title), and a share opens with a system message. The split is the pre-training split of the poems'
texts (``split_of`` with ``data.val_fraction``, ``data.test_fraction``, ``data.split_seed``): the set
trains on ``train`` poems, validates on ``dev`` poems and never uses ``test`` poems, so no poem held out
from pre-training (or used by the multiple-choice set) is trained on here.

The set is generated at run time into the cache (about a second; keyed by the poem file and the
settings), so it can never drift from the data pack or the split. To look at it::

    python -m bailong.data.instruct --out /tmp/instruct     # writes train.jsonl, val.jsonl, stats.json
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections import Counter
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from bailong.cache import atomic_dir, cache_key
from bailong.data.chat import Conversation, write_conversations
from bailong.data.config import InstructConfig, expect_config
from bailong.data.corpus import CorpusError, read_jsonl, split_of, write_jsonl

CLAUSE = re.compile(r"[^，。？！；、\n]+")
SYSTEM = {
    "tc": "你是一位熟悉唐詩的助理，請用繁體中文回答。",
    "en": "You are an assistant who knows Tang poetry well. Answer in English.",
}


@dataclass(frozen=True)
class Poem:
    text: str
    title: str
    author: str
    index: int = -1  # position in the poem file (non-blank records)

    @property
    def clauses(self) -> list[str]:
        return [c.strip() for c in CLAUSE.findall(self.text) if c.strip()]


@cache
def _opencc(config: str):
    import opencc

    return opencc.OpenCC(config)


def to_simplified(text: str) -> str:
    return _opencc("tw2s").convert(text)


def read_poems(path: str | Path) -> list[Poem]:
    """Poems with their title and author, in file order; a record without them fails with file and line."""
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"{path}: poem file not found")
    poems = []
    for where, record in read_jsonl(path):
        text = record.get("text")
        if not isinstance(text, str):
            raise CorpusError(f"{where}: expected an object with a string 'text' (and 'title', 'author')")
        if text.strip():
            poems.append(Poem(text, str(record.get("title") or ""), str(record.get("author") or ""), len(poems)))
    return poems


def split_poems(
    poems: list[Poem], val_fraction: float, test_fraction: float, seed: int
) -> tuple[list[Poem], list[Poem]]:
    """``(train, dev)`` poems by the pre-training split of their texts; ``test`` poems are in neither."""
    split = [split_of(p.text, seed, val_fraction, test_fraction) for p in poems]
    return [p for p, s in zip(poems, split) if s == "train"], [p for p, s in zip(poems, split) if s == "dev"]


# -- tasks: (prompt, answer) in the language asked ---------------------------------------------------
def _task(kind: str, lang: str, poem: Poem, rng: random.Random) -> tuple[str, str] | None:
    clauses = poem.clauses
    if not clauses:
        return None
    i = rng.randrange(len(clauses))
    line = clauses[i]
    if kind == "next":
        if len(clauses) < 2:
            return None
        i = rng.randrange(len(clauses) - 1)
        line, nxt = clauses[i], clauses[i + 1]
        if lang == "tc":
            return f"請接下一句：「{line}」", nxt
        return f'In the Tang poem by {poem.author}, which line follows "{line}"?', f'The next line is "{nxt}".'
    if kind == "author":
        if lang == "tc":
            return f"「{line}」是哪位詩人寫的？", f"這句詩出自{poem.author}。"
        return f'Who wrote the Tang poem with the line "{line}"?', f"It was written by {poem.author}."
    if kind == "title":
        if not poem.title:
            return None
        if lang == "tc":
            return f"「{line}」出自哪一首詩？", f"出自{poem.author}的〈{poem.title}〉。"
        return f'Which Tang poem contains the line "{line}"?', f'It comes from "{poem.title}" by {poem.author}.'
    if kind == "to_sc":
        if lang == "tc":
            return f"請把這句詩轉成簡體字：{line}", to_simplified(line)
        return f"Convert this line of Tang poetry to Simplified Chinese: {line}", to_simplified(line)
    if kind == "to_tc":
        simplified = to_simplified(line)
        if simplified == line:  # nothing to convert: not a useful example
            return None
        if lang == "tc":
            return f"請把這句簡體字轉成繁體字：{simplified}", line
        return f"Convert this line to Traditional Chinese: {simplified}", line
    raise ValueError(f"unknown task kind {kind!r}")


def _follow_ups(lang: str, poem: Poem) -> list[tuple[str, str]]:
    turns = [
        ("這首詩的作者是誰？", f"作者是{poem.author}。")
        if lang == "tc"
        else ("Who wrote it?", f"It was written by {poem.author}.")
    ]
    if poem.title:
        turns.append(
            ("題目是什麼？", f"題目是〈{poem.title}〉。")
            if lang == "tc"
            else ("And its title?", f'Its title is "{poem.title}".')
        )
    return turns


KINDS = ("next", "author", "title", "to_sc", "to_tc")


def conversation_for(
    poem: Poem, rng: random.Random, *, en_share: float, multi_turn_share: float, system_share: float
) -> dict[str, Any] | None:
    """One conversation about ``poem`` (``messages``, ``task``, ``lang``), or None if the drawn task does not apply."""
    lang = "en" if rng.random() < en_share else "tc"
    kind = rng.choice(KINDS)
    first = _task(kind, lang, poem, rng)
    if first is None:
        return None
    turns = [first]
    if kind in ("next", "title", "to_sc", "to_tc") and rng.random() < multi_turn_share:
        follow = [
            t for t in _follow_ups(lang, poem) if not (kind == "title" and t[1].startswith(("題目", "Its title")))
        ]
        turns += follow[: rng.randint(1, len(follow))]
    messages: Conversation = [{"role": "system", "content": SYSTEM[lang]}] if rng.random() < system_share else []
    for prompt, answer in turns:
        messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    return {"messages": messages, "task": kind, "lang": lang, "turns": len(turns), "poem": poem.index}


def make_conversations(
    poems: list[Poem], *, seed: int, limit: int | None, en_share: float, multi_turn_share: float, system_share: float
) -> list[dict[str, Any]]:
    """Conversations in a seeded order of ``poems`` (one per poem at most), up to ``limit``."""
    rng = random.Random(seed)
    order = list(range(len(poems)))
    rng.shuffle(order)
    out = []
    for i in order:
        if limit is not None and len(out) >= limit:
            break
        conv = conversation_for(
            poems[i], rng, en_share=en_share, multi_turn_share=multi_turn_share, system_share=system_share
        )
        if conv is not None:
            out.append(conv)
    return out


def build_instruct_set(
    cfg: InstructConfig, *, val_fraction: float, test_fraction: float, split_seed: int, out_dir: str | Path
) -> dict[str, Any]:
    """Write ``train.jsonl``, ``val.jsonl`` (from dev poems) and ``stats.json`` under ``out_dir``; returns the stats."""
    expect_config(cfg, InstructConfig, "build_instruct_set(cfg)")
    poems = read_poems(cfg.poems)
    train, val = split_poems(poems, val_fraction, test_fraction, split_seed)
    opts = dict(en_share=cfg.en_share, multi_turn_share=cfg.multi_turn_share, system_share=cfg.system_share)
    sets = {
        "train": make_conversations(train, seed=cfg.seed, limit=cfg.max_train, **opts),
        "val": make_conversations(val, seed=cfg.seed + 1, limit=cfg.max_val, **opts),
    }
    out = Path(out_dir)
    stats: dict[str, Any] = {
        "poems": len(poems),
        "train_poems": len(train),
        "val_poems": len(val),
        "test_poems_left_out": len(poems) - len(train) - len(val),
    }
    for name, convs in sets.items():
        write_conversations([c["messages"] for c in convs], out / f"{name}.jsonl")
        # the task labels ride along in a side file: the chat files stay plain {"messages": ...}
        write_jsonl(({k: c[k] for k in ("task", "lang", "turns", "poem")} for c in convs), out / f"{name}.tasks.jsonl")
        stats[name] = {
            "conversations": len(convs),
            "by_task": dict(Counter(f"{c['lang']}/{c['task']}" for c in convs)),
            "multi_turn": sum(c["turns"] > 1 for c in convs),
        }
    (out / "stats.json").write_text(json.dumps(stats, indent=2, ensure_ascii=False))
    return stats


def cached_instruct_set(
    cfg: InstructConfig, *, val_fraction: float, test_fraction: float, split_seed: int, cache_dir: str | Path
) -> Path:
    """The generated set's directory under ``<cache_dir>/instruct/<key>``, built once per distinct input."""
    from bailong.cache import fingerprint

    expect_config(cfg, InstructConfig, "cached_instruct_set(cfg)")
    settings = {
        k: getattr(cfg, k) for k in ("max_train", "max_val", "en_share", "multi_turn_share", "system_share", "seed")
    }
    key = cache_key(
        {
            "poems": fingerprint(str(cfg.poems)),
            "settings": settings,
            "version": 3,
            "val_fraction": val_fraction,
            "test_fraction": test_fraction,
            "split_seed": split_seed,
        }
    )
    target = Path(cache_dir) / "instruct" / key
    if not (target / "stats.json").is_file():
        with atomic_dir(target) as tmp:
            build_instruct_set(
                cfg, val_fraction=val_fraction, test_fraction=test_fraction, split_seed=split_seed, out_dir=tmp
            )
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--poems", default="data/zh_tw/poetry_tang.jsonl.gz")
    parser.add_argument("--out", required=True, help="directory for train.jsonl, val.jsonl, stats.json")
    parser.add_argument("--max-train", type=int, default=None)
    parser.add_argument("--max-val", type=int, default=None, help="default: every held-out poem")
    parser.add_argument("--val-fraction", type=float, default=0.02, help="as data.val_fraction of pre-training")
    parser.add_argument("--test-fraction", type=float, default=0.02, help="as data.test_fraction of pre-training")
    parser.add_argument("--split-seed", type=int, default=0, help="as data.split_seed of pre-training")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    cfg = InstructConfig(poems=args.poems, max_train=args.max_train, max_val=args.max_val, seed=args.seed)
    fractions = {"val_fraction": args.val_fraction, "test_fraction": args.test_fraction}
    stats = build_instruct_set(cfg, **fractions, split_seed=args.split_seed, out_dir=args.out)
    print(json.dumps(stats, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
