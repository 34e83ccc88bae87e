"""The HDF5 feature store: a crash-safe appending writer and a reader (in RAM or streamed).

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

Crash safety: rows are written, the file flushed, and only then the `committed_rows`
marker advanced and flushed again. A SIGKILL at any point leaves a file that reopens with
every committed batch intact; rows past the marker are discarded on resume. (Measured:
without the flush before the marker, a SIGKILL could lose every batch written so far.)
The writer works on `CACHE.h5.partial`; `finish()` marks it complete, fsyncs it and
renames it into place, so a file under its final name is always complete.

Failed writes (a full disk, an I/O error): HDF5 buffers data in its chunk cache, so a write
may fail only at the flush. Any failure of a commit leaves the marker where it was, and the
file is closed without HDF5 writing to it again (`_abandon`): what HDF5 still holds after a
failed flush no longer describes the file, and writing it was measured to crash the process at
exit or to zero committed rows. The failure is one `StorageError` line saying how many rows are
committed. A file such a failure left unable to be reopened for writing is rebuilt from its
committed rows on resume (`repair`).
"""
from __future__ import annotations

import contextlib
import errno as errno_codes
import functools
import logging
import os
import re
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import h5py
import numpy as np

from . import manifest as mf
from .errors import UserError

_STR = h5py.string_dtype("utf-8")
_DIGEST = "S64"
_ERROR = np.dtype([("path", _STR), ("digest", _DIGEST), ("reason", _STR)])
_CHUNK_BYTES = 1 << 20
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
# What a failed write says to do, by errno; any other failure: fix it and re-run.
_ADVICE = {errno_codes.ENOSPC: "free space and re-run the same command",
           errno_codes.EDQUOT: "free space (or raise the quota) and re-run the same command",
           errno_codes.EIO: "check the disk, then re-run the same command"}

log = logging.getLogger(__name__)


class CacheBusy(UserError):
    """A cache file that another process holds open (HDF5 locks a file it writes): wait for it
    or stop it. Never a reason to replace the file."""


class StorageError(UserError):
    """A write to a cache file failed (a full disk, an I/O error); what was committed is kept."""


class Unreadable(UserError):
    """A file that HDF5 cannot open or read as a cache (damaged, or not HDF5 at all)."""


def partial_path(path: str | Path) -> Path:
    """Where an unfinished cache for `path` lives."""
    path = Path(path)
    return path.with_name(path.name + ".partial")


