"""The tutorial's training loop against the cache: same data, same head init, same batch order.

    .venv/bin/python bench/vs_tutorial.py [--images 500] [--size 32] [--epochs 4] [--threads 1]

Data: the first --images of scikit-learn's digits (real 8x8 images, no download) written as PNG
folders, every 5th image of each digit held out for validation; VGG16 at --size px, the fc7 cut.

  A  the tutorial's way (seed/freeze-layers-tutorial.txt): build VGG16, `requires_grad = False`
     on every parameter, a new last layer (classifier.6), an optimizer over the parameters that
     still require grad, and every step pushes its batch through the whole frozen network;
     validation through the whole network after every epoch. The network is in eval() (Dropout
     off), as extraction runs it, so both ways compute the same function.
  B  the cache: `extract` train and validation once (float32 storage, so the features are the
     tutorial's to float rounding), then `train_head` on the cache: 1 head, and a 32-head sweep
     (4 learning rates x 8 seeds) in one pass.

Both use --optimizer (AdamW, weight decay 0, by default: on random-init features the tutorial's
plain SGD hardly moves the head; `--optimizer sgd --lr 1e-3 --momentum 0` is the tutorial's own
setting, meant for ImageNet weights), batch --batch-size, the head init of `HeadStack` for seed 0, and
the batch order of `train_head` (one torch.randperm per epoch from a generator seeded with
data_seed 0; the tutorial gets it from SubsetRandomSampler). Their validation accuracies must
agree (asserted: at most one validation image apart, for float rounding).

A round runs one tutorial experiment and the whole cache path, alternating; medians of --repeats
rounds. The 32-experiment tutorial sweep is 32 x the measured time of one experiment
(extrapolated: every experiment of a sweep costs the same); the cached sweep is measured.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])   # the repo, not bench/, on the path
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402
from PIL import Image  # noqa: E402
from torch import nn, optim  # noqa: E402
from torch.utils.data import DataLoader, SubsetRandomSampler  # noqa: E402
from torchvision.transforms import functional as TF  # noqa: E402

from bench._common import (alternate, bench_parser, apply_threads, machine,  # noqa: E402
                           median, quiet, scratch, spread, table)
from cache import CacheReader  # noqa: E402
from pipeline import ExtractConfig, extract  # noqa: E402
from pipeline.backbone import load_weights  # noqa: E402
from pipeline.preprocessing import default_preprocessing  # noqa: E402
from pipeline.config import TrainConfig  # noqa: E402
from pipeline.head_file import load_head  # noqa: E402
from pipeline.heads import HeadStack  # noqa: E402
from pipeline.train_head import train_head  # noqa: E402

SWEEP_LR_FACTORS = (1.0, 3.0, 0.3, 0.1)   # x --lr; times 8 seeds = the 32-experiment sweep
SWEEP_SEEDS = tuple(range(8))


def write_digits(root: Path, n: int) -> tuple[Path, Path]:
    """The first n digits as PNGs: root/train/<digit>/<i>.png, every 5th of each digit in
    root/val/ (stratified)."""
    from sklearn.datasets import load_digits

    digits, seen = load_digits(), [0] * 10
    for i, (image, target) in enumerate(zip(digits.images[:n], digits.target[:n])):
        seen[target] += 1
        path = root / ("val" if seen[target] % 5 == 1 else "train") / str(target) / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(image * 255 / 16).astype(np.uint8), mode="L").save(path)
    return root / "train", root / "val"


class Tutorial:
    """Experiment A: the tutorial's loop, with the data, init and batch order of B."""

    def __init__(self, train_dir: Path, val_dir: Path, args):
        self.args = args
        pre = default_preprocessing("vgg16", args.size)   # the weights' transforms at --size

        def transform(img):   # PIL -> resize, crop -> [0, 1] -> normalised (3, S, S)
            return TF.normalize(pre(img).to(torch.float32).div(255), pre.mean, pre.std)

        self.train = torchvision.datasets.ImageFolder(train_dir, transform=transform)
        self.val = torchvision.datasets.ImageFolder(val_dir, transform=transform)

    def run(self, lr: float, seed: int) -> dict:
        """One experiment from scratch: seconds, validation accuracy per epoch, the head."""
        a, t0 = self.args, time.perf_counter()
        state, _ = load_weights("vgg16", a.weights)
        with torch.device("meta"):
            model = torchvision.models.vgg16()
        model.load_state_dict(state, assign=True)
        for param in model.parameters():                  # the tutorial: freeze everything
            param.requires_grad = False
        classes = len(self.train.classes)
        model.classifier[6] = nn.Linear(4096, classes)    # new last layer, trainable
        model.classifier[6].load_state_dict(HeadStack(4096, classes, seeds=[seed]).head_state(0))
        model.eval()                                      # frozen Dropout off, as extraction
        trainable = filter(lambda p: p.requires_grad, model.parameters())   # the tutorial's filter
        opt = (optim.SGD(trainable, lr=lr, momentum=a.momentum) if a.optimizer == "sgd"
               else optim.AdamW(trainable, lr=lr, weight_decay=0.0))
        sampler = SubsetRandomSampler(range(len(self.train)),
                                      generator=torch.Generator().manual_seed(0))
        loader = DataLoader(self.train, batch_size=a.batch_size, sampler=sampler)
        val_loader = DataLoader(self.val, batch_size=128)
        accs = []
        for _ in range(a.epochs):
            for x, y in loader:
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()   # the whole VGG forward, every step
                opt.step()
            with torch.no_grad():
                correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in val_loader)
            accs.append(correct / len(self.val))
        return {"seconds": time.perf_counter() - t0, "val_acc": accs,
                "head": {k: v.detach().clone() for k, v in model.classifier[6].state_dict().items()}}


