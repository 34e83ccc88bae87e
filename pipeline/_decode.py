"""Decoders: an image file -> a (3, S, S) uint8 tensor, resized and centre-cropped as a
`Preprocessing` says. `extract` and `predict` pick one with --decode; the cache records it.

    decoder = resolve_decoder("auto", device)             # Decoder("cpu", draft=False) on a CPU
    x = decoder.load(open("cat.jpg", "rb"), pre)            # in a worker: (3, S, S) uint8
    x, bad = gpu_batch(items, pre, device)                 # gpu: a batch's JPEG bytes -> (B, 3, S, S)

- pil: Pillow decodes and resizes (the weights' transforms on a PIL image), as every cache
  made before --decode existed.
- cpu: libjpeg-turbo through `torchvision.io.decode_jpeg` straight to a uint8 tensor (the same
  pixels as Pillow's), then an antialiased uint8 tensor resize and a crop, in the workers.
- gpu: the workers read, hash and check each JPEG and pass its bytes on; the main process
  decodes the batch with nvJPEG on the device, resizes and crops there (`gpu_batch`).

Every decoder opens the header with Pillow first, under the guard of `pipeline.images` (sides,
aspect ratio, decompression bombs). Anything but a plain 8-bit RGB or grey JPEG (CMYK, 16-bit,
palette, PNG, ...), and any JPEG the fast decoder fails on, goes through Pillow and the
weights' transforms, image by image: the hardened path, which records a bad image as before. With `draft`, a JPEG at least twice
the resize target decodes at a reduced DCT scale (Pillow's `draft`, libjpeg's scaling) whose
sides stay at least the resized image's.
"""
from __future__ import annotations

import contextlib
import io
import math
import warnings
from dataclasses import dataclass
from typing import BinaryIO

import PIL
import torch
import torchvision
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from cache.errors import UserError

from .images import BadImageError, check_header, decode_errors, decode_file
from .preprocessing import Preprocessing

_FAST_MODES = ("RGB", "L")    # JPEG modes libjpeg-turbo and nvJPEG decode as Pillow does
_DRAFT_FACTOR = 2             # draft only where the DCT scaling can at least halve the sides


@dataclass(frozen=True)
class Decoder:
    """How image files become input tensors; `record()` is what a cache's manifest keeps."""
    name: str = "cpu"        # pil, cpu or gpu
    draft: bool = False      # large JPEGs decode at a reduced DCT scale (still >= the resize)

    def record(self) -> dict:
        """{name, library, draft}: the library (and version) whose pixels make the rows."""
        library = {"pil": f"Pillow {PIL.__version__}",
                   "cpu": f"torchvision {torchvision.__version__} (libjpeg-turbo)",
                   "gpu": f"torchvision {torchvision.__version__} (nvJPEG)"}[self.name]
        return {"name": self.name, "library": library, "draft": self.draft}

    def load(self, fp: BinaryIO, pre: Preprocessing) -> torch.Tensor:
        """The image in binary file `fp` (at its first byte) as a (3, S, S) uint8 tensor; for
        `gpu`, a plain JPEG as its (L,) uint8 bytes, for `gpu_batch` to decode. Raises
        BadImageError as `pipeline.images` does."""
        with decode_errors():
            with Image.open(fp) as img:        # the header only
                check_header(img)
                fmt, mode, size = img.format, img.mode, img.size
                upright = self.name == "gpu" and fmt == "JPEG" and _upright(img)
        draft = draft_size(size, pre) if self.draft and fmt == "JPEG" else None
        fp.seek(0)
        if self.name == "pil":
            return pre(decode_file(fp, draft))
        if fmt == "JPEG" and mode in _FAST_MODES and draft is None:
            data = torch.frombuffer(bytearray(fp.read()), dtype=torch.uint8)       # (L,)
            if upright:              # nvJPEG ignores EXIF orientation: turned ones stay here
                return data
            x = _jpeg_cpu(data)
            if x is not None:
                return resize_crop(x, pre)
            fp.seek(0)
        return pre(decode_file(fp, draft))    # today's path, Pillow's resize included


def _upright(img: Image.Image) -> bool:
    """The opened JPEG has no EXIF orientation to apply (absent, or 1)."""
    try:
        return img.getexif().get(0x0112, 1) == 1
    except Exception:   # a broken EXIF block: let the CPU path (Pillow's rules) decide
        return False


def draft_size(size: tuple[int, int], pre: Preprocessing) -> tuple[int, int] | None:
    """(width, height) a JPEG of `size` may be drafted down to (the resized image's sides), or
    None when it is less than twice as large (no DCT scale would apply)."""
    w, h = size
    short = min(w, h)
    if short < _DRAFT_FACTOR * pre.resize_size:
        return None
    return math.ceil(pre.resize_size * w / short), math.ceil(pre.resize_size * h / short)


