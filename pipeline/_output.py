"""What `extract` writes to: the checks of -o before any work, and the lock on it.

--overwrite replaces a feature cache of ours and nothing else; -o is never one of the input
images. The process that writes holds an exclusive flock on `.CACHE.h5.lock` beside the output
(pid and host inside), which the kernel releases however the process ends, so a second run on
the same -o is told who writes it instead of being advised to overwrite it.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import time
from pathlib import Path

from cache import cache_kind
from cache.errors import UserError

from ._files import check_output_file
from .sources import ImageList

try:
    import fcntl
except ImportError:          # no flock (Windows): runs are not locked against each other
    fcntl = None

log = logging.getLogger("pipeline.extract")


def check_output(output: Path) -> None:
    """Fail before any work when the output cannot be written."""
    if output.is_dir():
        raise UserError(f"output {output} is a folder: give a file name such as {output / 'cache.h5'}")
    check_output_file(output)


def check_replaceable(output: Path) -> None:
    """--overwrite replaces a feature cache, nothing else: refuse an existing -o that is not a
    regular file, or not one of our caches."""
    if not output.exists():
        return
    if not output.is_file():
        raise UserError(f"{output} exists and is not a regular file (a device, pipe or socket): "
                        "extract writes only over its own feature caches; choose another -o")
    if not os.access(output, os.W_OK):
        raise UserError(f"cannot replace {output}: it is not writable")
    kind = cache_kind(output)
    if kind == "unreadable":
        raise UserError(f"{output} exists and HDF5 cannot read it: if it is a damaged feature "
                        "cache, delete it and re-run; otherwise choose another -o")
    if kind != "cache":
        what = "an HDF5 file of other data" if kind == "hdf5" else "not an HDF5 file"
        raise UserError(f"{output} exists and is not a feature cache ({what}): extract replaces "
                        "only its own caches, even with --overwrite; choose another -o, or move "
                        "that file away")


def check_not_an_input(output: Path, images: ImageList) -> None:
    """Refuse an -o that names one of the images, also through a symbolic link. (A hard link
    to an image is no feature cache: `check_replaceable` refuses it.)"""
    target = output.resolve()
    names = {str(target)}                    # a list file may give absolute paths
    with contextlib.suppress(ValueError):
        names.add(target.relative_to(images.root).as_posix())
    clash = names.intersection(images.paths)
    if clash:
        raise UserError(f"{output} is one of the input images ({clash.pop()}): extract never "
                        "writes over its input; choose another -o")


_HELD_LOCKS: set[int] = set()   # descriptors of the output locks this process holds


def _close_inherited_locks() -> None:
    """In a forked child (a DataLoader worker), close its copies of the lock descriptors. A
    flock belongs to the open file, which fork shares: a worker that outlives a killed run by
    the seconds it takes to notice would keep the cache locked."""
    for fd in _HELD_LOCKS:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_LOCKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_locks)


class OutputLock:
    """An exclusive flock on `.CACHE.h5.lock` beside the output, the file holding the holder's
    pid and host. The kernel releases it when the holder ends, however it ends."""

    def __init__(self, output: Path):
        self.output = output
        self.path = output.parent / f".{output.name}.lock"
        self.fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise UserError naming the run that holds it. Where no lock file
        can be made (no such folder, read-only, not a regular output), the output checks that
        follow say what is wrong, so this takes none."""
        if fcntl is None or self.output.is_dir() or (self.output.exists()
                                                     and not self.output.is_file()):
            return
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError:
                return
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _lock_holder(fd)
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
                    raise UserError(f"{self.output} is being written by another `pipeline "
                                    f"extract` ({holder}); wait for it or stop it") from None
                log.warning("could not lock %s (%s): make sure no other extract writes %s at "
                            "the same time", self.path, e, self.output)
                return
            # A run that finished removes the file while it still holds the lock; one that got
            # the removed file locked it in vain, and tries the file now at the path.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        self.fd = fd
        _HELD_LOCKS.add(fd)

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()       # before unlocking: see acquire
        _HELD_LOCKS.discard(self.fd)
        os.close(self.fd)
        self.fd = None


def _lock_holder(fd: int) -> str:
    """ "pid N" (and "on HOST" when another) of the lock file's holder, which writes them just
    after it locks: a moment's wait covers that."""
    for _ in range(20):
        words = os.pread(fd, 256, 0).decode("utf-8", "replace").split()
        if words:
            host = f" on {words[1]}" if len(words) > 1 and words[1] != socket.gethostname() else ""
            return f"pid {words[0]}{host}"
        time.sleep(0.05)
    return "pid unknown"


__all__ = ["OutputLock", "check_not_an_input", "check_output", "check_replaceable"]
