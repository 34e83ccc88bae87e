"""Find the images of a source: a folder (ImageFolder layout or a flat folder of unlabeled
images) or a .csv/.tsv list of `path[,label]` rows, as a sorted, deterministic `ImageList`.

Extension-less files are kept when their first bytes are an image signature. Images whose
name (or list label) is not valid UTF-8 cannot be stored by name: `find_images` lists them
apart, in `ImageList.unusable`, and warns, instead of failing the whole listing. Reading the
images is `pipeline.images`.

    from pipeline.sources import find_images
    images = find_images("data/train")
    images.absolute(0), images.labels[0], images.class_names
"""
from __future__ import annotations

import csv
import logging
import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path

from cache.errors import UserError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm", ".pbm"}
)
LIST_EXTENSIONS = (".csv", ".tsv")

_NAMES_SHOWN = 10  # unusable names spelled out in the warning; the rest are counted
# A list's first row is a header when it uses one of these column names (lower case) and
# does not name a file: see _is_header.
_PATH_COLUMNS = frozenset({
    "path", "paths", "file", "files", "filename", "file_name", "filepath", "file_path",
    "image", "images", "image_path", "image_name", "img", "img_path", "name",
})
_LABEL_COLUMNS = frozenset({"label", "labels", "class", "class_name", "category", "target", "y"})
_HEADER_LOOKAHEAD = 8  # rows after the first checked for existence by the general header rule
_SNIFF_BYTES = 32  # enough for every signature in _has_image_signature
_BMP_DIB_SIZES = {12, 16, 40, 52, 56, 64, 108, 124}  # header sizes that follow "BM"


@dataclass(frozen=True)
class ImageList:
    """The images of one source, sorted by path."""

    root: Path  # absolute; folder root, or the list file's folder
    paths: tuple[str, ...]  # posix, relative to root (absolute if the list gave them so); sorted, unique
    labels: tuple[int, ...]  # class index per path, -1 for unlabeled
    class_names: tuple[str, ...]  # label i is class_names[i]
    kind: str  # "imagefolder" | "unlabeled" | "list"
    # (printable path, reason) of image files left out because their name or label is not
    # valid UTF-8, so no cache or report can store it; the bad bytes are shown as \xNN.
    unusable: tuple[tuple[str, str], ...] = ()
    # (size, mtime_ns) of each path, taken by the folder walk's one stat per file ((-1, -1)
    # where it failed); None for a list file, whose entries were not statted.
    stats: tuple[tuple[int, int], ...] | None = field(default=None, repr=False, compare=False)

    def absolute(self, i: int) -> Path:
        """The absolute path of image i (an absolute entry stays as it is)."""
        return self.root / self.paths[i]


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
    if not src.is_file():
        # Reading a FIFO or a device as a list would block or never end.
        raise UserError(f"image source {src} is not a regular file or a folder: pass a folder of "
                        f"images or a .csv/.tsv list")
    if src.suffix.lower() in LIST_EXTENSIONS:
        return _read_list_file(src)
    raise UserError(
        f"image source {src} is a {src.suffix or 'extension-less'} file: pass a folder of images "
        f"or a .csv/.tsv list file with rows path[,label]"
    )


def _find_in_folder(root: Path) -> ImageList:
    found, unusable, top_folders = _walk_images(root)
    found.sort()
    unusable.sort()
    _warn_unusable(root, unusable)
    if not found:
        if unusable:
            raise UserError(
                f"no usable images in {root}: the {len(unusable)} found have names that are not "
                f"valid UTF-8 (first: {unusable[0][0]}): rename them"
            )
        raise UserError(
            f"no images found in {root} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}, "
            f"and extension-less files by content): point to the folder that holds the images"
        )
    paths = tuple(p for p, _ in found)
    stats = tuple(s for _, s in found)
    if not any("/" in p for p in paths):
        return ImageList(root, paths, (-1,) * len(paths), (), "unlabeled", tuple(unusable),
                         stats)
    # Every top-level folder is a class, even one without images: dropping it would shift
    # the index of every class after it, so labels would not mean the same in two runs.
    # A folder whose name is not UTF-8 cannot be stored as a class name (its images are
    # in `unusable`).
    class_names = tuple(sorted(d for d in top_folders if is_utf8(d)))
    index = {name: i for i, name in enumerate(class_names)}
    labels = tuple(index[p.split("/", 1)[0]] if "/" in p else -1 for p in paths)
    used = {p.split("/", 1)[0] for p in paths if "/" in p}
    # The walk does not follow symlinked folders, so a symlinked class shows up empty: say so.
    empty = [name + (" (a symlink, not followed)" if (root / name).is_symlink() else "")
             for name in class_names if name not in used]
    if empty:
        logger.warning(
            "%d class folder(s) of %s hold no images, kept as classes so that the classes "
            "after them keep their index: %s", len(empty), root, ", ".join(empty),
        )
    n_loose = labels.count(-1)
    if n_loose:
        logger.warning(
            "%d image(s) lie directly in %s, outside the class folders: kept as unlabeled (label -1)",
            n_loose, root,
        )
    return ImageList(root, paths, labels, class_names, "imagefolder", tuple(unusable), stats)


