"""Scaling out and re-running: `pipeline extract` on 1 rank against 2 torchrun ranks, and what a
re-run costs when nothing (or little) changed.

    .venv/bin/python bench/scale.py [--images 256] [--size 64] [--repeats 3]
                                    [--small-images 20000] [--big-images 200000]
                                    [--huge-images 1000000] [--shards 100]
                                    [--only ranks|rerun|command|huge|shards]

ranks   The same --images JPEGs (256 x 256, VGG16 fc7 at --size px, random-init, batch 32, float16)
        extracted by one process and by `torchrun --standalone --nproc-per-node 2`, one thread
        (OMP_NUM_THREADS=1) and no decoding workers per rank, alternating for --repeats rounds.
        images/s is the job's: images computed / the slowest rank's compute phase (what the
        summary line reports); the launch (imports, process group, model build) is shown apart
        as whole-command seconds. Goal: 2 ranks >= 1.8x one.
rerun   --small-images 8 x 8 PNGs (ResNet18 penultimate at 32 px): the first extraction; a
        no-op re-run (each unchanged image costs a stat); the same with --rehash (every file
        read and hashed); the floor, listing the folder in Python (os.scandir + stat of every
        file); and adding 10 images to the cache, against the first extraction.
command The whole command, Python's start and imports included: `python -m cli extract` finding
        its cache up to date, against a Python process that stat-walks the same folder (the
        floor of a re-run from a script), over simulated folders of --small-images and
        --big-images empty .png files whose cache is written directly with the cache writer
        (the manifest of a real resnet18 layer1 avg-pooled extraction, rows of zeros, each
        file's digest and stat). Also whether the no-op imported torch.
huge    The in-process no-op re-run (`extract()` in this process) over simulated folders of
        --small-images and --huge-images files, against the listing floor in this process.
shards  The same kind of images, --small-images / --shards per tar shard (KEY.png + KEY.cls):
        the first extraction, a no-op re-run (a stat per shard, no member read), and adding
        one shard (its images read and computed, a stat for each of the others).

Every case in a table runs in the same invocation, alternating where repeated; ratios are
medians of per-round ratios.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])   # the repo, not bench/, on the path
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from bench._common import (alternate, bench_parser, machine, median, paired,  # noqa: E402
                           quiet, scratch, spread, table)
from bench.extract import make_images  # noqa: E402
from cache import CacheReader, CacheWriter, partial_path  # noqa: E402
from pipeline import ExtractConfig, extract  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# One rank's run: the summary goes to a JSON file (rank 0's), not through its printed line.
_ENTRY = """
import json, sys
from pipeline import ExtractConfig, extract
out, summary_path, cfg = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
s = extract(cfg.pop("source"), out, ExtractConfig(**cfg))
if s.rank == 0:
    json.dump({"images_per_s": s.images_per_s, "computed": s.computed, "rows": s.rows},
              open(summary_path, "w"))
