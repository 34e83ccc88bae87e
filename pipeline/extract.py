"""`extract()`: run a frozen backbone once over an image dataset and write an HDF5 feature cache.

    from pipeline import extract, ExtractConfig
    summary = extract("photos/", "photos.h5", ExtractConfig(layer="fc7", image_size=64))

Crash-safe and resumable: rows are committed batch by batch to `CACHE.h5.partial`; a re-run
of the same command continues from the last committed batch. Incremental: against an
existing cache, only new or changed images (by content hash) are computed; removed ones
are dropped. The cache appears under its final name only when complete.
"""
from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
import torchvision
from torch.utils.data import DataLoader

from cache import manifest as mf
from cache.errors import UserError
from cache.store import CacheReader, CacheWriter, assemble, finish, partial_path

from ._version import __version__
from ._progress import Progress
from .config import DTYPES, PRECISIONS, ExtractConfig
from .backbone import Preprocessing, build_backbone, to_float_batch
from ._loading import ImageBatches, collate, default_workers, digest_or_blank, resolve_device
from .images import ImageList, find_images

log = logging.getLogger(__name__)

_AUTOCAST = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ExtractSummary:
    """What a run did; `bad` lists (path, reason) of every image that could not be used."""
    path: str
    rows: int
    computed: int
    reused: int
    removed: int
    bad: list
    seconds: float
    images_per_s: float
    up_to_date: bool
    device: str
    manifest: dict

    def line(self) -> str:
        if self.up_to_date:
            return f"{self.path}: up to date ({self.rows} rows, {len(self.bad)} skipped images)"
        return (f"{self.path}: {self.rows} rows ({self.computed} computed, {self.reused} reused, "
                f"{self.removed} dropped), {len(self.bad)} skipped images, {self.seconds:.1f} s, "
                f"{self.images_per_s:.1f} images/s on {self.device}")


def extract(source: str | Path, output: str | Path, config: ExtractConfig = ExtractConfig()
            ) -> ExtractSummary:
    """Extract features of every image under `source` into the cache file `output`.

    Raises UserError for user mistakes (bad source, mismatching cache, unwritable output);
    with `config.strict`, also when images had to be skipped (after the cache is written).
    """
    t0 = time.perf_counter()
    output, part_path = Path(output), partial_path(output)
    _check_config(config)
    _check_output(output)
    images = find_images(source)
    device = resolve_device(config.device)
    precision = _precision(config.precision, device)
    model, info = _build(config)
    manifest = _manifest(info, config, precision, images)
    digests = _digests(images)

    old = _open_compatible(output, manifest, config.overwrite)       # complete cache or None
    held = _open_compatible(part_path, manifest, config.overwrite)   # earlier unfinished run
    sources = [r for r in (old, held) if r is not None]
    try:
        plan = _plan(images, digests, sources)
        if not plan.todo and old is not None and held is None and _is_whole(old, 0, plan, images):
            return _finish_strict(ExtractSummary(
                str(output), old.n_rows, 0, old.n_rows, 0, [(p, r) for p, _, r in plan.errors],
                time.perf_counter() - t0, 0.0, True, str(device), manifest), config)
    finally:
        for r in sources:
            r.close()

    writer = (CacheWriter.resume(part_path) if held is not None
              else CacheWriter.create(part_path, manifest))
    with writer:
        rows_before = writer.committed_rows
        t_compute = time.perf_counter()
        _run(model, images, plan.todo, writer, config, device, precision)
        compute_s = time.perf_counter() - t_compute
        new_rows = writer.committed_rows - rows_before

    # Rows computed just now live in the partial file: plan the final cache from all sources.
    held = CacheReader(part_path, allow_incomplete=True)
    sources = [r for r in (_open_compatible(output, manifest, True), held) if r is not None]
    try:
        final = _plan(images, digests, sources, changed_reason="file changed during extraction: "
                      "re-run extract to include it")
        updates = {"rows": len(final.rows), "errors": len(final.errors)}
        fast = _is_whole(held, len(sources) - 1, final, images)
        if not fast:
            assemble(output, {**manifest, **updates}, sources,
                     [(s, r, images.labels[i], images.paths[i], digests[i])
                      for i, s, r in final.rows], final.errors)
    finally:
        for r in sources:
            r.close()
    if fast:
        finish(part_path, output, updates)   # the partial is exactly the cache: rename it
    else:
        _remove(part_path)
    current = set(zip(images.paths, digests))
    removed = 0 if old is None else sum(k not in current for k in zip(old.paths, old.digests))
    return _finish_strict(ExtractSummary(
        str(output), len(final.rows), len(plan.todo), len(final.rows) - new_rows, removed,
        [(p, r) for p, _, r in final.errors], time.perf_counter() - t0,
        len(plan.todo) / compute_s if compute_s > 0 else 0.0, False, str(device), manifest), config)


