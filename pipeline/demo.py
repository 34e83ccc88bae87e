"""`demo()`: every stage on scikit-learn's digits (1,797 real 8x8 images, no download).

    from pipeline.config import DemoConfig
    from pipeline.demo import demo
    summary = demo("demo-out/", DemoConfig(), echo=print)   # prints each stage as it finishes
    summary.test_accuracy            # the exported model's accuracy on the held-out test images

Writes the digits as an image folder (train/ and test/, every 5th image of each digit held
out), extracts both at 32 px, trains a sweep of 19 heads (linear, mlp, logreg) on the train
cache with the test cache measured, exports the best head stitched onto its backbone, predicts
the test images with the exported model, and writes the report. It also times a few training
steps the tutorial's way (every image through the frozen network in every step) and
extrapolates them to the sweep.
The stages are the library's own functions; this module only composes them.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torchvision
from PIL import Image
from torch import nn

from cache.errors import UserError

from .backbone import build_backbone
from .preprocessing import Preprocessing, to_float_batch
from .config import (DEMO_OUT, DemoConfig, ExportConfig, ExtractConfig, PredictConfig,
                     ReportConfig, TrainConfig, validate)
from .export import ExportSummary, export
from .extract import ExtractSummary, extract
from .images import read_image
from .leaderboard import table
from .sources import find_images
from .predict import PredictResult, predict
from .report import ReportSummary, report
from .train_head import TrainSummary, train_head

# The sweep, 19 heads: 8 linear and 8 mlp (lr x dropout) and 3 logreg fits (C). The linear and
# mlp heads train on standardized fc7 features (train-head's default), where AdamW's learning
# rates run from too slow for 20 epochs (1e-4) to fast (3e-3). The span that suited raw features,
# 1e-3..3e-2, overshoots there (a linear head at 3e-2: validation loss 1.4 against 0.08 at 1e-3).
# With these, the best linear head lands within a point of the best logreg fit on the test
# digits. The mlp is narrow and C starts at 0.1 (fewer lbfgs iterations): train-head takes
# under 10 s on one CPU thread.
SWEEP = dict(head=("linear", "mlp", "logreg"), hidden=((64,),), lr=(1e-4, 3e-4, 1e-3, 3e-3),
             dropout=(0.0, 0.5), C=(0.1, 1.0, 10.0))


@dataclass
class DemoSummary:
    """What each stage of `demo()` did; the numbers come from the runs themselves."""
    out_dir: str
    weights: str                   # the backbone weights used ("none": random init)
    images: dict                   # part -> number of digit images written
    extract: dict[str, ExtractSummary]   # part ("train", "test") -> what extract did
    train: TrainSummary            # what train_head did (leaderboard, best_run, best_path, ...)
    export: ExportSummary
    predict: PredictResult
    test_accuracy: float           # exported model on the test images
    head_test_accuracy: float      # best head on the cached test features
    tutorial: dict                 # measured tutorial-way steps and their extrapolation
    report: ReportSummary | None   # None when not asked for
    seconds: dict = field(default_factory=dict)   # stage -> wall seconds

    @property
    def random_weights(self) -> bool:
        return self.weights == "none"


def demo(out_dir: str | Path = DEMO_OUT, config: DemoConfig = DemoConfig(),
         echo: Callable[[str], None] | None = None) -> DemoSummary:
    """Run every stage on the digits under `out_dir`; `echo` gets each stage's lines as it ends.

    Raises UserError for user mistakes (weights that cannot be loaded, bad settings).
    """
    say = echo or (lambda line: None)
    validate(config)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    weights = pick_weights("vgg16", config.weights)
    if weights == "none":
        why = ("no ImageNet weights in torchvision's cache and no --weights, so"
               if config.weights is None else "--weights none:")
        say(f"Note: {why} the backbone is RANDOM-INIT: the numbers below describe random "
            "features (which still separate digits).")
    else:
        say(f"weights: {weights}" + (" (ImageNet, found in torchvision's cache)"
                                     if config.weights is None else ""))
    folder = out_dir / ("digits" if config.per_class is None else f"digits-{config.per_class}")
    train_dir, test_dir = write_digits(folder, config.test_every, config.per_class)
    images = {part: len(find_images(d).paths) for part, d in (("train", train_dir),
                                                               ("test", test_dir))}
    say(f"images: {sum(images.values())} digits from scikit-learn (8x8 grey) in {folder}: "
        f"{images['train']} train, {images['test']} test (every {config.test_every}th of each "
        "digit held out)")
    seconds["images"] = time.perf_counter() - t

    extract_config = ExtractConfig(weights=weights, image_size=config.image_size,
                                   progress=config.progress)
    caches = {}
    for part, source in (("train", train_dir), ("test", test_dir)):
        caches[part] = extract(source, out_dir / f"{part}.h5", extract_config)
        seconds[f"extract {part}"] = caches[part].seconds
        say(f"extract {part}: {caches[part].line()}")

    train_config = TrainConfig(**SWEEP, epochs=config.epochs)
    # The demo's sweep starts afresh: train-head merges a new sweep into a runs folder's
    # earlier ones, and refuses one on other data (other --per-class).
    shutil.rmtree(out_dir / "runs", ignore_errors=True)
    trained = train_head(caches["train"].path, out_dir / "runs", train_config,
                         test_path=caches["test"].path)
    seconds["train-head"] = trained.seconds
    say(_train_line(trained, train_config))
    for line in _leaderboard_lines(trained.leaderboard, trained.results_csv):
        say(line)
    best = trained.leaderboard[0]
    say(f"best: {best['run_id']} -> {trained.best_path}")

    exported = export(trained.best_path, out_dir / "model.pt2", ExportConfig(weights=weights))
    seconds["export"] = exported.seconds
    say(f"export: {exported.line()}")

    predicted = predict(exported.path, [test_dir], PredictConfig(top_k=1, progress=config.progress))
    seconds["predict"] = predicted.seconds
    accuracy = _accuracy(predicted, test_dir)
    say(f"predict: {predicted.line()}")
    say(f"test accuracy of the exported model on the {len(predicted.predictions)} test images: "
        f"{accuracy:.4f}; the best head on the cached test features: {best['test_acc']:.4f}")

    t = time.perf_counter()
    tutorial = time_tutorial_way(train_dir, weights, config.image_size, len(trained.class_names),
                                 config.tutorial_steps, config.tutorial_batch)
    tutorial.update(_extrapolate(tutorial, trained, train_config, caches))
    seconds["tutorial timing"] = time.perf_counter() - t
    for line in _tutorial_lines(tutorial):
        say(line)

    summary = None
    if config.report:
        summary = report(out_dir / "runs", out_dir / "report", ReportConfig())
        seconds["report"] = summary.seconds
        say(f"report: {summary.line()}")
    return DemoSummary(str(out_dir), weights, images, caches, trained, exported, predicted,
                       accuracy, best["test_acc"], tutorial, summary, seconds)


# ------------------------------------------------------------------------------------ data

def write_digits(root: str | Path, test_every: int = 5, per_class: int | None = None
                 ) -> tuple[Path, Path]:
    """Write sklearn's digits as PNGs: root/train/<digit>/<n>.png and root/test/<digit>/<n>.png.

    The 1st, (1 + test_every)th, ... image of each digit (in sklearn's order) is held out for
    testing: stable, and every class has test images. `per_class` keeps the first that many
    images of each digit. Existing files are left as they are (a copy in the other part, from
    other settings, is removed so that no image is in both).
    """
    from sklearn.datasets import load_digits

    if test_every < 2:
        raise UserError(f"test_every {test_every}: use 2 or more (every n-th image of each "
                         "digit is a test image)")
    digits = load_digits()
    root = Path(root)
    seen = np.zeros(10, dtype=np.int64)                  # images of each digit so far
    for n, (image, target) in enumerate(zip(digits.images, digits.target)):
        k = int(seen[target])
        seen[target] += 1
        if per_class is not None and k >= per_class:
            continue
        part, other = ("test", "train") if k % test_every == 0 else ("train", "test")
        path = root / part / str(target) / f"{n:04d}.png"
        (root / other / str(target) / path.name).unlink(missing_ok=True)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            pixels = np.round(image * 255 / 16).astype(np.uint8)   # (8, 8), values 0..16
            Image.fromarray(pixels, mode="L").save(path)
    return root / "train", root / "test"


def pick_weights(backbone: str, weights: str | None) -> str:
    """`weights` if given; else the DEFAULT ImageNet weights when already downloaded; else none."""
    if weights:
        return weights
    url = torchvision.models.get_model_weights(backbone).DEFAULT.url
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    return "DEFAULT" if cached.is_file() else "none"


def _accuracy(predicted, test_dir: Path) -> float:
    """Top-1 accuracy of `predict`'s answers; the true class is each image's folder name."""
    images = find_images(test_dir)
    truth = {(test_dir / p).as_posix(): images.class_names[y]
             for p, y in zip(images.paths, images.labels)}
    hits = [p["top"][0]["class"] == truth[p["path"]] for p in predicted.predictions]
    return float(np.mean(hits)) if hits else float("nan")


def _leaderboard_lines(rows: list[dict], csv_path: str, limit: int = 10) -> list[str]:
    """The first `limit` leaderboard rows as aligned text columns."""
    return table(rows, ("rank", "run_id", "val_acc", "val_loss", "test_acc"), limit=limit,
                 more=csv_path, indent="  ")


# ----------------------------------------------------------------------- the tutorial's way

def time_tutorial_way(train_dir: str | Path, weights: str, image_size: int, n_classes: int,
                      steps: int = 3, batch: int = 32) -> dict:
    """Time `steps` training steps the tutorial's way, after one warm-up step.

    One step: decode `batch` training images, run them through the frozen VGG16 up to fc7 (the
    tutorial freezes everything but a new last layer, so autograd records nothing there), then
    a new linear fc8, cross-entropy, backward and an SGD step. Returns seconds per step and
    per image.
    """
    backbone, info = build_backbone("vgg16", weights, "fc7", image_size)
    pre = Preprocessing.from_dict(info["preprocessing"])
    head = nn.Linear(info["feature_dim"], n_classes)
    opt = torch.optim.SGD(head.parameters(), lr=1e-3, momentum=0.9)
    images = find_images(train_dir)
    order = np.random.default_rng(0).permutation(len(images.paths))
    picks = [order[(i * batch + np.arange(batch)) % len(order)] for i in range(steps + 1)]

    def step(rows) -> None:
        x = torch.stack([pre(read_image(images.absolute(i))[0]) for i in rows])   # (B, 3, S, S)
        y = torch.tensor([images.labels[i] for i in rows])
        loss = nn.functional.cross_entropy(head(backbone(to_float_batch(x))), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step(picks[0])                                   # warm-up: first-call allocations
    t0 = time.perf_counter()
    for rows in picks[1:]:
        step(rows)
    per_step = (time.perf_counter() - t0) / steps
    return {"steps": steps, "batch": batch, "seconds_per_step": per_step,
            "seconds_per_image": per_step / batch}


def _extrapolate(tutorial: dict, trained: TrainSummary, cfg: TrainConfig, caches: dict) -> dict:
    rows = trained.data["train"]["rows"]
    heads = trained.experiments
    cached = sum(c.seconds for c in caches.values()) + trained.seconds
    return {"train_rows": rows, "epochs": cfg.epochs, "heads": heads,
            "extrapolated_seconds": tutorial["seconds_per_image"] * rows * cfg.epochs * heads,
            "cached_seconds": cached,
            "caches_reused": any(c.up_to_date for c in caches.values())}


def _tutorial_lines(t: dict) -> list[str]:
    ratio = t["extrapolated_seconds"] / t["cached_seconds"] if t["cached_seconds"] else float("inf")
    steps = f"{t['steps']} training step" + ("s" if t["steps"] != 1 else "")
    lines = [
        f"tutorial way, measured: {steps} of {t['batch']} images (decode, frozen VGG16 to fc7, "
        f"new linear fc8, backward, SGD step) took {t['seconds_per_step']:.2f} s a step, "
        f"{1000 * t['seconds_per_image']:.1f} ms an image",
        f"tutorial way, extrapolated from the {steps}: {t['train_rows']} training "
        f"images x {t['epochs']} epochs x {t['heads']} heads = "
        f"{_duration(t['extrapolated_seconds'])}"
        f" (validation passes not counted; each logreg fit counted as {t['epochs']} epochs)",
        f"cached way, this run: extract train + test and train-head took "
        f"{_duration(t['cached_seconds'])}, {ratio:,.0f}x less",
    ]
    if t["caches_reused"]:
        lines[-1] += (" (the caches were up to date from an earlier run, so extraction cost "
                      "little: delete the .h5 files to time it)")
    return lines


def _train_line(s: TrainSummary, cfg: TrainConfig) -> str:
    kinds = [r["head"] for r in s.leaderboard]
    counts = ", ".join(f"{kinds.count(k)} {k}" for k in cfg.head)
    val = s.data["val"]
    return (f"train-head: {s.experiments} heads ({counts}) in {len(s.passes)} passes, "
            f"{cfg.epochs} epochs, on {s.data['train']['rows']} train rows, validation "
            f"{val['rows'] if val else 0} rows held out of train by path hash, test "
            f"{s.data['test']['rows']} rows, {s.seconds:.1f} s")


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


__all__ = ["SWEEP", "DemoSummary", "demo", "pick_weights", "time_tutorial_way", "write_digits"]
