"""The HDF5 feature store: a crash-safe appending writer and a reader (in RAM or streamed).

File layout (any HDF5 tool reads it):

    features  (N, D) float16|float32, chunked by rows (~1 MiB a chunk), uncompressed
              (format 2, several cuts of one pass: group cuts/<name>, one (N, D_name) each)
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
"""
from __future__ import annotations

import functools
import os
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

    @classmethod
    def create(cls, path: str | Path, manifest: dict) -> "CacheWriter":
        """Start a new file at `path` (replacing any) for rows described by `manifest`: one
        `features` dataset, or with several cuts a `cuts` group of one dataset per cut."""
        path = Path(path)
        dtype = manifest["dtype"]
        # The default libver on purpose: files made with libver="latest" (needed for SWMR)
        # were measured not to reopen after a SIGKILL, which resuming depends on.
        h5 = h5py.File(path, "w")
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
        except BaseException:
            h5.close()
            raise
        return cls(path, h5)

    @classmethod
    def resume(cls, path: str | Path) -> "CacheWriter":
        """Reopen an unfinished file, dropping anything written after the last commit."""
        path = Path(path)
        h5 = h5py.File(path, "r+")
        try:
            _check_layout(h5, path)
            n, m = int(h5.attrs["committed_rows"]), int(h5.attrs["committed_errors"])
            manifest = mf.loads(h5.attrs["manifest"])
            datasets = [*_feature_datasets(h5, manifest).values(),
                        *(h5[name] for name in ("labels", "paths", "digests", "stats")
                          if name in h5)]
            for d in datasets:
                if d.shape[0] != n:
                    d.resize(n, axis=0)
            if h5["errors"].shape[0] != m:
                h5["errors"].resize(m, axis=0)
            h5.flush()
        except BaseException:
            h5.close()
            raise
        return cls(path, h5)

    @property
    def committed_rows(self) -> int:
        return int(self._h5.attrs["committed_rows"])

    def commit(self, features: np.ndarray | Mapping[str, np.ndarray], labels: Sequence[int],
               paths: Sequence[str], digests: Sequence[str],
               errors: Sequence[tuple[str, str, str]] = (),
               stats: Sequence[tuple[int, int]] | None = None) -> None:
        """Append one batch atomically: data, flush, then the markers, flush. `features` is
        (B, D), or {cut name: (B, D_cut)} for every cut of a several-cut cache; `stats` the
        (size, mtime_ns) of each file when hashed (unknown: -1, and the file is hashed again
        next time)."""
        h5, b = self._h5, len(paths)
        n, m = self.committed_rows, int(h5.attrs["committed_errors"])
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
        if b:
            columns = [*((self._features[k], v) for k, v in features.items()),
                       (h5["labels"], np.asarray(labels, "int64")),
                       (h5["paths"], np.array(paths, dtype=object)),
                       (h5["digests"], np.array(digests, dtype=_DIGEST))]
            if "stats" in h5:
                columns.append((h5["stats"], np.asarray(stats if stats is not None else
                                                        [(-1, -1)] * b, "int64").reshape(b, 2)))
            for dataset, values in columns:
                dataset.resize(n + b, axis=0)
                dataset[n:n + b] = values
        if errors:
            h5["errors"].resize(m + len(errors), axis=0)
            h5["errors"][m:m + len(errors)] = np.array(
                [(p, d.encode(), r) for p, d, r in errors], dtype=_ERROR)
        h5.flush()
        h5.attrs.modify("committed_rows", n + b)
        h5.attrs.modify("committed_errors", m + len(errors))
        h5.flush()

    def finish(self, final_path: str | Path, manifest_updates: dict | None = None) -> Path:
        """Close, then mark complete and rename into place (see `finish`)."""
        self.close()
        return finish(self.path, final_path, manifest_updates)

    def close(self) -> None:
        if self._h5.id.valid:
            self._h5.close()

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
            self._h5 = h5py.File(self.path, "r")
        except OSError as e:
            raise UserError(f"{self.path} is not a readable HDF5 feature cache: {e}") from None
        try:
            _check_layout(self._h5, self.path)
            self.file_manifest = mf.loads(self._h5.attrs["manifest"])
            self._features = _feature_datasets(self._h5, self.file_manifest)
            self.cut = self._pick(layer)
            self.manifest = (mf.cut_manifest(self.file_manifest, self.cut)
                             if self.cut is not None and len(self.cut_names) > 1
                             else self.file_manifest)
            self.complete = bool(self._h5.attrs["complete"])
            if not self.complete and not allow_incomplete:
                raise UserError(f"{self.path} is an incomplete cache (extraction did not finish): "
                                 "re-run extract to complete it, or allow incomplete caches")
            self.n_rows = int(self._h5.attrs["committed_rows"])
            self.labels = self._h5["labels"][: self.n_rows].astype(np.int64)  # (N,)
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
    """Mark an unfinished cache complete, fsync it, and atomically rename it to `final_path`."""
    with h5py.File(partial, "r+") as h5:
        if manifest_updates:
            h5.attrs["manifest"] = mf.dumps({**mf.loads(h5.attrs["manifest"]), **manifest_updates})
        h5.attrs.modify("complete", 1)
        h5.flush()
    _fsync(Path(partial))
    os.replace(partial, final_path)
    _fsync(Path(final_path).resolve().parent)
    return Path(final_path)


def refresh_stats(path: str | Path, rows: Sequence[int], stats: Sequence[tuple[int, int]]
                  ) -> None:
    """Record new (size, mtime_ns) for rows of a complete cache whose files were found
    unchanged in content (touched, or copied without their times), so that the next run trusts
    them again. Only the stats dataset changes: a write torn by a crash leaves each row with
    its old or its new stats, both true of the same content."""
    if not len(rows):
        return
    with h5py.File(path, "r+") as h5:
        if "stats" not in h5:
            return
        order = np.argsort(rows)
        data = h5["stats"][:]
        data[np.asarray(rows)[order]] = np.asarray(stats, np.int64).reshape(-1, 2)[order]
        h5["stats"][:] = data
        h5.flush()


def read_manifest(path: str | Path) -> tuple[dict, bool]:
    """(manifest, complete) of a cache file, finished or not."""
    with h5py.File(path, "r") as h5:
        _check_layout(h5, Path(path))
        return mf.loads(h5.attrs["manifest"]), bool(h5.attrs["complete"])


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


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
        writer.close()
        raise
