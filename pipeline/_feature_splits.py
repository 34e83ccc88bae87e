"""The feature splits of `train_head`: which rows of which cache train, validate and test, the
order an epoch visits them, and whether they are held in RAM or streamed from HDF5.

With the training rows in RAM and the default shuffle window, epoch e visits them in the order
of the e-th `torch.randperm(n, generator=torch.Generator().manual_seed(data_seed))` (one
generator for the whole run); with a window of W chunks (`shuffle_chunks`, or streaming),
the chunks holding training rows are shuffled, and the rows of each W consecutive chunks are
shuffled together. RAM and streaming follow the same order for the same window.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from cache import CacheReader
from cache import manifest as mf
from cache.errors import UserError

from .config import TrainConfig
from .splits import hash_split

log = logging.getLogger("pipeline.train_head")     # one logger for the whole stage

# What must agree between train, val and test caches: everything that decides a plain-view
# feature row (a float16 train cache of 8 views with a float32 one-view val cache is fine).
MATCH_KEYS = mf.ROW_KEYS + ("class_names",)
EVAL_ROWS = 1024          # rows per evaluation batch


class Split:
    """The rows of one cache used for one role (train, val or test), in RAM or streamed.

    A training split of a cache with augmented views draws from `views` of them: in epoch e,
    image i contributes view v(data seed, e, i) (see `view_choice`). Evaluation, statistics
    and the other roles use the plain view 0.
    """

    def __init__(self, role: str, reader: CacheReader, rows: np.ndarray, views: int = 1):
        self.role, self.reader, self.views = role, reader, views
        self.rows = rows                                           # (N,) sorted file rows
        self.labels = reader.labels[rows]                          # (N,)
        self.ram: np.ndarray | None = None                         # (N, D) storage dtype
        self.ram_views: list[np.ndarray] = []                      # views 1.. (N, D) each
        self.peak_group_bytes = 0
        self._checked: set[int] = set()                            # chunks checked for NaN/inf
        step = reader.chunk_rows
        self.chunks = np.unique(rows // step)                      # chunks holding these rows
        chunk_of = rows // step
        self._span = dict(zip(self.chunks.tolist(),
                              zip(np.searchsorted(chunk_of, self.chunks).tolist(),
                                  np.searchsorted(chunk_of, self.chunks, "right").tolist())))

    @property
    def nbytes(self) -> int:
        """Bytes of every view this split uses, in RAM."""
        return (self.views * len(self.rows) * self.reader.feature_dim
                * self.reader.features.dtype.itemsize)

    def load(self) -> None:
        """Hold this split's features (every view it uses) in RAM (storage dtype; upcast per
        batch)."""
        arrays = [np.empty((len(self.rows), self.reader.feature_dim), self.reader.features.dtype)
                  for _ in range(self.views)]
        for v, array in enumerate(arrays):
            for s, e, block in self._read(self.chunks, v):
                array[s:e] = block
        self.ram, self.ram_views = arrays[0], arrays[1:]

    def blocks(self) -> Iterator[np.ndarray]:
        """This split's rows one HDF5 chunk at a time, in file order, storage dtype: from RAM
        when loaded, else streamed. The same blocks either way."""
        if self.ram is None:
            return (block for _, _, block in self._read(self.chunks))
        return (self.ram[slice(*self._span[c])] for c in self.chunks.tolist())

    def _read(self, chunks, view: int = 0) -> Iterator[tuple[int, int, np.ndarray]]:
        """(s, e, features of rows[s:e]) for each chunk of a view, in the order given; refuses
        NaN/inf (checked once per chunk, view and run, not every epoch)."""
        for start, _, block in self.reader.iter_chunks(order=chunks, view=view):
            chunk = start // self.reader.chunk_rows
            s, e = self._span[chunk]
            if e - s != len(block):                    # only some rows of this chunk are ours
                block = block[self.rows[s:e] - start]
            if (chunk, view) not in self._checked:
                self._check_finite(block, s)
                self._checked.add((chunk, view))
            yield s, e, block

    def _check_finite(self, block: np.ndarray, s: int) -> None:
        if block.dtype == np.float16:   # exponent bits all ones: inf or NaN (2.7x np.isfinite)
            finite = ~((block.view(np.uint16) & 0x7C00) == 0x7C00).any(axis=1)
        else:
            finite = np.isfinite(block).all(axis=1)
        if not finite.all():
            row = int(self.rows[s + int(np.argmin(finite))])
            raise UserError(f"{self.role} cache {self.reader.path} has NaN or inf features "
                             f"(row {row}, {self.reader.paths[row]}): re-extract it, e.g. "
                             "with --precision float32")

    def epoch(self, gen: torch.Generator, window: int, batch: int, number: int = 1,
              data_seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Training batches (x (B, D) float32, y (B,)) of epoch `number` in the shuffled order,
        each image as the view `view_choice` picks for it."""
        view = view_choice(data_seed, number, len(self.rows), self.views)
        pieces = self._ram_pieces if self.ram is not None else self._stream_pieces
        return _rebatch(pieces(_epoch_order(self, gen, window), batch, view), batch)

    def _ram_pieces(self, order, batch, view):
        arrays = [self.ram, *self.ram_views]
        for _, base, perm in order:
            for i in range(0, len(perm), batch):
                pos = base[perm[i:i + batch]]
                yield _pick(arrays, view[pos], pos), self.labels[pos]

    def _stream_pieces(self, order, batch, view):
        # One window buffer per view for the whole epoch: a new one per group kept two alive.
        size = max(len(base) for _, base, _ in order)
        windows = [np.empty((size, self.reader.feature_dim), self.reader.features.dtype)
                   for _ in range(self.views)]
        for chunks, base, perm in order:
            groups = [w[:len(base)] for w in windows]
            self.peak_group_bytes = max(self.peak_group_bytes, sum(g.nbytes for g in groups))
            for v, group in enumerate(groups):
                off = 0
                for s, e, block in self._read(chunks, v):   # same chunk order as `base`
                    group[off:off + e - s] = block
                    off += e - s
            for i in range(0, len(perm), batch):
                p = perm[i:i + batch]
                yield _pick(groups, view[base[p]], p), self.labels[base[p]]

    def batches(self, batch: int = EVAL_ROWS) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """All rows in file order (for evaluation), streamed one chunk at a time if not in RAM."""
        if self.ram is not None:
            pieces = ((self.ram[i:i + batch], self.labels[i:i + batch])
                      for i in range(0, len(self.rows), batch))
        else:
            pieces = ((block, self.labels[s:e]) for s, e, block in self._read(self.chunks))
        return _rebatch(pieces, batch)


