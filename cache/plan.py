"""Planning an incremental extraction: which images already have a row, which to compute.

An image is matched to a cached row by (path, content digest), so a changed file is computed
again and a removed one is dropped. The sources of reusable rows are the complete cache, the
`.partial` file of an unfinished one-process run and the `.shard-R` files of the ranks of an
unfinished many-process run (whatever their number), in that order; where several hold an
image the later one wins, being the newer computation. Images arrive as plain lists, so this
module needs no model and no torch:

    sources = open_existing(output, manifest, overwrite)      # [cache, partial, shards...]
    try:
        planned = plan(paths, labels, class_names, digests, [r for r in sources if r])
    finally:
        ...close the sources...
    # compute planned.todo into partial_path(output) (or shard_path(output, rank)), batch by batch
    final = finalize(output, manifest, paths, labels, class_names, digests)

Images that cannot be stored by name (`unusable`: (path, reason) of file names that are not
valid UTF-8) are recorded among the errors, with the digest "", by both `plan` and `finalize`.
"""
from __future__ import annotations

import contextlib
import glob
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from . import manifest as mf
from .errors import CacheBusy, StorageError, Unreadable, UserError
from .reader import CacheReader
from .update import assemble
from .writer import CacheWriter, finish, partial_path, repair

CHANGED_REASON = "file changed during extraction: re-run extract to include it"
log = logging.getLogger(__name__)


@dataclass
class Plan:
    """The cache that a list of images maps to, row by row in image order."""
    rows: list          # (image index, source number, source row) of each output row
    errors: list        # (path, digest, reason) of images known to be unusable, sorted
    todo: list          # indices of images with neither a row nor an error: to compute
    paths: Sequence[str] = field(repr=False)
    labels: Sequence[int] = field(repr=False)
    class_names: Sequence[str] = field(repr=False)
    digests: Sequence[str] = field(repr=False)
    # Paths of the sources that the source numbers of `rows` refer to (set by `finalize`).
    sources: list = field(default_factory=list, repr=False)

    def is_whole(self, source: CacheReader, s: int) -> bool:
        """True when `source` (source number `s`) already is exactly the cache planned:
        nothing to compute, all its rows in its order, the same labels, errors and classes."""
        return self.missing_errors(source, s) == []

    def missing_errors(self, source: CacheReader, s: int) -> list | None:
        """The planned errors that `source` (source number `s`) lacks, when adding them would
        make it exactly the cache planned (see `is_whole`); None when more than that differs."""
        if (self.todo
                or [(s0, r) for _, s0, r in self.rows] != [(s, k) for k in range(source.n_rows)]
                or source.labels.tolist() != [self.labels[i] for i, _, _ in self.rows]
                or source.class_names != list(self.class_names)):
            return None
        have, want = Counter(source.errors), Counter(self.errors)
        if have - want:
            return None
        return sorted((want - have).elements())

    def dropped(self, source: CacheReader) -> int:
        """Rows of `source` whose image is gone (a changed image is counted by `changed`)."""
        current = set(self.paths)
        return sum(path not in current for path in source.paths)

    def changed(self, source: CacheReader) -> int:
        """Rows of `source` whose image is still there with other content: computed again."""
        current = dict(zip(self.paths, self.digests))
        return sum(path in current and current[path] != digest
                   for path, digest in zip(source.paths, source.digests))

    def output_rows(self) -> list[tuple[int, int, int, str, str]]:
        """(source number, source row, label, path, digest) of each row, for `assemble`."""
        return [(s, r, self.labels[i], self.paths[i], self.digests[i]) for i, s, r in self.rows]


def plan(paths: Sequence[str], labels: Sequence[int], class_names: Sequence[str],
         digests: Sequence[str], sources: Sequence[CacheReader],
         changed_reason: str | None = None,
         unusable: Sequence[tuple[str, str]] = ()) -> Plan:
    """Match each image (by path and content digest) to a row or an error already in `sources`.

    Images found in none go to `todo`, or, with `changed_reason`, become errors with that
    reason (after computing, an image still without a row changed while it was being read).
    `unusable` (path, reason) are files left out of the images (names that are not valid
    UTF-8): errors with the digest "".
    """
    if not len(paths) == len(labels) == len(digests):
        raise ValueError(f"{len(paths)} paths, {len(labels)} labels and {len(digests)} digests: "
                         "pass one of each per image")
    index, known = {}, {}
    for s, src in enumerate(sources):
        for row, key in enumerate(zip(src.paths, src.digests)):
            index[key] = (s, row)   # a later source overwrites: it holds the newer computation
        for p, d, reason in src.errors:
            known[(p, d)] = reason
    planned = Plan([], [], [], paths, labels, class_names, digests)
    for i, key in enumerate(zip(paths, digests)):
        if key in index:
            planned.rows.append((i, *index[key]))
        elif key in known:
            planned.errors.append((*key, known[key]))
        elif changed_reason is not None:
            planned.errors.append((*key, changed_reason))
        else:
            planned.todo.append(i)
    planned.errors.extend((p, "", reason) for p, reason in unusable)
    planned.errors.sort()
    return planned


