"""`pipeline demo`: every stage on scikit-learn's digits, and the report."""
from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import click

from pipeline.config import DEMO_OUT, DemoConfig

from .main_helpers import click_type, defaults, fail_on_user_error

_D = defaults(DemoConfig)


@click.command("demo")
@click.option("-o", "--output", type=click.Path(path_type=Path, file_okay=False),
              default=DEMO_OUT, show_default=True,
              help="Folder for the images, caches, runs, model and report.")
@click.option("--weights", default=_D["weights"],
              help="Backbone weights (a torchvision weights name, a local .pth, or 'none'); "
                   "default: ImageNet weights if already in torchvision's cache, else random init.")
@click.option("--image-size", type=click_type(DemoConfig, "image_size"), default=_D["image_size"],
              show_default=True, help="Input size (small, so a 2-core CPU finishes quickly).")
@click.option("--per-class", type=click_type(DemoConfig, "per_class"), default=_D["per_class"],
              help="Use at most this many digits of each class; default: all 1,797 images.")
@click.option("--epochs", type=click_type(DemoConfig, "epochs"),
              default=_D["epochs"], show_default=True,
              help="Epochs of the linear and mlp heads of the sweep.")
@click.option("--tutorial-steps", type=click_type(DemoConfig, "tutorial_steps"),
              default=_D["tutorial_steps"],
              show_default=True, help="Training steps timed the tutorial's way (after a warm-up).")
@click.option("--no-report", "report", is_flag=True, flag_value=False, default=_D["report"],
              help="Skip the figures and report.md.")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines.")
@fail_on_user_error
def demo_command(output: Path, quiet: bool, **options) -> None:
    """Run the whole pipeline on scikit-learn's digits (1,797 real images, no download).

    Writes the digits as an image folder with a held-out test part, extracts both parts, trains
    a sweep of 19 heads (linear, mlp, logreg), exports the best with its backbone, predicts the
    test images with the exported model, and writes a report with figures. Prints what each
    stage did, the leaderboard, the test accuracy, and how long the tutorial's way (every image
    through the frozen network in every epoch of every head) would have taken, extrapolated
    from a few measured steps.
    """
    from pipeline.demo import demo

    t0 = time.perf_counter()
    config = DemoConfig(**options, progress=False if quiet else None)
    with _quiet_stage_logs():
        summary = demo(output, config, echo=click.echo)
    stages = ", ".join(f"{name} {s:.1f} s" for name, s in summary.seconds.items())
    click.echo(f"demo: done in {time.perf_counter() - t0:.0f} s ({stages}); everything is "
               f"under {output}/")


class _DropRandomInit(logging.Filter):
    """The demo says once, plainly, that its backbone is random-init; the stages need not.
    The stages mark those warnings with the record attribute `random_init`."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "random_init", False)


@contextlib.contextmanager
def _quiet_stage_logs():
    """No per-epoch and parity INFO lines (the demo prints its own summary; -v keeps them), and
    no repeated random-init warnings. Put back as they were afterwards."""
    drop = _DropRandomInit()
    filtered = [logging.getLogger(n) for n in ("pipeline.extract", "pipeline.export")]
    quieted = [logging.getLogger(n) for n in ("pipeline.train_head", "pipeline.export")]
    levels = [lg.level for lg in quieted]
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        for lg in quieted:
            lg.setLevel(logging.WARNING)
    for lg in filtered:
        lg.addFilter(drop)
    try:
        yield
    finally:
        for lg, level in zip(quieted, levels):
            lg.setLevel(level)
        for lg in filtered:
            lg.removeFilter(drop)
