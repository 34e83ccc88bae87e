"""The project's one exception type for user mistakes.

`UserError` is raised for anything the user can fix: a bad flag value, a missing or damaged
file, a cache made with other settings. The command line prints only these as a one-line
`Error: ...` and exits 1; any other exception is a bug and keeps its traceback. It lives in the
bottom layer (`cache/`) so that every layer above can raise it; `pipeline.UserError` is the
same class. It subclasses ValueError, so `except ValueError` keeps working.
"""
from __future__ import annotations


class UserError(ValueError):
    """A mistake the user can fix; str() is the one-line message, naming the problem and the fix."""


__all__ = ["UserError"]
