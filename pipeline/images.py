"""Find, read and decode images safely.

`find_images(SOURCE)` turns a folder (ImageFolder layout or a flat folder of
unlabeled images) or a .csv/.tsv list of `path[,label]` rows into a sorted,
deterministic `ImageList`. `read_image(path)` reads a file once and returns the
decoded RGB image with the SHA-256 of the bytes it decoded, so the digest stored
in the cache always describes the pixels that made the features.

Every way an image can be unusable (unreadable, empty, not an image, truncated,
decompression bomb, unconvertible mode) comes out as `BadImageError`, whose
message is a one-line reason the caller records and moves on.

    from pipeline.images import find_images, read_image
    images = find_images("data/train")
    img, digest = read_image(images.absolute(0))
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import logging
import os
import re
import stat
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cache.errors import UserError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".pbm"}
)
LIST_EXTENSIONS = (".csv", ".tsv")

_BLOCK = 1 << 20  # 1 MiB: hashing reads
_SNIFF_BYTES = 32  # enough for every signature in _has_image_signature
_BMP_DIB_SIZES = {12, 16, 40, 52, 56, 64, 108, 124}  # header sizes that follow "BM"
_MODES_16BIT = {"I;16", "I;16B", "I;16L", "I;16N"}
# Pillow raises all of these from plugins on malformed input; none of them is our bug.
_DECODE_ERRORS = (
    OSError, SyntaxError, ValueError, struct.error, EOFError,
    IndexError, KeyError, ZeroDivisionError, MemoryError,
)


class BadImageError(ValueError):
    """An image file that cannot be used; str() is the one-line reason."""


@dataclass(frozen=True)
class ImageList:
    """The images of one source, sorted by path."""

    root: Path  # absolute; folder root, or the list file's folder
    paths: tuple[str, ...]  # posix, relative to root (absolute if the list gave them so); sorted, unique
    labels: tuple[int, ...]  # class index per path, -1 for unlabeled
    class_names: tuple[str, ...]  # label i is class_names[i]
    kind: str  # "imagefolder" | "unlabeled" | "list"

    def absolute(self, i: int) -> Path:
        """The absolute path of image i (an absolute entry stays as it is)."""
        return self.root / self.paths[i]


# ---------------------------------------------------------------------------
# finding images

def find_images(source: str | Path) -> ImageList:
    """List the images of a folder or a .csv/.tsv list file.

    A folder whose sub-folders hold images is ImageFolder layout (one class per
    top-level sub-folder); a folder with images only at its top is unlabeled.
    A list file has rows `path[,label]` (tab-separated for .tsv).
    """
    src = Path(source).expanduser()
    if not src.exists():
        raise UserError(f"image source {src} does not exist: pass a folder of images or a .csv/.tsv list")
    src = src.resolve()
    if src.is_dir():
        return _find_in_folder(src)
    if src.suffix.lower() in LIST_EXTENSIONS:
        return _read_list_file(src)
    raise UserError(
        f"image source {src} is a {src.suffix or 'extension-less'} file: pass a folder of images "
        f"or a .csv/.tsv list file with rows path[,label]"
    )


def _find_in_folder(root: Path) -> ImageList:
    found = sorted(_walk_images(root))
    if not found:
        raise UserError(
            f"no images found in {root} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}, "
            f"and extension-less files by content): point to the folder that holds the images"
        )
    class_names = tuple(sorted({p.split("/", 1)[0] for p in found if "/" in p}))
    if not class_names:
        return ImageList(root, tuple(found), (-1,) * len(found), (), "unlabeled")
    index = {name: i for i, name in enumerate(class_names)}
    labels = tuple(index[p.split("/", 1)[0]] if "/" in p else -1 for p in found)
    n_loose = labels.count(-1)
    if n_loose:
        logger.warning(
            "%d image(s) lie directly in %s, outside the class folders: kept as unlabeled (label -1)",
            n_loose, root,
        )
    return ImageList(root, tuple(found), labels, class_names, "imagefolder")


def _walk_images(root: Path):
    """Yield posix paths, relative to root, of the image files under root."""
    def on_error(err: OSError) -> None:
        logger.warning("skipped unreadable folder %s: %s", err.filename, err.strerror)

    # followlinks=False: a symlinked folder cannot make the walk loop forever.
    for folder, dirnames, filenames in os.walk(root, onerror=on_error, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = Path(folder).relative_to(root)
        for name in filenames:
            if not name.startswith(".") and _is_image_file(Path(folder, name)):
                yield (rel / name).as_posix()


def _is_image_file(path: Path) -> bool:
    try:
        st = path.stat()  # follows symlinks
    except OSError:
        # A dangling link that claims to be an image is kept: it is reported as bad at decode.
        return path.suffix.lower() in IMAGE_EXTENSIONS
    if not stat.S_ISREG(st.st_mode):
        return False  # FIFOs, sockets, devices: opening them can block forever
    return path.suffix.lower() in IMAGE_EXTENSIONS or _has_image_signature(path)


def _has_image_signature(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(_SNIFF_BYTES)
    except OSError:
        return False
    if head.startswith((b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a",
                        b"II*\x00", b"MM\x00*")):
        return True
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return True
    # "BM" alone starts plenty of text files; a real BMP has a known DIB header size at 14.
    return head[:2] == b"BM" and len(head) >= 18 and struct.unpack_from("<I", head, 14)[0] in _BMP_DIB_SIZES


def _read_list_file(list_file: Path) -> ImageList:
    rows = _parse_list_rows(list_file)
    if not rows:
        raise UserError(f"list file {list_file} has no rows: add one `path[,label]` row per image")
    _check_unique(list_file, rows)
    rows.sort(key=lambda r: r[1])
    class_names = tuple(sorted({label for _, _, label in rows if label}))
    index = {name: i for i, name in enumerate(class_names)}
    return ImageList(
        root=list_file.parent,
        paths=tuple(path for _, path, _ in rows),
        labels=tuple(index[label] if label else -1 for _, _, label in rows),
        class_names=class_names,
        kind="list",
    )


def _parse_list_rows(list_file: Path) -> list[tuple[int, str, str]]:
    """Rows as (line number, posix path, label string or "")."""
    delimiter = "\t" if list_file.suffix.lower() == ".tsv" else ","
    rows: list[tuple[int, str, str]] = []
    # utf-8-sig: spreadsheet exports often start with a BOM that would glue onto the first path.
    with open(list_file, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, delimiter=delimiter)
        for cells in reader:
            cells = [c.strip() for c in cells]
            if not any(cells):
                continue
            if not rows and cells[0].lower() == "path":
                continue  # header
            rows.append(_parse_list_row(list_file, reader.line_num, cells))
    return rows


def _parse_list_row(list_file: Path, line: int, cells: list[str]) -> tuple[int, str, str]:
    if not cells[0]:
        raise UserError(f"{list_file} line {line}: empty path: each row is path[,label]")
    if any(cells[2:]):
        raise UserError(f"{list_file} line {line}: {len(cells)} columns, expected path[,label]")
    label = cells[1] if len(cells) > 1 else ""
    return line, Path(cells[0]).as_posix(), label


def _check_unique(list_file: Path, rows: list[tuple[int, str, str]]) -> None:
    lines: dict[str, list[int]] = {}
    for line, path, _ in rows:
        lines.setdefault(path, []).append(line)
    for path, at in lines.items():
        if len(at) > 1:
            raise UserError(
                f"{list_file}: {path} is listed more than once (lines {', '.join(map(str, at))}): "
                f"keep one row per image"
            )


# ---------------------------------------------------------------------------
# reading and decoding

def file_digest(path: Path) -> str:
    """SHA-256 hex digest of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def read_image(path: Path) -> tuple[Image.Image, str]:
    """Read a file once; return (RGB image, SHA-256 hex of the bytes decoded).

    Raises BadImageError for files that cannot be read or decoded.
    """
    data = _read_bytes(Path(path))
    return decode_image(data), hashlib.sha256(data).hexdigest()