def open_compatible(path: str | Path, manifest: dict, overwrite: bool,
                    repairable: bool = False) -> CacheReader | None:
    """Reader on an existing cache at `path` whose rows can be reused, or None if there is none.

    A file that is not a cache, or a cache made with other settings, is refused (naming the
    differing fields) unless `overwrite`, in which case it is ignored (and later replaced). A
    file another process holds open is refused even so (CacheBusy): it is not ours to replace.
    (That `-o` itself is a feature cache, extract checks before any work.) An unfinished file
    (`repairable`) that HDF5 cannot read, as a failed write can leave it, is first rebuilt
    from its committed rows (`repair`), keeping them. Only a UserError lets `overwrite` ignore
    a file: any other exception while opening it is a bug, raised as it is.
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        reader = CacheReader(path, allow_incomplete=True)
    except CacheBusy:
        raise
    except UserError as e:     # not a bug: a bug is never a reason to replace the file
        reader = _repaired(path, e) if repairable and isinstance(e, Unreadable) else None
        if reader is None:
            if overwrite:
                return None
            raise UserError(f"{path} exists but is not a usable feature cache ({e}); "
                            "pass --overwrite to replace it") from None
    diff = mf.differences(reader.manifest, manifest)
    if diff:
        reader.close()
        if overwrite:
            return None
        raise UserError(f"{path} was made with other settings ({'; '.join(diff)}): pass the "
                         "same settings to update it, --overwrite to start again, or another -o")
    return reader


def _repaired(path: Path, failure: Exception) -> CacheReader | None:
    """A reader on `path` rebuilt from its committed rows, or None where that fails too."""
    try:
        kept = repair(path)
        reader = CacheReader(path, allow_incomplete=True)
    except UserError:
        return None
    log.warning("%s could not be read (%s): rebuilt from its %d committed rows", path,
                failure, kept)
    return reader


def shard_path(output: str | Path, rank: int) -> Path:
    """Where rank `rank` of a many-process extraction commits its batches."""
    output = Path(output)
    return output.with_name(f"{output.name}.shard-{rank}")


def shard_paths(output: str | Path) -> list[Path]:
    """The shard files beside `output`, by rank (any number of ranks, any earlier run)."""
    output = Path(output)
    found = []
    for p in output.parent.glob(f"{glob.escape(output.name)}.shard-*"):
        suffix = p.name[len(output.name) + len(".shard-"):]
        if suffix.isdigit():
            found.append((int(suffix), p))
    return [p for _, p in sorted(found)]


def open_existing(output: str | Path, manifest: dict, overwrite: bool
                  ) -> list[CacheReader | None]:
    """Readers on the complete cache at `output`, its `.partial`, and its shards, in that order
    (None for the first two where there is none; see `open_compatible`).

    If one is refused, those already open are closed before raising.
    """
    opened: list[CacheReader | None] = []
    try:
        for path in (output, partial_path(output), *shard_paths(output)):
            opened.append(open_compatible(path, manifest, overwrite,
                                          repairable=path != Path(output)))
        return opened
    except BaseException:
        for r in opened:
            if r is not None:
                r.close()
        raise


def known_stats(sources: Sequence[CacheReader]) -> dict[str, tuple[int, int, str]]:
    """path -> (size, mtime_ns, digest) of every row whose file stats were kept: while a file
    still has that size and mtime, its digest can be trusted without reading it."""
    known = {}
    for src in sources:
        stats = src.stats                       # (N, 2): columns as flat lists, the fastest
        for path, digest, size, mtime in zip(src.paths, src.digests, stats[:, 0].tolist(),
                                             stats[:, 1].tolist()):
            if size >= 0:
                known[path] = (size, mtime, digest)
    return known


def finalize(output: str | Path, manifest: dict, paths: Sequence[str], labels: Sequence[int],
             class_names: Sequence[str], digests: Sequence[str],
             updates: dict | None = None, unusable: Sequence[tuple[str, str]] = ()) -> Plan:
    """Put the complete cache of these images at `output`, once their rows are computed.

    New rows are in `partial_path(output)` or in shards, reused ones may be in the cache at
    `output`. When the partial alone is exactly the cache (nothing reused, nothing dropped, no
    shards), it is marked complete and renamed into place; otherwise the rows of all sources
    are assembled into a new file, in image order, and the partial and shards are removed. An
    image still without a row is recorded as an error (`CHANGED_REASON`) and tried again by
    the next run. `updates` are added to the manifest. Returns the plan of the written cache.
    A partial that lacks only errors gets them appended and is renamed (no copy).

    A failed write raises StorageError and keeps every source as it was (a re-run finishes).
    """
    output, part = Path(output), partial_path(output)
    shards = shard_paths(output)
    with contextlib.ExitStack() as stack:
        old = open_compatible(output, manifest, overwrite=True)
        if old is not None:
            stack.enter_context(old)
        held = [stack.enter_context(CacheReader(p, allow_incomplete=True))
                for p in (part, *shards) if p.exists()]
        sources = ([old] if old is not None else []) + held
        final = plan(paths, labels, class_names, digests, sources, changed_reason=CHANGED_REASON,
                     unusable=unusable)
        final.sources = [r.path for r in sources]
        updates = {**(updates or {}), "rows": len(final.rows), "errors": len(final.errors)}
        missing = (final.missing_errors(held[0], len(sources) - 1)
                   if len(held) == 1 and not shards else None)
        if missing is None:
            try:
                assemble(output, {**manifest, **updates}, sources, final.output_rows(),
                         final.errors)
            except StorageError as e:
                kept = (f"the {sum(r.n_rows for r in held)} rows computed so far are kept in "
                        f"{', '.join(str(r.path) for r in held)}" if held
                        else "nothing computed is lost")
                unchanged = f"{output} is unchanged and " if output.exists() else ""
                raise StorageError(
                    f"{e.reason} writing {output.with_name(output.name + '.assembling')}: "
                    f"{unchanged}{kept}; {e.advice}") from None
    if missing is not None:   # after the readers are closed: the partial reopens for writing
        if missing:
            with CacheWriter.resume(part) as writer:
                writer.add_errors(missing)
        finish(part, output, updates)
    else:
        for p in (part, *shards):
            p.unlink(missing_ok=True)
    return final


__all__ = ["CHANGED_REASON", "Plan", "finalize", "known_stats", "open_compatible",
           "open_existing", "plan", "shard_path", "shard_paths"]
