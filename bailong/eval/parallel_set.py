"""A Traditional Chinese – English parallel set, held out of training, from LibreOffice's help.

Debian packages LibreOffice's help as HTML pages, one tree per language (``libreoffice-help-zh-tw``,
``libreoffice-help-en-us``, MPL-2.0), and every translatable paragraph carries the same id in each language
(``<p id="par_id3152148">``, ``<h1 id="hd_id3149346">``): the same page and id are one sentence pair, aligned by
the translators, not by a heuristic. ``aligned_pairs`` pairs them; ``drop_trained`` removes every pair whose
Traditional or English side shares a ``span``-character stretch with the training text (the project's TC corpus
holds 1,266 of these help pages: pairs from them, and boilerplate repeated on other pages, were trained on);
``assign_split`` puts each page's pairs in ``dev`` or ``test`` by a hash of the page's path, so that choices
(prompt wording, decoding) are made on pages the reported numbers never see.

``experiments/build_parallel_set.py`` builds ``data/parallel/libreoffice_help.jsonl.gz``; ``load_pairs``
reads it for the ``parallel_bpc`` and ``translation`` evaluators (``bailong.eval.parallel``).
"""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
from collections.abc import Iterable
from html.parser import HTMLParser
from pathlib import Path

from bailong.data.corpus import read_jsonl
from bailong.eval.consistency import HAN, traditional_purity

HELP_DIR = "usr/share/libreoffice/help"  # inside the packages: help/<lang>/text/<module>/<page>.html
PARAGRAPH_ID = re.compile(r"(?:par|hd)_id\d+")
SPLITS = ("dev", "test")
FIELDS = ("tc", "en", "page", "id", "split")


class _Paragraphs(HTMLParser):
    """The text of every element whose id is a help paragraph id, nested markup included, whitespace collapsed;
    an id that a page repeats with different text is dropped (``None``)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.open: list[tuple[str, int, list[str]]] = []
        self.depth = 0
        self.skipping = 0
        self.found: dict[str, str | None] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.depth += 1
        if tag in ("script", "style"):
            self.skipping += 1
        element_id = dict(attrs).get("id") or ""
        if PARAGRAPH_ID.fullmatch(element_id):
            self.open.append((element_id, self.depth, []))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        pass  # <br/>, <img/>: no text, no depth

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style") and self.skipping:
            self.skipping -= 1
        while self.open and self.open[-1][1] >= self.depth:
            element_id, _, parts = self.open.pop()
            text = " ".join("".join(parts).split())
            seen = self.found.get(element_id, text)
            self.found[element_id] = text if seen == text else None
        self.depth -= 1

    def handle_data(self, data: str) -> None:
        if not self.skipping:
            for _, _, parts in self.open:
                parts.append(data)


def page_paragraphs(html: str) -> dict[str, str]:
    """``{paragraph id: text}`` of one help page."""
    parser = _Paragraphs()
    parser.feed(html)
    parser.close()
    return {k: v for k, v in parser.found.items() if v}


def _deb_data(path: Path) -> tarfile.TarFile:
    """The ``data.tar.*`` member of a Debian package (an ``ar`` archive; read here because Python has no ar
    module and dpkg-deb is not on every machine)."""
    with path.open("rb") as fh:
        if fh.read(8) != b"!<arch>\n":
            raise ValueError(f"{path}: not a Debian package (no ar header)")
        while header := fh.read(60):
            name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58].decode())
            body = fh.read(size)
            fh.read(size % 2)  # members are 2-byte aligned
            if name.startswith("data.tar"):
                return tarfile.open(fileobj=io.BytesIO(body))
    raise ValueError(f"{path}: a Debian package without data.tar.*")


def help_pages(source: str | Path, lang: str) -> dict[str, str]:
    """``{path under help/<lang>/: HTML}`` for ``lang`` (``zh-TW``, ``en-US``) from a ``.deb`` or a directory that
    holds the package's files (``usr/share/libreoffice/help/<lang>/``) or the help tree itself."""
    source = Path(source)
    prefix = f"{HELP_DIR}/{lang}/"
    if source.is_file():
        pages = {}
        with _deb_data(source) as tar:
            for member in tar:
                name = member.name.removeprefix("./")
                if member.isfile() and name.startswith(prefix) and name.endswith(".html"):
                    pages[name[len(prefix) :]] = tar.extractfile(member).read().decode("utf-8")
    else:
        root = next((r for r in (source / HELP_DIR / lang, source / lang, source) if (r / "text").is_dir()), None)
        if root is None:
            raise FileNotFoundError(f"{source}: no {prefix}text/ (nor {lang}/text/ or text/) under it")
        pages = {str(p.relative_to(root)): p.read_text(encoding="utf-8") for p in sorted(root.rglob("*.html"))}
    if not pages:
        raise ValueError(f"{source}: no help pages for {lang}")
    return pages


