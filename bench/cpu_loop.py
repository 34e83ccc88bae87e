"""`pipeline extract` on the CPU against the plain loop that people write by hand: whole commands,
a cheap model, a few thousand photo-sized JPEGs. The goal: extract takes at most 0.7x the time
of the plain loop.

    OMP_NUM_THREADS=1 .venv/bin/python bench/cpu_loop.py [--images 1000] [--workers 2] [--repeats 3]

Cases, each a whole subprocess (interpreter start, imports, model build included), alternated
round by round:

  extract --decode auto   `python -m cli extract SRC -o OUT --backbone mobilenet_v3_small
                          --weights none --workers W -q`, a fresh OUT each round (auto is cpu
                          here: libjpeg-turbo to a tensor, uint8 tensor resize)
  extract --decode pil    the same with Pillow decode + the weights' transforms
  plain loop              `python -c SCRIPT`: torchvision get_model("mobilenet_v3_small") random
                          init, eval, inference_mode; a Dataset doing PIL.Image.open(p).convert("RGB")
                          + MobileNet_V3_Small_Weights.DEFAULT.transforms(); DataLoader(batch_size=32,
                          num_workers=W); each batch's output appended to a list (no file written)

Images: 500x375 JPEGs (q90) cut from scikit-learn's sample photos (china.jpg, flower.jpg) at
random places, scales and flips, so every file differs, in ImageFolder layout (2 classes),
written once to a scratch folder. Torch threads: the subprocesses inherit OMP_NUM_THREADS.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])   # the repo, not bench/, on the path
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from sklearn.datasets import load_sample_images  # noqa: E402

from bench._common import (alternate, bench_parser, machine, median, paired,  # noqa: E402
                           scratch, spread, table)

REPO = Path(__file__).resolve().parents[1]
GOAL = 0.7

PLAIN_LOOP = """
import sys
from pathlib import Path

import torch
from PIL import Image
from torchvision.models import MobileNet_V3_Small_Weights, get_model

src, workers = Path(sys.argv[1]), int(sys.argv[2])
paths = sorted(src.rglob("*.jpg"))
transform = MobileNet_V3_Small_Weights.DEFAULT.transforms()


class Files(torch.utils.data.Dataset):
    def __len__(self):
        return len(paths)

    def __getitem__(self, i):
        return transform(Image.open(paths[i]).convert("RGB"))


model = get_model("mobilenet_v3_small").eval()
features = []
with torch.inference_mode():
    for x in torch.utils.data.DataLoader(Files(), batch_size=32, num_workers=workers):
        features.append(model(x))
assert sum(len(f) for f in features) == len(paths)
"""


def make_photos(root: Path, n: int, size: tuple[int, int] = (500, 375), seed: int = 0) -> None:
    """n JPEGs (q90) of `size`, random crops / flips / rescales of the sample photos, in
    root/<class>/ with class = the sample photo they come from."""
    rng = np.random.default_rng(seed)
    samples = [Image.fromarray(a) for a in load_sample_images().images]   # china, flower
    names = ["china", "flower"]
    for name in names:
        (root / name).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        k = i % len(samples)
        img = samples[k]
        scale = rng.uniform(0.5, 1.0)
        w, h = int(img.width * scale), int(img.height * scale)
        x, y = rng.integers(0, img.width - w + 1), rng.integers(0, img.height - h + 1)
        out = img.crop((x, y, x + w, y + h))
        if rng.random() < 0.5:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        out.resize(size, Image.BICUBIC).save(root / names[k] / f"{i:05d}.jpg", quality=90)


def run(cmd: list[str]) -> float:
    """Seconds of one whole subprocess; its output shown only if it fails."""
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=os.environ.copy())
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout}{done.stderr}")
    return seconds


def main() -> None:
    ap = bench_parser(__doc__, repeats=3, threads=None)
    ap.add_argument("--images", type=int, default=1000, help="500x375 JPEGs")
    ap.add_argument("--workers", type=int, default=2,
                    help="decoding processes of every case (extract --workers, DataLoader num_workers)")
    args = ap.parse_args()
    print(machine() + f"; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    tmp = scratch("bench-cpu-loop-")
    src = tmp / "images"
    t0 = time.perf_counter()
    make_photos(src, args.images)
    print(f"{args.images} JPEGs 500x375 q90 written in {time.perf_counter() - t0:.1f} s; "
          f"mobilenet_v3_small random init, {args.workers} workers, median of {args.repeats} "
          "alternated rounds")

    rounds = iter(range(10 ** 9))

    def extract(decode: str | None):
        def case() -> float:
            out = tmp / f"out-{next(rounds)}.h5"     # a fresh cache every round
            cmd = [sys.executable, "-m", "cli", "extract", str(src), "-o", str(out),
                   "--backbone", "mobilenet_v3_small", "--weights", "none",
                   "--workers", str(args.workers), "-q"]
            seconds = run(cmd + (["--decode", decode] if decode else []))
            out.unlink()
            return seconds
        return case

    cases = {"extract --decode auto (cpu)": extract(None),
             "extract --decode pil": extract("pil"),
             "plain loop (PIL + transforms() + DataLoader)":
                 lambda: run([sys.executable, "-c", PLAIN_LOOP, str(src), str(args.workers)])}
    times = alternate(cases, args.repeats)
    base = "plain loop (PIL + transforms() + DataLoader)"
    rows = [[name, median(t), spread(t), args.images / median(t), paired(times, name, base)]
            for name, t in times.items()]
    print(table(["case (whole command)", "s", "spread s", "images/s", "/ plain loop"], rows))
    ratio = paired(times, "extract --decode auto (cpu)", base)
    print(f"extract / plain loop: {ratio:.2f} (goal <= {GOAL}: {'met' if ratio <= GOAL else 'not met'})")


if __name__ == "__main__":
    main()
