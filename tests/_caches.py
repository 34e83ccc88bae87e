"""Small feature caches written directly with CacheWriter (no backbone), for the tests of the
stages that read caches."""
from __future__ import annotations

import numpy as np

from cache import CacheWriter, partial_path

# What a random-init VGG16 fc7 extraction at 32 px would record (feature_dim, dtype and
# class_names come from the rows written).
MANIFEST = {"backbone": "vgg16", "weights": "none", "weights_sha256": "ab" * 32,
            "layer": "classifier.4", "layer_alias": "fc7", "precision": "float32",
            "preprocessing": {"resize_size": 37, "crop_size": 32, "mean": [0.5] * 3,
                              "std": [0.2] * 3}}


def make_cache(path, x, y, paths=None, classes=None, dtype="float32", complete=True,
               digests=None, **changes):
    """A feature cache holding rows x (N, D) with labels y, written the way extract writes one.

    paths default to "<class>/<row>.png", digests to zeros; `changes` override manifest keys
    (e.g. source_root, or a different layer). Returns the final path, or the partial one when
    not `complete`.
    """
    x, y = np.asarray(x), np.asarray(y)
    classes = list(classes or [f"class{i}" for i in range(int(y.max()) + 1)])
    paths = paths or [f"{classes[max(int(label), 0)]}/{i:05d}.png" for i, label in enumerate(y)]
    manifest = {**MANIFEST, "feature_dim": x.shape[1], "dtype": dtype, "class_names": classes,
                **changes}
    writer = CacheWriter.create(partial_path(path), manifest)
    writer.commit(x.astype(dtype), y.tolist(), list(paths), list(digests or ["0" * 64] * len(y)))
    if complete:
        return writer.finish(path)
    writer.close()
    return partial_path(path)