"""


def run_ranks(ranks: int, src: Path, tmp: Path, size: int) -> dict:
    out, summary = tmp / f"r{ranks}.h5", tmp / f"r{ranks}.json"
    out.unlink(missing_ok=True)
    cfg = dict(source=str(src), weights="none", image_size=size, batch_size=32, workers=0,
               layer="fc7", progress=False)
    entry = tmp / "entry.py"
    entry.write_text(_ENTRY)
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={ranks}"] if ranks > 1 else [sys.executable])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    subprocess.run([*launch, str(entry), str(out), str(summary), json.dumps(cfg)], check=True,
                   env=env, capture_output=True)
    result = json.loads(summary.read_text())
    result["command_s"] = time.perf_counter() - t0
    return result


def ranks_table(args, tmp: Path) -> None:
    src = tmp / "jpegs"
    make_images(src, args.images)
    results: dict[str, list[dict]] = {"1 process": [], "2 ranks": []}

    def case(name: str, ranks: int):
        def fn() -> float:
            r = run_ranks(ranks, src, tmp, args.size)
            results[name].append(r)
            return r["computed"] / r["images_per_s"]          # the job's compute seconds
        return fn
    times = alternate({"1 process": case("1 process", 1), "2 ranks": case("2 ranks", 2)},
                      args.repeats)
    rows = [[name, args.images / median(ts), paired(times, "1 process", name),
             spread([args.images / t for t in ts]),
             median([r["command_s"] for r in results[name]])] for name, ts in times.items()]
    print(f"{args.images} JPEGs 256x256 -> vgg16 fc7 at {args.size}px, batch 32, 1 thread and "
          f"0 workers per rank, {args.repeats} alternated rounds\n")
    print(table(["case", "images/s (job)", "speed-up vs 1 process", "images/s min..max",
                 "whole command s"], rows))


def small_images(root: Path, n: int, start: int = 0) -> None:
    rng = np.random.default_rng(start)
    for i in range(start, start + n):
        folder = root / f"c{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
            folder / f"{i:06d}.png")


def listing_floor(root: Path) -> int:
    """Every file's stat, walking the folder with os.scandir: the least a re-run can do."""
    n, stack = 0, [root]
    while stack:
        with os.scandir(stack.pop()) as it:
            for entry in it:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                else:
                    entry.stat()
                    n += 1
    return n


def rerun_table(args, tmp: Path) -> None:
    src, out = tmp / "small", tmp / "small.h5"
    small_images(src, args.small_images)
    cfg = ExtractConfig(backbone="resnet18", weights="none", image_size=32, batch_size=256,
                        workers=0, progress=False)
    t0 = time.perf_counter()
    first = extract(src, out, cfg)
    first_s = time.perf_counter() - t0
    cases = {"no-op re-run (stat check)": lambda: extract(src, out, cfg),
             "no-op re-run, --rehash": lambda: extract(
                 src, out, ExtractConfig(**{**cfg.__dict__, "rehash": True})),
             "listing floor (scandir + stat)": lambda: listing_floor(src)}
    times = alternate({k: (lambda fn=fn: fn() and None) for k, fn in cases.items()},
                      args.repeats)
    added = 0

    def add_ten() -> float:
        nonlocal added
        small_images(src, 10, start=args.small_images + added)
        added += 10
        t = time.perf_counter()
        s = extract(src, out, cfg)
        assert s.computed == 10, s.line()
        return time.perf_counter() - t
    add = [add_ten() for _ in range(args.repeats)]
    base = "listing floor (scandir + stat)"
    rows = [[name, median(ts), median(ts) / median(times[base]), spread(ts)]
            for name, ts in times.items()]
    rows.append(["add 10 images", median(add), median(add) / median(times[base]), spread(add)])
    rows.append(["first extraction", first_s, first_s / median(times[base]), "-"])
    print(f"\n{args.small_images} PNGs 8x8 -> resnet18 penultimate at 32px "
          f"({first.images_per_s:.0f} images/s computing), {args.repeats} rounds; seconds\n")
    print(table(["case", "seconds", "vs listing floor", "seconds min..max"], rows))
    print(f"\nadding 10 images cost {median(add) / first_s:.3f}x the first extraction")


# A stat-walk of a folder in a fresh Python process: the floor of a re-run launched by a script.
_STAT_WALK = ("from __future__ import annotations\nimport os, sys\n"
              + inspect.getsource(listing_floor) + "print(listing_floor(sys.argv[1]))\n")
# The no-op command in a fresh process, reporting whether it imported torch.
_NO_OP = """
import sys
from cli.main import main
try:
    main(sys.argv[2:], prog_name="pipeline")
except SystemExit as e:
    assert not e.code, e.code
open(sys.argv[1], "w").write(str("torch" in sys.modules))
"""
# The settings of the simulated folders: a 64-d cut keeps a million rows at 128 MiB.
_SIMULATED = dict(backbone="resnet18", weights="none", image_size=32, layer="layer1", pool="avg",
                  batch_size=256, workers=0, progress=False)