def is_translated(tc: str, en: str, *, min_han: int = 4) -> bool:
    """A Traditional translation of ``en``: at least ``min_han`` Han characters, not Simplified, not the English."""
    if tc == en or len(HAN.findall(tc)) < min_han:
        return False
    purity = traditional_purity(tc)  # None: only characters both scripts share
    return purity is None or purity >= 0.5


def aligned_pairs(tc_pages: dict[str, str], en_pages: dict[str, str], *, min_en: int = 20, max_en: int = 300):
    """Translated paragraph pairs of the pages both languages have, in page order, each pair once (the first
    occurrence of an English or a Traditional text; help pages repeat their boilerplate)."""
    pairs, seen = [], set()
    for page in sorted(tc_pages.keys() & en_pages.keys()):
        tc_paragraphs, en_paragraphs = page_paragraphs(tc_pages[page]), page_paragraphs(en_pages[page])
        for pid, tc in tc_paragraphs.items():
            en = en_paragraphs.get(pid)
            if not en or not min_en <= len(en) <= max_en or not is_translated(tc, en):
                continue
            if tc in seen or en in seen:
                continue
            seen.update((tc, en))
            pairs.append({"tc": tc, "en": en, "page": page, "id": pid})
    return pairs


def _shared_texts(texts: list[str], training: Iterable[str], span: int) -> set[int]:
    """Indices of ``texts`` that share a ``span``-character stretch with ``training``; a text shorter than
    ``span``: that occurs as a whole line of it (whitespace collapsed)."""
    windows: dict[str, list[int]] = {}
    short: dict[str, list[int]] = {}
    for i, text in enumerate(texts):
        if len(text) < span:
            short.setdefault(text, []).append(i)
        for start in range(len(text) - span + 1):
            windows.setdefault(text[start : start + span], []).append(i)
    shared: set[int] = set()
    for doc in training:
        for start in range(len(doc) - span + 1):
            shared.update(windows.get(doc[start : start + span], ()))
        for line in doc.splitlines():
            shared.update(short.get(" ".join(line.split()), ()))
    return shared


def drop_trained(pairs: list[dict], train_tc: Iterable[str], train_en: Iterable[str], *, span: int = 24):
    """``(kept, counts)``: the pairs neither of whose sides shares a ``span``-character stretch with the training
    text of its language (a side shorter than ``span``: is no whole line of it)."""
    tc_hits = _shared_texts([p["tc"] for p in pairs], train_tc, span)
    en_hits = _shared_texts([p["en"] for p in pairs], train_en, span)
    kept = [p for i, p in enumerate(pairs) if i not in tc_hits and i not in en_hits]
    return kept, {"shared_with_tc_training": len(tc_hits), "shared_with_en_training": len(en_hits)}


def assign_split(page: str, dev_fraction: float = 0.5) -> str:
    """``dev`` or ``test`` for every pair of ``page``, by a hash of its path."""
    bucket = int.from_bytes(hashlib.sha256(page.encode()).digest()[:8], "big") / 2**64
    return "dev" if bucket < dev_fraction else "test"


def load_pairs(path: str | Path, split: str | None = None) -> list[dict]:
    """The pairs of a parallel set file (JSON Lines, optionally gzipped: ``tc``, ``en``, ``page``, ``id``,
    ``split``), those of ``split`` only if given; a malformed record is a ValueError naming file, line and key."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"split={split!r}: expected one of {', '.join(SPLITS)}")
    pairs = []
    for where, record in read_jsonl(path):
        for key in FIELDS:
            if not isinstance(record.get(key), str) or not record[key].strip():
                raise ValueError(f"{where}: {key!r} must be a non-empty string")
        if record["split"] not in SPLITS:
            raise ValueError(f"{where}: split={record['split']!r}: expected one of {', '.join(SPLITS)}")
        if split is None or record["split"] == split:
            pairs.append(record)
    if not pairs:
        raise ValueError(f"{path}: no pairs{f' in the {split} split' if split else ''}")
    return pairs
