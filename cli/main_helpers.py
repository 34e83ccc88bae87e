"""Shared helpers of the command modules."""
from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path

import click

from cache.errors import UserError
from pipeline.config import Interval, Options, rule_of


def defaults(config_cls) -> dict:
    """Field defaults of a config dataclass: the one place defaults live."""
    return {f.name: f.default for f in dataclasses.fields(config_cls)}


def click_type(config_cls, name: str):
    """The click type of a config field, derived from its allowed values (`constraints`):
    Choice for options, IntRange/FloatRange for intervals."""
    rule = rule_of(config_cls, name)
    if isinstance(rule, Options):
        return click.Choice(rule.values)
    if not isinstance(rule, Interval):
        raise TypeError(f"{config_cls.__name__}.{name} has no range or options")
    ranged = click.IntRange if rule.kind is int else click.FloatRange
    return ranged(rule.low, rule.high, min_open=rule.low_open, max_open=rule.high_open)


def size_text(size: int) -> str:
    """A byte count as the shortest exact K/M/G/T text: 4 * 2**30 -> 4G."""
    for unit in "TGMK":
        scale = 2 ** (10 * ("KMGT".index(unit) + 1))
        if size % scale == 0:
            return f"{size // scale}{unit}"
    return str(size)


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


def output_file(example: str):
    """A click callback for `-o FILE`: an empty value is a usage error, and so is a folder (a
    trailing slash, or one that exists), which would otherwise be written as a file of that
    name or fail deep inside; the message gives a file name to use instead."""
    def check(ctx, param, value):
        if value is None:
            return None
        if not value.strip():
            raise click.BadParameter(f"is empty: give a file name, such as {example}")
        if value.endswith(("/", os.sep)) or Path(value).is_dir():
            raise click.BadParameter(f"{value} is a folder: give a file name in it, such as "
                                     f"{Path(value) / example}")
        return Path(value)
    return check


def file_name(ctx, param, value):
    """A click callback for an `-o FILE` that the library checks: a trailing slash, which a
    Path would drop, names a folder and is a usage error."""
    if value is not None and value.endswith(("/", os.sep)):
        raise click.BadParameter(f"{value} ends in a slash, so it names a folder: give a file "
                                 f"name in it, such as {Path(value) / 'cache.h5'}")
    return None if value is None else Path(value)


def output_folder(ctx, param, value):
    """A click callback for `-o FOLDER`: an empty value is a usage error (it would mean the
    current folder, silently)."""
    if value is not None and not str(value).strip():
        raise click.BadParameter("is empty: give a folder, such as runs/")
    return None if value is None else Path(value)
