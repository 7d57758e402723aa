"""``python -m bailong.cache {list,prune}``: what the cache holds, and removing what is no longer wanted.

    python -m bailong.cache list  [--cache-dir DIR] [--kind KIND] [--json]
    python -m bailong.cache prune [--cache-dir DIR] [--kind KIND] [--older-than DAYS] [--dry-run] [--json]

``list`` shows each kind's entries (size, last use, what produced them where the entry records it), the
temporary directories writers left and whether their writer is still alive. ``prune`` always removes orphan
temporaries (a writer killed mid-write: the entry's lock is free) and stale lock files (free, of an entry that
is gone); with ``--older-than DAYS`` also the entries nobody has used for that long (``0``: every entry).
Nothing is removed while another process holds its lock: prune takes the lock itself, and a run that then
asks for a removed entry computes it again.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import secrets
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bailong.cache import LOCKS, default_cache_dir, lock_path

KINDS = (  # what bailong writes
    "base_metrics",
    "init_rows",
    "instruct",
    "prepared_text",
    "random_bases",
    "token_shards",
    "tokenizers",
)
# Every writer takes the entry's lock before creating its temporary, so a free lock means the writer is gone;
# the grace covers writers that do not lock (an older bailong sharing the cache): their temps grow while alive.
ORPHAN_MIN_AGE_S = 60.0
# How each writer names its temporary sibling, so a temporary leads to its entry's lock.
TEMP_NAMES = (
    re.compile(r"^\.(?P<entry>.+)\.\d+\.[0-9a-f]{8}\.partial$"),  # bailong.files: .<entry>.<pid>.<hex>.partial
    re.compile(r"^\.(?P<entry>.+)\.[a-z0-9_]{8}\.tmp$"),  # cached_json before bailong.files: .<entry>.<random>.tmp
    re.compile(r"^\.(?P<entry>.+)\.tmp-[a-z0-9_]{8}$"),  # random_base: .<entry>.tmp-<random>
    re.compile(r"^\.tmp-(?P<entry>.+)-[0-9a-f]{8}$"),  # tokenizers: .tmp-<entry>-<hex>
    re.compile(r"^\.(?P<entry>.+)\.pruning-[0-9a-f]{8}$"),  # prune's own, interrupted mid-removal
    re.compile(r"^\.(?P<entry>.+)\.[a-z0-9_]{8}$"),  # atomic_dir: .<entry>.<random>
)
MANIFESTS = (
    "report.json",
    "extension.json",
    "random_base.json",
    "stats.json",
    "manifest.json",
)  # what an entry says about itself
SUMMARY_KEYS = (
    "strategy",
    "seed",
    "num_new",
    "device",
    "base",
    "added_vocab",
    "num_added",
    "architecture",
    "num_layers",
    "tc_bpc",
    "en_bpc",
    "computed_by_run",
)

try:
    import fcntl
except ImportError:  # Windows: filelock's own locks, probed through filelock below
    fcntl = None


@dataclass
class Item:
    """One thing in a kind's directory: an entry, a writer's temporary, or a lock file."""

    kind: str
    name: str
    path: Path
    what: str  # entry | temp | lock
    bytes: int
    modified: float  # mtime, seconds since the epoch
    last_used: float  # entries: the latest of the entry's and its lock files' mtimes
    owner: str | None  # temps and locks: the entry they belong to (None: cannot tell from the name)
    state: str = ""  # entry: "in use" | ""; temp: "orphan" | "being written"; lock: "held" | "stale" | ""
    summary: str = ""

    @property
    def entry_path(self) -> Path:
        """The entry this item is or belongs to (for a temporary whose owner is unknown, the temporary)."""
        kind_dir = self.path.parent.parent if self.path.parent.name == LOCKS else self.path.parent
        return kind_dir / (self.owner or self.name) if self.what != "entry" else self.path

    def as_json(self) -> dict:
        return {**dataclasses.asdict(self), "path": str(self.path)}


# ---------------------------------------------------------------------------------------------------
# locks


@contextlib.contextmanager
def holding(lock_files: list[Path]) -> Iterator[bool]:
    """Try to take every existing lock in ``lock_files`` without waiting; yield whether all were free (and
    are now held by us). Compatible with ``filelock.FileLock`` (flock on Unix); opens without truncating, so
    a lock's mtime, the entry's last use, stays as it was."""
    held: list = []
    try:
        for path in sorted(set(lock_files)):
            if fcntl is None:
                from filelock import FileLock, Timeout

                if not path.exists():  # FileLock would create it
                    continue

                lock = FileLock(str(path))
                try:
                    lock.acquire(timeout=0)
                except Timeout:
                    yield False
                    return
                held.append(lock)
                continue
            try:
                fd = os.open(path, os.O_RDWR)
            except FileNotFoundError:
                continue
            except PermissionError:  # another account's lock we cannot take: treat as held
                yield False
                return
            held.append(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # EWOULDBLOCK: held; anything else: cannot tell, so leave it alone
                yield False
                return
        yield True
    finally:
        for h in held:
            if isinstance(h, int):
                os.close(h)  # closing the descriptor releases its flock
            else:
                h.release()


def is_held(lock_files: list[Path]) -> bool:
    with holding(lock_files) as free:
        return not free


def entry_locks(kind_dir: Path, entry: str) -> list[Path]:
    """The lock files of ``entry`` that exist: ``.locks/<entry>.lock`` (computed_once, atomic_dir) and
    ``<entry>.lock`` beside it (random_base's, and an older bailong's)."""
    return [p for p in (lock_path(kind_dir / entry), kind_dir / f"{entry}.lock") if p.is_file()]


def kind_locks(kind_dir: Path) -> list[Path]:
    beside = [p for p in kind_dir.glob("*.lock") if p.is_file()]
    return sorted([*(kind_dir / LOCKS).glob("*.lock"), *beside])


# ---------------------------------------------------------------------------------------------------
# what is there


def size_of(path: Path) -> int:
    """Bytes of a file, or of every file under a directory (links not followed)."""
    if not path.is_dir() or path.is_symlink():
        return path.lstat().st_size
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def summary(path: Path) -> str:
    """What the entry records about what produced it: a few keys of its manifest (or of itself, a JSON file)."""
    try:
        if path.is_file() and path.suffix == ".json":
            data = json.loads(path.read_text())
        else:
            manifest = next((path / m for m in MANIFESTS if (path / m).is_file()), None)
            if manifest is None:
                return ""
            data = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return "(unreadable manifest)"
    if not isinstance(data, dict):
        return ""
    parts = []
    for key in SUMMARY_KEYS:
        value = data.get(key)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            parts.append(f"{key}={round(value, 4) if isinstance(value, float) else value}")
    parts += [
        f"{k}={v['conversations']} conversations"
        for k, v in data.items()
        if isinstance(v, dict) and "conversations" in v
    ]
    return " ".join(parts)


def temp_owner(name: str) -> str | None:
    for pattern in TEMP_NAMES:
        match = pattern.match(name)
        if match:
            return match["entry"]
    return None


def kind_dirs(cache_dir: Path, kinds: list[str] | None) -> list[Path]:
    present = sorted(p for p in cache_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    return [p for p in present if kinds is None or p.name in kinds]


def scan(cache_dir: Path, kinds: list[str] | None = None, now: float | None = None) -> list[Item]:
    """Every entry, temporary and lock file under ``cache_dir`` (of ``kinds``; default all), with its state."""
    now = time.time() if now is None else now
    items: list[Item] = []
    for kind_dir in kind_dirs(cache_dir, kinds):
        kind = kind_dir.name
        names = {p.name for p in kind_dir.iterdir()}
        for path in sorted(kind_dir.iterdir()):
            name = path.name
            if name == LOCKS:
                continue
            stat = path.lstat()
            if name.endswith(".lock") and not name.startswith("."):
                items.append(Item(kind, name, path, "lock", stat.st_size, stat.st_mtime, stat.st_mtime, name[:-5]))
            elif name.startswith(".") or name.endswith(".tmp"):
                owner = temp_owner(name)
                locks = entry_locks(kind_dir, owner) if owner else kind_locks(kind_dir)
                alive = now - stat.st_mtime < ORPHAN_MIN_AGE_S or is_held(locks)
                items.append(
                    Item(
                        kind,
                        name,
                        path,
                        "temp",
                        size_of(path),
                        stat.st_mtime,
                        stat.st_mtime,
                        owner,
                        "being written" if alive else "orphan",
                    )
                )
            else:
                locks = entry_locks(kind_dir, name)
                used = max([stat.st_mtime, *(p.stat().st_mtime for p in locks)])
                items.append(
                    Item(
                        kind,
                        name,
                        path,
                        "entry",
                        size_of(path),
                        stat.st_mtime,
                        used,
                        None,
                        "in use" if is_held(locks) else "",
                        summary(path),
                    )
                )
        for path in sorted((kind_dir / LOCKS).glob("*.lock")):
            stat = path.lstat()
            items.append(
                Item(
                    kind,
                    f"{LOCKS}/{path.name}",
                    path,
                    "lock",
                    stat.st_size,
                    stat.st_mtime,
                    stat.st_mtime,
                    path.name[:-5],
                )
            )
        for item in items:
            if item.kind == kind and item.what == "lock":
                item.state = "held" if is_held([item.path]) else "" if item.owner in names else "stale"
    return items


# ---------------------------------------------------------------------------------------------------
# removing


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _unlink_locks(locks: list[Path]) -> None:
    # Unlinked while we hold them: filelock >= 4 notices a waiter's inode is gone and retries on a fresh file.
    # With filelock 3 such a waiter and a newcomer may both compute the entry; each renames its own complete
    # copy into place, so the entry is still whole: the cost is duplicated work, never a broken entry.
    for lock in locks:
        lock.unlink(missing_ok=True)


def prune(
    cache_dir: Path,
    kinds: list[str] | None = None,
    older_than_days: float | None = None,
    dry_run: bool = False,
    now: float | None = None,
) -> list[dict]:
    """Remove orphan temporaries, stale locks and (with ``older_than_days``) entries unused for that long;
    return what was (or, ``dry_run``, would be) removed and what was kept, with the reason for each."""
    now = time.time() if now is None else now
    actions: list[dict] = []
    verb = "would remove" if dry_run else "removed"

    def record(item: Item, action: str, reason: str) -> None:
        actions.append(
            {
                "action": action,
                "kind": item.kind,
                "name": item.name,
                "what": item.what,
                "bytes": item.bytes,
                "reason": reason,
            }
        )

    items = scan(cache_dir, kinds, now)
    doomed_entries: set[tuple[str, str]] = set()
    for item in (i for i in items if i.what == "entry" and older_than_days is not None):
        if now - item.last_used < older_than_days * 86400:
            continue
        kind_dir = item.path.parent
        locks = entry_locks(kind_dir, item.name)
        with holding(locks) as free:
            if not free:
                record(item, "kept", "in use: another process holds its lock")
                continue
            try:
                last_used = max([item.path.lstat().st_mtime, *(p.stat().st_mtime for p in locks)])
            except FileNotFoundError:  # another prune got there first
                continue
            if now - last_used < older_than_days * 86400:  # used between the scan and our lock
                record(item, "kept", "used just now")
                continue
            record(item, verb, f"last used {format_age(now - last_used)} ago")
            doomed_entries.add((item.kind, item.name))  # its lock files go below, once nobody holds them
            if not dry_run:
                # renamed first: a reader sees the whole entry or none of it, never a half-removed one
                hidden = kind_dir / f".{item.name}.pruning-{secrets.token_hex(4)}"
                os.rename(item.path, hidden)
                _remove(hidden)

    for item in (i for i in items if i.what == "temp" and i.state == "orphan"):
        kind_dir = item.path.parent
        locks = entry_locks(kind_dir, item.owner) if item.owner else kind_locks(kind_dir)
        with holding(locks) as free:
            if not free:
                record(item, "kept", "its entry's lock is held: a writer is at work")
                continue
            record(item, verb, "orphan temporary: its writer is gone")
            if not dry_run:
                _remove(item.path)

    for item in (i for i in items if i.what == "lock"):
        if item.state != "stale" and (item.kind, item.owner) not in doomed_entries:
            continue  # the lock of an entry that stays records its last use
        with holding([item.path]) as free:
            if not free:
                record(item, "kept", "held")
            elif dry_run or not item.entry_path.exists():  # not recomputed since the scan
                record(item, verb, "stale lock: its entry is gone")
                if not dry_run:
                    _unlink_locks([item.path])
    return actions


# ---------------------------------------------------------------------------------------------------
# the command line


def format_size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def format_age(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def count(n: int, noun: str, plural: str | None = None) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {plural or noun + 's'}"


def total_bytes(items: list[Item]) -> int:
    return sum(i.bytes for i in items)


def print_listing(cache_dir: Path, items: list[Item], now: float) -> None:
    entries = [i for i in items if i.what == "entry"]
    print(f"{cache_dir}: {count(len(entries), 'entry', 'entries')}, {format_size(total_bytes(items))} in all")
    for kind in sorted({i.kind for i in items}):
        mine = [i for i in items if i.kind == kind]
        locks = [i for i in mine if i.what == "lock"]
        stale = sum(i.state == "stale" for i in locks)
        entries_here = sum(i.what == "entry" for i in mine)
        print(
            f"\n{kind}: {count(entries_here, 'entry', 'entries')}, {format_size(total_bytes(mine))}; "
            f"{count(len(locks), 'lock file')} ({stale} stale)"
        )
        for i in (i for i in mine if i.what == "entry"):
            state = f"  [{i.state}]" if i.state else ""
            print(
                f"  {i.name:<28} {format_size(i.bytes):>9}  used {format_age(now - i.last_used):>7} ago  "
                f"made {format_age(now - i.modified):>7} ago{state}  {i.summary}"
            )
        for i in (i for i in mine if i.what == "temp"):
            note = "orphan: prune removes it" if i.state == "orphan" else "being written"
            print(f"  {i.name:<28} {format_size(i.bytes):>9}  temporary, {format_age(now - i.modified)} old, {note}")


def parse_days(text: str) -> float:
    try:
        days = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of days >= 0, got {text!r}") from None
    if not math.isfinite(days) or days < 0:
        raise argparse.ArgumentTypeError(f"expected a number of days >= 0, got {text!r}")
    return days


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bailong.cache",
        description="List or prune bailong's cache of tokenizers, base metrics, "
        "init rows, instruction sets and random bases (entries named by a hash of their inputs).",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help=f"the cache (default: $BAILONG_CACHE, else $BAILONG_ROOT/.cache; here {default_cache_dir()})",
    )
    common.add_argument(
        "--kind", action="append", default=None, metavar="KIND", help=f"only this kind (repeatable): {', '.join(KINDS)}"
    )
    common.add_argument("--json", action="store_true", help="print JSON instead of a table")
    commands = parser.add_subparsers(dest="command", metavar="{list,prune}")
    commands.add_parser(
        "list",
        parents=[common],
        help="entries per kind: size, last use, what produced them",
        description="Entries per kind with size, last use and what produced them; writers' "
        "temporaries and whether they are orphans.",
    )
    prune_parser = commands.add_parser(
        "prune",
        parents=[common],
        help="remove orphans, stale locks and (--older-than) unused entries",
        description="Remove orphan temporaries (writer killed) and stale lock files; with --older-than also "
        "entries unused for that many days. Never removes what another process holds the lock of.",
    )
    prune_parser.add_argument(
        "--older-than",
        type=parse_days,
        default=None,
        metavar="DAYS",
        help="also remove entries not used for DAYS days (fractions allowed; 0: all)",
    )
    prune_parser.add_argument("--dry-run", action="store_true", help="say what would be removed; remove nothing")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        parser.exit(2, "\nerror: name a command: list or prune\n")
    cache_dir = args.cache_dir or default_cache_dir()
    if not cache_dir.exists():
        parser.error(f"cache directory {cache_dir} does not exist (pass --cache-dir, or set BAILONG_CACHE)")
    if not cache_dir.is_dir():
        parser.error(f"--cache-dir {cache_dir} is not a directory")
    if args.kind:
        present = {p.name for p in kind_dirs(cache_dir, None)}
        unknown = [k for k in args.kind if k not in KINDS and k not in present]
        if unknown:
            parser.error(
                f"--kind {unknown[0]!r}: not a cache kind; expected one of {', '.join(sorted(set(KINDS) | present))}"
            )

    now = time.time()
    if args.command == "list":
        items = scan(cache_dir, args.kind, now)
        if args.json:
            print(
                json.dumps(
                    {
                        "cache_dir": str(cache_dir),
                        "total_bytes": total_bytes(items),
                        "items": [i.as_json() for i in items],
                    },
                    indent=2,
                    ensure_ascii=False,
                )
            )
        else:
            print_listing(cache_dir, items, now)
        return 0

    before = total_bytes(scan(cache_dir, None, now))
    actions = prune(cache_dir, args.kind, args.older_than, args.dry_run, now)
    removed = sum(a["bytes"] for a in actions if a["action"] != "kept")
    after = before - removed if args.dry_run else total_bytes(scan(cache_dir, None, time.time()))
    if args.json:
        print(
            json.dumps(
                {
                    "cache_dir": str(cache_dir),
                    "dry_run": args.dry_run,
                    "bytes_before": before,
                    "bytes_after": after,
                    "actions": actions,
                },
                indent=2,
                ensure_ascii=False,
            )
        )
        return 0
    for a in actions:
        if not (a["what"] == "lock" and a["action"] != "kept"):  # lock files are counted below, not listed
            print(f"{a['action']:<12} {a['kind']}/{a['name']} ({a['what']}, {format_size(a['bytes'])}): {a['reason']}")
    locks = sum(a["what"] == "lock" and a["action"] != "kept" for a in actions)
    if locks:
        verb = "would remove" if args.dry_run else "removed"
        print(f"{verb:<12} {count(locks, 'stale lock file')} (of entries that are gone)")
    if not actions:
        print(
            "nothing to remove"
            + ("" if args.older_than is not None else " (entries are removed only with --older-than DAYS)")
        )
    print(
        f"{cache_dir}: {format_size(before)} before, {format_size(after)} after"
        + (" (dry run: nothing removed)" if args.dry_run else "")
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
