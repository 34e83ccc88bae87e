"""The project's exception type for user mistakes, its kinds for cache files, and `first_line`.

`UserError` is raised for anything the user can fix: a bad flag value, a missing or damaged
file, a cache made with other settings. The command line prints only these as a one-line
`Error: ...` and exits 1; any other exception is a bug and keeps its traceback. It is its own
type, not a ValueError, so that an `except` meant for user mistakes never catches a bug. It
lives in the bottom layer (`cache/`) so that every layer above can raise it;
`pipeline.UserError` is the same class.
"""
from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix; str() is the one-line message, naming the problem and the fix."""


class CacheBusy(UserError):
    """A cache file that another process holds open (HDF5 locks a file it writes): wait for it
    or stop it. Never a reason to replace the file."""


class StorageError(UserError):
    """A write to a cache file failed (a full disk, an I/O error); what was committed is kept.
    `reason` and `advice` are the parts of the message, for a caller that says it again."""
    reason: str = ""
    advice: str = ""


class Unreadable(UserError):
    """A file that HDF5 cannot open or read as a cache (damaged, or not HDF5 at all)."""


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, at most `limit` characters, for quoting it in
    a one-line message; the exception's type name when it has no message."""
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:limit]


__all__ = ["CacheBusy", "StorageError", "Unreadable", "UserError", "first_line"]
