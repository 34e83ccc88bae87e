"""The configs' allowed values: one validator for the library, the same ranges in the CLI."""
from __future__ import annotations

import dataclasses
import math

import click
import pytest

from cache.errors import UserError
from cli.main import COMMANDS
from cli.main_helpers import click_type, size_text
from pipeline.config import (HEADS, DemoConfig, ExportConfig, ExtractConfig, Options,
                             PredictConfig, ReportConfig, TrainConfig, validate)

CONFIGS = (ExtractConfig, TrainConfig, ExportConfig, PredictConfig, ReportConfig, DemoConfig)


@pytest.mark.parametrize("cls", CONFIGS)
def test_defaults_are_allowed_and_every_constraint_names_a_field(cls):
    validate(cls())
    assert set(cls.constraints) <= {f.name for f in dataclasses.fields(cls)}


@pytest.mark.parametrize("config, message", [
    (ExtractConfig(image_size=16), "--image-size 16: use an integer >= 32"),
    (ExtractConfig(image_size=32.0), "--image-size 32.0: use an integer >= 32"),
    (ExtractConfig(batch_size=True), "--batch-size True: use an integer >= 1"),
    (ExtractConfig(workers=-2), "--workers -2: use an integer >= -1"),
    (ExtractConfig(dtype="int8"), "unknown --dtype 'int8': choose from float16, float32"),
    (TrainConfig(lr=(1e-3, 0.0)), "--lr 0.0: use a finite number > 0"),
    (TrainConfig(lr=(math.inf,)), "--lr inf: use a finite number > 0"),
    (TrainConfig(dropout=(0.5, 1.0)), r"--dropout 1.0: use a finite number in [0, 1)"),
    (TrainConfig(momentum=math.nan), "--momentum nan: use a finite number in [0, 1]"),
    (TrainConfig(head=("linear", "svm")), "unknown --head 'svm': choose from " + ", ".join(HEADS)),
    (TrainConfig(seed=()), "--seed is empty: give at least one value"),
    (TrainConfig(views=0), "--views 0: use an integer >= 1"),
    (ReportConfig(dpi=19), "--dpi 19: use an integer >= 20"),
    (DemoConfig(per_class=1), "--per-class 1: use an integer >= 2"),
    (ExportConfig(input="jpeg"), "unknown --input 'jpeg': choose from tensor, image"),
])
def test_a_value_outside_its_constraint_is_one_line_naming_the_option(config, message):
    with pytest.raises(UserError) as e:
        validate(config)
    assert str(e.value) == message


def test_none_only_where_the_field_allows_it():
    validate(ExtractConfig(image_size=None))
    validate(TrainConfig(views=None))
    validate(ExtractConfig(batch_size=None))       # extract: None picks by the device
    with pytest.raises(UserError, match="--batch-size None: use an integer >= 1"):
        validate(PredictConfig(batch_size=None))


def test_derived_click_types_keep_the_range():
    t = click_type(TrainConfig, "val_fraction")
    assert isinstance(t, click.FloatRange)
    assert (t.min, t.max, t.min_open, t.max_open) == (0, 1, False, True)
    t = click_type(ExtractConfig, "image_size")
    assert isinstance(t, click.IntRange) and (t.min, t.max) == (32, None)
    assert click_type(ExtractConfig, "pool").choices == ("flatten", "avg")
    with pytest.raises(TypeError):
        click_type(ExtractConfig, "backbone")


def _described(t) -> tuple:
    if isinstance(t, click.Choice):
        return ("choice", tuple(t.choices))
    if isinstance(t, (click.IntRange, click.FloatRange)):
        return (type(t).__name__, t.min, t.max, t.min_open, t.max_open)
    return (type(t).__name__,)


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.name)
def test_every_option_of_a_constrained_field_uses_the_derived_type(command):
    cls = {"extract": ExtractConfig, "train-head": TrainConfig, "export": ExportConfig,
           "predict": PredictConfig, "report": ReportConfig, "demo": DemoConfig}.get(command.name)
    if cls is None:
        pytest.skip("no config")
    checked = 0
    for p in command.params:
        rule = cls.constraints.get(p.name)
        if not isinstance(p, click.Option) or rule is None:
            continue
        if p.type.name in ("list", "size", "views"):
            continue        # sweep axes, sizes and 'all': parsed by their own types
        assert _described(p.type) == _described(click_type(cls, p.name)), p.name
        checked += 1
    assert checked >= 2


def test_list_options_take_their_choices_from_the_constraint():
    train = next(c for c in COMMANDS if c.name == "train-head")
    head = next(p for p in train.params if p.name == "head")
    assert head.type.choices == TrainConfig.constraints["head"].values
    assert isinstance(TrainConfig.constraints["head"], Options)


def test_size_text():
    assert [size_text(n) for n in (4 * 2**30, 512 * 2**20, 3 * 2**40, 1000)] == \
        ["4G", "512M", "3T", "1000"]
