"""Multiple-choice sets made from held-out text: "which line comes next?".

Every item takes a document's line ``i`` as the right answer, the ``context_lines`` lines before it as
the question, and ``num_choices - 1`` distractor lines from *other* held-out documents of the *same*
corpus file (a KJV verse never competes with a fortune, so style is no shortcut). Distractors match
the answer's length: exactly for Traditional Chinese (Tang poem lines are regular, so 五言 competes
with 五言), within ``length_tolerance`` (relative) for English. Only ``test`` documents are used (the reported
figures' split): each source (``mc.tc_sources``, ``mc.en_sources``) is a corpus of the data config, matched by
its path, and its documents are that corpus's ``test`` split as the prepare stage wrote it (converted,
deduplicated, grouped with its variants and near-duplicates: ``group_by``, ``data.dedup.group``), so no stage
has trained on any line of an item nor made a choice on it. The same seed gives the same set. Editorial notes in
full-width parentheses (variant readings such as （一作「野」）) are removed from lines.

The generated sets are written in the MC file format of ``bailong.eval.choice`` (``mc/tc.jsonl``,
``mc/en.jsonl`` in the run directory), so they can be re-scored or shared like any other MC file.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Sequence

from bailong.data.config import CorpusConfig, DataConfig, expect_config
from bailong.data.prepare import PreparedText, prepare_text
from bailong.data.splits import corpus_index
from bailong.eval.choice import MCItem
from bailong.eval.config import MCConfig

SPLIT = "test"  # the items' documents: held out of training and of every choice


def held_out_documents(prepared: PreparedText, data: DataConfig, lang: str, spec: CorpusConfig, key: str) -> list[str]:
    """The ``test`` documents of the data config's ``lang`` corpus at ``spec.path`` (``key`` names the MC source in a
    ConfigError when no corpus has that path)."""
    i = corpus_index(data, lang, spec.path, key)
    return list(prepared.documents_by_source(lang, SPLIT)[i])


EDITORIAL_NOTE = re.compile(r"（[^（）]*）")  # variant readings in the poems: 舒（一作「野」）桃


def _lines(doc: str) -> list[str]:
    """Non-empty lines, without editorial notes in full-width parentheses (not part of the poem)."""
    lines = (EDITORIAL_NOTE.sub("", line).strip() for line in doc.split("\n"))
    return [line for line in lines if line]


def next_line_items(
    docs: Sequence[str],
    *,
    n_items: int,
    num_choices: int = 4,
    context_lines: int = 2,
    length_tolerance: float = 0.0,
    lang: str | None = None,
    seed: int = 0,
    id_prefix: str = "",
) -> list[MCItem]:
    """Up to ``n_items`` next-line items from ``docs`` (one per document first, then a second pass, ...).

    A position is used only if at least ``num_choices - 1`` distinct lines of other documents fit its
    length; fewer items than asked come back when the documents run out (the caller reports ``_n``).
    """
    if num_choices < 2:
        raise ValueError(f"num_choices must be at least 2, got {num_choices}")
    if context_lines < 1:
        raise ValueError(f"context_lines must be at least 1, got {context_lines}")
    rng = random.Random(seed)
    lines = [_lines(d) for d in docs]
    by_length: dict[int, list[tuple[int, str]]] = {}
    for d, doc_lines in enumerate(lines):
        for line in dict.fromkeys(doc_lines):  # each distinct line once per document
            by_length.setdefault(len(line), []).append((d, line))

    def distractor_pool(d: int, answer: str) -> list[str]:
        slack = int(length_tolerance * len(answer))
        pool = []
        for length in range(len(answer) - slack, len(answer) + slack + 1):
            pool += [line for other, line in by_length.get(length, []) if other != d and line != answer]
        return sorted(set(pool))  # sorted: the draw depends on the seed only

    # positions per document, shuffled; then round-robin over shuffled documents
    positions = [[(d, i) for i in range(1, len(doc_lines))] for d, doc_lines in enumerate(lines)]
    for p in positions:
        rng.shuffle(p)
    order = [d for d in range(len(lines)) if positions[d]]
    rng.shuffle(order)
    items: list[MCItem] = []
    while order and len(items) < n_items:
        remaining = []
        for d in order:
            if len(items) >= n_items:
                break
            if not positions[d]:
                continue
            _, i = positions[d].pop()
            answer = lines[d][i]
            pool = distractor_pool(d, answer)
            if len(pool) >= num_choices - 1:
                choices = rng.sample(pool, num_choices - 1)
                slot = rng.randrange(num_choices)
                choices.insert(slot, answer)
                question = "\n".join(lines[d][max(0, i - context_lines) : i]) + "\n"
                items.append(MCItem(question, tuple(choices), slot, lang, f"{id_prefix}{d}:{i}"))
            if positions[d]:
                remaining.append(d)
        order = remaining
    return items


def held_out_mc_set(
    sources: Sequence[CorpusConfig],
    *,
    prepared: PreparedText,
    data: DataConfig,
    n_items: int,
    lang: str,
    num_choices: int,
    context_lines: int,
    length_tolerance: float,
    seed: int,
) -> list[MCItem]:
    """An MC set from the ``test`` documents of ``sources`` (corpora of ``data.<lang>``, by path), items shared evenly
    among them."""
    if not sources:
        raise ValueError(f"no source corpora for the {lang} MC set")
    items: list[MCItem] = []
    for k, spec in enumerate(sources):
        share = n_items // len(sources) + (k < n_items % len(sources))
        docs = held_out_documents(prepared, data, lang, spec, f"mc.{lang}_sources.{k}")
        items += next_line_items(
            docs,
            n_items=share,
            num_choices=num_choices,
            context_lines=context_lines,
            length_tolerance=length_tolerance,
            lang=lang,
            seed=seed + k,
            id_prefix=f"{lang}{k}:",
        )
    return items


def build_mc_sets(mc_cfg: MCConfig, *, data: DataConfig, cache_dir: str | os.PathLike) -> dict[str, list[MCItem]]:
    """``{"tc": items, "en": items}`` from the ``mc`` config over the ``test`` split of ``prepare_text(data,
    cache_dir)`` (the split every stage reads; prepared there first if it is not yet). A source that is no corpus of
    the data config fails first, before anything is prepared."""
    expect_config(data, DataConfig, "build_mc_sets(data)")
    for lang in ("tc", "en"):
        sources = getattr(mc_cfg, f"{lang}_sources")
        if not sources:
            raise ValueError(f"no source corpora for the {lang} MC set (mc.{lang}_sources is empty)")
        for k, spec in enumerate(sources):
            corpus_index(data, lang, spec.path, f"mc.{lang}_sources.{k}")
    prepared = prepare_text(data, cache_dir)
    common = dict(
        prepared=prepared,
        data=data,
        num_choices=mc_cfg.num_choices,
        context_lines=mc_cfg.context_lines,
        seed=mc_cfg.seed,
    )
    return {
        "tc": held_out_mc_set(
            mc_cfg.tc_sources, n_items=mc_cfg.items_per_lang, lang="tc", length_tolerance=0.0, **common
        ),
        "en": held_out_mc_set(
            mc_cfg.en_sources,
            n_items=mc_cfg.items_per_lang,
            lang="en",
            length_tolerance=mc_cfg.en_length_tolerance,
            **common,
        ),
    }
