"""`pipeline extract` and `pipeline inspect`."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from pipeline.config import ExtractConfig

from .main_helpers import click_type, defaults, fail_on_user_error, file_name

_D = defaults(ExtractConfig)


@click.command("extract")
@click.argument("source", type=click.Path(path_type=Path), required=False)
@click.option("-o", "--output", type=str, callback=file_name,
              help="The HDF5 cache to write (CACHE.h5; CACHE.h5.partial while unfinished).")
@click.option("--backbone", default=_D["backbone"], show_default=True,
              help="Frozen network: any torchvision classification model (vgg16, resnet50, "
                   "convnext_tiny, efficientnet_b0, vit_b_16, ...) or timm:NAME (the timm extra).")
@click.option("--weights", default=_D["weights"], show_default=True,
              help="Weights name (DEFAULT, or torchvision's IMAGENET1K_V1, IMAGENET1K_V2, ...), a "
                   "local .pth state_dict, or 'none' for random init.")
@click.option("--layer", default=_D["layer"], show_default=True,
              help="Cut: penultimate (the input of the final classification layer; VGG: fc7 "
                   "after its ReLU, the tutorial's), a node name from --list-layers, or VGG's "
                   "fc7, fc6, pool5.")
@click.option("--pool", type=click_type(ExtractConfig, "pool"),
              default=_D["pool"], show_default=True,
              help="Spatial outputs: flatten every value, or avg (mean over positions/tokens "
                   "to one value per channel).")
@click.option("--views", type=click_type(ExtractConfig, "views"),
              default=_D["views"], show_default=True,
              help="Views cached per image: view 0 is the plain preprocessing, views 1..K-1 "
                   "are augmented by --augment (K x the storage; train-head draws one per epoch).")
@click.option("--augment", default=_D["augment"], metavar="SPEC",
              help="torchvision transforms.v2 transforms of the augmented views, e.g. "
                   "\"RandomResizedCrop(scale=(0.5,1)),RandomHorizontalFlip(),ColorJitter(0.2,0.2)\"; "
                   "default: RandomResizedCrop(),RandomHorizontalFlip().")
@click.option("--augment-seed", type=int, default=_D["augment_seed"], show_default=True,
              help="Seeds every view, with the image's content digest and the view number.")
@click.option("--list-layers", is_flag=True,
              help="Print the cut names of --backbone (named cuts, then every graph node) and exit.")
@click.option("--image-size", type=click_type(ExtractConfig, "image_size"),
              default=_D["image_size"],
              help="Input crop size; default: the weights' own (224).")
@click.option("--batch-size", type=click_type(ExtractConfig, "batch_size"),
              default=_D["batch_size"],
              help="Images per forward pass and per committed batch; default: 32 on a CPU, "
                   "256 on a GPU.")
@click.option("--workers", type=click_type(ExtractConfig, "workers"),
              default=_D["workers"], show_default=True,
              help="Decoding processes; -1: automatic.")
@click.option("--device", default=_D["device"], show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--decode", type=click_type(ExtractConfig, "decode"), default=_D["decode"],
              show_default=True,
              help="JPEG decoding: cpu (libjpeg-turbo to tensors in the workers), gpu (nvJPEG "
                   "on the device), pil (Pillow, as caches made before this option); auto: the "
                   "existing cache's decoder where it runs here, else gpu on a GPU, cpu elsewhere. "
                   "Other formats and odd JPEGs always go through Pillow.")
@click.option("--draft/--no-draft", default=_D["draft"], show_default=True,
              help="Decode JPEGs at least twice the resize target at a reduced DCT scale "
                   "(faster on large photos; slightly different features).")
@click.option("--mix-decoders", is_flag=True,
              help="Add rows decoded otherwise than the cache's existing rows (e.g. on a laptop "
                   "after a GPU run); the manifest lists every decoder.")
@click.option("--dtype", type=click_type(ExtractConfig, "dtype"), default=_D["dtype"],
              show_default=True, help="Storage dtype of the features.")
@click.option("--precision", type=click_type(ExtractConfig, "precision"),
              default=_D["precision"], show_default=True,
              help="Forward-pass precision (autocast); auto: float16 on a GPU (a batch with a "
                   "non-finite output is redone in float32), float32 on a CPU.")
@click.option("--overwrite", is_flag=True, help="Start again if the existing cache was made "
              "with other settings (it replaces a feature cache, never any other file).")
@click.option("--rehash", is_flag=True,
              help="Hash every image again; by default an image whose size and modification "
                   "time are unchanged keeps its recorded digest (a stat, not a read).")
@click.option("--dist-timeout", type=click_type(ExtractConfig, "dist_timeout"),
              default=_D["dist_timeout"],
              show_default=True,
              help="Under torchrun: seconds a rank waits for the others at a meeting point "
                   "before failing with the ranks that did not come.")
@click.option("--strict", is_flag=True, help="Exit non-zero if any image had to be skipped.")
@click.option("--label-key", default=_D["label_key"], show_default=True, metavar="cls|json:FIELD",
              help="Tar shards: take a sample's label from its KEY.cls member (an integer), or "
                   "from FIELD of its KEY.json member.")
@click.option("-q", "--quiet", is_flag=True, help="No progress line.")
@fail_on_user_error
def extract_command(source: Path | None, output: Path | None, quiet: bool, list_layers: bool,
                    **options) -> None:
    """Run the frozen backbone over the images in SOURCE and cache the activations in -o.

    \b
    On several processes, GPUs or machines, launch it with torchrun (same cache):
      torchrun --nproc-per-node 8 --no-python pipeline extract SOURCE -o CACHE.h5

    SOURCE is a folder of class sub-folders (ImageFolder layout), a folder of unlabeled
    images, a .csv/.tsv list of path[,label], or webdataset-style tar shards: a .tar, a
    brace range 'shards/part-{000..099}.tar' or a glob 'shards/*.tar' (quoted), read in
    place. Re-running the same command resumes an
    interrupted run, or updates the cache for added, changed and removed images.
    """
    if list_layers:
        from pipeline.backbone import list_layers as names

        nodes = names(options["backbone"], options["image_size"])
        click.echo("\n".join(nodes))
        # Module names work too (each means its last node): every dotted prefix of a node.
        modules = dict.fromkeys(".".join(n.split(".")[:i]) for n in nodes
                                for i in range(1, n.count(".") + 1))
        modules = [m for m in modules if m not in nodes]
        if modules:
            click.echo(f"module names (each means its last node): {', '.join(modules)}")
        return
    if source is None or output is None:
        raise click.UsageError("give SOURCE and -o CACHE.h5 (or --list-layers)")
    from pipeline.extract import extract

    config = ExtractConfig(**options, progress=False if quiet else None)
    try:
        summary = extract(source, output, config)
    except KeyboardInterrupt as e:
        # Ctrl-C is no failure: what was committed is kept, so one line and the shell's
        # exit status for SIGINT (128 + 2), not a traceback.
        held = getattr(e, "committed", None)
        rows = f"{held} rows committed" if held is not None else "committed rows kept"
        click.echo(f"Interrupted: {rows}; re-run the same command to resume", err=True)
        sys.exit(130)
    if summary.rank != 0:      # under torchrun, rank 0 speaks for the job
        return
    for path, reason in summary.bad[:20]:
        click.echo(f"skipped {path}: {reason}", err=True)
    if len(summary.bad) > 20:
        click.echo(f"... and {len(summary.bad) - 20} more skipped (see `pipeline inspect`)", err=True)
    click.echo(summary.line())


@click.command("inspect")
@click.argument("cache", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@fail_on_user_error
def inspect_command(cache: Path, as_json: bool) -> None:
    """Show a cache's manifest, rows per class, skipped images, and whether it is complete."""
    from cache.inspect import describe

    info = describe(cache)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    m = info["manifest"]
    click.echo(f"{cache}: {'complete' if info['complete'] else 'INCOMPLETE'}, {info['rows']} rows "
               f"x {info['feature_dim']} {info['dtype']}, {info['size_bytes'] / 2**20:.1f} MiB")
    cuts = ", ".join(f"{c['name']}" + (f" ({c['layer']})" if c["layer"] != c["name"] else "")
                     + (f" {c['pool']}-pooled" if c["pool"] else "") + f" {c['feature_dim']}-d"
                     for c in info["cuts"])
    click.echo(f"  backbone {m['backbone']}  weights {m['weights']} "
               f"(sha256 {m['weights_sha256'][:12]})  layer {cuts}")
    pre = m["preprocessing"]
    click.echo(f"  preprocessing: resize {pre['resize_size']}, crop {pre['crop_size']}, "
               f"{pre['interpolation']}, mean {pre['mean']}, std {pre['std']}")
    click.echo(f"  precision {m['precision']}  source {m.get('source_root')} ({m.get('source_kind')})")
    click.echo("  decoded by " + ", ".join(info["decoders"]))
    if info["views"] > 1:
        v = m["views"]
        click.echo(f"  {info['views']} views of each image: the plain one and {info['views'] - 1} "
                   f"of {v['spec']} (augment seed {v['seed']})")
    for name, count in info["class_counts"].items():
        click.echo(f"  {count:8d}  {name}")
    if info["unlabeled"]:
        click.echo(f"  {info['unlabeled']:8d}  (unlabeled)")
    click.echo(f"  {len(info['errors'])} skipped images")
    for e in info["errors"][:20]:
        click.echo(f"    {e['path']}: {e['reason']}")
