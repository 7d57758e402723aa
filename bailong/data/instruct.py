"""A small real instruction set made from the Tang poems of the data pack (not written by hand).

Each poem (``text``, ``title``, ``author``) gives one conversation of one task, asked in Traditional
Chinese or in English and answered in the language asked:

- ``next``: continue the next verse line (the poem's clauses, split at ，。？！；);
- ``author`` / ``title``: name the poet or the poem a line comes from;
- ``to_sc`` / ``to_tc``: convert a line between Traditional and Simplified script with OpenCC
  (``tw2s``, Taiwan standard forms as in the data; the Traditional answer is the original line);

a share of conversations continues with follow-up turns about the same poem (who wrote it, its
title), and a share opens with a system message. The split is the prepare stage's split of the poem file,
read back, not computed again: the poem file is a corpus of ``data.tc`` (a ConfigError otherwise), and a poem
is a training poem when its text (converted as that corpus converts it) is in the prepared ``train`` split,
a validation poem when it is in ``dev``. The set trains on ``train`` poems, validates on ``dev`` poems and
never uses the others (``test`` poems, and any the prepare stage dropped), so no poem held out from
pre-training, no variant of one (``group_by``, ``data.dedup.group``) and no multiple-choice item (made from
``test``) is trained on here.

The set is generated at run time into the cache (about a second; keyed by the prepared text, the poem file and
the settings), so it can never drift from the data pack or the split. To look at it::

    python -m bailong.data.instruct --out /tmp/instruct     # writes train.jsonl, val.jsonl, stats.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
from collections import Counter
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from bailong.cache import atomic_dir, cache_key, default_cache_dir
from bailong.data.chat import Conversation, write_conversations
from bailong.data.config import DataConfig, InstructConfig, data_config_from_yaml, expect_config
from bailong.data.corpus import CorpusError, _converter, read_jsonl, write_jsonl
from bailong.data.prepare import SPLITS, PreparedText, prepare_text
from bailong.data.splits import corpus_index

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


def prepared_poem_texts(poems: str | Path, data: DataConfig, prepared: PreparedText) -> tuple[dict[str, set], Any]:
    """The texts of the poem file's corpus per split of the prepared text, and that corpus's OpenCC converter (None
    without ``convert``): what ``split_poems`` compares a poem's converted text with."""
    i = corpus_index(data, "tc", poems, "data.chat.instruct.poems")
    texts = {split: set(prepared.documents_by_source("tc", split)[i]) for split in SPLITS}
    return texts, _converter(data.tc[i])


def split_poems(poems: list[Poem], texts: dict[str, set], convert=None) -> dict[str, list[Poem]]:
    """Poems by membership in the prepared split (``texts``: each split's texts; ``convert``: the corpus's
    conversion, so like is compared with like): ``train`` when the text is in ``train`` and in no held-out split,
    ``dev`` when it is in ``dev`` only, ``test`` when it is in ``test``, ``other`` for the rest (poems the prepare
    stage dropped or never read, or a text repeated in train and dev). Only ``train`` and ``dev`` are used."""
    out: dict[str, list[Poem]] = {"train": [], "dev": [], "test": [], "other": []}
    for poem in poems:
        text = convert(poem.text) if convert is not None else poem.text
        where = {split for split, kept in texts.items() if text in kept}
        if where in ({"train"}, {"dev"}):
            out[where.pop()].append(poem)
        else:
            out["test" if "test" in where else "other"].append(poem)
    return out


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
    cfg: InstructConfig, *, data: DataConfig, prepared: PreparedText, out_dir: str | Path
) -> dict[str, Any]:
    """Write ``train.jsonl`` (from train poems), ``val.jsonl`` (from dev poems) and ``stats.json`` under ``out_dir``;
    returns the stats. ``prepared``: ``prepare_text(data, ...)``, the split the poems are read back from."""
    expect_config(cfg, InstructConfig, "build_instruct_set(cfg)")
    expect_config(data, DataConfig, "build_instruct_set(data)")
    poems = read_poems(cfg.poems)
    texts, convert = prepared_poem_texts(cfg.poems, data, prepared)
    split = split_poems(poems, texts, convert)
    train, val = split["train"], split["dev"]
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
        "test_poems_left_out": len(split["test"]),
        # dropped by the prepare stage (bridged near-duplicates, past max_docs), or in two splits (a repeated text)
        "other_poems_left_out": len(split["other"]),
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


def cached_instruct_set(cfg: InstructConfig, *, data: DataConfig, cache_dir: str | Path) -> Path:
    """The generated set's directory under ``<cache_dir>/instruct/<key>``, built once per distinct input: the poems
    split as ``prepare_text(data, cache_dir)`` splits them (prepared there first if they are not yet)."""
    from bailong.cache import fingerprint

    expect_config(cfg, InstructConfig, "cached_instruct_set(cfg)")
    expect_config(data, DataConfig, "cached_instruct_set(data)")
    prepared = prepare_text(data, cache_dir)
    settings = {
        k: getattr(cfg, k) for k in ("max_train", "max_val", "en_share", "multi_turn_share", "system_share", "seed")
    }
    key = cache_key(
        {
            "poems": fingerprint(str(cfg.poems)),
            "settings": settings,
            "version": 4,
            "prepared_text": prepared.root.name,  # the prepared text's own key: its corpora, dedup and split
        }
    )
    target = Path(cache_dir) / "instruct" / key
    if not (target / "stats.json").is_file():
        with atomic_dir(target) as tmp:
            build_instruct_set(cfg, data=data, prepared=prepared, out_dir=tmp)
    return target


def main(argv: list[str] | None = None) -> None:
    root = Path(os.environ.get("BAILONG_ROOT") or Path(__file__).resolve().parents[2])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for train.jsonl, val.jsonl, stats.json")
    parser.add_argument(
        "--data",
        default=str(root / "conf" / "data" / "pretrain_tc.yaml"),
        help="the data config whose prepared split the poems follow (default: the pre-training data of data=sft_chat)",
    )
    parser.add_argument("--poems", default=str(root / "data" / "zh_tw" / "poetry_tang.jsonl.gz"), help="a data.tc path")
    parser.add_argument("--cache-dir", default=None, help="where the text is prepared (default: the project's cache)")
    parser.add_argument("--max-train", type=int, default=None)
    parser.add_argument("--max-val", type=int, default=None, help="default: every dev poem")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    data = data_config_from_yaml(args.data, root / "data")
    cfg = InstructConfig(poems=args.poems, max_train=args.max_train, max_val=args.max_val, seed=args.seed)
    prepared = prepare_text(data, args.cache_dir if args.cache_dir is not None else default_cache_dir())
    stats = build_instruct_set(cfg, data=data, prepared=prepared, out_dir=args.out)
    print(json.dumps(stats, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