def _cli_args(cfg: dict) -> list[str]:
    return ["--backbone", cfg["backbone"], "--weights", cfg["weights"], "--image-size",
            str(cfg["image_size"]), "--layer", cfg.get("layer", "penultimate"), "--pool",
            cfg.get("pool", "flatten"), "--batch-size", str(cfg["batch_size"]), "--workers", "0",
            "-q"]


def simulated_folder(root: Path, out: Path, n: int, tmp: Path) -> None:
    """`n` empty .png files in 10 class folders and their complete cache at `out`, written
    directly: the manifest of a real extraction with `_SIMULATED` settings, rows of zeros, each
    file's digest and stat. A re-run over them finds the cache up to date."""
    probe_src, probe_out = tmp / "probe", tmp / "probe.h5"
    small_images(probe_src, 10)
    extract(probe_src, probe_out, ExtractConfig(**_SIMULATED))
    with CacheReader(probe_out) as r:
        manifest = {**r.file_manifest, "source_root": str(root)}
    dim = manifest["feature_dim"]
    empty = hashlib.sha256(b"").hexdigest()
    writer = CacheWriter.create(partial_path(out), manifest)
    # Image order: sorted paths, so class by class (the numbers are zero-padded).
    images = [(f"c{c}/{i:07d}.png", c) for c in range(10) for i in range(c, n, 10)]
    step = 50_000
    for start in range(0, n, step):
        rows = images[start:start + step]
        stats = []
        for path, _ in rows:
            file = root / path
            file.parent.mkdir(parents=True, exist_ok=True)
            file.touch()
            st = file.stat()
            stats.append((st.st_size, st.st_mtime_ns))
        writer.commit(np.zeros((len(rows), dim), manifest["dtype"]), [y for _, y in rows],
                      [p for p, _ in rows], [empty] * len(rows), stats=stats)
    writer.finish(out, {"rows": n, "errors": 0})