SHARD_SUFFIX = ".tar"                # a webdataset-style tar shard (see `pipeline.shards`)


def is_shard_source(source: str | Path) -> bool:
    """Whether SOURCE names tar shards (a .tar file, a brace range or a glob of them)."""
    text = str(source)
    name = text.lower()
    if name.endswith((".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")):
        return True
    return name.endswith(SHARD_SUFFIX) and not Path(text).is_dir()


_NO_STAT = (-1, -1)


def _walk_images(root: Path) -> tuple[list[tuple[str, tuple[int, int]]], list[tuple[str, str]],
                                      list[str]]:
    """((posix path relative to root, (size, mtime_ns)) of the image files under root, (printable
    path, reason) of those whose path is not valid UTF-8, names of root's non-hidden sub-folders).

    One os.scandir per folder and one stat per file (following a symlink, as opening it
    would): the stat that tells a regular file from a FIFO is the one a re-run compares with
    the cache's record, so listing a folder costs what `ls -l` costs and no more.
    """
    found: list[tuple[str, tuple[int, int]]] = []
    unusable: list[tuple[str, str]] = []
    top_folders: list[str] = []
    stack = [(str(root), "")]          # (folder, its path relative to root, "" or ending in /)
    while stack:
        folder, rel = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError as err:
            logger.warning("skipped unreadable folder %s: %s", printable(str(err.filename)),
                           err.strerror)
            continue
        subfolders = []
        for entry in entries:
            name = entry.name
            if name.startswith("."):
                continue
            try:
                is_dir = entry.is_dir()   # follows a symlink, like os.walk's listing of folders
            except OSError:
                is_dir = False
            if is_dir:
                # followlinks=False: a symlinked folder cannot make the walk loop forever.
                subfolders.append((name, entry.is_symlink()))
                continue
            stat_ = _image_stat(entry)
            if stat_ is None:
                continue
            path = rel + name
            if is_utf8(path):
                found.append((path, stat_))
            else:
                unusable.append((printable(path), "file or folder name is not valid UTF-8: rename it"))
        if not rel:                      # root itself
            top_folders = sorted(name for name, _ in subfolders)
        stack.extend((os.path.join(folder, name), f"{rel}{name}/")
                     for name, link in sorted(subfolders, reverse=True) if not link)
    return found, unusable, top_folders


def _extension(name: str) -> str:
    """Path(name).suffix.lower() of a file name that does not start with a dot, at a tenth of
    its cost (it runs once per file of the folder)."""
    dot = name.rfind(".")
    return name[dot:].lower() if 0 < dot < len(name) - 1 else ""


def _image_stat(entry: os.DirEntry) -> tuple[int, int] | None:
    """(size, mtime_ns) of a directory entry that is an image file, (-1, -1) for a dangling link
    that claims to be one (reported as bad at decode); None for anything else."""
    try:
        st = entry.stat()  # follows symlinks
    except OSError:
        return _NO_STAT if _extension(entry.name) in IMAGE_EXTENSIONS else None
    if not stat.S_ISREG(st.st_mode):
        return None  # FIFOs, sockets, devices: opening them can block forever
    if _extension(entry.name) in IMAGE_EXTENSIONS or _has_image_signature(Path(entry.path)):
        return st.st_size, st.st_mtime_ns
    return None


