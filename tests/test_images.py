"""Tests for pipeline.images: safe reading and decoding, digests.

Every image is a few pixels, written to tmp_path with Pillow (or by hand).
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.images import BadImageError, decode_image, file_digest, read_image

FORMATS = {".png": "PNG", ".bmp": "BMP", ".webp": "WEBP", ".tiff": "TIFF", ".tif": "TIFF",
           ".gif": "GIF", ".jpg": "JPEG", ".jpeg": "JPEG", ".ppm": "PPM"}


def _save(path: Path, color=(255, 0, 0), size=(4, 3), fmt: str | None = None, mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, format=fmt or FORMATS.get(path.suffix.lower(), "PNG"))
    return path


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _pixels(img: Image.Image) -> list[tuple[int, ...]]:
    return [tuple(int(v) for v in px) for px in np.asarray(img).reshape(-1, 3)]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _bomb_png(width: int, height: int) -> bytes:
    """A PNG of a few dozen bytes whose header claims width x height 1-bit gray."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(b"\0" * 16)) + _png_chunk(b"IEND", b""))


# ---------------------------------------------------------------------------
# decode_image / read_image: bad input

def test_truncated_jpeg(tmp_path: Path):
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    data = _encode(Image.fromarray(noise), "JPEG")
    with pytest.raises(BadImageError, match="^truncated image$"):
        decode_image(data[: len(data) // 2])


def test_truncated_png():
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    data = _encode(Image.fromarray(noise), "PNG")
    with pytest.raises(BadImageError, match="^truncated image$"):
        decode_image(data[: len(data) // 2])


def test_empty_file(tmp_path: Path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(BadImageError, match="^empty file$"):
        read_image(tmp_path / "empty.png")


def test_text_named_jpg(tmp_path: Path):
    (tmp_path / "bad.jpg").write_text("this is not a picture")
    with pytest.raises(BadImageError, match=r"not an image \(cannot identify image file\)"):
        read_image(tmp_path / "bad.jpg")


@pytest.mark.parametrize("side", [20000, 10000])  # past Pillow's error limit; past its warning limit
def test_decompression_bomb(side: int):
    with pytest.raises(BadImageError, match=f"decompression bomb: {side * side} pixels exceeds limit"):
        decode_image(_bomb_png(side, side))


def test_unreadable_paths(tmp_path: Path):
    with pytest.raises(BadImageError, match="unreadable: No such file or directory"):
        read_image(tmp_path / "gone.png")
    with pytest.raises(BadImageError, match="unreadable: Is a directory"):
        read_image(tmp_path)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads everything")
def test_permission_denied(tmp_path: Path):
    path = _save(tmp_path / "secret.png")
    path.chmod(0)
    try:
        with pytest.raises(BadImageError, match="unreadable: Permission denied"):
            read_image(path)
    finally:
        path.chmod(0o644)


def test_bad_image_error_is_a_value_error():
    assert issubclass(BadImageError, ValueError)


# ---------------------------------------------------------------------------
# decode_image: modes and orientation

@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16bit_gray_is_scaled_not_clipped(fmt: str):
    gray16 = Image.fromarray(np.array([[65535, 32768, 0, 257]], dtype=np.uint16))
    assert gray16.mode == "I;16"
    img = decode_image(_encode(gray16, fmt))
    assert img.mode == "RGB"
    assert _pixels(img) == [(255,) * 3, (128,) * 3, (0,) * 3, (1,) * 3]


def test_32bit_int_gray_scaled_when_above_8_bits_kept_otherwise():
    wide = Image.fromarray(np.array([[65535, 32768, 100]], dtype=np.int32))
    narrow = Image.fromarray(np.array([[200, 7]], dtype=np.int32))
    assert _pixels(decode_image(_encode(wide, "TIFF"))) == [(255,) * 3, (128,) * 3, (0,) * 3]
    assert _pixels(decode_image(_encode(narrow, "TIFF"))) == [(200,) * 3, (7,) * 3]


def test_float_gray_is_clipped():
    img = Image.fromarray(np.array([[-5.0, 300.0, 12.4]], dtype=np.float32))
    assert _pixels(decode_image(_encode(img, "TIFF"))) == [(0,) * 3, (255,) * 3, (12,) * 3]


@pytest.mark.parametrize("mode, color, fmt, expected", [
    ("CMYK", (0, 255, 255, 0), "TIFF", (255, 0, 0)),
    ("RGBA", (10, 20, 30, 0), "PNG", (10, 20, 30)),
    ("LA", (77, 128), "PNG", (77, 77, 77)),
    ("L", 77, "PNG", (77, 77, 77)),
    ("1", 1, "PNG", (255, 255, 255)),
    ("RGB", (1, 2, 3), "PNG", (1, 2, 3)),
    ("RGB", (1, 2, 3), "BMP", (1, 2, 3)),
    ("RGB", (1, 2, 3), "PPM", (1, 2, 3)),
    ("RGB", (1, 2, 3), "WEBP", (1, 2, 3)),
])
def test_modes_become_exact_rgb(mode: str, color, fmt: str, expected):
    kw = {"lossless": True} if fmt == "WEBP" else {}
    img = decode_image(_encode(Image.new(mode, (3, 2), color), fmt, **kw))
    assert img.mode == "RGB" and img.size == (3, 2)
    assert set(_pixels(img)) == {expected}


def test_cmyk_jpeg_becomes_rgb():
    img = decode_image(_encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=95))
    assert img.mode == "RGB"
    assert np.abs(np.asarray(img, dtype=int) - [255, 0, 0]).max() <= 3


@pytest.mark.parametrize("transparency", [None, 1])
def test_palette_png(transparency):
    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 10, 20, 30, 200, 100, 50])
    pal.putpixel((0, 0), 1)
    pal.putpixel((1, 0), 2)
    kw = {} if transparency is None else {"transparency": transparency}
    img = decode_image(_encode(pal, "PNG", **kw))  # -W error: no palette-transparency warning
    assert img.mode == "RGB"
    assert _pixels(img) == [(10, 20, 30), (200, 100, 50)]


def test_animated_gif_gives_first_frame():
    frames = [Image.new("RGB", (4, 4), (255, 0, 0)), Image.new("RGB", (4, 4), (0, 0, 255))]
    data = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert Image.open(io.BytesIO(data)).n_frames == 2
    img = decode_image(data)
    assert img.mode == "RGB" and set(_pixels(img)) == {(255, 0, 0)}


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (3, 2), (0, 0, 0))
    img.putpixel((0, 0), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to view
    out = decode_image(_encode(img, "PNG", exif=exif.tobytes()))
    assert out.size == (2, 3)
    assert out.getpixel((1, 0)) == (255, 0, 0)  # top-left turned to top-right
    jpeg = decode_image(_encode(img, "JPEG", exif=exif.tobytes()))
    assert jpeg.size == (2, 3)


def test_decoded_image_is_independent_of_input_buffer():
    data = bytearray(_encode(Image.new("RGB", (2, 2), (9, 8, 7)), "PNG"))
    img = decode_image(bytes(data))
    data[:] = b"\0" * len(data)
    assert img.getpixel((1, 1)) == (9, 8, 7)


# ---------------------------------------------------------------------------
# digests

def test_read_image_digest_is_sha256_of_the_file(tmp_path: Path):
    path = _save(tmp_path / "a.png", color=(4, 5, 6))
    img, digest = read_image(path)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert digest == file_digest(path)
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (4, 5, 6)


def test_file_digest_spans_blocks(tmp_path: Path):
    data = np.random.default_rng(1).bytes((5 << 20) // 2)  # 2.5 MiB: three 1 MiB reads
    (tmp_path / "blob").write_bytes(data)
    assert file_digest(tmp_path / "blob") == hashlib.sha256(data).hexdigest()