def rows_per_chunk(feature_dim: int, dtype: str) -> int:
    """Rows in one ~1 MiB chunk of the features dataset."""
    return max(1, _CHUNK_BYTES // (feature_dim * np.dtype(dtype).itemsize))


class CacheWriter:
    """Appends committed batches to an (unfinished) cache file. Use `create` or `resume`."""

    def __init__(self, path: Path, h5: h5py.File):
        self.path = path
        self._h5 = h5
        self.manifest = mf.loads(h5.attrs["manifest"])
        self._features = _feature_datasets(h5, self.manifest)   # cut name -> (N, D) dataset
        # The markers as last flushed: what a failure reports as committed.
        self._rows, self._errors = _markers(h5, path)

    @classmethod
    def create(cls, path: str | Path, manifest: dict) -> "CacheWriter":
        """Start a new file at `path` (replacing any) for rows described by `manifest`: one
        `features` dataset, or with several cuts a `cuts` group of one dataset per cut."""
        path = Path(path)
        dtype = manifest["dtype"]
        # Unlinked, then created exclusively: opening an existing file with "w" truncates it
        # before HDF5 tries its lock, so a process still reading it would see it emptied.
        path.unlink(missing_ok=True)
        # The default libver on purpose: files made with libver="latest" (needed for SWMR)
        # were measured not to reopen after a SIGKILL, which resuming depends on.
        try:
            h5 = _open_h5(path, "w-")
        except (OSError, RuntimeError) as e:
            path.unlink(missing_ok=True)
            raise _storage_error(e, f"creating {path}", "no rows are committed yet") from None
        try:
            if manifest.get("cuts"):
                group = h5.create_group("cuts")
                for cut in manifest["cuts"]:
                    _create_features(group, cut["name"], int(cut["feature_dim"]), dtype)
            else:
                _create_features(h5, "features", int(manifest["feature_dim"]), dtype)
            if mf.view_count(manifest) > 1:      # augmented views 1..K-1 beside the plain one
                group = h5.create_group("views")
                for v in range(1, mf.view_count(manifest)):
                    _create_features(group, str(v), int(manifest["feature_dim"]), dtype)
            for name, dt in (("labels", "int64"), ("paths", _STR), ("digests", _DIGEST)):
                h5.create_dataset(name, (0,), dtype=dt, maxshape=(None,), chunks=(4096,))
            h5.create_dataset("stats", (0, 2), dtype="int64", maxshape=(None, 2),
                              chunks=(4096, 2))
            h5.create_dataset("errors", (0,), dtype=_ERROR, maxshape=(None,), chunks=(256,))
            h5.attrs["manifest"] = mf.dumps(manifest)
            h5.attrs["format_version"] = (mf.MULTI_CUT_VERSION if manifest.get("cuts")
                                          else mf.FORMAT_VERSION)
            h5.attrs["committed_rows"] = 0
            h5.attrs["committed_errors"] = 0
            h5.attrs["complete"] = 0
            h5.flush()
        except BaseException as e:
            _abandon(h5)
            path.unlink(missing_ok=True)     # holds nothing, and may not even reopen
            if _io_failure(e):
                raise _storage_error(e, f"writing {path}", "no rows are committed yet") from None
            raise
        return cls(path, h5)

    @classmethod
    def resume(cls, path: str | Path) -> "CacheWriter":
        """Reopen an unfinished file, dropping anything written after the last commit.

        A file that a failed write left unable to be reopened for writing is first rebuilt
        from its committed rows (`repair`); one whose markers are damaged is refused."""
        path = Path(path)
        try:
            return cls._resume(path)
        except (CacheBusy, StorageError):
            raise
        except (OSError, RuntimeError, KeyError) as e:   # h5py: KeyError for damaged objects
            kept = repair(path)
            log.warning("%s could not be reopened for writing (%s): rebuilt from its %d "
                        "committed rows", path, _first_line(e), kept)
            return cls._resume(path)

    @classmethod
    def _resume(cls, path: Path) -> "CacheWriter":
        h5 = _open_h5(path, "r+")
        try:
            _check_layout(h5, path)
            manifest = mf.loads(h5.attrs["manifest"])
            n, m = _markers(h5, path, manifest)
            for d in _row_datasets(h5, manifest):
                if d.shape[0] != n:
                    d.resize(n, axis=0)
            if h5["errors"].shape[0] != m:
                h5["errors"].resize(m, axis=0)
            h5.flush()
        except UserError:
            try:              # refused before anything was changed: a plain close writes nothing
                h5.close()
            except BaseException:
                _abandon(h5)
            raise
        except BaseException:
            _abandon(h5)
            raise
        return cls(path, h5)

    @property
    def committed_rows(self) -> int:
        return self._rows

    def commit(self, features: np.ndarray | Mapping[str, np.ndarray], labels: Sequence[int],
               paths: Sequence[str], digests: Sequence[str],
               errors: Sequence[tuple[str, str, str]] = (),
               stats: Sequence[tuple[int, int]] | None = None) -> None:
        """Append one batch atomically: data, flush, then the markers, flush. `features` is
        (B, D), or {cut name: (B, D_cut)} for every cut of a several-cut cache; `stats` the
        (size, mtime_ns) of each file when hashed (unknown: -1, and the file is hashed again
        next time).

        A failed write raises StorageError (the batch is not committed, the file is closed);
        the writer takes no further batches."""
        h5, b = self._h5, len(paths)
        if not h5.id.valid:
            raise ValueError(f"the writer of {self.path} is closed (after a failed write, "
                             "resume the file to go on)")
        n, m = self._rows, self._errors
        if not isinstance(features, Mapping):
            if len(self._features) != 1:
                raise ValueError(f"this cache holds cuts {', '.join(self._features)}: commit "
                                 "a dict of features per cut")
            features = {next(iter(self._features)): features}
        if set(features) != set(self._features):
            raise ValueError(f"batch has cuts {sorted(features)}, the cache {list(self._features)}")
        for name, values in features.items():
            if values.shape != (b, self._features[name].shape[1]):
                raise ValueError(f"batch features of {name} have shape {values.shape}, "
                                 f"expected ({b}, {self._features[name].shape[1]})")
        try:
            if b:
                columns = [*((self._features[k], v) for k, v in features.items()),
                           (h5["labels"], np.asarray(labels, "int64")),
                           (h5["paths"], np.array(paths, dtype=object)),
                           (h5["digests"], np.array(digests, dtype=_DIGEST))]
                if "stats" in h5:
                    columns.append((h5["stats"], np.asarray(
                        stats if stats is not None else [(-1, -1)] * b, "int64").reshape(b, 2)))
                for dataset, values in columns:
                    dataset.resize(n + b, axis=0)
                    dataset[n:n + b] = values
            if errors:
                h5["errors"].resize(m + len(errors), axis=0)
                h5["errors"][m:m + len(errors)] = np.array(
                    [(p, d.encode(), r) for p, d, r in errors], dtype=_ERROR)
            # Only a flush that succeeded puts the rows in the file: until then the marker
            # must not move (a failed flush may have written none, some or all of them).
            h5.flush()
            h5.attrs.modify("committed_rows", n + b)
            h5.attrs.modify("committed_errors", m + len(errors))
            h5.flush()
        except BaseException as e:
            self._fail(e)
        self._rows, self._errors = n + b, m + len(errors)

    def add_errors(self, errors: Sequence[tuple[str, str, str]]) -> None:
        """Commit (path, digest, reason) errors without rows."""
        self.commit({name: np.empty((0, d.shape[1]), d.dtype)
                     for name, d in self._features.items()}, [], [], [], errors)

    def _fail(self, e: BaseException):
        """Close after a failed commit and raise: StorageError for an I/O failure (with the
        committed rows as the file now says, when it can be read), else `e` itself."""
        closed = _abandon(self._h5)
        if not _io_failure(e):
            raise e
        rows = self._rows
        if closed:   # the marker flush may have landed before the failure
            with contextlib.suppress(Exception), h5py.File(self.path, "r") as h5:
                rows = _markers(h5, self.path)[0]
        raise _storage_error(e, f"writing {self.path}", f"{rows} rows are committed") from None

    def finish(self, final_path: str | Path, manifest_updates: dict | None = None) -> Path:
        """Close, then mark complete and rename into place (see `finish`)."""
        self.close()
        return finish(self.path, final_path, manifest_updates)

    def close(self) -> None:
        if self._h5.id.valid:
            try:
                self._h5.close()
            except BaseException as e:   # the close flushes: a failure is a failed write
                self._fail(e)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class CacheReader:
    """Read access to a feature cache. Refuses unfinished files unless `allow_incomplete`.

    Labels are read on opening; paths, digests and errors on first use (then kept); features
    stay on disk until `load_features()` (all into RAM) or `iter_chunks()` (streamed).

    A cache of several cuts serves one at a time: `layer` picks it (by name, alias or graph
    node); without it, the only cut. `manifest` is then that cut's manifest, as a one-cut
    cache of it would have; with several cuts and none picked it is the file's own, and the
    features cannot be read until one is.
    """

    def __init__(self, path: str | Path, allow_incomplete: bool = False,
                 layer: str | None = None):
        self.path = Path(path)
        if not self.path.exists():
            hint = (f" (an unfinished one is at {partial_path(self.path)}: re-run the same "
                    "extract command to finish it)") if partial_path(self.path).exists() else ""
            raise UserError(f"no cache at {self.path}{hint}")
        try:
            self._h5 = _open_h5(self.path, "r")
        except (OSError, RuntimeError) as e:
            raise Unreadable(f"{self.path} is not a readable HDF5 feature cache: "
                             f"{_first_line(e)}") from None
        try:
            _check_layout(self._h5, self.path)
            self.file_manifest = mf.validate(mf.loads(self._h5.attrs["manifest"], self.path),
                                             self.path)
            self._features = _feature_datasets(self._h5, self.file_manifest)
            mf.check_widths(self.file_manifest, {k: d.shape for k, d in self._features.items()},
                            self.path)
            self.cut = self._pick(layer)
            self.manifest = (mf.cut_manifest(self.file_manifest, self.cut)
                             if self.cut is not None and len(self.cut_names) > 1
                             else self.file_manifest)
            self.complete = bool(self._h5.attrs["complete"])
            if not self.complete and not allow_incomplete:
                raise UserError(f"{self.path} is an incomplete cache (extraction did not finish): "
                                 "re-run extract to complete it, or allow incomplete caches")
            self.n_rows = _markers(self._h5, self.path, self.file_manifest)[0]
            self.labels = self._h5["labels"][: self.n_rows].astype(np.int64)  # (N,)
        except (OSError, RuntimeError, KeyError) as e:   # HDF5 could not read what the file
            self._h5.close()                              # says it holds (h5py: KeyError too)
            raise Unreadable(f"{self.path} is damaged: {_first_line(e)}") from None
        except BaseException:
            self._h5.close()
            raise

    def _pick(self, layer: str | None) -> dict | None:
        cuts = mf.cuts(self.file_manifest)
        if layer is None:
            return cuts[0] if len(cuts) == 1 else None
        cut = mf.find_cut(self.file_manifest, layer)
        if cut is None:
            raise UserError(f"{self.path} holds no cut {layer!r}, only "
                            f"{', '.join(c['name'] for c in cuts)}: pick one of those with "
                            "--layer, or extract that cut")
        return cut

    @property
    def cut_names(self) -> list[str]:
        """Names of the cuts this cache holds (one for a one-cut cache)."""
        return [c["name"] for c in mf.cuts(self.file_manifest)]

    @property
    def n_views(self) -> int:
        """Views of each image: 1, or K for a cache extracted with --views K."""
        return mf.view_count(self.file_manifest)

    def view(self, v: int) -> h5py.Dataset:
        """The (N, D) features of view `v` (0: the plain preprocessing, `features`)."""
        if not 0 <= v < self.n_views:
            raise IndexError(f"view {v} of a cache of {self.n_views} views")
        return self.features if v == 0 else self._features[f"view {v}"]

    # Paths, digests and errors are read on first use (then kept): as Python strings they
    # cost ~0.5 KiB a row, which training, needing only features and labels, should not pay.
    @functools.cached_property
    def paths(self) -> list[str]:
        """(N,) image paths relative to the source root."""
        return [p.decode("utf-8") for p in self._h5["paths"][: self.n_rows]]

    @functools.cached_property
    def digests(self) -> list[str]:
        """(N,) SHA-256 hex digests of the image files."""
        return [d.decode("ascii") for d in self._h5["digests"][: self.n_rows]]

    @functools.cached_property
    def stats(self) -> np.ndarray:
        """(N, 2) int64 size and mtime_ns of each file when it was hashed; -1 where unknown
        (every row of a cache written before they were kept)."""
        if "stats" not in self._h5:
            return np.full((self.n_rows, 2), -1, np.int64)
        return self._h5["stats"][: self.n_rows].astype(np.int64)

    @functools.cached_property
    def errors(self) -> list[tuple[str, str, str]]:
        """(path, digest, reason) of every image that could not be used."""
        return _read_errors(self._h5)

    @property
    def features(self) -> h5py.Dataset:
        """The (N, D) features dataset of the picked cut on disk (rows past `n_rows` are not
        committed)."""
        if self.cut is None:
            raise UserError(f"{self.path} holds several cuts ({', '.join(self.cut_names)}): "
                            "pick one with --layer")
        return self._features[self.cut["name"]]

    @property
    def feature_dim(self) -> int:
        return int(self.features.shape[1])

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest.get("class_names", []))

    @property
    def chunk_rows(self) -> int:
        """Rows per HDF5 chunk; for a contiguous (unchunked) copy, the rows of ~1 MiB."""
        chunks = self.features.chunks
        return int(chunks[0]) if chunks else rows_per_chunk(self.feature_dim,
                                                            self.features.dtype.str)

    def load_features(self, dtype="float32") -> np.ndarray:
        """All committed features in RAM as an (N, D) array of `dtype`."""
        out = np.empty((self.n_rows, self.feature_dim), dtype=dtype)
        for start, stop, block in self.iter_chunks():
            out[start:stop] = block
        return out

    def read_rows(self, indices: Sequence[int] | np.ndarray, cut: str | None = None
                  ) -> np.ndarray:
        """Features of arbitrary rows, in the order given, as float32 (N', D), of the picked
        cut, or of the features dataset `cut` names (a cut, or "view V"; a one-cut cache's
        only cut answers to any cut name).

        Reads contiguous runs as slices: HDF5 fancy indexing row by row is slow.
        """
        if cut is None or (cut not in self._features and len(self.cut_names) == 1):
            dataset = self.features
        else:
            dataset = self._features[cut]
        indices = np.asarray(indices, dtype=np.int64)
        out = np.empty((len(indices), dataset.shape[1]), dtype=np.float32)
        order = np.argsort(indices, kind="stable")
        sorted_idx = indices[order]
        if len(sorted_idx) and (sorted_idx[0] < 0 or sorted_idx[-1] >= self.n_rows):
            raise IndexError(f"row index out of range 0..{self.n_rows - 1}")
        breaks = np.flatnonzero(np.diff(sorted_idx) != 1) + 1
        pos = 0
        for run in np.split(sorted_idx, breaks) if len(sorted_idx) else []:
            block = dataset[run[0]: run[-1] + 1]
            out[order[pos:pos + len(run)]] = block
            pos += len(run)
        return out

    def iter_chunks(self, order: Sequence[int] | None = None, view: int = 0
                    ) -> Iterator[tuple[int, int, np.ndarray]]:
        """Yield (start, stop, features[start:stop]) one whole HDF5 chunk at a time, of the
        plain view or of augmented view `view`.

        `order` is a permutation of chunk numbers (for shuffled streaming); default in order.
        """
        step, dataset = self.chunk_rows, self.view(view)
        n_chunks = -(-self.n_rows // step)
        for c in (range(n_chunks) if order is None else order):
            start, stop = c * step, min((c + 1) * step, self.n_rows)
            yield start, stop, dataset[start:stop]

    def close(self) -> None:
        if self._h5.id.valid:
            self._h5.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def finish(partial: str | Path, final_path: str | Path, manifest_updates: dict | None = None) -> Path:
    """Mark an unfinished cache complete, fsync it, and atomically rename it to `final_path`.

    A failed write raises StorageError and leaves the file unfinished under its name (a re-run
    finishes it)."""
    partial = Path(partial)
    try:
        h5 = _open_h5(partial, "r+")
    except (OSError, RuntimeError) as e:
        log.warning("%s could not be reopened for writing (%s): rebuilding it from its "
                    "committed rows", partial, _first_line(e))
        repair(partial)
        h5 = _open_h5(partial, "r+")
    rows = 0
    try:
        rows = _markers(h5, partial)[0]
        if manifest_updates:
            h5.attrs["manifest"] = mf.dumps({**mf.loads(h5.attrs["manifest"]), **manifest_updates})
        h5.attrs.modify("complete", 1)
        h5.flush()
        h5.close()
        fsync_path(partial)
    except BaseException as e:
        _abandon(h5)
        if _io_failure(e):
            raise _storage_error(e, f"finishing {partial}", f"{rows} rows are committed"
                                 ) from None
        raise
    os.replace(partial, final_path)
    fsync_path(Path(final_path).resolve().parent)
    return Path(final_path)


def refresh_stats(path: str | Path, rows: Sequence[int], stats: Sequence[tuple[int, int]]
                  ) -> None:
    """Record new (size, mtime_ns) for rows of a complete cache whose files were found
    unchanged in content (touched, or copied without their times), so that the next run trusts
    them again. Only the stats dataset changes: a write torn by a crash leaves each row with
    its old or its new stats, both true of the same content. Only an optimization: when the
    file cannot be written (busy, a full disk), it says so and the next run hashes those files
    again."""
    if not len(rows):
        return
    path = Path(path)
    try:
        h5 = _open_h5(path, "r+")
    except (CacheBusy, OSError, RuntimeError) as e:
        log.warning("could not record new file times in %s (%s): the next run reads those "
                    "files again", path, _first_line(e))
        return
    try:
        if "stats" in h5:
            order = np.argsort(rows)
            data = h5["stats"][:]
            data[np.asarray(rows)[order]] = np.asarray(stats, np.int64).reshape(-1, 2)[order]
            h5["stats"][:] = data
        h5.close()
    except BaseException as e:
        _abandon(h5)
        if not _io_failure(e):
            raise
        log.warning("could not record new file times in %s (%s): the next run reads those "
                    "files again", path, _first_line(e))


def read_manifest(path: str | Path) -> tuple[dict, bool]:
    """(manifest, complete) of a cache file, finished or not."""
    with h5py.File(path, "r") as h5:
        _check_layout(h5, Path(path))
        manifest = mf.validate(mf.loads(h5.attrs["manifest"], path), path)
        return manifest, bool(h5.attrs["complete"])


def _check_layout(h5: h5py.File, path: Path) -> None:
    version = int(h5.attrs.get("format_version", -1))
    if version not in (mf.FORMAT_VERSION, mf.MULTI_CUT_VERSION):
        raise UserError(f"{path} has cache format version {version}, this tool reads "
                        f"{mf.FORMAT_VERSION} and {mf.MULTI_CUT_VERSION}: re-extract it")
    features = "cuts" if version == mf.MULTI_CUT_VERSION else "features"
    missing = [k for k in (features, "labels", "paths", "digests", "errors") if k not in h5]
    if missing or "manifest" not in h5.attrs:
        raise UserError(f"{path} is an HDF5 file but not a feature cache "
                        f"(missing: {', '.join(missing) or 'manifest'})")


def _create_features(parent, name: str, dim: int, dtype: str) -> None:
    parent.create_dataset(name, (0, dim), dtype=dtype, maxshape=(None, dim),
                          chunks=(rows_per_chunk(dim, dtype), dim))


def _feature_datasets(h5: h5py.File, manifest: dict) -> dict[str, h5py.Dataset]:
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


def _read_errors(h5: h5py.File) -> list[tuple[str, str, str]]:
    m = int(h5.attrs["committed_errors"])
    return [(e["path"].decode("utf-8"), e["digest"].decode("ascii"), e["reason"].decode("utf-8"))
            for e in h5["errors"][:m]]


def fsync_path(path: str | Path) -> None:
    """fsync a file or folder by path (flush() is not fsync(): data can still be in the page
    cache; a full disk or an I/O error may only surface here)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _row_datasets(h5: h5py.File, manifest: dict | None = None) -> list[h5py.Dataset]:
    """Every dataset with one entry per row: the features of each cut, labels, paths, digests
    and (when present) stats."""
    manifest = manifest if manifest is not None else mf.loads(h5.attrs["manifest"])
    return [*_feature_datasets(h5, manifest).values(),
            *(h5[name] for name in ("labels", "paths", "digests", "stats") if name in h5)]


def _markers(h5: h5py.File, path: Path, manifest: dict | None = None) -> tuple[int, int]:
    """(committed rows, committed errors) of a cache file, refused as damaged when they are not
    counts the file holds: rows past the datasets' ends were never written, and a negative count
    is no count at all. Refused rather than clamped: a marker that was edited or torn says
    nothing about which rows are good."""
    try:
        n, m = int(h5.attrs["committed_rows"]), int(h5.attrs["committed_errors"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path} is damaged: its committed_rows/committed_errors markers are "
                        f"unreadable ({_first_line(e)}): {_way_out(path)}") from None
    held = min(d.shape[0] for d in _row_datasets(h5, manifest))
    held_errors = h5["errors"].shape[0]
    if not (0 <= n <= held and 0 <= m <= held_errors):
        raise UserError(f"{path} is damaged: its markers say {n} rows and {m} errors are "
                        f"committed, but it holds {held} rows and {held_errors} errors: "
                        f"{_way_out(path)}")
    return n, m


def _way_out(path: Path) -> str:
    if path.name.endswith(".partial") or ".shard-" in path.name:
        return "delete it and re-run the same extract command (its rows are computed again)"
    return "re-extract it"


def _open_h5(path: Path, mode: str) -> h5py.File:
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


def _abandon(h5: h5py.File) -> bool:
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


def _errno(e: BaseException) -> int | None:
    """The errno of an OSError, or the one HDF5 names in its message ("errno = 28")."""
    if isinstance(e, OSError) and isinstance(e.errno, int):
        return e.errno
    found = re.search(r"errno = (\d+)", str(e))
    return int(found.group(1)) if found else None


def _io_failure(e: BaseException) -> bool:
    """h5py reports a failed read or write of the file as OSError or RuntimeError."""
    return isinstance(e, (OSError, RuntimeError))


def _storage_error(e: BaseException, doing: str, kept: str) -> StorageError:
    code = _errno(e)
    if code:
        reason = os.strerror(code)
        reason = reason[:1].lower() + reason[1:]
    else:
        reason = f"a write failed ({_first_line(e)})"
    err = StorageError(f"{reason} {doing}: {kept}; "
                       f"{_ADVICE.get(code, 'fix that and re-run the same command')}")
    err.reason, err.advice = reason, _ADVICE.get(code, "fix that and re-run the same command")
    return err


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:200]


def repair(path: str | Path) -> int:
    """Rebuild the unfinished cache file at `path` from its committed rows and errors; return
    the rows kept. For a file that a failed write left readable but no longer writable (HDF5's
    metadata half-flushed). A file whose committed rows cannot be read is refused as damaged."""
    path = Path(path)
    tmp = path.with_name(path.name + ".repairing")

    def damaged(e: BaseException) -> UserError:
        return UserError(f"{path} is damaged ({_first_line(e)}) and cannot be repaired: "
                         f"{_way_out(path)}")
    try:
        src = _open_h5(path, "r")
    except (OSError, RuntimeError) as e:
        # A flush that failed after recording the file's new end in the superblock leaves the
        # file shorter than it says: HDF5 refuses to open it. The missing tail held only what
        # that flush was writing, past the committed rows, so zeros in its place will do.
        end = re.search(r"truncated file: eof = (\d+).*stored_eof = (\d+)", str(e))
        if not end or int(end.group(2)) <= int(end.group(1)):
            raise damaged(e) from None
        try:
            os.truncate(path, int(end.group(2)))
            src = _open_h5(path, "r")
        except (OSError, RuntimeError) as again:
            raise damaged(again) from None
    try:
        with src:
            try:
                _check_layout(src, path)
                manifest = mf.loads(src.attrs["manifest"])
                n, _ = _markers(src, path, manifest)
                errors = _read_errors(src)
                feats = _feature_datasets(src, manifest)
            except (OSError, RuntimeError, KeyError) as e:
                raise damaged(e) from None
            block = rows_per_chunk(max(d.shape[1] for d in feats.values()), manifest["dtype"])
            with CacheWriter.create(tmp, manifest) as writer:
                for start in range(0, n, block):
                    rows = slice(start, min(n, start + block))
                    try:
                        values = {name: d[rows] for name, d in feats.items()}
                        labels, digests = src["labels"][rows], src["digests"][rows]
                        paths = [p.decode("utf-8") for p in src["paths"][rows]]
                        stats = src["stats"][rows] if "stats" in src else None
                    except (OSError, RuntimeError) as e:
                        raise damaged(e) from None
                    writer.commit(values, labels, paths, digests, stats=stats)
                if errors:
                    writer.add_errors(errors)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return n


def cache_kind(path: str | Path) -> str:
    """What the existing regular file at `path` is: "cache" (a feature cache of any format,
    finished or not), "hdf5" (an HDF5 file that is not one), "unreadable" (an HDF5 signature,
    but HDF5 cannot open it) or "other" (not HDF5). CacheBusy when another process holds it."""
    try:
        with open(path, "rb") as f:
            if f.read(len(_HDF5_SIGNATURE)) != _HDF5_SIGNATURE:
                return "other"
    except OSError:
        return "unreadable"
    try:
        with _open_h5(Path(path), "r") as h5:
            return "cache" if {"manifest", "format_version"} <= set(h5.attrs) else "hdf5"
    except (OSError, RuntimeError, KeyError):
        return "unreadable"


def assemble(dest: str | Path, manifest: dict, sources: Sequence[CacheReader],
             rows: Sequence[tuple[int, int, int, str, str]],
             errors: Sequence[tuple[str, str, str]] = ()) -> Path:
    """Write a complete cache at `dest` from rows of existing caches, without recomputing.

    `rows` lists the output rows in order as (source number, source row, label, path,
    digest). Used when an incremental re-extraction merges reused and new rows. The new
    file is built under a temporary name and renamed into place, so `dest` is never torn.
    """
    dest = Path(dest)
    tmp = dest.with_name(dest.name + ".assembling")
    writer = CacheWriter.create(tmp, manifest)
    dims = dict(mf.feature_datasets(manifest))
    block = rows_per_chunk(max(dims.values()), manifest["dtype"]) * 8

    def empty(n: int) -> dict[str, np.ndarray]:
        return {name: np.empty((n, d), manifest["dtype"]) for name, d in dims.items()}

    try:
        for start in range(0, len(rows), block):
            part = rows[start:start + block]
            feats = empty(len(part))                                   # cut -> (B, D_cut)
            src = np.array([r[0] for r in part])
            src_rows = np.array([r[1] for r in part])
            stats = np.empty((len(part), 2), np.int64)
            for s in np.unique(src):
                mask = src == s
                for name, values in feats.items():
                    values[mask] = sources[s].read_rows(src_rows[mask], cut=name)
                stats[mask] = sources[s].stats[src_rows[mask]]
            writer.commit(feats, [r[2] for r in part], [r[3] for r in part],
                          [r[4] for r in part], stats=stats)
        writer.commit(empty(0), [], [], [], errors)
        return writer.finish(dest)
    except BaseException:
        # The temporary file is of no use half-written, and on a full disk it holds the space
        # a re-run needs.
        _abandon(writer._h5)
        tmp.unlink(missing_ok=True)
        raise
