"""Writing output files so that a failure leaves nothing half-written under a final name.

Every file a stage hands to the user (run files, report files, exported models, predictions)
is written to a temporary name in its own folder, flushed to disk, and renamed over the final
name with os.replace, which is atomic within one filesystem. A full disk, an I/O error or a
folder that became read-only then ends in one UserError naming the file and the fix, and the
file under the final name is the previous complete one, or none.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from cache import fsync_path
from cache.errors import UserError


def temporary_name(path: Path) -> Path:
    """A hidden name beside `path` that keeps its suffix (some writers choose the format by
    it) and is unique to this process."""
    return path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")


def write_file(path: str | Path, write: Callable[[Path], None], fix: str) -> Path:
    """Call write(tmp) to write the content to a temporary name beside `path`, make it durable,
    and rename it to `path`. An OSError on the way becomes a UserError that names `path`, the
    reason and `fix` (e.g. "free some space or write to another folder"); the temporary file
    is removed and `path` is left as it was."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        write(tmp)
        fsync_path(tmp)       # a full disk can surface only here, when the data reaches the disk
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {path}: {e.strerror or e}: {fix} ({path.name} is "
                        "as it was)") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | Path, text: str, fix: str) -> Path:
    """`write_file` of UTF-8 text."""
    return write_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), fix)


def check_folder(folder: str | Path, what: str, fix: str) -> Path:
    """Refuse, before any work, an output folder that cannot be written: `folder` itself if
    it exists, else the nearest existing folder above it (where it would be created)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{what} {folder} is a file, not a folder: {fix}")
    probe = folder
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"cannot create {what} {folder}: {probe} is a file: {fix}")
    # os.access answers for the effective user and sees read-only mounts (EROFS) too.
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {what} {folder}: {probe} is not writable: {fix}")
    return folder


def check_output_file(output: str | Path) -> Path:
    """Refuse, before any work, an output file (-o) whose folder is missing or not writable."""
    parent = Path(output).resolve().parent
    if not parent.is_dir():
        raise UserError(f"output folder {parent} does not exist: create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write to {parent}: it is not writable: choose another -o")
    return Path(output)


def make_folder(folder: str | Path, what: str, fix: str) -> Path:
    """mkdir -p `folder`, an OSError as one UserError."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {what} {folder}: {e.strerror or e}: {fix}") from None
    return folder

