"""Shared helpers of the command modules."""
from __future__ import annotations

import dataclasses
import functools

import click

from cache.errors import UserError


def defaults(config_cls) -> dict:
    """Field defaults of a config dataclass: the one place defaults live."""
    return {f.name: f.default for f in dataclasses.fields(config_cls)}


def fail_on_user_error(fn):
    """Turn the library's UserError (a user mistake) into a one-line `Error: ...` and exit 1.
    Any other exception is a bug and keeps its traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            raise click.ClickException(str(e)) from None
    return wrapper
