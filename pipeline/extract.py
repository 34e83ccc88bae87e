"""`extract()`: run a frozen backbone once over an image dataset and write an HDF5 feature cache.

    from pipeline import extract, ExtractConfig
    summary = extract("photos/", "photos.h5", ExtractConfig(layer="fc7", image_size=64))

Crash-safe and resumable: rows are committed batch by batch to `CACHE.h5.partial`; a re-run
of the same command continues from the last committed batch. Incremental: against an
existing cache, only new or changed images (by content hash) are computed; removed ones
are dropped. The cache appears under its final name only when complete. The planning
(what to reuse, what to compute, how to finish) is `cache.plan`; this module computes.
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
from cache.plan import Plan, finalize, open_existing, plan
from cache.store import CacheWriter, partial_path

from ._version import __version__
from ._progress import progress
from .config import DTYPES, PRECISIONS, ExtractConfig
from .backbone import Preprocessing, build_backbone, to_float_batch
from ._loading import ImageBatches, collate, default_workers, digest_or_blank, resolve_device
from .images import ImageList, find_images

log = logging.getLogger(__name__)

_AUTOCAST = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ExtractSummary:
    """What a run did. `computed` counts the rows computed by this run and `reused` the rows
    taken from earlier runs; `bad` lists (path, reason) of every image that could not be used
    (such images are in neither count)."""
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
    listing = (images.paths, images.labels, images.class_names, _digests(images))

    old, held = open_existing(output, manifest, config.overwrite)   # complete cache, earlier run
    try:
        planned = plan(*listing, [r for r in (old, held) if r is not None])
        up_to_date = old is not None and held is None and planned.is_whole(old, 0)
        removed = 0 if old is None else planned.dropped(old)   # read while `old` is open
    finally:
        for r in (old, held):
            if r is not None:
                r.close()
    if up_to_date:
        return _finish_strict(ExtractSummary(
            str(output), len(planned.rows), 0, len(planned.rows), 0, _bad(planned),
            time.perf_counter() - t0, 0.0, True, str(device), manifest), config)

    writer = (CacheWriter.resume(part_path) if held is not None
              else CacheWriter.create(part_path, manifest))
    with writer:
        rows_before = writer.committed_rows
        t_compute = time.perf_counter()
        _run(model, images, planned.todo, writer, config, device, precision)
        compute_s = time.perf_counter() - t_compute
        computed = writer.committed_rows - rows_before   # images that failed to decode add none
    final = finalize(output, manifest, *listing)
    return _finish_strict(ExtractSummary(
        str(output), len(final.rows), computed, len(final.rows) - computed, removed, _bad(final),
        time.perf_counter() - t0, computed / compute_s if compute_s > 0 else 0.0, False,
        str(device), manifest), config)


def _bad(planned: Plan) -> list[tuple[str, str]]:
    return [(p, reason) for p, _, reason in planned.errors]


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
    cuda = device.type == "cuda"
    model = model.to(device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    batches = [todo[k:k + config.batch_size] for k in range(0, len(todo), config.batch_size)]
    loader = DataLoader(ImageBatches(images, pre), batch_sampler=batches, collate_fn=collate,
                        num_workers=default_workers(config.workers, cuda), pin_memory=cuda)
    autocast = (torch.autocast(device.type, dtype=_AUTOCAST[precision])
                if precision != "float32" else contextlib.nullcontext())
    store_dtype = getattr(torch, config.dtype)
    committer = _Committer(writer)
    try:
        with progress(len(todo), "extract", config.progress) as bar, torch.inference_mode():
            for batch in loader:
                feats = (_forward(model, batch["images"], device, autocast, store_dtype)
                         if len(batch["index"]) else None)
                committer.put(feats, [images.labels[i] for i in batch["index"]],
                              [images.paths[i] for i in batch["index"]], batch["digests"],
                              batch["errors"])
                bar.update(len(batch["index"]) + len(batch["errors"]))
        committer.close()
    finally:
        # Also when the loop raised: the caller closes the writer next, which must not race a
        # commit in progress, and a thread left waiting on its queue would never end.
        committer.stop()


def _forward(model, images: torch.Tensor, device: torch.device, autocast, store_dtype):
    """Features of a (B, 3, S, S) uint8 batch as a (B, D) `store_dtype` CPU tensor (a dict of
    them per cut for several cuts); on CUDA, (pinned host tensors, event) with the copy back
    still in flight (the committer waits)."""
    cuda = device.type == "cuda"
    x = images.to(device, non_blocking=True)
    if cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast:
        y = model(to_float_batch(x))                     # (B, D), or {cut: (B, D_cut)}
    feats = {k: v.to(store_dtype) for k, v in y.items()} if isinstance(y, dict) else y.to(
        store_dtype)
    if not cuda:
        return feats

    def to_host(t: torch.Tensor) -> torch.Tensor:
        host = torch.empty(t.shape, dtype=store_dtype, pin_memory=True)
        return host.copy_(t, non_blocking=True)
    host = {k: to_host(v) for k, v in feats.items()} if isinstance(feats, dict) else to_host(feats)
    event = torch.cuda.Event()
    event.record()
    return host, event


class _Committer:
    """Commits batches to the writer from a background thread (overlaps HDF5 with compute)."""

    def __init__(self, writer: CacheWriter):
        self.writer = writer
        self.queue: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="extract-committer", daemon=True)
        self.thread.start()

    def put(self, *item) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(item)

    def close(self) -> None:
        """Commit every queued batch, end the thread, and raise a commit failure if any."""
        self.stop()
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        """End the thread once the queued batches are committed; does nothing the second time.

        Only this (main) thread queues the end marker, so a live thread has not yet seen it.
        """
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()

    def _loop(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is not None:
                continue   # drain so the producer never blocks on a dead writer
            feats, labels, paths, digests, errors = item
            try:
                if isinstance(feats, tuple):
                    feats[1].synchronize()
                    feats = feats[0]
                self.writer.commit(_arrays(feats, self.writer.manifest), labels, paths, digests,
                                   errors)
                log.debug("committed %d rows", self.writer.committed_rows)
            except BaseException as e:  # surfaced in the main thread by put()/close()
                self.error = e


def _arrays(feats, manifest: dict) -> dict[str, np.ndarray]:
    """{cut name: (B, D) array} of a batch's features: a tensor for a one-cut cache, a dict
    for several cuts, None for a batch without a usable image (no rows)."""
    if feats is None:
        return {c["name"]: np.empty((0, c["feature_dim"]), manifest["dtype"])
                for c in mf.cuts(manifest)}
    if isinstance(feats, dict):
        return {name: t.numpy() for name, t in feats.items()}
    return {mf.cuts(manifest)[0]["name"]: feats.numpy()}


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
    return build_backbone(config.backbone, config.weights, config.layer, config.image_size,
                          config.pool)


def _manifest(info: dict, config: ExtractConfig, precision: str, images: ImageList) -> dict:
    return {
        **info,
        "format_version": mf.MULTI_CUT_VERSION if info.get("cuts") else mf.FORMAT_VERSION,
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


def _finish_strict(summary: ExtractSummary, config: ExtractConfig) -> ExtractSummary:
    if config.strict and summary.bad:
        raise UserError(f"{len(summary.bad)} images could not be used (--strict): "
                         + "; ".join(f"{p}: {r}" for p, r in summary.bad[:5])
                         + (" ..." if len(summary.bad) > 5 else "")
                         + f". The cache {summary.path} holds the rest.")
    return summary
