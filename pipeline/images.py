"""Read and decode image files safely.

`read_image(path)` opens a file once, hashes it in blocks and decodes it from that same open
file, returning the decoded RGB image with the SHA-256 of the bytes it decoded, so the digest
stored in the cache always describes the pixels that made the features.

Every way an image can be unusable (unreadable, not a regular file, empty, not an image,
truncated, decompression bomb, absurd size or aspect ratio, unconvertible mode) comes out as
`BadImageError`, whose message is a one-line reason the caller records and moves on. Listing
the images of a source is `pipeline.sources`.

    from pipeline.images import read_image
    img, digest = read_image(Path("data/train/cat/001.jpg"))
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import re
import stat
import struct
import warnings
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cache.errors import first_line

_BLOCK = 1 << 20  # 1 MiB: hashing reads
# O_NONBLOCK: opening a FIFO that nobody writes to would otherwise block forever.
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_O_BINARY = getattr(os, "O_BINARY", 0)  # Windows: no newline translation of image bytes
# Sizes that no photograph or scan reaches. Preprocessing resizes the shorter side to a
# few hundred pixels, so the resized image's longer side is the aspect ratio times that:
# a 200,000 x 1 PNG of a few hundred bytes would need gigabytes once resized. Stitched
# panoramas stay around 10:1, and 65,535 px is the largest side JPEG can store, so these
# limits refuse only synthetic or broken files, and at 100:1 a 256 px shorter side
# resizes to about 20 MB. Checked on the header, before the pixels are decoded.
_MAX_ASPECT = 100
_MAX_SIDE = 65_535
_READ_ATTEMPTS = 3  # a file rewritten while read_image reads it is read again, this often
_MODES_16BIT = {"I;16", "I;16B", "I;16L", "I;16N"}
# Pillow raises all of these from plugins on malformed input; none of them is our bug.
_DECODE_ERRORS = (
    OSError, SyntaxError, ValueError, struct.error, EOFError,
    IndexError, KeyError, ZeroDivisionError, MemoryError,
)


class BadImageError(ValueError):
    """An image file that cannot be used; str() is the one-line reason.

    `digest` is the SHA-256 of the bytes that were read and failed to decode, or ""
    when the file could not be read at all.
    """

    digest: str = ""


class NotRegularFileError(OSError):
    """The path names a FIFO, socket, device or anything else that is not a regular file."""


def file_digest(path: Path) -> str:
    """SHA-256 hex digest of a file's bytes, read in 1 MiB blocks.

    Raises OSError when the file cannot be read, NotRegularFileError (an OSError) without
    blocking or reading when it is a FIFO, device or socket.
    """
    with open_regular(path) as f:
        return _hash_file(f)[0]


def digest_or_blank(path: Path) -> str:
    """Content digest, or "" when the file cannot be read (it is retried on every run).

    A FIFO, device or socket gives "" at once: file_digest refuses anything but a regular
    file before reading, so a listed /dev/zero or a FIFO with no writer cannot hang the run.
    """
    try:
        return file_digest(path)
    except OSError:
        return ""


def open_regular(path: Path) -> io.BufferedReader:
    """Open a regular file for reading; refuse anything else before reading a byte (raises
    NotRegularFileError, an OSError, for a FIFO, device or socket).

    A FIFO with no writer would block the open forever and /dev/zero never ends, so the
    open is non-blocking and the type is checked on the open descriptor, which also
    leaves no gap for the path to be swapped between the check and the read.
    """
    fd = os.open(path, os.O_RDONLY | _O_NONBLOCK | _O_BINARY)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), os.fspath(path))
        if not stat.S_ISREG(mode):
            raise NotRegularFileError(errno.EINVAL, "not a regular file", os.fspath(path))
        if _O_NONBLOCK:
            os.set_blocking(fd, True)  # a regular file: plain blocking reads from here on
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _hash_file(f: io.BufferedReader) -> tuple[str, int]:
    """(SHA-256 hex, byte count) of `f` from its current position to its end."""
    h = hashlib.sha256()
    buf = bytearray(_BLOCK)  # one buffer reused: memory stays at 1 MiB whatever the file size
    view = memoryview(buf)
    size = 0
    while n := f.readinto(buf):
        h.update(view[:n])
        size += n
    return h.hexdigest(), size


def _fingerprint(f: io.BufferedReader) -> tuple[int, int]:
    st = os.fstat(f.fileno())
    return st.st_size, st.st_mtime_ns


def read_image(path: Path, decode: Callable[[BinaryIO], Any] | None = None
               ) -> tuple[Any, str]:
    """Open a file once; return (RGB image, SHA-256 hex of the bytes decoded).

    The file is hashed in blocks, then decoded from the same open file, so neither step
    holds the whole file in memory. Raises BadImageError for files that cannot be read or
    decoded; its `digest` is set when the bytes were read. `decode` (a binary file object at
    the image's first byte -> anything, raising BadImageError) replaces the PIL decoder: the
    faster decoders of `pipeline._decode` read through the same checks this way.
    """
    try:
        f = open_regular(Path(path))
    except OSError as e:
        raise BadImageError(f"unreadable: {e.strerror or e}") from e
    with f:
        for _ in range(_READ_ATTEMPTS):
            # Hashing and decoding read the file twice: an unchanged size and mtime across
            # both shows they read the same bytes (a replaced file cannot interfere: this
            # descriptor keeps the old one). A file rewritten meanwhile is read again.
            before = _fingerprint(f)
            try:
                f.seek(0)
                digest, size = _hash_file(f)
                f.seek(0)
            except OSError as e:
                raise BadImageError(f"unreadable: {e.strerror or e}") from e
            try:
                if size == 0:
                    raise BadImageError("empty file")
                img = (decode or _decode)(f)
            except BadImageError as e:
                if _fingerprint(f) != before:
                    continue
                e.digest = digest
                raise
            if _fingerprint(f) == before:
                return img, digest
    raise BadImageError(f"file kept changing while being read ({_READ_ATTEMPTS} tries)")


def decode_image(data: bytes) -> Image.Image:
    """Decode image bytes into a fully loaded RGB image, or raise BadImageError(reason).

    EXIF orientation is applied; 16-bit images are scaled (not clipped) to 8 bits;
    animated images give their first frame.
    """
    if not data:
        raise BadImageError("empty file")
    return _decode(io.BytesIO(data))


def _decode(fp, draft: tuple[int, int] | None = None) -> Image.Image:
    """`decode_image` from a binary file object positioned at the image's first byte. With
    `draft` (width, height), a JPEG decodes at the smallest DCT scale (1/2, 1/4, 1/8) that
    keeps both sides at least that large (libjpeg's scaled decoding, Pillow's `draft`)."""
    with decode_errors():
        with Image.open(fp) as img:  # reads the header only
            check_header(img)
            if draft is not None and img.format == "JPEG":
                img.draft(img.mode, draft)
            img.load()  # decode now, inside the guard, so truncation raises here
            return _to_rgb(_exif_upright(img))


decode_file = _decode   # the decoders of pipeline._decode fall back to it


@contextlib.contextmanager
def decode_errors():
    """Every way Pillow (or a decoder reading its header) fails on bad input, as BadImageError;
    a decompression bomb warning counts as one (Pillow only warns between 1x and 2x
    MAX_IMAGE_PIXELS)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except BadImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImageError(_bomb_reason(e)) from e
    except _DECODE_ERRORS as e:
        raise BadImageError(_decode_reason(e)) from e


def check_header(img: Image.Image) -> None:
    """Refuse an opened (not yet decoded) image whose header gives an unusable size."""
    _check_size(*img.size)


def _check_size(width: int, height: int) -> None:
    if min(width, height) < 1:
        raise BadImageError(f"unusable size {width}x{height} pixels: an empty side")
    if max(width, height) > _MAX_ASPECT * min(width, height):
        raise BadImageError(
            f"unusable size {width}x{height} pixels: aspect ratio above {_MAX_ASPECT}:1")
    if max(width, height) > _MAX_SIDE:
        raise BadImageError(f"unusable size {width}x{height} pixels: a side above {_MAX_SIDE}")


def _bomb_reason(err: Exception) -> str:
    match = re.search(r"\((\d+) pixels\)", str(err))
    pixels = match.group(1) if match else "too many"
    return f"decompression bomb: {pixels} pixels exceeds limit of {Image.MAX_IMAGE_PIXELS}"


def _decode_reason(err: Exception) -> str:
    if isinstance(err, UnidentifiedImageError):
        return "not an image (cannot identify image file)"
    message = first_line(err)
    if "truncat" in message.lower():
        return "truncated image"
    return f"corrupt image: {message}"


def _exif_upright(img: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(img)
    except _DECODE_ERRORS:
        # Broken EXIF metadata does not make the pixels unusable: keep them as stored.
        return img.copy()


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in _MODES_16BIT or img.mode in ("I", "F"):
        return Image.fromarray(_to_uint8(img)).convert("RGB")
    if img.mode in ("P", "PA") and "transparency" in img.info:
        img = img.convert("RGBA")  # P+transparency straight to RGB makes Pillow warn
    return img.convert("RGB")


def _to_uint8(img: Image.Image) -> np.ndarray:
    """(H, W) uint8 from a 16-bit, 32-bit integer or float single-channel image."""
    a = np.asarray(img)
    if img.mode == "F":
        return np.clip(np.nan_to_num(a), 0, 255).round().astype(np.uint8)
    a = a.astype(np.int64)
    if img.mode in _MODES_16BIT or a.max(initial=0) > 255:
        # Scale the 16-bit range: a plain convert clips, turning most of the image white.
        # The integer form equals round(v * 255 / 65535); no v lands exactly on .5.
        return ((np.clip(a, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8)
    return np.clip(a, 0, 255).astype(np.uint8)
