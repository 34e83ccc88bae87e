"""Shared helpers of the command modules."""
from __future__ import annotations

import dataclasses
import functools

import click


def defaults(config_cls) -> dict:
    """Field defaults of a config dataclass: the one place defaults live."""
    return {f.name: f.default for f in dataclasses.fields(config_cls)}


def fail_on_value_error(fn):
    """Turn library ValueErrors (user mistakes) into a one-line error and exit code 1."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ValueError as e:
            raise click.ClickException(str(e)) from None
    return wrapper
