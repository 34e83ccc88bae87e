"""Decoding images into batches for a forward pass (extract and predict share it)."""
from __future__ import annotations

import os
import re

import torch
from torch.utils.data import Dataset

from cache.errors import UserError

from ._decode import Decoder, gpu_batch
from .preprocessing import Preprocessing
from .images import BadImageError, digest_or_blank
from .shards import ShardList, read_path
from .sources import ImageList


class ImageBatches(Dataset):
    """Decodes one image to a (3, S, S) uint8 tensor, or reports why it could not; with an
    `augment` and `views` K > 1, to (K, 3, S, S): the plain view and K - 1 augmented ones.
    A `decoder` (`pipeline._decode`) replaces Pillow + `pre` for the plain view; the gpu
    decoder gives a plain JPEG as its (L,) uint8 bytes, decoded later by `gpu_batch`."""

    def __init__(self, images: ImageList, pre: Preprocessing, augment=None, views: int = 1,
                 decoder: Decoder | None = None):
        self.images, self.pre, self.augment, self.views = images, pre, augment, views
        self.decoder = decoder if augment is None else None

    def __len__(self) -> int:
        return len(self.images.paths)

    def __getitem__(self, i: int):
        try:
            if isinstance(self.images, ShardList):   # a member, read at its offset
                if self.decoder is not None:
                    x, digest = self.images.read(i, self._decode)
                    return i, x, digest, None, self.images.paths[i]
                img, digest = self.images.read(i)
            elif self.decoder is not None:                  # a file, or SHARD.tar/MEMBER
                x, digest = read_path(self.images.absolute(i), self._decode)
                return i, x, digest, None, self.images.paths[i]
            else:
                img, digest = read_path(self.images.absolute(i))   # a file, or SHARD.tar/MEMBER
            if self.augment is None:
                return i, self.pre(img), digest, None, self.images.paths[i]
            views = torch.stack([self.augment(img, digest, v) for v in range(self.views)])
            return i, views, digest, None, self.images.paths[i]
        except BadImageError as e:
            # The digest of the bytes that failed, when read_image got to read them: hashing
            # a large corrupt file a second time would double the cost of rejecting it.
            digest = e.digest or ("" if isinstance(self.images, ShardList)
                                  else digest_or_blank(self.images.absolute(i)))
            return i, None, digest, str(e), self.images.paths[i]

    def _decode(self, fp) -> torch.Tensor:
        return self.decoder.load(fp, self.pre)


def collate(items):
    """Batch of ImageBatches items: good images stacked, bad ones listed as (path, digest, reason)."""
    good = [it for it in items if it[3] is None]
    encoded = any(it[1].dim() == 1 for it in good)     # JPEG bytes for the gpu decoder
    return {
        "index": [it[0] for it in good],
        # (B, [K,] 3, S, S); a list of (L,) bytes and (3, S, S) images for `gpu_batch`
        "images": ([it[1] for it in good] if encoded else torch.stack([it[1] for it in good]))
        if good else None,
        "digests": [it[2] for it in good],
        "paths": [it[4] for it in good],
        "errors": [(it[4], it[2], it[3]) for it in items if it[3] is not None],
    }


def on_device(batch: dict, pre: Preprocessing, device: torch.device) -> dict:
    """A collated batch whose images are JPEG bytes (the gpu decoder) with its images decoded
    on `device`; those that turn out unusable move from its rows to its errors."""
    x, bad = gpu_batch(batch["images"], pre, device)
    keep = [k for k in range(len(batch["index"])) if k not in bad]
    return {"index": [batch["index"][k] for k in keep], "images": x,
            "digests": [batch["digests"][k] for k in keep],
            "paths": [batch["paths"][k] for k in keep],
            "errors": batch["errors"] + [(batch["paths"][k], batch["digests"][k], reason)
                                         for k, reason in bad.items()]}


def default_workers(workers: int, cuda: bool) -> int:
    """Decoding processes: `workers` if >= 0, else CPU: half the cores, at most 4; GPU: every
    core, at most 16 (on a GPU, decoding is what the forward pass waits for)."""
    if workers >= 0:
        return workers
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return min(16, cpus or 1) if cuda else min(4, (cpus or 1) // 2)


def default_batch_size(batch_size: int | None, cuda: bool) -> int:
    """Images per forward pass: `batch_size`, else 256 on a GPU (where a batch of 32 leaves it
    waiting on launches), 32 on a CPU."""
    return batch_size if batch_size is not None else 256 if cuda else 32


def resolve_device(name: str) -> torch.device:
    """--device: auto (CUDA when there is one), cpu, cuda or cuda:N, with N one of this
    machine's GPUs."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # torch.device() accepts "cuda:x" and "gpu" only to fail later, deep in CUDA: match first.
    if not re.fullmatch(r"cpu|cuda(:[0-9]+)?", name):
        raise UserError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available here; use --device cpu or auto")
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.index is not None and device.index >= count:
        raise UserError(f"--device {name}: this machine has {count} CUDA device"
                        f"{'s' if count != 1 else ''} (cuda:0 to cuda:{count - 1}); pick one "
                        "of them, or cuda")
    return device
