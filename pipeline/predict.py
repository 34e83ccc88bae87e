"""`predict()`: run a model written by `export()` over images; top-k classes with probabilities.

    from pipeline.config import PredictConfig
    from pipeline.predict import predict
    result = predict("model.pt2", ["new-photos/", "one.jpg"], PredictConfig(top_k=3))
    result.predictions[0]   # {"path": "new-photos/a.jpg",
                            #  "top": [{"class": "cat", "index": 0, "probability": 0.93}, ...]}

Images are found, decoded and preprocessed exactly as `extract` does (the same loader, with the
preprocessing the model carries from the cache manifest), in batches, decoded in DataLoader
workers. A model exported with `--input image` gets each decoded image whole, one at a time,
and resizes it itself. Bad images are reported with their reason and skipped, never replaced.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader
from torchvision.transforms import functional as TF

from cache.errors import UserError

from ._progress import progress
from .preprocessing import to_float_batch
from .config import PredictConfig, validate
from ._decode import resolve_decoder
from ._loading import (ImageBatches, collate, default_workers, on_device,   # extract's loader
                       resolve_device)
from .models import REEXPORT, load_model
from .shards import member_paths
from .sources import LIST_EXTENSIONS, ImageList, find_images, is_shard_source, is_utf8, printable


@dataclass
class PredictResult:
    """Predictions in input order; `logits` (N, C) float32 has one row per prediction."""
    model: str
    format: str
    class_names: list
    predictions: list      # {"path", "top": [{"class", "index", "probability"}, ...]}
    logits: np.ndarray
    skipped: list          # (path, reason) of images that could not be used
    seconds: float

    def line(self) -> str:
        n = len(self.predictions)
        return (f"{n} image{'s' * (n != 1)} predicted with {self.model} ({self.format}), {len(self.skipped)} "
                f"skipped, {self.seconds:.1f} s ({n / self.seconds if self.seconds else 0:.1f} "
                f"images/s)")

    def to_json(self) -> dict:
        return {"model": self.model, "format": self.format, "class_names": self.class_names,
                "predictions": self.predictions,
                "skipped": [{"path": p, "reason": r} for p, r in self.skipped]}


def predict(model_path: str | Path, inputs, config: PredictConfig = PredictConfig()
            ) -> PredictResult:
    """Top-k classes of every image in `inputs` (image files, folders, .csv/.tsv lists,
    tar shards: their image members, read in place).

    Raises UserError for user mistakes: a file that is not an exported model, a missing input,
    a folder without images, bad settings.
    """
    t0 = time.perf_counter()
    validate(config)
    images, unnamed = _collect(inputs)
    device = resolve_device(config.device)
    model = load_model(model_path, device)
    names = model.class_names
    k = min(config.top_k, len(names))
    n = len(images.paths)
    pixels = model.input_kind == "image"     # the model resizes; whole images differ in size
    step = 1 if pixels else config.batch_size
    batches = [list(range(s, min(s + step, n))) for s in range(0, n, step)]
    workers = 0 if len(batches) < 2 else default_workers(config.workers, device.type == "cuda")
    pre = model.preprocessing
    decoder = None if pixels else resolve_decoder(config.decode, device, config.draft)
    loader = DataLoader(ImageBatches(images, TF.pil_to_tensor if pixels else pre,
                                     decoder=decoder),
                        batch_sampler=batches,
                        collate_fn=collate, num_workers=workers, pin_memory=device.type == "cuda")
    predictions, blocks, skipped = [], [], list(unnamed)
    with progress(n, "predict", config.progress) as bar:
        for batch in loader:
            if isinstance(batch["images"], list):
                batch = on_device(batch, pre, device)             # JPEGs decoded by nvJPEG
            skipped += [(path, reason) for path, _, reason in batch["errors"]]
            if batch["index"]:
                x = batch["images"] if pixels else to_float_batch(batch["images"])
                out = model.run(x).float().numpy()                                    # (B, C)
                if out.ndim != 2 or out.shape[1] != len(names):
                    raise UserError(f"{model_path}: damaged model metadata: it names "
                                    f"{len(names)} classes, the model gives logits of shape "
                                    f"{tuple(out.shape)}: {REEXPORT}")
                blocks.append(out)
                predictions += [_top(images.paths[i], row, names, k)
                                for i, row in zip(batch["index"], _softmax(out))]
            bar.update(len(batch["index"]) + len(batch["errors"]))
    logits = np.concatenate(blocks) if blocks else np.empty((0, len(names)), np.float32)
    return PredictResult(str(model_path), model.format, names, predictions, logits, skipped,
                         time.perf_counter() - t0)


def _collect(inputs) -> tuple[ImageList, list[tuple[str, str]]]:
    """One ImageList of every image named by `inputs`, paths as the user would write them, and
    (path, reason) of the files that cannot even be named (file names that are not UTF-8)."""
    paths: list[str] = []
    skipped: list[tuple[str, str]] = []
    for arg in inputs:
        p = Path(arg).expanduser()
        if is_shard_source(arg):                     # tar shards: their image members
            found_paths, found_skipped = member_paths(arg)
            paths += found_paths
            skipped += found_skipped
            continue
        if not p.exists():
            raise UserError(f"{arg} does not exist: pass image files, folders of images, "
                             ".csv/.tsv lists or .tar shards")
        if p.is_dir() or p.suffix.lower() in LIST_EXTENSIONS:
            found = find_images(p)
            base = p if p.is_dir() else p.parent     # list paths are relative to the list's folder
            paths += [(base / rel).as_posix() for rel in found.paths]
            skipped += [((base / rel).as_posix(), reason) for rel, reason in found.unusable]
        elif not is_utf8(p.as_posix()):
            skipped.append((printable(p.as_posix()), "file name is not valid UTF-8: rename it"))
        else:
            paths.append(p.as_posix())               # decoded as given; a non-image is reported
    if not paths:
        raise UserError("no usable images given: pass image files or folders")
    # Relative paths resolve against the working directory, absolute ones stay as they are.
    return ImageList(Path.cwd(), tuple(paths), (-1,) * len(paths), (), "list"), skipped



def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)                                   # (B, C)


def _top(path: str, probs: np.ndarray, names: list[str], k: int) -> dict:
    order = np.argsort(-probs, kind="stable")[:k]
    return {"path": path, "top": [{"class": names[i], "index": int(i),
                                   "probability": float(probs[i])} for i in order]}


__all__ = ["PredictResult", "predict"]
