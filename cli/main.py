"""`pipeline`: extract features once, train many heads, export one model.

    pipeline extract photos/ -o photos.h5
    pipeline inspect photos.h5

Every command module imports only click and the torch-free configs at the top; the library
stage is imported inside the command's body, so `--help` and usage errors answer at once.
"""
from __future__ import annotations

import logging
import sys

import click

from .demo import demo_command
from .export import export_command, predict_command
from .extract import extract_command, inspect_command
from .report import report_command
from .train_head import train_head_command

COMMANDS = (extract_command, inspect_command, train_head_command, export_command,
            predict_command, report_command, demo_command)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", count=True, help="More log output (-v: each committed batch of extract, each epoch of train-head).")
@click.version_option(package_name="frozen-feature-pipeline")
def main(verbose: int) -> None:
    """Run a frozen backbone once, cache its activations in HDF5, and train many
    replacement heads on the cache cheaply on a CPU."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(levelname)s: %(message)s", stream=sys.stderr)
    for noisy in ("PIL", "h5py", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


for _command in COMMANDS:
    main.add_command(_command)
