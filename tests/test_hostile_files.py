"""Files that used to hang, exhaust memory or abort a whole run: FIFOs and devices, absurd
image sizes, huge corrupt files, names that are not UTF-8. Each must be refused with a
one-line reason (or listed apart) while the good images next to it go through.

Every file is made in tmp_path; nothing needs the network.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import struct
import sys
import threading
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

import pipeline.images as images_module
from cache.errors import UserError
from pipeline._loading import ImageBatches
from pipeline.images import digest_or_blank
from pipeline.preprocessing import Preprocessing
from pipeline.images import (BadImageError, NotRegularFileError, decode_image, file_digest,
                             read_image)
from pipeline.sources import find_images

PRE = Preprocessing(resize_size=8, crop_size=8, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
NOT_UTF8 = "file or folder name is not valid UTF-8: rename it"


def _png(path: Path, color=(255, 0, 0), size=(4, 3)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format="PNG")
    return path


def _png_header(width: int, height: int) -> bytes:
    """A PNG of a few dozen bytes whose header claims width x height 1-bit gray."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def _within(seconds: float, work):
    """work() run in a thread; fails the test (instead of hanging it) when it does not return."""
    out: dict = {}

    def run():
        try:
            out["value"] = work()
        except BaseException as e:  # re-raised in the test's thread
            out["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"still running after {seconds} s: a read blocked")
    if "error" in out:
        raise out["error"]
    return out["value"]


@pytest.fixture
def no_decoding(monkeypatch):
    """Fail if Pillow decodes any pixels: refusals must come from the header alone."""
    def load(self):
        raise AssertionError(f"decoded a {self.size[0]}x{self.size[1]} image")
    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


# ---------------------------------------------------------------------------
# FIFOs and devices

@pytest.mark.skipif(not hasattr(os, "mkfifo") or not os.path.exists("/dev/zero"),
                    reason="needs FIFOs and /dev/zero")
def test_fifo_and_dev_zero_in_a_list_are_reported_without_blocking(tmp_path: Path):
    good = _png(tmp_path / "good.png", color=(1, 2, 3))
    os.mkfifo(tmp_path / "pipe.png")  # no writer: a blocking open would wait forever
    (tmp_path / "list.csv").write_text("good.png,cat\npipe.png,cat\n/dev/zero,dog\n")

    def work():
        images = find_images(tmp_path / "list.csv")
        digests = [digest_or_blank(images.absolute(i)) for i in range(len(images.paths))]
        batches = ImageBatches(images, PRE)
        return images, digests, [batches[i] for i in range(len(batches))]

    images, digests, items = _within(20, work)
    assert images.paths == ("/dev/zero", "good.png", "pipe.png")
    assert digests == ["", hashlib.sha256(good.read_bytes()).hexdigest(), ""]
    for i in (0, 2):
        index, tensor, digest, reason, path = items[i]
        assert (index, tensor, digest, reason, path) == (
            i, None, "", "unreadable: not a regular file", images.paths[i])
    assert items[1][3] is None and items[1][2] == digests[1]
    assert items[1][1].shape == (3, 8, 8) and items[1][1][:, 0, 0].tolist() == [1, 2, 3]


@pytest.mark.skipif(not hasattr(os, "mkfifo") or not os.path.exists("/dev/zero"),
                    reason="needs FIFOs and /dev/zero")
def test_file_digest_refuses_what_is_not_a_regular_file(tmp_path: Path):
    os.mkfifo(tmp_path / "pipe.png")
    for path in (tmp_path / "pipe.png", Path("/dev/zero")):
        with pytest.raises(NotRegularFileError, match="not a regular file"):
            _within(20, lambda p=path: file_digest(p))
        with pytest.raises(BadImageError, match="^unreadable: not a regular file$"):
            _within(20, lambda p=path: read_image(p))
    with pytest.raises(IsADirectoryError):
        file_digest(tmp_path)
    assert issubclass(NotRegularFileError, OSError)  # digest_or_blank's `except OSError` holds


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_as_the_list_file_is_a_user_error(tmp_path: Path):
    os.mkfifo(tmp_path / "list.csv")
    with pytest.raises(UserError, match="is not a regular file or a folder"):
        _within(20, lambda: find_images(tmp_path / "list.csv"))


# ---------------------------------------------------------------------------
# sizes that cannot be resized sanely

@pytest.mark.parametrize("size", [(200_000, 1), (1, 200_000), (2_000_000, 1), (101, 1)])
def test_extreme_aspect_ratio_is_refused_before_decoding(tmp_path: Path, size, no_decoding):
    path = tmp_path / "strip.png"
    # Pillow writes these strips in a few KB; save() does not go through ImageFile.load.
    Image.new("1", size).save(path)
    assert path.stat().st_size < 64 << 10
    t0 = time.perf_counter()
    with pytest.raises(BadImageError) as err:
        read_image(path)
    assert time.perf_counter() - t0 < 5
    assert str(err.value) == f"unusable size {size[0]}x{size[1]} pixels: aspect ratio above 100:1"
    assert err.value.digest == file_digest(path)


def test_side_above_65535_is_refused_before_decoding(no_decoding):
    # 70,000 x 1,000 is within the aspect limit and under Pillow's pixel limit.
    with pytest.raises(BadImageError, match=r"^unusable size 70000x1000 pixels: a side above 65535$"):
        decode_image(_png_header(70_000, 1_000))


def test_aspect_ratio_of_100_is_kept(tmp_path: Path):
    path = tmp_path / "wide.png"
    Image.new("L", (300, 3), 200).save(path)
    img, digest = read_image(path)
    assert img.size == (300, 3) and img.getpixel((299, 2)) == (200, 200, 200)
    assert digest == file_digest(path)


def test_extreme_aspect_ratio_is_skipped_by_the_loader(tmp_path: Path):
    Image.new("1", (200_000, 1)).save(tmp_path / "strip.png")
    _png(tmp_path / "ok.png")
    images = find_images(tmp_path)
    items = [ImageBatches(images, PRE)[i] for i in range(2)]
    assert [it[4] for it in items] == ["ok.png", "strip.png"]
    assert items[0][3] is None and items[0][1].shape == (3, 8, 8)
    assert items[1][1] is None
    assert items[1][3] == "unusable size 200000x1 pixels: aspect ratio above 100:1"
    assert items[1][2] == file_digest(tmp_path / "strip.png")


# ---------------------------------------------------------------------------
# large files: streamed, never held whole

def test_large_corrupt_jpeg_is_rejected_in_little_memory(tmp_path: Path):
    path = tmp_path / "huge.jpg"
    garbage = np.random.default_rng(0).bytes(1 << 20)
    with open(path, "wb") as f:
        f.write(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00")
        for _ in range(50):
            f.write(garbage)
    size = path.stat().st_size
    tracemalloc.start()
    try:
        with pytest.raises(BadImageError) as err:
            read_image(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert size > 50 << 20
    assert peak < 4 << 20, f"peak {peak} bytes for a {size}-byte file"
    assert str(err.value) == "not an image (cannot identify image file)"
    assert err.value.digest == file_digest(path)
    # The loader records that digest, without hashing the file a second time.
    images = find_images(tmp_path)
    assert ImageBatches(images, PRE)[0][1:4] == (None, file_digest(path), str(err.value))


def test_streamed_decode_matches_bytes_decode_across_blocks(tmp_path: Path):
    noise = np.random.default_rng(2).integers(0, 256, (700, 900, 3), dtype=np.uint8)
    path = tmp_path / "noise.png"
    Image.fromarray(noise).save(path, compress_level=0)
    data = path.read_bytes()
    assert len(data) > 1 << 20  # more than one hashing block
    img, digest = read_image(path)
    assert digest == hashlib.sha256(data).hexdigest() == file_digest(path)
    assert np.array_equal(np.asarray(img), noise)
    assert np.array_equal(np.asarray(img), np.asarray(decode_image(data)))


def test_file_rewritten_between_hash_and_decode_is_read_again(tmp_path: Path, monkeypatch):
    path = _png(tmp_path / "a.png", color=(1, 1, 1))
    new = io.BytesIO()
    Image.new("RGB", (5, 5), (9, 9, 9)).save(new, format="PNG")
    real_decode, calls = images_module._decode, []

    def rewrite_then_decode(fp):
        calls.append(1)
        if len(calls) == 1:  # another process rewrites the file in place, mid-read
            with open(path, "r+b") as f:
                f.write(new.getvalue())
        return real_decode(fp)

    monkeypatch.setattr(images_module, "_decode", rewrite_then_decode)
    img, digest = read_image(path)
    assert len(calls) == 2
    assert digest == hashlib.sha256(new.getvalue()).hexdigest() == file_digest(path)
    assert img.size == (5, 5) and img.getpixel((0, 0)) == (9, 9, 9)


# ---------------------------------------------------------------------------
# names that are not UTF-8

def _make_bytes_named(folder: Path, name: bytes, data: bytes) -> None:
    fd = os.open(os.fsencode(folder) + b"/" + name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (2, 2)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.skipif(sys.platform in ("win32", "darwin"), reason="file names are always Unicode there")
def test_names_that_are_not_utf8_are_listed_apart(tmp_path: Path, caplog):
    _png(tmp_path / "cat" / "a.png")
    _png(tmp_path / "dog" / "c.png")
    try:
        _make_bytes_named(tmp_path / "cat", b"b\xffad.png", _png_bytes())
        os.mkdir(os.fsencode(tmp_path) + b"/bad\xfe")
    except OSError as e:
        pytest.skip(f"this filesystem refuses names that are not UTF-8: {e}")
    _make_bytes_named(tmp_path / os.fsdecode(b"bad\xfe"), b"x.png", _png_bytes())
    with caplog.at_level(logging.WARNING, logger="pipeline.sources"):
        images = find_images(tmp_path)
    assert images.paths == ("cat/a.png", "dog/c.png")
    assert images.class_names == ("cat", "dog") and images.labels == (0, 1)
    assert images.unusable == (("bad\\xfe/x.png", NOT_UTF8), ("cat/b\\xffad.png", NOT_UTF8))
    assert "2 image(s) of" in caplog.text and "cat/b\\xffad.png" in caplog.text
    for text in images.paths + images.class_names + tuple(p for p, _ in images.unusable):
        text.encode("utf-8")  # storable: no surrogate escapes left anywhere


@pytest.mark.skipif(sys.platform in ("win32", "darwin"), reason="file names are always Unicode there")
def test_folder_of_only_undecodable_names_is_a_user_error(tmp_path: Path):
    try:
        _make_bytes_named(tmp_path, b"\xff.png", _png_bytes())
    except OSError as e:
        pytest.skip(f"this filesystem refuses names that are not UTF-8: {e}")
    with pytest.raises(UserError, match=r"no usable images .*not valid UTF-8 \(first: \\xff\.png\)"):
        find_images(tmp_path)


def test_list_rows_that_are_not_utf8_are_listed_apart(tmp_path: Path, caplog):
    (tmp_path / "list.csv").write_bytes(b"path,label\na.png,cat\nb\xffad.png,cat\nc.png,caf\xe9\n")
    with caplog.at_level(logging.WARNING, logger="pipeline.sources"):
        images = find_images(tmp_path / "list.csv")
    assert images.paths == ("a.png",) and images.class_names == ("cat",) and images.labels == (0,)
    assert images.unusable == (
        ("b\\xffad.png", "file name on line 3 is not valid UTF-8"),
        ("c.png", "label caf\\xe9 on line 4 is not valid UTF-8"),
    )
    assert "2 image(s) of" in caplog.text


def test_list_of_only_undecodable_rows_is_a_user_error(tmp_path: Path):
    (tmp_path / "list.csv").write_bytes(b"\xff.png,cat\n")
    with pytest.raises(UserError, match=r"no usable rows.*save it as UTF-8"):
        find_images(tmp_path / "list.csv")
