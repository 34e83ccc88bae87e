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
import stat
import time
import uuid
from pathlib import Path

from cache import CacheReader, CacheWriter, cache_kind
from cache.errors import UserError

from ._files import check_output_file
from .sources import ImageList

try:
    import fcntl
except ImportError:          # no flock (Windows): runs are not locked against each other
    fcntl = None

log = logging.getLogger("pipeline.extract")


def check_output_name(output: str | Path) -> Path:
    """`output` as a Path; a name that ends in a slash names a folder, which Path would drop."""
    if isinstance(output, str) and output.endswith(("/", os.sep)):
        raise UserError(f"output {output} ends in a slash, so it names a folder: give a file "
                        f"name in it, such as {Path(output) / 'cache.h5'}")
    return Path(output)


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


@contextlib.contextmanager
def dropped_if_empty(writer: CacheWriter, created: bool):
    """A file this run created and that holds no committed row when the run fails is removed:
    it would record the failed run's settings and refuse the corrected command."""
    try:
        yield
    except BaseException:
        if created and writer.committed_rows == 0:
            with contextlib.suppress(Exception):
                writer.close()
            if _rows_on_disk(writer.path) == 0:   # a marker flush may have landed all the same
                writer.path.unlink(missing_ok=True)
        raise


def _rows_on_disk(path: Path) -> int:
    """The committed rows the file at `path` says it holds; 0 when it cannot be read."""
    with contextlib.suppress(Exception), CacheReader(path, allow_incomplete=True) as r:
        return r.n_rows
    return 0


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
                fd = open_lock_file(self.path)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
                    raise self._not_a_lock_file() from None
                return
            if not own_plain_file(os.fstat(fd)):
                os.close(fd)
                raise self._not_a_lock_file()
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

    def _not_a_lock_file(self) -> UserError:
        try:
            mode = os.lstat(self.path).st_mode
        except OSError:
            mode = 0
        what = ("a symbolic link" if stat.S_ISLNK(mode) else "a folder" if stat.S_ISDIR(mode)
                else "a regular file with other names (hard links)" if stat.S_ISREG(mode)
                else "not a regular file")
        return UserError(f"{self.path}, the lock file of {self.output}, is {what}: extract "
                         "writes its lock only into a file of its own, never through it; "
                         "remove it and re-run")

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()       # before unlocking: see acquire
        _HELD_LOCKS.discard(self.fd)
        os.close(self.fd)
        self.fd = None


def open_lock_file(path: Path) -> int:
    """Open (or create) the lock file without following a symbolic link, and without waiting
    on a FIFO: anyone who can write the folder could put one there, to make the lock's pid
    line land in another file or to hang the run."""
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    return os.open(path, flags, 0o644)


def own_plain_file(st: os.stat_result) -> bool:
    """A regular file of one name: truncating it changes no other file."""
    return stat.S_ISREG(st.st_mode) and st.st_nlink == 1


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


def check_shared(output: Path, job) -> None:
    """Under torchrun (`job`, a `_distributed.Job`), every rank must see the folder of -o (the
    shards meet there): rank 0 leaves a marker, each rank looks for it."""
    def marker_for(token: str) -> Path:
        return output.parent / f".{output.name}.ranks-{token}"
    if job.lead:
        token = uuid.uuid4().hex
        marker_for(token).touch()          # before the others learn its name
    marker = marker_for(job.gather(token if job.lead else None)[0])
    try:
        job.step("checking the output folder", lambda: None if marker.exists() else _unseen(
            output))
    finally:
        if job.lead:
            marker.unlink(missing_ok=True)


def _unseen(output: Path):
    raise UserError(f"{socket.gethostname()} does not see rank 0's files in {output.parent}: "
                    "with several nodes, -o must be on a filesystem every node sees (NFS, "
                    "Lustre, ...)")


__all__ = ["OutputLock", "check_not_an_input", "check_output", "check_output_name",
           "check_replaceable", "check_shared", "dropped_if_empty", "open_lock_file",
           "own_plain_file"]
