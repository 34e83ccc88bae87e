"""The extraction engine: decode image batches in worker processes, run the frozen model on
them, and commit the features to a cache writer from a background thread.

    with decoding(images, batches, pre, augment, views, workers, device, decoder) as loaded:
        with CacheWriter.create(path, manifest) as writer:
            run(model, images, loaded, stats, writer, dtype="float16", device=device,
                precision="float32", done=counter, total=n, shown=True, pre=pre)

The stage around it (`pipeline.extract`) plans which images to compute, cuts them into batches
and opens the writer.
"""
from __future__ import annotations

import contextlib
import logging
import queue
import signal
import threading
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader

from cache import manifest as mf
from cache.writer import CacheWriter

from ._decode import Decoder
from ._loading import ImageBatches, collate, default_workers, on_device
from ._progress import progress
from .augment import Augment
from .preprocessing import Preprocessing, to_float_batch
from .sources import ImageList

log = logging.getLogger("pipeline.extract")

_AUTOCAST = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@contextlib.contextmanager
def decoding(images: ImageList, batches: list[list[int]], pre: Preprocessing,
             augment: Augment | None, views: int, workers: int | None, device: torch.device,
             decoder: Decoder | None = None):
    """The decoded `batches` (lists of indices into `images`) as an iterator of collated
    batches, None when there are none, with its worker processes (`workers`, None for the
    default) started at once and stopped on leaving, also on a failure or Ctrl-C. With
    `views` > 1, each image gives `views` augmented views. `decoder` (None: Pillow) decodes the
    plain view (see `pipeline._decode`)."""
    if not batches:
        yield None
        return
    cuda = device.type == "cuda"
    dataset = ImageBatches(images, pre, augment, views, decoder)   # (K, 3, S, S) each
    n_workers = default_workers(workers, cuda)
    # On a GPU, a deeper queue rides out the batches whose images happen to be slow to decode.
    prefetch = {"prefetch_factor": 4 if cuda else 2} if n_workers else {}
    loader = DataLoader(dataset, batch_sampler=batches, collate_fn=collate,
                        num_workers=n_workers, pin_memory=cuda, worker_init_fn=_worker_init,
                        **prefetch)
    loaded = iter(loader)
    try:
        yield loaded
    finally:
        shutdown = getattr(loaded, "_shutdown_workers", None)   # absent without workers
        if shutdown is not None:
            shutdown()


