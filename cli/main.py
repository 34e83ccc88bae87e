"""`pipeline`: extract features once, train many heads, export one model.

    pipeline extract photos/ -o photos.h5
    pipeline inspect photos.h5
"""
from __future__ import annotations

import logging
import sys

import click


from .main_helpers import defaults, fail_on_value_error  # noqa: F401  (re-exported)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", count=True, help="More log output (-v: each committed batch).")
@click.version_option(package_name="frozen-feature-pipeline")
def main(verbose: int) -> None:
    """Run a frozen VGG backbone once, cache its activations in HDF5, and train many
    replacement heads on the cache cheaply on a CPU."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(levelname)s: %(message)s", stream=sys.stderr)
    for noisy in ("PIL", "h5py", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


from .extract import extract_command, inspect_command  # noqa: E402

main.add_command(extract_command)
main.add_command(inspect_command)
from .demo import demo_command  # noqa: E402

main.add_command(demo_command)
# More commands register here.
from .report import report_command  # noqa: E402
main.add_command(report_command)
from .export import export_command, predict_command  # noqa: E402
for _command in (export_command, predict_command): main.add_command(_command)  # noqa: E701
from .train_head import train_head_command  # noqa: E402
main.add_command(train_head_command)
