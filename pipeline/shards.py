"""Tar shards as an image source: webdataset-style archives read in place, never unpacked.

A SOURCE ending in `.tar` is a shard, a brace range (`shards/part-{000000..000099}.tar`) or a
glob (`shards/*.tar`) a sorted list of them. Members whose basenames share the part before the
first dot form one sample: the member with an image extension is the image, the integer in a
`KEY.cls` member its label (`label_key="json:FIELD"`: the FIELD of `KEY.json`). A row's path is
`SHARD.tar/MEMBER`, relative to the shards' folder.

Nothing of an archive is written to disk: listing streams the headers and hashes the images, a
decoding worker reads one member's bytes at its offset (`ShardList.read`). So a member named
`../x.jpg` or `/abs/x.jpg`, a link, a device or a directory posing as an image cannot escape;
each is recorded as skipped with its reason, as is a member too large to be an image. A damaged
shard keeps the members before the damage. Compressed tars are refused: a member of a
compressed stream has no offset to read it at.

    shards = expand("data/part-{000..009}.tar")     # ShardSet: root and sorted shard paths
    images, listing, stats, read = list_shards(shards, "cls", known={})
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from cache.errors import UserError, first_line

from .images import BadImageError, decode_image, read_image
from ._shard_names import ShardSet, expand
from .sources import IMAGE_EXTENSIONS, SHARD_SUFFIX, ImageList, is_utf8, printable

MAX_MEMBER = 256 << 20     # bytes; no image file comes near, and a member is read whole
_MAX_LABEL = 1 << 20       # bytes of a .cls or .json member


@dataclass(frozen=True)
class ShardList(ImageList):
    """An ImageList whose paths are `SHARD.tar/MEMBER`, with where each member's bytes lie."""
    shards: tuple[str, ...] = ()
    # per path: (shard index, byte offset, size) of the member's data; (-1, 0, 0) for a row
    # reused from the cache without reading its shard.
    members: tuple[tuple[int, int, int], ...] = ()
    label_key: str = "cls"

    def read(self, i: int, decode=None):
        """(RGB image, SHA-256 of the member's bytes) of image i, read at its offset; `decode`
        as for `read_member_at`."""
        k, offset, size = self.members[i]
        if k < 0:
            raise BadImageError("member not located in its shard: re-run extract")
        return read_member_at(self.root / self.shards[k], offset, size, decode)


# ----------------------------------------------------------------------------- listing

@dataclass
class _Shard:
    """What listing one shard found."""
    stat: tuple[int, int]
    images: list = field(default_factory=list)     # (path, label or None, digest, offset, size)
    skipped: list = field(default_factory=list)    # (path, reason)
    read: int = 0                                  # members read to hash them


def known_members(reader, label_key: str) -> dict[str, _Shard]:
    """shard -> its images and skipped members as the complete cache `reader` holds them, for
    the shards whose rows all kept the same (size, mtime_ns): while a shard keeps it, its
    listing can be trusted without reading it. (A complete cache holds every member listed,
    as a row or an error; a partial one may not.) Empty when the cache used another label key."""
    if reader is None or not reader.complete:
        return {}
    if (reader.file_manifest.get("config") or {}).get("label_key", "cls") != label_key:
        return {}
    names = reader.class_names
    out: dict[str, _Shard] = {}
    bad: set[str] = set()
    for path, label, digest, st in zip(reader.paths, reader.labels.tolist(), reader.digests,
                                       reader.stats.tolist()):
        shard = split_member(path)[0]
        if shard is None:
            continue
        entry = out.setdefault(shard, _Shard(tuple(st)))
        if entry.stat != tuple(st) or st[0] < 0:
            bad.add(shard)
        entry.images.append((path, names[label] if label >= 0 else None, digest, -1, 0))
    for path, digest, reason in reader.errors:
        shard = path if path in out else split_member(path)[0]
        if shard not in out:
            continue
        if digest:
            out[shard].images.append((path, None, digest, -1, 0))
        else:
            out[shard].skipped.append((path, reason))
    return {k: v for k, v in out.items() if k not in bad}


def split_member(path: str) -> tuple[str | None, str | None]:
    """(shard, member) of a `SHARD.tar/MEMBER` row path, or (None, None)."""
    at = path.find(SHARD_SUFFIX + "/")
    if at < 0:
        return None, None
    cut = at + len(SHARD_SUFFIX)
    return path[:cut], path[cut + 1:]