def main() -> None:
    ap = bench_parser(__doc__, repeats=3)
    ap.add_argument("--images", type=int, default=500, help="digits used (4/5 train, 1/5 val)")
    ap.add_argument("--size", type=int, default=32, help="VGG input crop in px")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw",
                    help="the tutorial's SGD hardly moves a head on random-init features")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--momentum", type=float, default=0.9, help="sgd only")
    ap.add_argument("--weights", default="none",
                    help="none (random init, no download) or a weights name/file, e.g. DEFAULT")
    args = ap.parse_args()
    apply_threads(args)
    quiet()
    torch.manual_seed(0)
    tmp = scratch("bench-tutorial-")
    train_dir, val_dir = write_digits(tmp / "digits", args.images)
    tutorial = Tutorial(train_dir, val_dir, args)
    xcfg = ExtractConfig(weights=args.weights, image_size=args.size, batch_size=args.batch_size,
                         dtype="float32", overwrite=True, progress=False)
    # Raw features, as the tutorial's new fc8 sees them: no standardization, so both ways
    # compute the same steps.
    shared = dict(optimizer=(args.optimizer,), momentum=args.momentum, epochs=args.epochs,
                  batch_size=args.batch_size, val_fraction=0.0, data_seed=0, standardize=False)
    sweep = TrainConfig(lr=tuple(args.lr * f for f in SWEEP_LR_FACTORS), seed=SWEEP_SEEDS, **shared)
    rounds: list[dict] = []

    def run_tutorial() -> float:
        rounds.append({"tutorial": tutorial.run(args.lr, seed=0)})
        return rounds[-1]["tutorial"]["seconds"]

    def run_cache() -> float:
        r, t0 = rounds[-1], time.perf_counter()
        for part in ("train", "val"):
            (tmp / f"{part}.h5").unlink(missing_ok=True)        # extract from scratch
            extract(tmp / "digits" / part, tmp / f"{part}.h5", xcfg)
        r["extract"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        r["one"] = train_head(tmp / "train.h5", tmp / "one", TrainConfig(lr=(args.lr,), **shared),
                              tmp / "val.h5")
        r["one_s"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        r["sweep"] = train_head(tmp / "train.h5", tmp / "sweep", sweep, tmp / "val.h5")
        r["sweep_s"] = time.perf_counter() - t2
        return time.perf_counter() - t0

    alternate({"A": run_tutorial, "B": run_cache}, args.repeats)
    n_train, n_val = len(tutorial.train), len(tutorial.val)
    for part, dataset in (("train", tutorial.train), ("val", tutorial.val)):
        with CacheReader(tmp / f"{part}.h5") as reader:   # same images, same order, same labels
            root = tmp / "digits" / part
            assert reader.paths == [Path(p).relative_to(root).as_posix() for p, _ in dataset.samples]
            assert reader.labels.tolist() == dataset.targets
    with_cache = _agreement(rounds, n_val)

    tut = median([r["tutorial"]["seconds"] for r in rounds])
    ext = median([r["extract"] for r in rounds])
    one = median([r["one_s"] for r in rounds])
    swp = median([r["sweep_s"] for r in rounds])
    best = max(row["val_acc"] for row in rounds[-1]["sweep"].leaderboard)
    k = len(rounds[-1]["sweep"].leaderboard)
    rows = [
        ["A: tutorial loop (VGG forward every step)", tut, f"{k * tut:,.0f} (extrapolated)",
         with_cache["tutorial"], "-"],
        ["B: extract once + train-head on the cache", ext + one, ext + swp, with_cache["cache"], best],
        ["   of which: extract train + val", ext, ext, "", ""],
        ["   of which: train-head", one, swp, "", ""],
        ["A / B (median of per-round ratios)",
         median([r["tutorial"]["seconds"] / (r["extract"] + r["one_s"]) for r in rounds]),
         median([k * r["tutorial"]["seconds"] / (r["extract"] + r["sweep_s"]) for r in rounds]),
         "", ""],
    ]
    breakeven = ext / (tut - one) if tut > one else math.inf
    print(f"machine: {machine()}")
    print(f"digits: {n_train} train + {n_val} val images, VGG16 fc7 at {args.size}px, weights "
          f"{args.weights}, {args.epochs} epochs, batch {args.batch_size}, {args.optimizer} lr "
          f"{args.lr:g}{f' momentum {args.momentum:g}' if args.optimizer == 'sgd' else ''}; "
          f"median of {args.repeats} alternated rounds\n")
    print(table(["way", "1 experiment s", f"{k}-experiment sweep s", "val acc (lr, seed 0)",
                 f"best val of {k}"], rows))
    print(f"\nspread (s): tutorial experiment {spread([r['tutorial']['seconds'] for r in rounds])}, "
          f"extract {spread([r['extract'] for r in rounds])}, "
          f"{k}-head sweep {spread([r['sweep_s'] for r in rounds])}")
    print(f"the {k}-experiment tutorial sweep is {k} x the measured time of one experiment "
          f"(extrapolated); the cached {k}-head sweep is measured. Both ways read the same "
          f"{n_train} + {n_val} images in the same order with the same labels (checked)")
    print(f"break-even: the cache has paid for itself after {breakeven:.2f} experiments "
          f"(extraction / (tutorial experiment - cached experiment) = {ext:.1f} / "
          f"({tut:.1f} - {one:.1f}))")
    print(f"accuracy: the same experiment reaches val acc {with_cache['tutorial']:.4f} the "
          f"tutorial's way and {with_cache['cache']:.4f} on the cache (per epoch: tutorial "
          f"{with_cache['tutorial_epochs']}, cache {with_cache['cache_epochs']}); final head "
          f"weights differ by at most {with_cache['weight_diff']:.2e}")


def _agreement(rounds: list[dict], n_val: int) -> dict:
    """Check that both ways reached the same validation accuracy in every round."""
    weight_diff = 0.0
    for r in rounds:
        tut = r["tutorial"]["val_acc"]
        row = r["one"].leaderboard[0]
        head, _ = load_head(row["path"])
        cache_epochs = [float(a) for a in _history(row["path"])]
        diff = np.abs(np.array(tut) - np.array(cache_epochs)).max()
        assert diff <= 1 / n_val + 1e-9, (
            f"tutorial and cache disagree: val acc per epoch {tut} vs {cache_epochs}")
        weight_diff = max([weight_diff] + [float((head.state_dict()[name] - t).abs().max())
                                           for name, t in r["tutorial"]["head"].items()])
    return {"tutorial": tut[-1], "cache": cache_epochs[-1], "weight_diff": weight_diff,
            "tutorial_epochs": [round(a, 4) for a in tut],
            "cache_epochs": [round(a, 4) for a in cache_epochs]}


def _history(run_dir: str) -> list[float]:
    metrics = json.loads((Path(run_dir) / "metrics.json").read_text())
    return [e["val_acc"] for e in metrics["epochs"]]


if __name__ == "__main__":
    main()