def _worker_init(worker_id: int) -> None:
    """A decoding worker ignores Ctrl-C: a terminal sends SIGINT to the whole process group,
    the main process then stops the workers, and a worker's own KeyboardInterrupt would only
    add a traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def run(model, images: ImageList, loaded, stats: list, writer: CacheWriter, *, dtype: str,
        device: torch.device, precision: str, done: Callable[[int], int], total: int,
        shown: bool, pre: Preprocessing | None = None) -> int:
    """Compute features for the decoded batches `loaded` (see `decoding`), committing one
    batch at a time to `writer`, stored as `dtype`, with each file's (size, mtime_ns) from
    `stats`. `precision` is the forward pass's ("float32", "bfloat16", "float16": autocast).

    Decoding runs in DataLoader workers and HDF5 writing in a thread, both overlapped
    with the forward pass. The batches are cut from the images to compute in order, so a
    resumed run forms the same batches as an uninterrupted one (bit-identical features on the
    CPU), whichever rank computes them. `done(n)` adds n images done and returns the total so
    far (every rank's, in a torchrun job): the progress line, shown when `shown`, counts it of
    `total`. Batches of JPEG bytes (the gpu decoder) are decoded on `device` as `pre` says.

    Under float16 autocast, a batch whose features are not all finite (an activation past
    float16's 65,504) is computed again in float32. Returns how many batches were.
    """
    if loaded is None:
        return 0
    cuda = device.type == "cuda"
    model = model.to(device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    autocast = (torch.autocast(device.type, dtype=_AUTOCAST[precision])
                if precision != "float32" else contextlib.nullcontext())
    store_dtype = getattr(torch, dtype)
    committer = _Committer(writer)
    redone = [0]
    try:
        with progress(total, "extract", shown) as bar, torch.inference_mode(), \
                _interrupt_between_batches() as check_interrupt:
            for batch in loaded:
                if isinstance(batch["images"], list):
                    batch = on_device(batch, pre, device)
                feats = (_forward(model, batch["images"], device, autocast, store_dtype,
                                  redone) if len(batch["index"]) else None)
                committer.put(feats, [images.labels[i] for i in batch["index"]],
                              [images.paths[i] for i in batch["index"]], batch["digests"],
                              batch["errors"], [stats[i] for i in batch["index"]])
                bar.update(done(len(batch["index"]) + len(batch["errors"])) - bar.n)
                check_interrupt()
            check_interrupt()    # pressed while the last batch was awaited
        committer.close()
        if redone[0]:
            log.warning("%d batches had non-finite %s features and were computed again in "
                        "float32", redone[0], precision)
        return redone[0]
    finally:
        # Also when the loop raised: the caller closes the writer next, which must not race a
        # commit in progress, and a thread left waiting on its queue would never end.
        committer.stop()


@contextlib.contextmanager
def _interrupt_between_batches():
    """Ctrl-C while batches are computed takes effect between two batches (the check this
    yields raises KeyboardInterrupt then), a second Ctrl-C at once. An interrupt that lands while
    the DataLoader receives a batch breaks the worker's hand-over of its shared memory, and the
    worker prints a traceback. Only where Ctrl-C raises KeyboardInterrupt in the main thread
    (not in another thread, not where SIGINT is ignored)."""
    pressed = []

    def check() -> None:
        if pressed:
            raise KeyboardInterrupt

    def first(signum, frame) -> None:
        pressed.append(signum)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield check
        return
    signal.signal(signal.SIGINT, first)
    try:
        yield check
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _forward(model, images: torch.Tensor, device: torch.device, autocast, store_dtype,
             redone: list[int]):
    """Features of a (B, 3, S, S) uint8 batch as a (B, D) `store_dtype` CPU tensor (a dict of
    them per cut for several cuts; for a (B, K, 3, S, S) batch of K views, {view: (B, D)}, one
    forward pass per view, so view 0 is computed as a one-view cache computes it); on CUDA,
    (pinned host tensors, event) with the copy back still in flight (the committer waits).
    A reduced-precision pass with a non-finite output is done again in float32 (counted in
    `redone[0]`)."""
    cuda = device.type == "cuda"
    x = images.to(device, non_blocking=True)

    def run(x4: torch.Tensor):
        if cuda:
            x4 = x4.contiguous(memory_format=torch.channels_last)
        with autocast:
            y = model(to_float_batch(x4))                 # (B, D), or {cut: (B, D_cut)}
        if isinstance(autocast, contextlib.nullcontext) or _finite(y):
            return y
        redone[0] += 1
        with torch.autocast(device.type, enabled=False):
            return model(to_float_batch(x4))
    y = {v: run(x[:, v]) for v in range(x.shape[1])} if x.dim() == 5 else run(x)
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


def _finite(y) -> bool:
    """Every value of the features `y` (a tensor or a dict of them) is finite (one sync)."""
    parts = y.values() if isinstance(y, dict) else [y]
    return bool(torch.stack([torch.isfinite(t).all() for t in parts]).all())


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
            feats, labels, paths, digests, errors, stats = item
            try:
                if isinstance(feats, tuple):
                    feats[1].synchronize()
                    feats = feats[0]
                self.writer.commit(_arrays(feats, self.writer.manifest), labels, paths, digests,
                                   errors, stats)
                log.debug("committed %d rows", self.writer.committed_rows)
            except BaseException as e:  # surfaced in the main thread by put()/close()
                self.error = e


def _arrays(feats, manifest: dict) -> dict[str, np.ndarray]:
    """{dataset key: (B, D) array} of a batch's features: a tensor for a one-cut cache, a dict
    by cut name for several cuts or by view number for views, None for a batch without a
    usable image (no rows)."""
    keys = [k for k, _ in mf.feature_datasets(manifest)]       # cut names, then "view 1", ...
    if feats is None:
        return {k: np.empty((0, d), manifest["dtype"]) for k, d in mf.feature_datasets(manifest)}
    if isinstance(feats, dict):
        return {(keys[k] if isinstance(k, int) else k): t.numpy() for k, t in feats.items()}
    return {keys[0]: feats.numpy()}
