"""The crash-safe writer of an unfinished cache file: create or resume, commit batches, finish.

Crash safety: rows are written, the file flushed, and only then the `committed_rows`
marker advanced and flushed again. A SIGKILL at any point leaves a file that reopens with
every committed batch intact; rows past the marker are discarded on resume. (Measured:
without the flush before the marker, a SIGKILL could lose every batch written so far.)
The writer works on `CACHE.h5.partial`; `finish()` marks it complete, fsyncs it and
renames it into place, so a file under its final name is always complete. The file's layout
is described in `cache._h5`.

Failed writes (a full disk, an I/O error): HDF5 buffers data in its chunk cache, so a write
may fail only at the flush. Any failure of a commit leaves the marker where it was, and the
file is closed without HDF5 writing to it again (`_h5.abandon`): what HDF5 still holds after a
failed flush no longer describes the file, and writing it was measured to crash the process at
exit or to zero committed rows. The failure is one `StorageError` line saying how many rows are
committed. A file such a failure left unable to be reopened for writing is rebuilt from its
committed rows on resume (`repair`).
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
from pathlib import Path
from typing import Mapping, Sequence

import h5py
import numpy as np

from . import _h5
from . import manifest as mf
from .errors import CacheBusy, StorageError, UserError, first_line

log = logging.getLogger(__name__)


def partial_path(path: str | Path) -> Path:
    """Where an unfinished cache for `path` lives."""
    path = Path(path)
    return path.with_name(path.name + ".partial")


class CacheWriter:
    """Appends committed batches to an (unfinished) cache file. Use `create` or `resume`."""

    def __init__(self, path: Path, h5: h5py.File):
        self.path = path
        self._file = h5
        self.manifest = mf.loads(h5.attrs["manifest"])
        self._features = _h5.feature_datasets(h5, self.manifest)   # cut name -> (N, D) dataset
        # The markers as last flushed: what a failure reports as committed.
        self._rows, self._errors = _h5.markers(h5, path)

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
            h5 = _h5.open_file(path, "w-")
        except (OSError, RuntimeError) as e:
            path.unlink(missing_ok=True)
            raise _h5.storage_error(e, f"creating {path}", "no rows are committed yet") from None
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
            for name, dt in (("labels", "int64"), ("paths", _h5.STR), ("digests", _h5.DIGEST)):
                h5.create_dataset(name, (0,), dtype=dt, maxshape=(None,), chunks=(4096,))
            h5.create_dataset("stats", (0, 2), dtype="int64", maxshape=(None, 2),
                              chunks=(4096, 2))
            h5.create_dataset("errors", (0,), dtype=_h5.ERROR, maxshape=(None,), chunks=(256,))
            h5.attrs["manifest"] = mf.dumps(manifest)
            h5.attrs["format_version"] = (mf.MULTI_CUT_VERSION if manifest.get("cuts")
                                          else mf.FORMAT_VERSION)
            h5.attrs["committed_rows"] = 0
            h5.attrs["committed_errors"] = 0
            h5.attrs["complete"] = 0
            h5.flush()
        except BaseException as e:
            _h5.abandon(h5)
            path.unlink(missing_ok=True)     # holds nothing, and may not even reopen
            if _h5.io_failure(e):
                raise _h5.storage_error(e, f"writing {path}", "no rows are committed yet"
                                        ) from None
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
                        "committed rows", path, first_line(e), kept)
            return cls._resume(path)

    @classmethod
    def _resume(cls, path: Path) -> "CacheWriter":
        h5 = _h5.open_file(path, "r+")
        try:
            _h5.check_layout(h5, path)
            manifest = mf.loads(h5.attrs["manifest"])
            n, m = _h5.markers(h5, path, manifest)
            for d in _h5.row_datasets(h5, manifest):
                if d.shape[0] != n:
                    d.resize(n, axis=0)
            if h5["errors"].shape[0] != m:
                h5["errors"].resize(m, axis=0)
            h5.flush()
        except UserError:
            try:              # refused before anything was changed: a plain close writes nothing
                h5.close()
            except BaseException:
                _h5.abandon(h5)
            raise
        except BaseException:
            _h5.abandon(h5)
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
        h5, b = self._file, len(paths)
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
                           (h5["digests"], np.array(digests, dtype=_h5.DIGEST))]
                if "stats" in h5:
                    columns.append((h5["stats"], np.asarray(
                        stats if stats is not None else [(-1, -1)] * b, "int64").reshape(b, 2)))
                for dataset, values in columns:
                    dataset.resize(n + b, axis=0)
                    dataset[n:n + b] = values
            if errors:
                h5["errors"].resize(m + len(errors), axis=0)
                h5["errors"][m:m + len(errors)] = np.array(
                    [(p, d.encode(), r) for p, d, r in errors], dtype=_h5.ERROR)
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
        closed = _h5.abandon(self._file)
        if not _h5.io_failure(e):
            raise e
        rows = self._rows
        if closed:   # the marker flush may have landed before the failure
            with contextlib.suppress(Exception), h5py.File(self.path, "r") as h5:
                rows = _h5.markers(h5, self.path)[0]
        raise _h5.storage_error(e, f"writing {self.path}", f"{rows} rows are committed") from None

    def finish(self, final_path: str | Path, manifest_updates: dict | None = None) -> Path:
        """Close, then mark complete and rename into place (see `finish`)."""
        self.close()
        return finish(self.path, final_path, manifest_updates)

    def close(self) -> None:
        if self._file.id.valid:
            try:
                self._file.close()
            except BaseException as e:   # the close flushes: a failure is a failed write
                self._fail(e)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _create_features(parent, name: str, dim: int, dtype: str) -> None:
    parent.create_dataset(name, (0, dim), dtype=dtype, maxshape=(None, dim),
                          chunks=(_h5.rows_per_chunk(dim, dtype), dim))


def finish(partial: str | Path, final_path: str | Path, manifest_updates: dict | None = None
           ) -> Path:
    """Mark an unfinished cache complete, fsync it, and atomically rename it to `final_path`.

    A failed write raises StorageError and leaves the file unfinished under its name (a re-run
    finishes it)."""
    partial = Path(partial)
    try:
        h5 = _h5.open_file(partial, "r+")
    except (OSError, RuntimeError) as e:
        log.warning("%s could not be reopened for writing (%s): rebuilding it from its "
                    "committed rows", partial, first_line(e))
        repair(partial)
        h5 = _h5.open_file(partial, "r+")
    rows = 0
    try:
        rows = _h5.markers(h5, partial)[0]
        if manifest_updates:
            h5.attrs["manifest"] = mf.dumps({**mf.loads(h5.attrs["manifest"]), **manifest_updates})
        h5.attrs.modify("complete", 1)
        h5.flush()
        h5.close()
        _h5.fsync_path(partial)
    except BaseException as e:
        _h5.abandon(h5)
        if _h5.io_failure(e):
            raise _h5.storage_error(e, f"finishing {partial}", f"{rows} rows are committed"
                                    ) from None
        raise
    os.replace(partial, final_path)
    _h5.fsync_path(Path(final_path).resolve().parent)
    return Path(final_path)


def repair(path: str | Path) -> int:
    """Rebuild the unfinished cache file at `path` from its committed rows and errors; return
    the rows kept. For a file that a failed write left readable but no longer writable (HDF5's
    metadata half-flushed). A file whose committed rows cannot be read is refused as damaged."""
    path = Path(path)
    tmp = path.with_name(path.name + ".repairing")

    def damaged(e: BaseException) -> UserError:
        return UserError(f"{path} is damaged ({first_line(e)}) and cannot be repaired: "
                         f"{_h5.way_out(path)}")
    try:
        src = _h5.open_file(path, "r")
    except (OSError, RuntimeError) as e:
        # A flush that failed after recording the file's new end in the superblock leaves the
        # file shorter than it says: HDF5 refuses to open it. The missing tail held only what
        # that flush was writing, past the committed rows, so zeros in its place will do.
        end = re.search(r"truncated file: eof = (\d+).*stored_eof = (\d+)", str(e))
        if not end or int(end.group(2)) <= int(end.group(1)):
            raise damaged(e) from None
        try:
            os.truncate(path, int(end.group(2)))
            src = _h5.open_file(path, "r")
        except (OSError, RuntimeError) as again:
            raise damaged(again) from None
    try:
        with src:
            try:
                _h5.check_layout(src, path)
                manifest = mf.loads(src.attrs["manifest"])
                n, _ = _h5.markers(src, path, manifest)
                errors = _h5.read_errors(src)
                feats = _h5.feature_datasets(src, manifest)
            except (OSError, RuntimeError, KeyError) as e:
                raise damaged(e) from None
            dim = max(d.shape[1] for d in feats.values())
            block = _h5.rows_per_chunk(dim, manifest["dtype"])
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