def _read_bytes(path: Path) -> bytes:
    try:
        # O_NONBLOCK: opening a FIFO that nobody writes to must not hang the run.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise BadImageError(f"unreadable: {e.strerror or e}") from e
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise BadImageError(f"unreadable: {os.strerror(errno.EISDIR)}")
        if not stat.S_ISREG(mode):
            raise BadImageError("unreadable: not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    except OSError as e:
        raise BadImageError(f"unreadable: {e.strerror or e}") from e
    finally:
        os.close(fd)


def decode_image(data: bytes) -> Image.Image:
    """Decode image bytes into a fully loaded RGB image, or raise BadImageError(reason).

    EXIF orientation is applied; 16-bit images are scaled (not clipped) to 8 bits;
    animated images give their first frame.
    """
    if not data:
        raise BadImageError("empty file")
    try:
        with warnings.catch_warnings():
            # Pillow only warns between 1x and 2x MAX_IMAGE_PIXELS; both are bombs here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                img.load()  # decode now, inside the guard, so truncation raises here
                return _to_rgb(_exif_upright(img))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImageError(_bomb_reason(e)) from e
    except _DECODE_ERRORS as e:
        raise BadImageError(_decode_reason(e)) from e


def _bomb_reason(err: Exception) -> str:
    match = re.search(r"\((\d+) pixels\)", str(err))
    pixels = match.group(1) if match else "too many"
    return f"decompression bomb: {pixels} pixels exceeds limit of {Image.MAX_IMAGE_PIXELS}"


def _decode_reason(err: Exception) -> str:
    if isinstance(err, UnidentifiedImageError):
        return "not an image (cannot identify image file)"
    message = str(err).splitlines()[0] if str(err) else type(err).__name__
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
