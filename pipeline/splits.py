"""The stable validation split: by a hash of each image path (TensorFlow retrain.py's idea).

Train-head holds these rows out when no validation cache is given; the report recomputes them.
"""
from __future__ import annotations

import hashlib

import numpy as np


def hash_split(paths: list[str], fraction: float) -> np.ndarray:
    """(N,) bool, True for validation: SHA-1 of each path, as a number in [0, 1), below
    `fraction`. Depends on the path alone, so adding images never moves old ones."""
    u = [int.from_bytes(hashlib.sha1(p.encode("utf-8")).digest()[:8], "big") / 2**64 for p in paths]
    return np.asarray(u, dtype=np.float64) < fraction


def validation_rows(paths: list[str], labels: np.ndarray, fraction: float) -> np.ndarray:
    """(V,) sorted rows of a train cache that `train_head` holds out for validation when no val
    cache is given: the labeled rows whose path hashes below `fraction` (head.json's data.val
    is then {"kind": "hash_split", "fraction": fraction}). For reports that recompute
    predictions."""
    return np.flatnonzero((np.asarray(labels) >= 0) & hash_split(list(paths), fraction))