@dataclass
class _Plan:
    rows: list          # (image index, source number, source row) for each output row
    errors: list        # (path, digest, reason), sorted
    todo: list          # image indices to compute


def _plan(images: ImageList, digests: list[str], sources: list[CacheReader],
          changed_reason: str | None = None) -> _Plan:
    """Match each image (by path and content digest) to a row or error already held."""
    index, known = {}, {}
    for s, src in enumerate(sources):
        for row, key in enumerate(zip(src.paths, src.digests)):
            index[key] = (s, row)   # later sources win: the newest computation
        for p, d, reason in src.errors:
            known[(p, d)] = reason
    plan = _Plan([], [], [])
    for i, (path, digest) in enumerate(zip(images.paths, digests)):
        key = (path, digest)
        if key in index:
            plan.rows.append((i, *index[key]))
        elif key in known:
            plan.errors.append((path, digest, known[key]))
        elif changed_reason is not None:
            plan.errors.append((path, digest, changed_reason))
        else:
            plan.todo.append(i)
    plan.errors.sort()
    return plan


def _is_whole(src: CacheReader, s: int, plan: _Plan, images: ImageList) -> bool:
    """True when source number `s` already is exactly the cache `plan` describes."""
    return ([(s0, r) for _, s0, r in plan.rows] == [(s, k) for k in range(src.n_rows)]
            and src.labels.tolist() == [images.labels[i] for i, _, _ in plan.rows]
            and sorted(src.errors) == plan.errors
            and src.class_names == list(images.class_names))


def _open_compatible(path: Path, manifest: dict, overwrite: bool) -> CacheReader | None:
    """Reader on an existing cache at `path` whose rows can be reused, or None.

    A cache made with other settings is refused (naming the difference) unless
    `overwrite`, in which case it is ignored here and replaced at the end.
    """
    if not path.exists():
        return None
    try:
        reader = CacheReader(path, allow_incomplete=True)
    except ValueError as e:
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