def command_table(args, tmp: Path) -> None:
    """Whole no-op commands against a stat-walk process, over simulated folders of
    --small-images and --big-images files."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    rows = []
    for n in (args.small_images, args.big_images):
        src, out, flag = tmp / f"sim{n}", tmp / f"sim{n}.h5", tmp / "torch-imported"
        simulated_folder(src, out, n, tmp)

        def no_op():
            subprocess.run([sys.executable, "-c", _NO_OP, str(flag), "extract", str(src), "-o",
                            str(out), *_cli_args(_SIMULATED)], check=True, env=env, cwd=REPO,
                           capture_output=True)

        def walk():
            subprocess.run([sys.executable, "-c", _STAT_WALK, str(src)], check=True, env=env,
                           capture_output=True)
        times = alternate({"no-op command": no_op, "stat-walk process": walk}, args.repeats)
        rows.append([f"{n:,} files", median(times["no-op command"]),
                     median(times["stat-walk process"]),
                     paired(times, "no-op command", "stat-walk process"),
                     flag.read_text() == "True"])
        shutil.rmtree(src, ignore_errors=True)
        out.unlink()
    print(f"\nwhole commands (Python start included), simulated folders, {args.repeats} "
          "alternated rounds; seconds\n")
    print(table(["folder", "no-op extract", "stat-walk process", "ratio", "imported torch"],
                rows))


def huge_table(args, tmp: Path) -> None:
    """The in-process no-op over simulated folders of --small-images and --huge-images files,
    against the listing floor."""
    rows = []
    cfg = ExtractConfig(**_SIMULATED)
    base = "listing floor (scandir + stat)"
    for n in (args.small_images, args.huge_images):
        src, out = tmp / f"sim{n}", tmp / f"sim{n}.h5"
        t0 = time.perf_counter()
        simulated_folder(src, out, n, tmp)
        made = time.perf_counter() - t0
        assert extract(src, out, cfg).up_to_date
        times = alternate({"no-op re-run": lambda: extract(src, out, cfg) and None,
                           base: lambda: listing_floor(src) and None}, args.repeats)
        rows.append([f"{n:,} files (made in {made:.0f} s)", median(times["no-op re-run"]),
                     median(times[base]), paired(times, "no-op re-run", base),
                     spread(times["no-op re-run"])])
        shutil.rmtree(src, ignore_errors=True)
        out.unlink()
    print(f"\nin-process no-op re-run, simulated folders, {args.repeats} alternated rounds; "
          "seconds\n")
    print(table(["folder", "no-op re-run", "listing floor", "ratio", "no-op min..max"], rows))


def write_shards(root: Path, count: int, per_shard: int, start: int = 0) -> None:
    import io
    import tarfile
    rng = np.random.default_rng(start)
    root.mkdir(parents=True, exist_ok=True)
    for k in range(start, start + count):
        with tarfile.open(root / f"part-{k:06d}.tar", "w") as tar:
            for i in range(per_shard):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, "PNG")
                for name, data in ((f"{i:06d}.png", buf.getvalue()),
                                   (f"{i:06d}.cls", str(i % 10).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def shards_table(args, tmp: Path) -> None:
    per = args.small_images // args.shards
    root, out = tmp / "shards", tmp / "shards.h5"
    write_shards(root, args.shards, per)
    source = f"{root}/part-*.tar"
    cfg = ExtractConfig(backbone="resnet18", weights="none", image_size=32, batch_size=256,
                        workers=0, progress=False)

    def timed(fn):
        t = time.perf_counter()
        s = fn()
        return time.perf_counter() - t, s
    first_s, first = timed(lambda: extract(source, out, cfg))
    noop = [timed(lambda: extract(source, out, cfg)) for _ in range(args.repeats)]
    added = []
    for r in range(args.repeats):
        write_shards(root, 1, per, start=args.shards + r)
        added.append(timed(lambda: extract(source, out, cfg)))
    rows = [["first extraction", first_s, first.hashed, first.computed, "-"],
            ["no-op re-run", median([t for t, _ in noop]), noop[-1][1].hashed,
             noop[-1][1].computed, spread([t for t, _ in noop])],
            ["add one shard", median([t for t, _ in added]), added[-1][1].hashed,
             added[-1][1].computed, spread([t for t, _ in added])]]
    print(f"\n{args.shards} tar shards x {per} PNGs 8x8 -> resnet18 penultimate at 32px, "
          f"{args.repeats} rounds; seconds, members read to hash them, rows computed\n")
    print(table(["case", "seconds", "members read", "computed", "seconds min..max"], rows))
    print(f"\nadding one shard cost {median([t for t, _ in added]) / first_s:.3f}x the first "
          "extraction")


def main() -> None:
    ap = bench_parser(__doc__, repeats=3, threads=None)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--small-images", type=int, default=20000)
    ap.add_argument("--big-images", type=int, default=200_000)
    ap.add_argument("--huge-images", type=int, default=1_000_000)
    ap.add_argument("--only", choices=("ranks", "rerun", "command", "huge", "shards"))
    ap.add_argument("--shards", type=int, default=100)
    args = ap.parse_args()
    quiet()
    import torch
    torch.set_num_threads(1)                   # the re-run cases, in this process
    tmp = scratch("bench-scale-")
    print(f"machine: {machine()}")
    if args.only in (None, "ranks"):
        ranks_table(args, tmp)
    if args.only in (None, "rerun"):
        rerun_table(args, tmp)
    if args.only in (None, "command"):
        command_table(args, tmp)
    if args.only in (None, "huge"):
        huge_table(args, tmp)
    if args.only in (None, "shards"):
        shards_table(args, tmp)


if __name__ == "__main__":
    main()
