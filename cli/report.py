"""`pipeline report`: figures of a head sweep and a report.md that embeds them."""
from __future__ import annotations

from pathlib import Path

import click

from pipeline.config import ReportConfig

from .main_helpers import click_type, defaults, fail_on_user_error, output_folder

_D = defaults(ReportConfig)


@click.command("report")
@click.argument("runs_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("-o", "--output", type=click.Path(file_okay=False), default=None,
              callback=output_folder,
              help="Folder for the PNG figures and report.md; default: RUNS_DIR/report.")
@click.option("--cache", type=click.Path(path_type=Path, dir_okay=False), default=_D["cache"],
              help="The cache holding the validation rows (the --val cache, or the train cache "
                   "of a hash split) if it moved; default: the one the best head's head.json "
                   "names.")
@click.option("--images-root", type=click.Path(path_type=Path, file_okay=False),
              default=_D["images_root"],
              help="Folder the cached image paths are relative to now; default: the cache's "
                   "source root.")
@click.option("--misclassified", type=click_type(ReportConfig, "misclassified"),
              default=_D["misclassified"],
              show_default=True, help="Images in the grid of the most confident mistakes.")
@click.option("--leaderboard-rows", type=click_type(ReportConfig, "leaderboard_rows"),
              default=_D["leaderboard_rows"],
              show_default=True, help="Rows of the leaderboard table in report.md.")
@click.option("--dpi", type=click_type(ReportConfig, "dpi"), default=_D["dpi"], show_default=True,
              help="Resolution of the PNG figures.")
@fail_on_user_error
def report_command(runs_dir: Path, output: Path | None, cache: Path | None,
                   images_root: Path | None, **options) -> None:
    """Draw the sweep recorded in RUNS_DIR (written by `pipeline train-head -o RUNS_DIR`).

    PNG figures: learning curves (train/val loss and accuracy per epoch, best run highlighted),
    validation accuracy against each swept hyper-parameter, the best head's confusion matrix,
    and a grid of the validation images it gets wrong most confidently; report.md embeds them
    beside the leaderboard table.
    """
    from pipeline.report import report

    config = ReportConfig(**options, cache=None if cache is None else str(cache),
                          images_root=None if images_root is None else str(images_root))
    summary = report(runs_dir, output, config)
    for note in summary.notes:
        click.echo(f"note: {note}", err=True)
    for path in summary.figures.values():
        click.echo(f"  {path}")
    click.echo(summary.line())
