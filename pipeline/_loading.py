"""Decoding images into batches for a forward pass (extract and predict share it)."""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch.utils.data import Dataset

from cache.errors import UserError

from .preprocessing import Preprocessing
from .images import BadImageError, file_digest
from .shards import ShardList, read_path
from .sources import ImageList


class ImageBatches(Dataset):
    """Decodes one image to a (3, S, S) uint8 tensor, or reports why it could not; with an
    `augment` and `views` K > 1, to (K, 3, S, S): the plain view and K - 1 augmented ones."""

    def __init__(self, images: ImageList, pre: Preprocessing, augment=None, views: int = 1):
        self.images, self.pre, self.augment, self.views = images, pre, augment, views

    def __len__(self) -> int:
        return len(self.images.paths)

    def __getitem__(self, i: int):
        try:
            if isinstance(self.images, ShardList):   # a member, read at its offset
                img, digest = self.images.read(i)
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


def collate(items):
    """Batch of ImageBatches items: good images stacked, bad ones listed as (path, digest, reason)."""
    good = [it for it in items if it[3] is None]
    return {
        "index": [it[0] for it in good],
        "images": torch.stack([it[1] for it in good]) if good else None,   # (B, [K,] 3, S, S)
        "digests": [it[2] for it in good],
        "errors": [(it[4], it[2], it[3]) for it in items if it[3] is not None],
    }


def digest_or_blank(path: Path) -> str:
    """Content digest, or "" when the file cannot be read (it is retried on every run).

    A FIFO, device or socket gives "" at once: file_digest refuses anything but a regular
    file before reading, so a listed /dev/zero or a FIFO with no writer cannot hang the run.
    """
    try:
        return file_digest(path)
    except OSError:
        return ""


def default_workers(workers: int, cuda: bool) -> int:
    """Decoding processes: `workers` if >= 0, else CPU: half the cores, at most 4; GPU: up to 8."""
    if workers >= 0:
        return workers
    cpus = os.cpu_count() or 1
    return min(8, cpus) if cuda else min(4, cpus // 2)


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
