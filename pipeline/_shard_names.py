"""Naming tar shards: a SOURCE (a `.tar`, a brace range or list, a glob) expanded to its sorted
shards, each checked to be a plain (uncompressed) tar file. Reading them is `pipeline.shards`.

    shards = expand("data/part-{000..009}.tar")     # ShardSet: root and sorted shard paths
"""
from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cache.errors import UserError

from .sources import SHARD_SUFFIX

_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_BRACE_LIST = re.compile(r"\{([^{}]*,[^{}]*)\}")
_COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz",
               b"\x28\xb5\x2f\xfd": "zstd"}


@dataclass(frozen=True)
class ShardSet:
    """The shards of a SOURCE before they are read."""
    source: str                  # as the user gave it
    root: Path                   # absolute; the folder the rows' paths start from
    shards: tuple[str, ...]      # posix paths relative to root, sorted


def expand(source: str | Path) -> ShardSet:
    """The sorted shards of `source`; a UserError for a pattern that matches nothing, a shard
    of a brace range that does not exist, or a compressed tar."""
    text = os.path.expanduser(str(source))
    if text.lower().endswith((".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")):
        raise UserError(f"{source} is a compressed tar: its members cannot be read in place; "
                        "decompress it once (gunzip/unxz/unzstd) and pass the .tar")
    names = _braces(text)
    found: list[str] = []
    for name in names:
        if glob.has_magic(name):
            found.extend(glob.glob(name))
        elif os.path.exists(name):
            found.append(name)
        else:
            whole = "" if len(names) == 1 else f" (of the {len(names)} the range names)"
            raise UserError(f"shard {name} does not exist{whole}: fix the pattern or restore "
                            "the shard")
    found = sorted({os.path.abspath(p) for p in found if p.lower().endswith(SHARD_SUFFIX)})
    if not found:
        raise UserError(f"{source} matches no .tar shard: check the pattern (quote it so the "
                        "shell leaves braces and * to extract)")
    for p in found:
        _check_plain(Path(p))
    root = Path(os.path.commonpath([os.path.dirname(p) for p in found]))
    rel = tuple(sorted(Path(p).relative_to(root).as_posix() for p in found))
    return ShardSet(str(source), root, rel)


def _braces(text: str) -> list[str]:
    """`text` with each {A..B} numeric range (zero padding kept) and {a,b,...} list expanded,
    in order."""
    listed = _BRACE_LIST.search(text)
    if listed is not None:
        head, tail = text[:listed.start()], text[listed.end():]
        return [n for part in listed.group(1).split(",") for n in _braces(head + part + tail)]
    match = _BRACE.search(text)
    if match is None:
        return [text]
    a, b = match.group(1), match.group(2)
    lo, hi = int(a), int(b)
    if hi < lo:
        raise UserError(f"brace range {{{a}..{b}}} runs backwards: write {{{b}..{a}}}")
    width = len(a) if a.startswith("0") and len(a) > 1 else 0
    head, tail = text[:match.start()], text[match.end():]
    return [n for k in range(lo, hi + 1) for n in _braces(f"{head}{k:0{width}d}{tail}")]


def _check_plain(shard: Path) -> None:
    """Refuse, in one line, a shard that is no regular file or a compressed tar."""
    if not shard.is_file():
        raise UserError(f"shard {shard} is not a regular file: pass .tar files")
    with open(shard, "rb") as f:
        head = f.read(6)
    for magic, kind in _COMPRESSED.items():
        if head.startswith(magic):
            raise UserError(f"shard {shard} is a {kind}-compressed tar: its members cannot be "
                            "read in place; decompress it once and pass the plain .tar")


__all__ = ["ShardSet", "expand"]
