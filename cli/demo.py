"""`pipeline demo`."""
from __future__ import annotations

from pathlib import Path

import click

from .main_helpers import fail_on_value_error


@click.command("demo")
@click.option("-o", "--output", type=click.Path(path_type=Path, file_okay=False), default="demo-out",
              show_default=True, help="Folder for the images, caches and runs.")
@click.option("--weights", default=None, help="Backbone weights; default: ImageNet weights if "
              "already in torchvision's cache, else random init.")
@click.option("--image-size", type=click.IntRange(min=32), default=32, show_default=True,
              help="Input size (small, so a 2-core CPU finishes quickly).")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines.")
@fail_on_value_error
def demo_command(output: Path, weights: str | None, image_size: int, quiet: bool) -> None:
    """Run the pipeline on scikit-learn's digits (1,797 real images, no download)."""
    from pipeline.demo import demo

    result = demo(output, weights, image_size, progress=False if quiet else None)
    if result["random_weights"]:
        click.echo("Note: no ImageNet weights on this machine, so the backbone is RANDOM-INIT "
                   "(the features are random projections, which still separate digits).")
    for part, summary in result["extract"].items():
        click.echo(f"extract {part}: {summary.line()}")