def view_choice(data_seed: int, epoch: int, n: int, views: int) -> np.ndarray:
    """(n,) the view each of a split's n images contributes in `epoch`: drawn from a generator
    seeded by (data seed, epoch), image i taking the i-th draw. All 0 with one view."""
    if views == 1:
        return np.zeros(n, np.int64)
    return np.random.default_rng([data_seed, epoch, 0x7615]).integers(0, views, n)


def _pick(arrays: list[np.ndarray], views: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """(B, D): row pos[j] of arrays[views[j]], for each j."""
    if len(arrays) == 1:
        return arrays[0][pos]
    out = np.empty((len(pos), arrays[0].shape[1]), arrays[0].dtype)
    for v, array in enumerate(arrays):
        mask = views == v
        if mask.any():
            out[mask] = array[pos[mask]]
    return out


def feature_moments(split: Split) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and std (D,), float64, of the split's rows: one pass over its chunks
    (streamed when the split is not in RAM), combined with Chan et al.'s pairwise update, which
    stays exact where the mean dwarfs the std. RAM and streaming read the same chunks and do the
    same arithmetic, so they give the same bits. Population std (ddof 0, as StandardScaler)."""
    d = split.reader.feature_dim
    n, mean, m2 = 0, np.zeros(d), np.zeros(d)
    for block in split.blocks():
        b = block.astype(np.float64)            # (B, D): the one float64 copy of a chunk
        nb, mb = len(b), b.mean(0)              # (D,)
        b -= mb
        delta, total = mb - mean, n + nb
        m2 += np.square(b, out=b).sum(0) + delta ** 2 * (n * nb / total)
        mean += delta * (nb / total)
        n = total
    std = np.sqrt(m2 / n)
    # A constant feature (a ReLU unit that never fires: std 0; or a spread at the float32
    # rounding of its mean) gets std 1, as in scikit-learn's StandardScaler: it is centred,
    # never divided by ~0.
    std[std <= 1e-7 * np.abs(mean)] = 1.0
    return mean, std


def _epoch_order(split: Split, gen: torch.Generator, window: int):
    """[(chunks, base, perm)]: the epoch visits positions base[perm] group by group."""
    n = len(split.rows)
    if window >= len(split.chunks):
        return [(split.chunks, np.arange(n), torch.randperm(n, generator=gen).numpy())]
    chunks = split.chunks[torch.randperm(len(split.chunks), generator=gen).numpy()]
    order = []
    for i in range(0, len(chunks), window):
        group = chunks[i:i + window]
        base = np.concatenate([np.arange(*split._span[c]) for c in group.tolist()])
        order.append((group, base, torch.randperm(len(base), generator=gen).numpy()))
    return order


def _rebatch(pieces, batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive batches of exactly `batch` rows (the last may be short), upcast to float32."""
    xs, ys, have = [], [], 0
    for x, y in pieces:
        while len(x):
            take = min(batch - have, len(x))
            xs.append(x[:take]), ys.append(y[:take])
            x, y, have = x[take:], y[take:], have + take
            if have == batch:
                yield _tensors(xs, ys)
                xs, ys, have = [], [], 0
    if have:
        yield _tensors(xs, ys)


def _tensors(xs, ys) -> tuple[torch.Tensor, torch.Tensor]:
    x = xs[0] if len(xs) == 1 else np.concatenate(xs)
    y = ys[0] if len(ys) == 1 else np.concatenate(ys)
    x = torch.from_numpy(np.ascontiguousarray(x)).float()          # float16 caches: upcast here
    return x, torch.from_numpy(np.asarray(y, np.int64))


def open_splits(train_path, val_path, test_path, cfg: TrainConfig, readers: list):
    def open_cache(path, role, layer):
        reader = CacheReader(path, allow_incomplete=True, layer=layer)
        readers.append(reader)
        if reader.cut is None:
            raise UserError(f"{role} cache {path} holds several cuts "
                            f"({', '.join(reader.cut_names)}): pick one with --layer")
        if not reader.complete and not cfg.allow_incomplete:
            raise UserError(f"{role} cache {path} is incomplete (extraction did not finish, "
                             f"{reader.n_rows} rows committed): re-run the same `pipeline extract` "
                             "command to finish it, or pass --allow-incomplete to use those rows")
        if not reader.class_names:
            raise UserError(f"{role} cache {path} has no class names: train-head needs labeled "
                             "images (a folder per class, or a list file with labels)")
        return reader

    def labeled(reader, role):
        labels = reader.labels
        if (labels >= len(reader.class_names)).any():
            raise UserError(f"{role} cache {reader.path} has labels beyond its "
                             f"{len(reader.class_names)} class names: the cache is damaged, "
                             "re-extract it")
        unlabeled = int((labels < 0).sum())
        if unlabeled:
            log.warning("%s cache %s: %d unlabeled rows ignored", role, reader.path, unlabeled)
        return labels >= 0

    train_reader = open_cache(train_path, "train", cfg.layer)
    keep = labeled(train_reader, "train")
    val = test = None
    if val_path is None and cfg.val_fraction > 0:
        in_val = hash_split(train_reader.paths, cfg.val_fraction)
        val = Split("val", train_reader, np.flatnonzero(keep & in_val))
        if not len(val.rows):
            raise UserError(f"--val-fraction {cfg.val_fraction} of {int(keep.sum())} labeled rows "
                             "selected no validation rows: give --val VAL.h5 or a larger fraction")
        keep &= ~in_val
    for path, role in ((val_path, "val"), (test_path, "test")):
        if path is None:
            continue
        # What made the caches first: a cache of another backbone has no cut of this name, and
        # "pick another --layer" would be advice that cannot work.
        with CacheReader(path, allow_incomplete=True) as peek:
            _refuse_mismatch(role, path, train_path,
                             mf.differences(train_reader.manifest, peek.file_manifest, _MADE_BY))
        reader = open_cache(path, role, train_reader.manifest["layer"])   # the same cut
        _refuse_mismatch(role, path, train_path,
                         mf.differences(train_reader.manifest, reader.manifest, MATCH_KEYS))
        split = Split(role, reader, np.flatnonzero(labeled(reader, role)))
        if not len(split.rows):
            raise UserError(f"{role} cache {path} has no labeled rows")
        val, test = (split, test) if role == "val" else (val, split)
    views = train_reader.n_views if cfg.views is None else cfg.views
    if not 1 <= views <= train_reader.n_views:
        raise UserError(f"--views {cfg.views}: the train cache {train_path} holds "
                        f"{train_reader.n_views} view(s) of each image: use 1..{train_reader.n_views}"
                        " or all")
    train = Split("train", train_reader, np.flatnonzero(keep), views)
    if not len(train.rows):
        raise UserError(f"train cache {train_path} has no labeled rows left to train on")
    return train, val, test


# What made a cache, whatever cuts it holds.
_MADE_BY = ("backbone", "weights", "weights_sha256", "preprocessing", "precision")


def _refuse_mismatch(role: str, path, train_path, diff: list[str]) -> None:
    if diff:
        raise UserError(
            f"{role} cache {path} does not match the train cache {train_path}: "
            + "; ".join(diff) + ". Extract both with the same --backbone, --weights, --layer, "
            "--image-size and --precision, from data with the same classes")


def plan_memory(train: Split, evals: list[Split], cfg: TrainConfig) -> dict:
    """Load what fits under --max-memory into RAM; stream the rest. Returns the plan."""
    reader = train.reader
    chunk_bytes = reader.chunk_rows * reader.feature_dim * reader.features.dtype.itemsize
    if train.nbytes <= cfg.max_memory:
        train.load()
        used, window = train.nbytes, cfg.shuffle_chunks or len(train.chunks)
    else:
        # Stream: a window of chunks (of every view used) for training plus one chunk for
        # streamed evaluation.
        per_chunk = chunk_bytes * train.views
        window = cfg.shuffle_chunks or (cfg.max_memory - chunk_bytes) // per_chunk
        if window < 1 or window * per_chunk + chunk_bytes > cfg.max_memory:
            raise UserError(_window_error(cfg, per_chunk))
        used = window * per_chunk
        if "logreg" in cfg.head:      # (ridge and lda heads stream: they sum over chunks)
            raise UserError(f"logreg heads need the training features in RAM "
                             f"({_size(train.nbytes)}, more than --max-memory "
                             f"{_size(cfg.max_memory)}): raise --max-memory or train linear heads")
    streamed = False
    for split in evals:
        if train.ram is not None and used + split.nbytes <= cfg.max_memory:
            split.load()
            used += split.nbytes
        else:
            streamed = True
    return {"max_memory": cfg.max_memory, "train": "ram" if train.ram is not None else "stream",
            "eval": "stream" if streamed else "ram",
            "window_chunks": int(min(window, len(train.chunks))), "chunk_bytes": chunk_bytes,
            "planned_feature_bytes": used + (chunk_bytes if streamed else 0)}


def _window_error(cfg: TrainConfig, chunk_bytes: int) -> str:
    need = max(cfg.shuffle_chunks, 1) + 1
    return (f"--max-memory {_size(cfg.max_memory)} does not hold {need} HDF5 chunks of "
            f"{_size(chunk_bytes)} (a shuffle window of {need - 1} and one for evaluation): "
            f"raise --max-memory to at least {_size(need * chunk_bytes)} or lower --shuffle-chunks")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


@dataclass
class Context:
    """What every pass of a sweep shares: the config, the splits, and what is derived from the
    training rows."""
    cfg: TrainConfig
    train: Split
    val: Split | None
    test: Split | None
    class_names: list[str]
    window: int                                       # shuffle window in chunks
    class_weight: torch.Tensor | None                 # (C,) loss weights, None: unweighted
    moments: tuple[np.ndarray, np.ndarray] | None     # training rows' (mean, std) (D,) float64