def resize_crop(x: torch.Tensor, pre: Preprocessing) -> torch.Tensor:
    """(3, H, W) uint8 -> (3, S, S) uint8: shorter side to pre.resize_size (antialiased, on
    uint8 as Pillow does), then the centre crop; on whatever device `x` is."""
    x = F.resize(x, [pre.resize_size], interpolation=InterpolationMode(pre.interpolation),
                 antialias=pre.antialias)
    return F.center_crop(x, [pre.crop_size])


def _jpeg_cpu(data: torch.Tensor) -> torch.Tensor | None:
    """(3, H, W) uint8 of JPEG bytes `data`, upright by its EXIF orientation, or None where
    libjpeg-turbo fails (truncated, odd markers): Pillow then decides what is wrong."""
    try:
        with _quiet():
            return decode_jpeg(data, mode=ImageReadMode.RGB, apply_exif_orientation=True)
    except RuntimeError:
        return None


@contextlib.contextmanager
def _quiet():
    """torchvision 0.29 warns on every decode that image decoding moves to torchcodec."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The image decoding", DeprecationWarning)
        yield


def gpu_batch(items: list[torch.Tensor], pre: Preprocessing, device: torch.device,
              decode=None) -> tuple[torch.Tensor | None, dict[int, str]]:
    """A batch of worker outputs (JPEG bytes (L,), or images already decoded (3, S, S)) as a
    (B', 3, S, S) uint8 tensor on `device`, and {position: reason} of the items that turned
    out unusable (not in the tensor). The JPEGs decode together on the device (`decode`,
    default nvJPEG's batched `decode_jpeg`); one the device cannot take falls back to the CPU
    decoder, which records a bad image as usual."""
    encoded = [k for k, t in enumerate(items) if t.dim() == 1]
    out: list[torch.Tensor | None] = [
        None if t.dim() == 1 else t.to(device, non_blocking=True) for t in items]
    bad: dict[int, str] = {}
    decoded = dict(zip(encoded, _decode_many([items[k] for k in encoded], device,
                                             decode or decode_jpeg)))
    # One resize per image size, not one per image: a Python loop of small kernels would
    # leave the GPU waiting on launches.
    sizes: dict[tuple, list[int]] = {}
    for k, x in decoded.items():
        if x is not None:
            sizes.setdefault(tuple(x.shape), []).append(k)
    for ks in sizes.values():
        for k, y in zip(ks, resize_crop(torch.stack([decoded[k] for k in ks]), pre)):
            out[k] = y                                            # (3, S, S)
    for k in (k for k, x in decoded.items() if x is None):
        try:
            out[k] = Decoder("cpu").load(io.BytesIO(items[k].numpy().tobytes()), pre).to(device)
        except BadImageError as e:
            bad[k] = str(e)
    kept = [x for x in out if x is not None]
    return (torch.stack(kept) if kept else None), bad       # (B', 3, S, S)


def _decode_many(data: list[torch.Tensor], device: torch.device, decode
                 ) -> list[torch.Tensor | None]:
    """Each JPEG of `data` decoded on `device` ((3, H, W) uint8), None where it fails: the
    batch in one call, and image by image when that call fails."""
    if not data:
        return []

    def run(batch):
        with _quiet():
            return decode(batch, mode=ImageReadMode.RGB, device=device,
                          apply_exif_orientation=True)
    try:
        return list(run(data))
    except (RuntimeError, ValueError):
        pass
    out = []
    for d in data:
        try:
            out.append(run([d])[0])
        except (RuntimeError, ValueError):
            out.append(None)
    return out


def gpu_decoding_available(device: torch.device) -> bool:
    """nvJPEG can decode on `device` (a CUDA device and a torchvision built with it)."""
    if device.type != "cuda":
        return False
    tiny = io.BytesIO()
    Image.new("RGB", (8, 8)).save(tiny, "JPEG")
    try:
        with _quiet():
            decode_jpeg([torch.frombuffer(bytearray(tiny.getvalue()), dtype=torch.uint8)],
                        device=device)
        return True
    except (RuntimeError, TypeError):
        return False


def resolve_decoder(name: str, device: torch.device, draft: bool = False,
                    recorded: list[str] | None = None) -> Decoder:
    """The decoder --decode `name` means on `device`. auto: the decoder that made the rows of
    an existing cache (`recorded` names) where it runs here; else gpu on a CUDA device with
    nvJPEG, cpu elsewhere."""
    gpu = device.type == "cuda" and gpu_decoding_available(device)
    if name == "gpu" and not gpu:
        raise UserError(f"--decode gpu needs a CUDA device with nvJPEG ({device} here): use "
                        "--decode cpu or auto")
    if name != "auto":
        return Decoder(name, draft)
    for old in recorded or ():
        if old in ("pil", "cpu") or old == "gpu" and gpu:
            return Decoder(old, draft)
    return Decoder("gpu" if gpu else "cpu", draft)

