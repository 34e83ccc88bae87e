"""Extraction efficiency: `pipeline extract` from image files against the bare forward pass.

    .venv/bin/python bench/extract.py [--images 256] [--size 64] [--repeats 3] [--threads 1]
                                      [--backbone resnet50] [--layer penultimate]
                                      [--cuts fc6,fc7,pool5]

Same batch size, cut and input size for every case; alternated, medians of --repeats rounds
(ratios: medians of per-round ratios):

  bare forward           the backbone forward over uint8 batches already in memory (no decoding,
                         no writing): the limit extraction can reach
  extract float16        extract() from JPEG files to an HDF5 cache: decoding in DataLoader
                         workers (the default: half the cores), writing in a thread
  extract float32        the same, float32 storage
  extract float16, 0 workers   decoding in the main process, between forward passes
  extract float16 from shards  the same JPEGs as 4 webdataset tar shards (KEY.jpg + KEY.cls),
                               members read in place by the same workers

With --cuts, it compares instead: one extraction storing every cut of the list in one pass,
the list's cuts extracted one by one, and one extraction of the first cut alone (the goal: all
cuts within 10 % of one cut).

Extract rates are over the compute phase (decode + forward + write), as extract() reports them;
model building and file hashing happen once per run and are shown separately. To attribute the
gap: decode only (read_image + the weights' preprocessing, one process) and write only
(CacheWriter.commit of the same rows) rates, measured once each.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])   # the repo, not bench/, on the path
import io  # noqa: E402
import tarfile  # noqa: E402

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageFilter  # noqa: E402

from bench._common import (alternate, bench_parser, apply_threads, machine,  # noqa: E402
                           median, paired, quiet, scratch, spread, table)
from cache import CacheWriter, partial_path  # noqa: E402
from pipeline import ExtractConfig, extract  # noqa: E402
from pipeline._loading import default_workers  # noqa: E402
from pipeline.backbone import build_backbone  # noqa: E402
from pipeline.preprocessing import Preprocessing, to_float_batch  # noqa: E402
from pipeline.images import read_image  # noqa: E402


def make_images(root: Path, n: int) -> None:
    """n photo-sized (256x256) JPEGs of smooth noise: decoding costs what real photos cost."""
    rng = np.random.default_rng(0)
    for i in range(n):
        (root / f"c{i % 4}").mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8))
        img.filter(ImageFilter.GaussianBlur(3)).save(root / f"c{i % 4}" / f"{i:05d}.jpg", quality=90)


def make_shards(src: Path, root: Path, count: int) -> str:
    """The JPEGs under `src` as `count` webdataset tar shards (KEY.jpg, KEY.cls) in `root`;
    returns the brace range naming them."""
    paths = sorted(src.rglob("*.jpg"), key=lambda p: p.name)
    root.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        with tarfile.open(root / f"part-{k:03d}.tar", "w") as tar:
            for p in paths[k::count]:
                tar.add(p, arcname=p.name)
                cls = tarfile.TarInfo(p.stem + ".cls")
                label = p.parent.name[1:].encode()
                cls.size = len(label)
                tar.addfile(cls, io.BytesIO(label))
    return f"{root}/part-{{000..{count - 1:03d}}}.tar"


def main() -> None:
    ap = bench_parser(__doc__, repeats=3)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--backbone", default="vgg16")
    ap.add_argument("--layer", default="penultimate")
    ap.add_argument("--cuts", default=None, help="compare one pass over these cuts (fc6,fc7,pool5) "
                                                 "against them one by one")
    args = ap.parse_args()
    apply_threads(args)
    quiet()
    tmp = scratch("bench-extract-")
    src = tmp / "images"
    make_images(src, args.images)
    if args.cuts:
        return _cuts(args, src, tmp)
    cfg = dict(backbone=args.backbone, weights="none", image_size=args.size,
               batch_size=args.batch_size, layer=args.layer, overwrite=True, progress=False)
    model, info = build_backbone(args.backbone, "none", args.layer, args.size)
    pre = Preprocessing.from_dict(info["preprocessing"])
    paths = sorted(src.rglob("*.jpg"))
    tensors = torch.stack([pre(Image.open(p).convert("RGB")) for p in paths])   # (N, 3, S, S) uint8

    def bare() -> None:
        with torch.inference_mode():
            for k in range(0, len(tensors), args.batch_size):
                model(to_float_batch(tensors[k:k + args.batch_size]))

    stats: dict[str, dict] = {}

    def run_extract(name: str, dtype: str, workers: int = -1, source=src):
        def case() -> float:
            out = tmp / f"{name.replace(' ', '_')}.h5"
            out.unlink(missing_ok=True)   # extract everything each time
            s = extract(source, out, ExtractConfig(**cfg, dtype=dtype, workers=workers))
            with h5py.File(out, "r") as h5:
                storage = h5["features"].id.get_storage_size()
            st = stats.setdefault(name, {"whole": []})
            st.update(file=out.stat().st_size, features=storage)
            st["whole"].append(s.seconds)
            return len(paths) / s.images_per_s   # compute phase: decode + forward + write
        return case

    workers = default_workers(-1, cuda=False)
    cases = {"bare forward": bare,
             f"extract float16 ({workers} workers)": run_extract("float16", "float16"),
             f"extract float32 ({workers} workers)": run_extract("float32", "float32"),
             "extract float16 (0 workers)": run_extract("float16 inline", "float16", 0),
             f"extract float16 from 4 shards ({workers} workers)": run_extract(
                 "float16 shards", "float16", source=make_shards(src, tmp / "shards", 4))}
    times = alternate(cases, args.repeats)
    decode_s, write_s = _decode_only(paths, pre), _write_only(tmp, info, len(paths))

    base = median(times["bare forward"])
    rows = []
    for (name, ts), key in zip(times.items(), (None, "float16", "float32", "float16 inline",
                                               "float16 shards")):
        t = median(ts)
        st = stats.get(key)
        rows.append([name, len(paths) / t, paired(times, "bare forward", name),
                     spread([len(paths) / v for v in ts]),
                     f"{st['features'] / len(paths) / 1024:.1f}" if st else "-",
                     f"{st['file'] / 2**20:.2f}" if st else "-",
                     f"{len(paths) / median(st['whole']):.1f}" if st else "-"])
    rows.append(["decode only (1 process)", len(paths) / decode_s, base / decode_s, "-", "-", "-", "-"])
    rows.append(["write only (float16 commits)", len(paths) / write_s, base / write_s, "-", "-",
                 "-", "-"])
    print(f"machine: {machine()}")
    print(f"{len(paths)} JPEGs 256x256 -> {args.backbone} {args.layer} at {args.size}px, batch "
          f"{args.batch_size}, random-init weights; {args.repeats} alternated rounds: images/s "
          "from median times, 'vs bare forward' the median of per-round ratios\n")
    print(table(["case", "images/s", "vs bare forward", "images/s min..max", "KiB / row stored",
                 "file MiB", "whole-run images/s"], rows))
    f16, f32 = stats["float16"], stats["float32"]
    files, sharded = (f"extract float16 ({workers} workers)",
                      f"extract float16 from 4 shards ({workers} workers)")
    print(f"\nthroughput from shards: {paired(times, files, sharded):.3f}x that from files "
          "(median of per-round time ratios; the goal is >= 1)")
    print(f"\nfloat16 storage: {f32['features'] / f16['features']:.2f}x smaller features than "
          f"float32 (files are whole 1 MiB chunks, so small caches round up); whole-run images/s "
          "include building the model and hashing the files, once per run")


def _cuts(args, src: Path, tmp: Path) -> None:
    """One pass storing every cut against the cuts one by one and the first cut alone."""
    cuts = [c.strip() for c in args.cuts.split(",")]
    cfg = dict(backbone=args.backbone, weights="none", image_size=args.size,
               batch_size=args.batch_size, overwrite=True, progress=False)

    def run(layers: list[str]):
        def case() -> float:
            total = 0.0
            for layer in layers:
                out = tmp / f"{layer.replace(',', '+')}.h5"
                out.unlink(missing_ok=True)
                s = extract(src, out, ExtractConfig(**cfg, layer=layer))
                total += args.images / s.images_per_s          # compute phase, as extract reports
            return total
        return case

    one_pass = f"{len(cuts)} cuts in one pass"
    cases = {one_pass: run([",".join(cuts)]), f"{len(cuts)} single-cut extractions": run(cuts),
             f"{cuts[0]} alone": run(cuts[:1])}
    times = alternate(cases, args.repeats)
    rows = [[name, args.images / median(ts), paired(times, name, f"{cuts[0]} alone"),
             spread([args.images / v for v in ts])] for name, ts in times.items()]
    print(f"machine: {machine()}")
    print(f"{args.images} JPEGs 256x256 -> {args.backbone} at {args.size}px, batch "
          f"{args.batch_size}, random-init weights; {args.repeats} alternated rounds; time "
          f"relative to extracting {cuts[0]} alone (median of per-round ratios)\n")
    print(table(["case", "images/s", f"time vs {cuts[0]} alone", "images/s min..max"], rows))


def _decode_only(paths: list[Path], pre: Preprocessing) -> float:
    """Seconds to read, decode and preprocess every image in this process (extract's per-image
    work in its workers)."""
    t0 = time.perf_counter()
    for p in paths:
        pre(read_image(p)[0])
    return time.perf_counter() - t0


def _write_only(tmp: Path, info: dict, n: int) -> float:
    """Seconds to commit n float16 rows in batches of 32 (data, flush, marker, flush)."""
    manifest = {**info, "dtype": "float16", "precision": "float32", "class_names": ["a"]}
    dim = info["feature_dim"]
    rows = np.random.default_rng(0).random((n, dim), dtype=np.float32).astype(np.float16)
    t0 = time.perf_counter()
    with CacheWriter.create(partial_path(tmp / "write.h5"), manifest) as w:
        for k in range(0, n, 32):
            part = rows[k:k + 32]
            w.commit(part, [0] * len(part), [f"{k + i}.jpg" for i in range(len(part))],
                     ["0" * 64] * len(part))
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
