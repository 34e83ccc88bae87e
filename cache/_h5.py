"""The cache file's HDF5 layout and the low-level helpers that the reader, writer and updates share.

File layout (any HDF5 tool reads it):

    features  (N, D) float16|float32, chunked by rows (~1 MiB a chunk), uncompressed
              (format 2, several cuts of one pass: group cuts/<name>, one (N, D_name) each)
              (with --views K: group views/<v>, v = 1..K-1, one augmented (N, D) each)
    labels    (N,)   int64, -1 for unlabeled
    paths     (N,)   UTF-8 strings, relative to the source root
    digests   (N,)   SHA-256 hex of each image file
    stats     (N, 2) int64 size and modification time (ns) of each file when it was hashed:
                     while both are unchanged the digest is trusted without reading the file
                     (absent from caches written before it existed)
    errors    (M,)   compound (path, digest, reason): images that could not be used
    attrs: manifest (JSON), format_version, committed_rows, committed_errors, complete

Rows past `committed_rows` (errors past `committed_errors`) are not committed: a reader never
shows them and a writer drops them on resume (see `cache.writer`).
"""
from __future__ import annotations

import contextlib
import errno as errno_codes
import os
import re
from pathlib import Path

import h5py
import numpy as np

from . import manifest as mf
from .errors import CacheBusy, StorageError, UserError, first_line

STR = h5py.string_dtype("utf-8")
DIGEST = "S64"
ERROR = np.dtype([("path", STR), ("digest", DIGEST), ("reason", STR)])
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_CHUNK_BYTES = 1 << 20
# What a failed write says to do, by errno; any other failure: fix it and re-run.
_ADVICE = {errno_codes.ENOSPC: "free space and re-run the same command",
           errno_codes.EDQUOT: "free space (or raise the quota) and re-run the same command",
           errno_codes.EIO: "check the disk, then re-run the same command"}