def _run(model, images: ImageList, todo: list[int], writer: CacheWriter, config: ExtractConfig,
         device: torch.device, precision: str) -> None:
    """Compute features for images `todo`, committing one batch at a time.

    Decoding runs in DataLoader workers and HDF5 writing in a thread, both overlapped
    with the forward pass. Batches are cut from `todo` in order, so a resumed run forms
    the same batches as an uninterrupted one (bit-identical features on the CPU).
    """
    if not todo:
        return
    pre = Preprocessing.from_dict(writer.manifest["preprocessing"])
    store_dtype = getattr(torch, config.dtype)
    cuda = device.type == "cuda"
    model = model.to(device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    batches = [todo[k:k + config.batch_size] for k in range(0, len(todo), config.batch_size)]
    loader = DataLoader(ImageBatches(images, pre), batch_sampler=batches, collate_fn=collate,
                        num_workers=default_workers(config.workers, cuda), pin_memory=cuda)
    committer = _Committer(writer)
    autocast = (torch.autocast(device.type, dtype=_AUTOCAST[precision])
                if precision != "float32" else contextlib.nullcontext())
    with Progress(len(todo), "extract", config.progress) as bar, torch.inference_mode():
        for batch in loader:
            feats = None
            if len(batch["index"]):
                x = batch["images"].to(device, non_blocking=True)
                if cuda:
                    x = x.contiguous(memory_format=torch.channels_last)
                with autocast:
                    y = model(to_float_batch(x))                     # (B, D)
                feats = y.to(store_dtype)
                if cuda:   # copy back asynchronously; the writer thread waits on the event
                    host = torch.empty(feats.shape, dtype=store_dtype, pin_memory=True)
                    host.copy_(feats, non_blocking=True)
                    event = torch.cuda.Event()
                    event.record()
                    feats = (host, event)
            committer.put(feats, [images.labels[i] for i in batch["index"]],
                          [images.paths[i] for i in batch["index"]], batch["digests"],
                          batch["errors"])
            bar.update(len(batch["index"]) + len(batch["errors"]))
        committer.close()


class _Committer:
    """Commits batches to the writer from a background thread (overlaps HDF5 with compute)."""

    def __init__(self, writer: CacheWriter):
        self.writer = writer
        self.queue: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def put(self, *item) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(item)

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error

    def _loop(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is not None:
                continue   # drain so the producer never blocks on a dead writer
            feats, labels, paths, digests, errors = item
            try:
                if isinstance(feats, tuple):
                    feats[1].synchronize()
                    feats = feats[0]
                dim = self.writer.manifest["feature_dim"]
                array = (feats.numpy() if feats is not None
                         else np.empty((0, dim), dtype=self.writer.manifest["dtype"]))
                self.writer.commit(array, labels, paths, digests, errors)
                log.debug("committed %d rows", self.writer.committed_rows)
            except BaseException as e:  # surfaced in the main thread by put()/close()
                self.error = e


def _digests(images: ImageList) -> list[str]:
    """SHA-256 of every image file, hashed in threads (hashlib releases the GIL)."""
    paths = [images.absolute(i) for i in range(len(images.paths))]
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
        return list(pool.map(digest_or_blank, paths))


def _precision(name: str, device: torch.device) -> str:
    if name == "auto":
        return "bfloat16" if device.type == "cuda" else "float32"
    if name not in PRECISIONS:
        raise UserError(f"unknown precision {name!r}: use {', '.join(PRECISIONS)}")
    return name


def _check_config(config: ExtractConfig) -> None:
    if config.dtype not in DTYPES:
        raise UserError(f"unknown storage dtype {config.dtype!r}: use {' or '.join(DTYPES)}")
    if config.batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {config.batch_size}")


def _check_output(output: Path) -> None:
    """Fail before any work when the output cannot be written."""
    if output.is_dir():
        raise UserError(f"output {output} is a folder: give a file name such as {output / 'cache.h5'}")
    parent = output.resolve().parent
    if not parent.is_dir():
        raise UserError(f"output folder {parent} does not exist: create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to {parent}: choose another -o")
    if output.exists() and not os.access(output, os.W_OK):
        raise UserError(f"cannot replace {output}: it is not writable")


def _build(config: ExtractConfig):
    if config.weights.lower() == "none":
        log.warning("using RANDOM-INIT %s weights (--weights none): features describe a random "
                    "network, not a pretrained one", config.backbone, extra={"random_init": True})
    return build_backbone(config.backbone, config.weights, config.layer, config.image_size)


def _manifest(info: dict, config: ExtractConfig, precision: str, images: ImageList) -> dict:
    return {
        **info,
        "format_version": mf.FORMAT_VERSION,
        "dtype": config.dtype,
        "precision": precision,
        "class_names": list(images.class_names),
        "source_root": str(images.root),
        "source_kind": images.kind,
        "config": {k: v for k, v in asdict(config).items() if k != "progress"},
        "versions": {"pipeline": __version__, "torch": torch.__version__,
                     "torchvision": torchvision.__version__, "h5py": h5py.__version__,
                     "numpy": np.__version__},
    }


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _finish_strict(summary: ExtractSummary, config: ExtractConfig) -> ExtractSummary:
    if config.strict and summary.bad:
        raise UserError(f"{len(summary.bad)} images could not be used (--strict): "
                         + "; ".join(f"{p}: {r}" for p, r in summary.bad[:5])
                         + (" ..." if len(summary.bad) > 5 else "")
                         + f". The cache {summary.path} holds the rest.")
    return summary
