"""Read access to a feature cache: `CacheReader` (features in RAM or streamed by chunk),
`read_manifest`, and `cache_kind` (what an existing file is, before anything replaces it).
The file's layout is described in `cache._h5`."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Iterator, Sequence

import h5py
import numpy as np

from . import _h5
from . import manifest as mf
from .errors import Unreadable, UserError, first_line
from .records import Cut, Weights
from .writer import partial_path


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
            self._file = _h5.open_file(self.path, "r")
        except (OSError, RuntimeError) as e:
            raise Unreadable(f"{self.path} is not a readable HDF5 feature cache: "
                             f"{first_line(e)}") from None
        try:
            _h5.check_layout(self._file, self.path)
            self.file_manifest = mf.validate(mf.loads(self._file.attrs["manifest"], self.path),
                                             self.path)
            self._features = _h5.feature_datasets(self._file, self.file_manifest)
            mf.check_widths(self.file_manifest, {k: d.shape for k, d in self._features.items()},
                            self.path)
            self.cut = self._pick(layer)
            self.manifest = (mf.cut_manifest(self.file_manifest, self.cut)
                             if self.cut is not None and len(self.cut_names) > 1
                             else self.file_manifest)
            self.complete = bool(self._file.attrs["complete"])
            if not self.complete and not allow_incomplete:
                raise UserError(f"{self.path} is an incomplete cache (extraction did not finish): "
                                "re-run extract to complete it, or allow incomplete caches")
            self.n_rows = _h5.markers(self._file, self.path, self.file_manifest)[0]
            self.labels = self._file["labels"][: self.n_rows].astype(np.int64)  # (N,)
        except (OSError, RuntimeError, KeyError) as e:   # HDF5 could not read what the file
            self._file.close()                         # says it holds (h5py: KeyError too)
            raise Unreadable(f"{self.path} is damaged: {first_line(e)}") from None
        except BaseException:
            self._file.close()
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
    def weights(self) -> Weights:
        """The record of the backbone weights the cache was made with (converted from the
        `weights` string for caches written before the record existed)."""
        return Weights.from_manifest(self.file_manifest, self.path)

    @property
    def cuts(self) -> list[Cut]:
        """The records of the cuts this cache holds (one for a one-cut cache)."""
        return Cut.all(self.file_manifest)

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
        return [p.decode("utf-8") for p in self._file["paths"][: self.n_rows]]

    @functools.cached_property
    def digests(self) -> list[str]:
        """(N,) SHA-256 hex digests of the image files."""
        return [d.decode("ascii") for d in self._file["digests"][: self.n_rows]]

    @functools.cached_property
    def stats(self) -> np.ndarray:
        """(N, 2) int64 size and mtime_ns of each file when it was hashed; -1 where unknown
        (every row of a cache written before they were kept)."""
        if "stats" not in self._file:
            return np.full((self.n_rows, 2), -1, np.int64)
        return self._file["stats"][: self.n_rows].astype(np.int64)

    @functools.cached_property
    def errors(self) -> list[tuple[str, str, str]]:
        """(path, digest, reason) of every image that could not be used."""
        return _h5.read_errors(self._file)

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
        return int(chunks[0]) if chunks else _h5.rows_per_chunk(self.feature_dim,
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
        if self._file.id.valid:
            self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_manifest(path: str | Path) -> tuple[dict, bool]:
    """(manifest, complete) of a cache file, finished or not."""
    with h5py.File(path, "r") as h5:
        _h5.check_layout(h5, Path(path))
        manifest = mf.validate(mf.loads(h5.attrs["manifest"], path), path)
        return manifest, bool(h5.attrs["complete"])


def cache_kind(path: str | Path) -> str:
    """What the existing regular file at `path` is: "cache" (a feature cache of any format,
    finished or not), "hdf5" (an HDF5 file that is not one), "unreadable" (an HDF5 signature,
    but HDF5 cannot open it) or "other" (not HDF5). CacheBusy when another process holds it."""
    try:
        with open(path, "rb") as f:
            if f.read(len(_h5.HDF5_SIGNATURE)) != _h5.HDF5_SIGNATURE:
                return "other"
    except OSError:
        return "unreadable"
    try:
        with _h5.open_file(Path(path), "r") as h5:
            return "cache" if {"manifest", "format_version"} <= set(h5.attrs) else "hdf5"
    except (OSError, RuntimeError, KeyError):
        return "unreadable"