def rows_per_chunk(feature_dim: int, dtype: str) -> int:
    """Rows in one ~1 MiB chunk of the features dataset."""
    return max(1, _CHUNK_BYTES // (feature_dim * np.dtype(dtype).itemsize))


def open_file(path: Path, mode: str) -> h5py.File:
    """h5py.File(path, mode); HDF5's refusal to lock a file that another process holds open
    (errno 11) is CacheBusy, never taken for a damaged file."""
    try:
        return h5py.File(path, mode)
    except OSError as e:
        if _errno(e) in (errno_codes.EAGAIN, errno_codes.EWOULDBLOCK) \
                or "unable to lock file" in str(e):
            raise CacheBusy(f"{path} is busy: another process has it open (HDF5 locks a file "
                            "while it is written); wait for that process to finish, or stop "
                            "it") from None
        raise


def check_layout(h5: h5py.File, path: Path) -> None:
    """Refuse a file of another format version, or an HDF5 file that is not a feature cache."""
    version = int(h5.attrs.get("format_version", -1))
    if version not in (mf.FORMAT_VERSION, mf.MULTI_CUT_VERSION):
        raise UserError(f"{path} has cache format version {version}, this tool reads "
                        f"{mf.FORMAT_VERSION} and {mf.MULTI_CUT_VERSION}: re-extract it")
    features = "cuts" if version == mf.MULTI_CUT_VERSION else "features"
    missing = [k for k in (features, "labels", "paths", "digests", "errors") if k not in h5]
    if missing or "manifest" not in h5.attrs:
        raise UserError(f"{path} is an HDF5 file but not a feature cache "
                        f"(missing: {', '.join(missing) or 'manifest'})")


def feature_datasets(h5: h5py.File, manifest: dict) -> dict[str, h5py.Dataset]:
    """Key -> (N, D) features dataset, as `manifest.feature_datasets` lists them: each cut by
    name, then augmented views 1..K-1 as "view 1", ..."""
    names = [c["name"] for c in mf.cuts(manifest)]
    views = [str(v) for v in range(1, mf.view_count(manifest))]
    missing = ([n for n in names if n not in h5["cuts"]] if "cuts" in h5 else []) + (
        [f"view {v}" for v in views if v not in h5.get("views", {})])
    if missing:
        raise UserError(f"{h5.filename} is damaged: its manifest names features "
                        f"{', '.join(missing)} that the file does not hold: re-extract it")
    out = ({n: h5["cuts"][n] for n in names} if "cuts" in h5 else {names[0]: h5["features"]})
    return out | {f"view {v}": h5["views"][v] for v in views}


def row_datasets(h5: h5py.File, manifest: dict | None = None) -> list[h5py.Dataset]:
    """Every dataset with one entry per row: the features of each cut, labels, paths, digests
    and (when present) stats."""
    manifest = manifest if manifest is not None else mf.loads(h5.attrs["manifest"])
    return [*feature_datasets(h5, manifest).values(),
            *(h5[name] for name in ("labels", "paths", "digests", "stats") if name in h5)]


def markers(h5: h5py.File, path: Path, manifest: dict | None = None) -> tuple[int, int]:
    """(committed rows, committed errors) of a cache file, refused as damaged when they are not
    counts the file holds: rows past the datasets' ends were never written, and a negative count
    is no count at all. Refused rather than clamped: a marker that was edited or torn says
    nothing about which rows are good."""
    try:
        n, m = int(h5.attrs["committed_rows"]), int(h5.attrs["committed_errors"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path} is damaged: its committed_rows/committed_errors markers are "
                        f"unreadable ({first_line(e)}): {way_out(path)}") from None
    held = min(d.shape[0] for d in row_datasets(h5, manifest))
    held_errors = h5["errors"].shape[0]
    if not (0 <= n <= held and 0 <= m <= held_errors):
        raise UserError(f"{path} is damaged: its markers say {n} rows and {m} errors are "
                        f"committed, but it holds {held} rows and {held_errors} errors: "
                        f"{way_out(path)}")
    return n, m


def read_errors(h5: h5py.File) -> list[tuple[str, str, str]]:
    """(path, digest, reason) of each committed error."""
    m = int(h5.attrs["committed_errors"])
    return [(e["path"].decode("utf-8"), e["digest"].decode("ascii"), e["reason"].decode("utf-8"))
            for e in h5["errors"][:m]]


def way_out(path: Path) -> str:
    """What to do about a damaged file: an unfinished one is deleted and its rows computed
    again, a finished one re-extracted."""
    if path.name.endswith(".partial") or ".shard-" in path.name:
        return "delete it and re-run the same extract command (its rows are computed again)"
    return "re-extract it"


def abandon(h5: h5py.File) -> bool:
    """Close a file after a failed write without HDF5 writing to the file again; True when it
    closed. Its descriptor is first pointed at an anonymous in-memory file, so whatever HDF5
    still flushes (dirty chunks and metadata that no longer describe the file) goes there, and
    the file keeps what its last successful flush wrote. A first flush after a failed one can
    fail on HDF5's own leftover state, hence the second try."""
    if not h5.id.valid:
        return True
    try:
        fd = h5.id.get_vfd_handle()
        sink = (os.memfd_create("abandoned-hdf5") if hasattr(os, "memfd_create")
                else os.open(os.devnull, os.O_RDWR))
        try:
            os.dup2(sink, fd)
        finally:
            os.close(sink)
    except Exception:   # noqa: BLE001 - not sec2: a plain close is all that is left
        pass
    for _ in range(2):
        with contextlib.suppress(Exception):
            h5.flush()
            break
    for _ in range(2):
        with contextlib.suppress(Exception):
            h5.close()
        if not h5.id.valid:
            return True
    return False


def io_failure(e: BaseException) -> bool:
    """h5py reports a failed read or write of the file as OSError or RuntimeError."""
    return isinstance(e, (OSError, RuntimeError))


def storage_error(e: BaseException, doing: str, kept: str) -> StorageError:
    """The one-line StorageError for failure `e` while `doing` ("writing PATH"), saying what is
    `kept` and what to do (by errno: free space, check the disk)."""
    code = _errno(e)
    if code:
        reason = os.strerror(code)
        reason = reason[:1].lower() + reason[1:]
    else:
        reason = f"a write failed ({first_line(e)})"
    advice = _ADVICE.get(code, "fix that and re-run the same command")
    err = StorageError(f"{reason} {doing}: {kept}; {advice}")
    err.reason, err.advice = reason, advice
    return err


def _errno(e: BaseException) -> int | None:
    """The errno of an OSError, or the one HDF5 names in its message ("errno = 28")."""
    if isinstance(e, OSError) and isinstance(e.errno, int):
        return e.errno
    found = re.search(r"errno = (\d+)", str(e))
    return int(found.group(1)) if found else None


def fsync_path(path: str | Path) -> None:
    """fsync a file or folder by path (flush() is not fsync(): data can still be in the page
    cache; a full disk or an I/O error may only surface here)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
