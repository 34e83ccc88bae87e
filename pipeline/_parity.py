"""Export's parity check: the written model, run on images the cache holds, must give the
head's logits on the cached features, within the rounding error the cache's storage dtype and
compute precision carry, propagated through the head (`_error_sigma`).

    rows, inputs = pick_images(reader, preprocessing, images_root=None, count=8)
    result = check(load_model("model.pt2"), head, reader, rows, inputs)   # UserError if not
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from cache.errors import UserError
from cache.reader import CacheReader

from .images import BadImageError
from .shards import read_path
from .models import LoadedModel
from .preprocessing import to_float_batch

log = logging.getLogger("pipeline.export")   # one logger for the stage's lines

# Relative error of a cached feature against a fresh float32 forward pass of the same network:
# the storage dtype's rounding plus the error of the precision it was computed in (autocast).
# float32 keeps room for two implementations of the same convolutions (eager, exported, ONNX RT).
_STORAGE_EPS = {"float16": 2.0 ** -11, "float32": 0.0}
_COMPUTE_EPS = {"float32": 1e-5, "float16": 4 * 2.0 ** -11, "bfloat16": 4 * 2.0 ** -8}
_SIGMAS = 6.0        # tolerance = this many standard deviations of the propagated rounding error
_ATOL = 1e-5         # plus an absolute floor for float32 caches of tiny logits
_GELU_SLOPE = 1.13   # steepest slope of GELU (1.129): how much it can amplify an input error
_PARITY_TRIES = 200  # cached rows tried at most when looking for reachable, unchanged images
# Image-input models resize with tensor operations, which land up to one gray level from
# Pillow's resize: allowed logit error, as a fraction of the largest logit. Measured by
# bench/image_input.py: at most 3.8 % (random-init VGG16 and ResNet18, digits and random-size
# images at 32 px); 0.1 leaves a margin of 2.6x.
_RESIZE_REL = 0.1


def check(model: LoadedModel, head: nn.Module, reader: CacheReader, rows: list[int],
          inputs: list[torch.Tensor]) -> dict:
    """Run `model` on cached images; its logits must equal the head's on the cached features.
    `inputs`: (3, S, S) uint8 crops, or (3, H, W) uint8 whole images for an image-input model
    (run one at a time: their sizes differ)."""
    feats = torch.from_numpy(reader.read_rows(rows))                          # (B, D)
    with torch.no_grad():
        expected = head(feats)                                                # (B, C)
    image_input = model.input_kind == "image"
    got = (torch.cat([model.run(x[None]) for x in inputs]) if image_input
           else model.run(to_float_batch(torch.stack(inputs))))               # (B, C)
    m = reader.manifest
    eps = _STORAGE_EPS.get(m["dtype"], 2.0 ** -11) + _COMPUTE_EPS.get(m["precision"], 2.0 ** -8)
    tolerance = float(_SIGMAS * _error_sigma(head, feats, eps).max() + _ATOL)
    if image_input:   # tensor resizing lands up to one gray level from Pillow's
        tolerance += _RESIZE_REL * float(expected.abs().max())
    diff = float((got - expected).abs().max())
    result = {"images": len(rows), "max_abs_diff": diff, "tolerance": tolerance,
              "max_abs_logit": float(expected.abs().max()), "cache": str(reader.path)}
    log.info("parity on %d cached images: max |logit diff| %.3g, tolerance %.3g",
             len(rows), diff, tolerance)
    if not diff <= tolerance:   # also catches NaN
        raise UserError(f"parity check failed: on {len(rows)} images of {reader.path} the "
                         f"stitched model's logits differ from the head's on the cached features "
                         f"by up to {diff:.3g} (tolerance {tolerance:.3g}, logits up to "
                         f"{result['max_abs_logit']:.3g}): the images, weights or preprocessing "
                         "are not the ones that made the cache; nothing was written")
    return result


def pick_images(reader: CacheReader, pre: Callable, images_root: str | None, count: int
                ) -> tuple[list[int], list[torch.Tensor]]:
    """Up to `count` rows, spread over the cache, whose image file (under `images_root`, else
    the cache's source root) is still there and unchanged (same SHA-256), decoded as extract
    decodes, then `pre` (the cache's Preprocessing for (3, S, S) uint8 crops, or pil_to_tensor
    for whole images)."""
    root = Path(images_root or reader.manifest.get("source_root") or ".")
    n = reader.n_rows
    candidates = np.unique(np.linspace(0, n - 1, min(n, _PARITY_TRIES)).round().astype(int))
    # Interleave so the first picks spread over the whole cache (classes are contiguous).
    order = [int(r) for k in range(4) for r in candidates[k::4]]
    rows, crops, tried = [], [], 0
    for r in order:
        if len(rows) == count:
            break
        tried += 1
        try:
            img, digest = read_path(root / reader.paths[r])   # a file or a shard's member
        except BadImageError:
            continue
        if digest == reader.digests[r]:
            rows.append(r)
            crops.append(pre(img))
    if not rows:
        raise UserError(f"parity check: none of the {tried} cached images tried is readable and "
                         f"unchanged under {root}: pass --images-root with the folder the images "
                         "now live in, --cache with another cache of the same features, or "
                         "--no-parity-check")
    return rows, crops


def _error_sigma(head: nn.Module, feats: torch.Tensor, eps: float) -> torch.Tensor:
    """(B, C) standard deviation of each logit when every feature carries an independent relative
    error of size `eps` (rounding), propagated through the head's layers to first order."""
    var = (eps * feats) ** 2                                                  # (B, D)
    layers = list(head) if isinstance(head, nn.Sequential) else [head]
    with torch.no_grad():
        for layer in layers:
            if isinstance(layer, nn.Linear):
                var = var @ (layer.weight ** 2).t()                           # (B, out)
            elif isinstance(layer, nn.GELU):
                var = var * _GELU_SLOPE ** 2
            elif not isinstance(layer, (nn.ReLU, nn.Tanh, nn.Identity, nn.Dropout)):
                raise UserError(f"the parity check does not know head layer {layer}: "
                                 "use --no-parity-check")    # 1-Lipschitz layers pass through
    return var.sqrt()