def list_shards(shards: ShardSet, label_key: str, known: dict[str, _Shard], rehash: bool = False,
                share=None, gather=None):
    """List the images of every shard: (ShardList, (paths, labels, class names, digests),
    (size, mtime_ns) of each image's shard, members read to hash them).

    A shard whose size and mtime equal those `known` keeps its known listing (a stat, not a
    read) unless `rehash`; the others are read, several at a time. Under torchrun `share`
    deals the shards to ranks and `gather` collects every rank's part (both default to one
    process).
    """
    _check_label_key(label_key)
    todo = list(range(len(shards.shards)))
    mine = share(todo) if share else todo

    def one(k: int) -> _Shard:
        rel = shards.shards[k]
        path = shards.root / rel
        try:
            st = os.stat(path)
        except OSError as e:
            return _Shard((-1, -1), skipped=[(rel, f"unreadable shard: {e.strerror or e}")])
        stat = (st.st_size, st.st_mtime_ns)
        kept = known.get(rel)
        if kept is not None and not rehash and kept.stat == stat:
            return _Shard(stat, list(kept.images), list(kept.skipped), 0)
        return _read_shard(path, rel, stat, label_key)

    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
        done = list(pool.map(one, mine))
    results: list = [None] * len(todo)
    if gather is not None:
        parts = gather(done)
        for rank, part in enumerate(parts):
            results[rank::len(parts)] = part
    else:
        results = done
    return _assemble(shards, label_key, results)


def _assemble(shards: ShardSet, label_key: str, results: list[_Shard]):
    rows = []    # (path, label, digest, (shard, offset, size), stat)
    skipped = []
    for k, r in enumerate(results):
        skipped.extend(r.skipped)
        for path, label, digest, offset, size in r.images:
            rows.append((path, label, digest, (k if offset >= 0 else -1, offset, size), r.stat))
    rows.sort(key=lambda row: row[0])
    skipped.sort()
    class_names = _class_names([row[1] for row in rows])
    index = {name: i for i, name in enumerate(class_names)}
    labels = tuple(index[str(row[1])] if row[1] is not None else -1 for row in rows)
    paths = tuple(row[0] for row in rows)
    images = ShardList(shards.root, paths, labels, class_names, "shards", tuple(skipped),
                       shards=shards.shards, members=tuple(row[3] for row in rows),
                       label_key=label_key)
    digests = [row[2] for row in rows]
    return (images, (paths, labels, class_names, digests), [row[4] for row in rows],
            sum(r.read for r in results))


def _class_names(labels: list) -> tuple[str, ...]:
    """Integer labels name classes 0..max by their integers; text labels sort."""
    present = {str(x) for x in labels if x is not None}
    if not present:
        return ()
    if all(re.fullmatch(r"\d+", x) for x in present):
        return tuple(str(k) for k in range(max(int(x) for x in present) + 1))
    if any(re.fullmatch(r"\d+", x) for x in present):
        raise UserError("the shards' labels mix integers and names: give every sample the same "
                        "kind of label")
    return tuple(sorted(present))


def _check_label_key(label_key: str) -> None:
    if label_key != "cls" and not (label_key.startswith("json:") and len(label_key) > 5):
        raise UserError(f"--label-key {label_key!r}: use cls (the KEY.cls member) or "
                        "json:FIELD (FIELD of the KEY.json member)")


