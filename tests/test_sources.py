"""Tests for pipeline.sources: finding images in folders and list files.

Every image is a few pixels, written to tmp_path with Pillow (or by hand).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from PIL import Image

from cache.errors import UserError
from pipeline.images import BadImageError, read_image
from pipeline.sources import IMAGE_EXTENSIONS, ImageList, find_images

from .test_images import FORMATS, _encode, _save


# ---------------------------------------------------------------------------
# find_images: folders

@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    _save(root / "cat" / "a.png")
    _save(root / "cat" / "sub" / "deep" / "b.jpg")
    _save(root / "dog" / "c.bmp")
    (root / "dog" / "photo").write_bytes(_encode(Image.new("RGB", (2, 2)), "PNG"))  # no extension
    (root / "dog" / "notes.txt").write_text("not an image")
    _save(root / "dog" / ".secret.png")  # hidden file
    _save(root / ".cache" / "x.png")  # hidden folder
    (root / "empty_class").mkdir()
    (root / "empty_class" / "readme.md").write_text("# nothing here")
    _save(root / "loose.png")  # outside any class folder
    return root


def test_imagefolder_classes_labels_and_sorted_paths(image_folder: Path, caplog):
    with caplog.at_level(logging.WARNING, logger="pipeline.sources"):
        images = find_images(image_folder)
    assert images.kind == "imagefolder"
    assert images.root == image_folder.resolve()
    assert images.class_names == ("cat", "dog", "empty_class")  # kept, though it has no image
    assert images.paths == ("cat/a.png", "cat/sub/deep/b.jpg", "dog/c.bmp", "dog/photo", "loose.png")
    assert images.labels == (0, 0, 1, 1, -1)
    assert images.absolute(1) == image_folder.resolve() / "cat" / "sub" / "deep" / "b.jpg"
    assert images.unusable == ()
    assert "1 image(s) lie directly in" in caplog.text
    assert "hold no images, kept as classes" in caplog.text and "empty_class" in caplog.text


def test_empty_class_folder_is_kept_so_later_indices_do_not_shift(tmp_path: Path, caplog):
    _save(tmp_path / "a" / "1.png")
    (tmp_path / "b").mkdir()
    _save(tmp_path / "c" / "2.png")
    _save(tmp_path / "c" / "3.png")
    with caplog.at_level(logging.WARNING, logger="pipeline.sources"):
        images = find_images(tmp_path)
    assert images.class_names == ("a", "b", "c")
    assert images.paths == ("a/1.png", "c/2.png", "c/3.png")
    assert images.labels == (0, 2, 2)
    assert "1 class folder(s) of" in caplog.text and caplog.text.rstrip().endswith("their index: b")


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")
def test_symlinked_class_folder_is_kept_and_named_in_the_warning(tmp_path: Path, caplog):
    _save(tmp_path / "elsewhere" / "x.png")
    _save(tmp_path / "data" / "a" / "1.png")
    os.symlink(tmp_path / "elsewhere", tmp_path / "data" / "b")
    with caplog.at_level(logging.WARNING, logger="pipeline.sources"):
        images = find_images(tmp_path / "data")
    assert images.class_names == ("a", "b") and images.paths == ("a/1.png",)
    assert "their index: b (a symlink, not followed)" in caplog.text


def test_imagefolder_is_deterministic(image_folder: Path):
    assert find_images(image_folder) == find_images(str(image_folder))


def test_unlabeled_folder(tmp_path: Path):
    _save(tmp_path / "b.jpg")
    _save(tmp_path / "a.png")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "no_images_here").mkdir()
    images = find_images(tmp_path)
    assert images.kind == "unlabeled"
    assert images.paths == ("a.png", "b.jpg")
    assert images.labels == (-1, -1)
    assert images.class_names == ()


def test_every_format_is_found_by_extension(tmp_path: Path):
    for ext in FORMATS:
        _save(tmp_path / f"img{ext}")
    _save(tmp_path / "UPPER.PNG")
    (tmp_path / "broken.jpg").write_text("text, found here, rejected at decode")
    images = find_images(tmp_path)
    expected = sorted([f"img{ext}" for ext in FORMATS] + ["UPPER.PNG", "broken.jpg"])
    assert list(images.paths) == expected
    assert {".png", ".jpg", ".tiff", ".pgm", ".pbm"} <= IMAGE_EXTENSIONS


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF"])
def test_extensionless_image_is_found_by_content(tmp_path: Path, fmt: str):
    (tmp_path / "photo").write_bytes(_encode(Image.new("RGB", (3, 3)), fmt))
    (tmp_path / "BMW_notes").write_text("BM is also how this text starts")
    (tmp_path / "notes.txt").write_text("plain text")
    assert find_images(tmp_path).paths == ("photo",)


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")
def test_symlinked_files_followed_symlinked_folders_not_looped(tmp_path: Path):
    _save(tmp_path / "cat" / "a.png")
    os.symlink(tmp_path / "cat" / "a.png", tmp_path / "cat" / "link.png")
    os.symlink(tmp_path, tmp_path / "cat" / "loop")  # would recurse forever if followed
    os.symlink(tmp_path / "gone.png", tmp_path / "cat" / "dangling.png")
    images = find_images(tmp_path)
    assert images.paths == ("cat/a.png", "cat/dangling.png", "cat/link.png")
    with pytest.raises(BadImageError, match="unreadable: No such file"):
        read_image(images.absolute(1))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_is_skipped_and_never_blocks(tmp_path: Path):
    _save(tmp_path / "a.png")
    os.mkfifo(tmp_path / "pipe.png")
    assert find_images(tmp_path).paths == ("a.png",)
    with pytest.raises(BadImageError, match="not a regular file"):
        read_image(tmp_path / "pipe.png")


def test_missing_source_is_an_error(tmp_path: Path):
    with pytest.raises(UserError, match="does not exist"):
        find_images(tmp_path / "nope")


def test_folder_without_images_is_an_error(tmp_path: Path):
    (tmp_path / "notes.txt").write_text("hello")
    _save(tmp_path / ".hidden.png")
    with pytest.raises(UserError, match=r"no images found .*\.jpg") as err:
        find_images(tmp_path)
    assert "\n" not in str(err.value)


def test_file_of_another_kind_is_an_error(tmp_path: Path):
    (tmp_path / "list.txt").write_text("a.png\n")
    with pytest.raises(UserError, match=r"\.csv/\.tsv"):
        find_images(tmp_path / "list.txt")


# ---------------------------------------------------------------------------
# find_images: list files

def test_csv_with_header_relative_absolute_and_empty_labels(tmp_path: Path):
    elsewhere = _save(tmp_path / "other" / "z.png")
    list_file = tmp_path / "lists" / "train.csv"
    list_file.parent.mkdir()
    list_file.write_text(
        "Path,label\n"
        "imgs/b.png,dog\n"
        "\n"
        "./imgs/a.png,cat\n"
        f"{elsewhere},\n"
        "imgs/missing.png\n"
        "imgs/c.png,cat\n"
    )
    images = find_images(list_file)
    assert images.kind == "list"
    assert images.root == list_file.parent.resolve()
    assert images.paths == (elsewhere.as_posix(), "imgs/a.png", "imgs/b.png", "imgs/c.png", "imgs/missing.png")
    assert images.labels == (-1, 0, 1, 0, -1)
    assert images.class_names == ("cat", "dog")
    assert images.absolute(0) == elsewhere  # absolute entries stay absolute
    assert images.absolute(1) == list_file.parent.resolve() / "imgs" / "a.png"


@pytest.mark.parametrize("header", ["filename,class", "image,label", "FILE_NAME,Category",
                                    "img,y", "path", "picture,label"])
def test_csv_header_with_usual_column_names_is_skipped(tmp_path: Path, header: str):
    list_file = tmp_path / "list.csv"
    list_file.write_text(f"{header}\nb.png,dog\na.png,cat\n")  # the images need not exist
    images = find_images(list_file)
    assert images.paths == ("a.png", "b.png")
    assert images.class_names == ("cat", "dog") and images.labels == (0, 1)


def test_csv_header_with_other_names_is_skipped_when_the_rows_after_it_exist(tmp_path: Path, caplog):
    _save(tmp_path / "a.png")
    _save(tmp_path / "b.png")
    list_file = tmp_path / "list.csv"
    list_file.write_text("fname,species\na.png,cat\nb.png,dog\n")
    with caplog.at_level(logging.WARNING, logger="pipeline.sources"):
        images = find_images(list_file)
    assert images.paths == ("a.png", "b.png") and images.class_names == ("cat", "dog")
    assert "first row 'fname,species' taken as a header" in caplog.text
    (tmp_path / "b.png").unlink()  # now the rows after it do not all exist: it is data
    images = find_images(list_file)
    assert images.paths == ("a.png", "b.png", "fname")
    assert images.class_names == ("cat", "dog", "species")


def test_csv_first_row_naming_a_real_file_is_never_a_header(tmp_path: Path):
    (tmp_path / "imgs").mkdir()
    _save(tmp_path / "imgs" / "path", fmt="PNG")  # an extension-less image called "path"
    _save(tmp_path / "imgs" / "b.png")
    list_file = tmp_path / "imgs" / "list.csv"
    list_file.write_text("path,cat\nb.png,dog\n")
    images = find_images(list_file)
    assert images.paths == ("b.png", "path")
    assert images.class_names == ("cat", "dog") and images.labels == (1, 0)
    img, _ = read_image(images.absolute(1))
    assert img.size == (4, 3)


def test_csv_first_row_with_an_image_extension_is_never_a_header(tmp_path: Path):
    _save(tmp_path / "a.png")
    list_file = tmp_path / "list.csv"
    list_file.write_text("missing.png,label\na.png,cat\n")  # a lost image, reported at decode
    assert find_images(list_file).paths == ("a.png", "missing.png")


def test_csv_without_header_and_unlabeled(tmp_path: Path):
    list_file = tmp_path / "all.CSV"
    list_file.write_text("b.png\na.png\n")
    images = find_images(list_file)
    assert images.paths == ("a.png", "b.png")
    assert images.labels == (-1, -1)
    assert images.class_names == ()


def test_tsv(tmp_path: Path):
    list_file = tmp_path / "val.tsv"
    list_file.write_text("path\tlabel\nx, with comma.png\tzebra\ny.png\tant\n")
    images = find_images(list_file)
    assert images.paths == ("x, with comma.png", "y.png")
    assert images.labels == (1, 0)
    assert images.class_names == ("ant", "zebra")


def test_csv_with_byte_order_mark_keeps_header_skipped(tmp_path: Path):
    list_file = tmp_path / "excel.csv"
    list_file.write_bytes("path,label\na.png,cat\n".encode("utf-8-sig"))
    assert find_images(list_file).paths == ("a.png",)


def test_duplicate_paths_name_path_and_lines(tmp_path: Path):
    list_file = tmp_path / "dup.csv"
    list_file.write_text("path,label\na.png,cat\nb.png,dog\n./a.png,dog\n")
    with pytest.raises(UserError, match=r"a\.png is listed more than once \(lines 2, 4\)"):
        find_images(list_file)


@pytest.mark.parametrize("text", ["", "\n\n", "path,label\n"])
def test_empty_list_file_is_an_error(tmp_path: Path, text: str):
    list_file = tmp_path / "empty.csv"
    list_file.write_text(text)
    with pytest.raises(UserError, match="has no rows"):
        find_images(list_file)


def test_extra_columns_are_an_error(tmp_path: Path):
    list_file = tmp_path / "wide.csv"
    list_file.write_text("a.png,cat,train\n")
    with pytest.raises(UserError, match=r"line 1: 3 columns, expected path\[,label\]"):
        find_images(list_file)


def test_image_list_is_frozen(tmp_path: Path):
    images = ImageList(tmp_path, ("a.png",), (-1,), (), "unlabeled")
    with pytest.raises(AttributeError):
        images.kind = "list"  # type: ignore[misc]