def is_utf8(text: str) -> bool:
    """False for a str holding surrogate escapes (undecodable bytes of a file name or list)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(text: str) -> str:
    """`text` with each byte that is not UTF-8 shown as \\xNN (other lone surrogates as \\udNNN)."""
    try:
        raw = text.encode("utf-8", "surrogateescape")  # back to the bytes on disk or in the list
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def _warn_unusable(source: Path, unusable: list[tuple[str, str]]) -> None:
    if not unusable:
        return
    shown = "; ".join(f"{path} ({reason})" for path, reason in unusable[:_NAMES_SHOWN])
    more = f"; and {len(unusable) - _NAMES_SHOWN} more" if len(unusable) > _NAMES_SHOWN else ""
    logger.warning("%d image(s) of %s skipped: %s%s", len(unusable), source, shown, more)


def _has_image_signature(path: Path) -> bool:
    from .images import open_regular    # PIL: only for a file without an image extension
    try:
        # Checked again on open: the file may have been swapped for a FIFO since the stat.
        with open_regular(path) as f:
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
    rows, unusable = _parse_list_rows(list_file)
    unusable.sort()
    _warn_unusable(list_file, unusable)
    if not rows:
        if unusable:
            raise UserError(
                f"list file {list_file} has no usable rows: the paths or labels of its "
                f"{len(unusable)} rows are not valid UTF-8 (first: {unusable[0][0]}): save it as UTF-8"
            )
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
        unusable=tuple(unusable),
    )


def _parse_list_rows(list_file: Path) -> tuple[list[tuple[int, str, str]], list[tuple[str, str]]]:
    """Rows as (line number, posix path, label string or ""), and (printable path, reason)
    of the rows whose path or label is not valid UTF-8."""
    delimiter = "\t" if list_file.suffix.lower() == ".tsv" else ","
    table: list[tuple[int, list[str]]] = []
    # utf-8-sig: spreadsheet exports often start with a BOM that would glue onto the first path.
    # surrogateescape: a byte that is not UTF-8 spoils its own row only, not the whole list.
    with open(list_file, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        reader = csv.reader(f, delimiter=delimiter)
        for cells in reader:
            cells = [c.strip() for c in cells]
            if any(cells):
                table.append((reader.line_num, cells))
    if table and _is_header(list_file, table):
        table = table[1:]
    rows: list[tuple[int, str, str]] = []
    unusable: list[tuple[str, str]] = []
    for line, cells in table:
        row = _parse_list_row(list_file, line, cells)
        if not is_utf8(row[1]):
            unusable.append((printable(row[1]), f"file name on line {line} is not valid UTF-8"))
        elif not is_utf8(row[2]):
            unusable.append((row[1], f"label {printable(row[2])} on line {line} is not valid UTF-8"))
        else:
            rows.append(row)
    return rows, unusable


def _is_header(list_file: Path, table: list[tuple[int, list[str]]]) -> bool:
    """Whether the first row names the columns instead of an image.

    Never when its first cell names an existing file or has an image extension: a row
    that points at a real image is data, even for an image called "path". Otherwise it is
    a header when it uses a usual column name (path, filename, image, ... first, or label,
    class, ... second), or, whatever the names, when the rows after it all name existing
    files and it has no folder in it: a column title, not one lost image among present ones.
    """
    cells = table[0][1]
    first = cells[0]
    if not first or Path(first).suffix.lower() in IMAGE_EXTENSIONS or _names_file(list_file, first):
        return False
    if first.lower() in _PATH_COLUMNS or (len(cells) > 1 and cells[1].lower() in _LABEL_COLUMNS):
        return True
    after = [c[0] for _, c in table[1:1 + _HEADER_LOOKAHEAD] if c[0]]
    if "/" in first or "\\" in first or not after or not all(_names_file(list_file, p) for p in after):
        return False
    logger.warning("%s: first row %r taken as a header: it names no file and the rows after it do",
                   list_file, printable(",".join(cells)))
    return True


def _names_file(list_file: Path, cell: str) -> bool:
    # lexists: a dangling symlink is still an entry the user listed (reported bad at decode).
    return os.path.lexists(list_file.parent / cell)


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