def _read_shard(path: Path, rel: str, stat: tuple[int, int], label_key: str) -> _Shard:
    """Stream `path`'s headers once, hashing each image member and reading each label."""
    out = _Shard(stat)
    images: dict[str, tuple] = {}      # member name -> (key, digest, offset, size)
    labels: dict[str, object] = {}     # key -> label
    bad_labels: dict[str, str] = {}    # key -> why its label is unusable
    want = "cls" if label_key == "cls" else "json"
    seen, current = 0, None
    try:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            while True:
                member = tar.next()
                if member is None:
                    break
                seen += 1
                name, kind = member.name, _field(member.name)
                where = f"{rel}/{name}" if is_utf8(name) else f"{rel}/{printable(name)}"
                reason = _hostile(member, kind)
                if reason is not None:
                    if kind is not None or not member.isdir():
                        out.skipped.append((where, reason))
                    continue
                if kind == "image":
                    if name in images:
                        out.skipped.append((where, "duplicate member name: the later one is used"))
                    if member.size > MAX_MEMBER:
                        out.skipped.append((where, _too_large(member.size)))
                        continue
                    current = where
                    digest = _hash_member(f, member)
                    current = None
                    out.read += 1
                    images[name] = (_key(name), digest, member.offset_data, member.size)
                elif kind == want:
                    try:
                        labels[_key(name)] = _label(f, member, label_key)
                    except ValueError as e:
                        bad_labels[_key(name)] = f"{rel}/{name}: {e}"
    except (tarfile.TarError, OSError, EOFError) as e:
        what = "unreadable" if seen == 0 else f"damaged after {seen} members"
        out.skipped.append((rel, f"{what} shard ({first_line(e)}): the members before the "
                                 "damage are kept"))
        if current is not None:
            out.skipped.append((current, "truncated member: the shard ends inside it"))
    for name, (key, digest, offset, size) in images.items():
        where = f"{rel}/{name}"
        if key in bad_labels:
            out.skipped.append((where, f"unusable label in {bad_labels[key]}"))
            continue
        out.images.append((where, labels.get(key), digest, offset, size))
    return out


def _field(name: str) -> str | None:
    """"image", "cls", "json" or None: what member `name` is to a sample."""
    base = PurePosixPath(name).name
    suffix = PurePosixPath(base).suffix.lower()
    if suffix in IMAGE_EXTENSIONS:
        return "image"
    if suffix in (".cls", ".json"):
        return suffix[1:]
    return None


def _key(name: str) -> str:
    """The webdataset key: the member's folder and its basename up to the first dot."""
    p = PurePosixPath(name)
    return str(p.parent / p.name.split(".", 1)[0])


def _hostile(member: tarfile.TarInfo, kind: str | None) -> str | None:
    """Why `member` cannot be an image or a label, or None when it is a plain file."""
    name = member.name
    if not is_utf8(name):
        return "member name is not valid UTF-8"
    if name.startswith("/"):
        return "absolute member path"
    if ".." in PurePosixPath(name).parts:
        return "member path leaves the archive (..)"
    if member.issym():
        return f"symbolic link to {member.linkname}"
    if member.islnk():
        return f"hard link to {member.linkname}"
    if member.isdir():
        return "a directory, not a file"
    if member.ischr() or member.isblk():
        return "a device, not a file"
    if member.isfifo():
        return "a FIFO, not a file"
    if not member.isreg():
        return "not a regular file"
    return None


def _too_large(size: int) -> str:
    return f"member of {size / (1 << 20):.0f} MiB, larger than any image (limit " \
           f"{MAX_MEMBER >> 20} MiB): not read"


def _hash_member(f, member: tarfile.TarInfo) -> str:
    h = hashlib.sha256()
    f.seek(member.offset_data)
    left = member.size
    while left:
        block = f.read(min(left, 1 << 20))
        if not block:
            raise tarfile.ReadError("unexpected end of data")
        h.update(block)
        left -= len(block)
    return h.hexdigest()


def _label(f, member: tarfile.TarInfo, label_key: str):
    if member.size > _MAX_LABEL:
        raise ValueError(f"{member.size} bytes, too large for a label")
    f.seek(member.offset_data)
    data = f.read(member.size)
    if len(data) != member.size:
        raise tarfile.ReadError("unexpected end of data")
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None
    if label_key == "cls":
        if not re.fullmatch(r"\d+", text):
            raise ValueError(f"{text[:20]!r} is not a non-negative integer")
        return int(text)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e.msg})") from None
    for part in label_key[len("json:"):].split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)) or isinstance(
            value, int) and value < 0:
        raise ValueError(f"{label_key[5:]} is {value!r}: a label is a non-negative integer "
                         "or a name")
    return value


# ----------------------------------------------------------------------------- reading

_OPEN: dict[str, tuple] = {}    # shard path -> (pid, (dev, ino, size, mtime_ns), descriptor)
_OPEN_KEPT = 16                 # shards held open per process


