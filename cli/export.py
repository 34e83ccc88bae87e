"""`pipeline export` and `pipeline predict`."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import click

from pipeline.config import ExportConfig, PredictConfig

from .main_helpers import click_type, defaults, fail_on_user_error, output_file

_E = defaults(ExportConfig)
_P = defaults(PredictConfig)


@click.command("export")
@click.argument("head", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=str, required=True, callback=output_file("model.pt2"),
              metavar="FILE",
              help="The model file: MODEL.pt2, MODEL.onnx, or MODEL.pth (+ MODEL.json) for "
                   "--format torchvision.")
@click.option("--format", "format", type=click_type(ExportConfig, "format"), default=None,
              show_default=f"from -o's suffix (.pt2, .onnx, .pth), else {_E['format']}",
              help="pt2: torch.export archive (unpickles code when loaded: treat it as code); "
                   "onnx: ONNX with a dynamic batch (needs the onnx extra); torchvision: the "
                   "state_dict of the torchvision model with its last layer replaced by the "
                   "head (any torchvision backbone at the penultimate cut, linear or logreg "
                   "head). A format that contradicts -o's suffix is refused.")
@click.option("--input", "input", type=click_type(ExportConfig, "input"), default=_E["input"],
              show_default=True,
              help="tensor: the model takes (N, 3, S, S) float in [0, 1], preprocessed; image: "
                   "(N, 3, H, W) uint8 decoded RGB pixels of any size, resized, cropped and "
                   "normalised inside the model (pt2, onnx).")
@click.option("--weights", default=_E["weights"],
              help="Backbone weights to rebuild; default: those the cache manifest names (a local "
                   ".pth at the path recorded when the cache was made). Their SHA-256 must equal "
                   "the manifest's.")
@click.option("--cache", type=click.Path(path_type=Path, dir_okay=False), default=_E["cache"],
              help="Cache whose images drive the parity check; default: the head's training cache.")
@click.option("--images-root", type=click.Path(path_type=Path, file_okay=False),
              default=_E["images_root"],
              help="Folder the cached image paths are relative to now; default: the cache's "
                   "source root.")
@click.option("--parity-images", type=click_type(ExportConfig, "parity_images"),
              default=_E["parity_images"], show_default=True,
              help="Cached images run through the exported model.")
@click.option("--no-parity-check", "parity_check", is_flag=True, flag_value=False,
              default=_E["parity_check"],
              help="Export without checking the model against the head on cached images.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@fail_on_user_error
def export_command(head: Path, output: Path, as_json: bool, cache: Path | None,
                   images_root: Path | None, **options) -> None:
    """Stitch a trained head and its frozen backbone into one model file.

    HEAD is a run folder written by `pipeline train-head`, or its head.pt/head.json. The
    backbone that made the head's features is rebuilt, the head attached, and the model
    written to -o.

    The model takes a float RGB batch in [0, 1] at the cache's crop size (any batch size), or
    with --input image decoded uint8 pixels of any size, and returns logits; class names and
    preprocessing travel with it. Before the file is written under its name, the model is run
    on images the cache holds and must reproduce the head's logits on the cached features
    (the largest difference is reported).
    """
    from pipeline.export import export
    from pipeline.models import SUFFIXES

    if options["format"] is None:          # the suffix says it: -o model.onnx is ONNX
        options["format"] = next((f for f, ends in SUFFIXES.items()
                                  if output.suffix.lower() in ends), _E["format"])
    config = ExportConfig(**options, cache=None if cache is None else str(cache),
                          images_root=None if images_root is None else str(images_root))
    summary = export(head, output, config)
    if as_json:
        click.echo(json.dumps({k: v for k, v in vars(summary).items()}, indent=2))
        return
    click.echo(summary.line())
    if summary.format == "pt2":
        click.echo("Note: loading a .pt2 file unpickles code; share and load it like code.")


@click.command("predict")
@click.argument("model", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--top-k", type=click_type(PredictConfig, "top_k"), default=_P["top_k"],
              show_default=True,
              help="Classes reported per image, most probable first.")
@click.option("--format", "out_format", type=click.Choice(["table", "csv", "json"]),
              default="table", show_default=True, help="Output format.")
@click.option("-o", "--output", type=str, default=None, callback=output_file("predictions.csv"),
              metavar="FILE", help="Write the predictions to this file instead of stdout.")
@click.option("--batch-size", type=click_type(PredictConfig, "batch_size"),
              default=_P["batch_size"], show_default=True, help="Images per forward pass.")
@click.option("--workers", type=click_type(PredictConfig, "workers"), default=_P["workers"],
              show_default=True,
              help="Decoding processes; -1: automatic.")
@click.option("--device", default=_P["device"], show_default=True,
              help="auto (CUDA when there is one), cpu, cuda or cuda:N. pt2 and torchvision "
                   "models run there; ONNX models use onnxruntime's CPU provider.")
@click.option("--decode", type=click_type(PredictConfig, "decode"), default=_P["decode"],
              show_default=True,
              help="JPEG decoding: cpu (libjpeg-turbo in the workers), gpu (nvJPEG on the "
                   "device), pil (Pillow); auto: gpu on a GPU, else cpu.")
@click.option("--draft/--no-draft", default=_P["draft"], show_default=True,
              help="Decode JPEGs at least twice the resize target at a reduced DCT scale.")
@click.option("-q", "--quiet", is_flag=True, help="No progress line.")
@fail_on_user_error
def predict_command(model: Path, images: tuple[Path, ...], out_format: str, output: Path | None,
                    quiet: bool, **options) -> None:
    """Top-k classes of images, with a model written by `pipeline export`.

    IMAGES are image files, folders of images, .csv/.tsv lists, or tar shards (a .tar, a
    quoted brace range or glob, read in place); MODEL a .pt2, .onnx or torchvision .pth file. Each image gets its top-k classes with their probabilities.

    Images are decoded and preprocessed as `pipeline extract` did for the model's cache. Bad
    images are reported on stderr and skipped.
    """
    from pipeline.predict import predict

    if output is not None:
        _refuse_input_as_output(output, [model, *images])
        _check_output_folder(output)
    result = predict(model, images, PredictConfig(**options, progress=False if quiet else None))
    if output is not None:
        _refuse_input_as_output(output, [Path(p["path"]) for p in result.predictions]
                                + [Path(p) for p, _ in result.skipped])
    for path, reason in result.skipped:
        click.echo(f"skipped {path}: {reason}", err=True)
    text = {"table": _table, "csv": _csv, "json": _json}[out_format](result)
    if output is None:
        click.echo(text, nl=not text.endswith("\n"))
        click.echo(result.line(), err=True)
        return
    from pipeline._files import write_text

    write_text(output, text, "free some space or choose another -o")
    click.echo(f"{result.line()}; written to {output}")


def _check_output_folder(output: Path) -> None:
    """Refuse, before predicting, an -o whose folder is missing or cannot be written."""
    from pipeline._files import check_output_file

    check_output_file(output)


def _refuse_input_as_output(output: Path, inputs: list[Path]) -> None:
    """-o must not replace the model, an input image or list, or an image inside an input folder."""
    from pipeline.sources import IMAGE_EXTENSIONS

    target = output.resolve()
    for p in inputs:
        p = p.resolve()
        if target == p or (p.is_dir() and p in target.parents and target.exists()
                           and target.suffix.lower() in IMAGE_EXTENSIONS):
            raise click.UsageError(f"-o {output} would overwrite an input ({p}): write the "
                                   "predictions to another file")


def _table(result) -> str:
    rows = [["path"] + [f"top {i + 1}" for i in range(max((len(p["top"]) for p in
                                                          result.predictions), default=0))]]
    for p in result.predictions:
        rows.append([p["path"]] + [f"{t['class']} {t['probability']:.3f}" for t in p["top"]])
    widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _csv(result) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "rank", "class", "index", "probability"])
    for p in result.predictions:
        for rank, t in enumerate(p["top"], 1):
            w.writerow([p["path"], rank, t["class"], t["index"], f"{t['probability']:.6g}"])
    return buf.getvalue()


def _json(result) -> str:
    return json.dumps(result.to_json(), indent=2)