def read_member_at(shard: Path, offset: int, size: int, decode=None):
    """(RGB image, SHA-256 of the bytes) of the member whose data lie at `offset`; the shard
    stays open in this process for its next members (pread: no shared file position) while
    it is the same file (a shard replaced under its name is opened again). `decode` (a binary
    file object -> anything, raising BadImageError) replaces the PIL decoder, as in
    `images.read_image`."""
    if size > MAX_MEMBER:
        raise BadImageError(_too_large(size))
    key = str(shard)
    try:
        st = os.stat(shard)
        ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        held = _OPEN.get(key)
        if held is None or held[0] != os.getpid() or held[1] != ident:   # a forked worker
            if held is not None and held[0] == os.getpid():                # opens its own
                os.close(held[2])
            _OPEN.pop(key, None)
            while len(_OPEN) >= _OPEN_KEPT:
                old = _OPEN.pop(next(iter(_OPEN)))
                if old[0] == os.getpid():
                    os.close(old[2])
            held = _OPEN[key] = (os.getpid(), ident, os.open(shard, os.O_RDONLY))
    except OSError as e:
        raise BadImageError(f"unreadable shard: {e.strerror or e}") from e
    try:
        data = os.pread(held[2], size, offset)
    except OSError as e:
        raise BadImageError(f"unreadable: {e.strerror or e}") from e
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != size:
        err = BadImageError("shard shorter than its header says (truncated)")
        err.digest = digest
        raise err
    try:
        if decode is None:
            return decode_image(data), digest
        if not data:
            raise BadImageError("empty file")
        return decode(io.BytesIO(data)), digest
    except BadImageError as e:
        e.digest = digest
        raise


def read_path(path: Path, decode=None):
    """read_image for a cached row's path: a file, or `SHARD.tar/MEMBER` read from its shard
    (the shard's headers are streamed once per process to find its members; nothing is
    extracted). `decode` as for `read_image`."""
    path = Path(path)
    shard_text, member = split_member(path.as_posix())
    if member is None or path.exists():
        return read_image(path, decode)
    shard = Path(shard_text)
    try:
        found = _index(shard).get(member)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise BadImageError(f"unreadable shard {shard.name}: {first_line(e)}") from e
    if found is None:
        raise BadImageError(f"no member {member} in {shard.name}")
    offset, size, reason = found
    if reason is not None:
        raise BadImageError(reason)
    return read_member_at(shard, offset, size, decode)


def member_paths(source: str | Path) -> tuple[list[str], list[tuple[str, str]]]:
    """(`SHARD.tar/MEMBER` paths of the image members, (path, reason) of the hostile ones) of
    the shards `source` names, paths spelled from `source`'s folder, as read_path reads them;
    the members are not read."""
    shards = expand(source)
    base = Path(os.path.dirname(os.path.expanduser(str(source))) or ".")
    # Paths as the user wrote them where the shards lie under the source's folder.
    prefix = (base if (base.resolve() if base.exists() else base) == shards.root
              else shards.root)
    paths, skipped = [], []
    for rel in shards.shards:
        shard = shards.root / rel
        try:
            index = _index(shard)
        except (tarfile.TarError, OSError, EOFError) as e:
            skipped.append(((prefix / rel).as_posix(), f"unreadable shard: {first_line(e)}"))
            continue
        for name, (_, _, reason) in sorted(index.items()):
            if _field(name) != "image":
                continue
            where = (prefix / rel).as_posix() + "/" + (name if is_utf8(name) else printable(name))
            (paths.append(where) if reason is None else skipped.append((where, reason)))
    return paths, skipped


_INDEXES: dict[tuple[str, int, int], dict] = {}   # (shard, size, mtime_ns) -> its index
_INDEXES_KEPT = 8


def _index(shard: Path) -> dict[str, tuple[int, int, str | None]]:
    """member name -> (data offset, size, why it cannot be read or None) of every member of
    `shard`, from its headers alone; kept for the last few shards while they are unchanged."""
    st = os.stat(shard)
    key = (str(shard), st.st_size, st.st_mtime_ns)
    if key not in _INDEXES:
        index = {}
        with open(shard, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            while (info := tar.next()) is not None:
                reason = _hostile(info, _field(info.name))
                if reason is None and info.size > MAX_MEMBER:
                    reason = _too_large(info.size)
                index[info.name] = (info.offset_data, info.size, reason)
        while len(_INDEXES) >= _INDEXES_KEPT:
            _INDEXES.pop(next(iter(_INDEXES)))
        _INDEXES[key] = index
    return _INDEXES[key]
