"""Describe a cache file: manifest, counts per class, errors, complete or not (for `pipeline inspect`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from . import manifest as mf
from .reader import CacheReader


def describe(path: str | Path) -> dict:
    """A JSON-able summary of the cache at `path` (finished or not)."""
    with CacheReader(path, allow_incomplete=True) as r:
        # The reader checked what reading features needs; a description shows every
        # preprocessing setting, so those must be there too.
        mf.validate(r.file_manifest, r.path, preprocessing=mf.FOR_DISPLAY)
        names = r.class_names
        counts = np.bincount(r.labels[r.labels >= 0], minlength=len(names)) if names else []
        return {
            "path": str(path),
            "complete": r.complete,
            "rows": r.n_rows,
            "feature_dim": sum(c["feature_dim"] for c in mf.cuts(r.file_manifest)),
            "views": mf.view_count(r.file_manifest),
            "cuts": [{k: c[k] for k in ("name", "layer", "pool", "feature_dim")}
                     for c in mf.cuts(r.file_manifest)],
            "dtype": r.file_manifest.get("dtype"),
            "decoders": [mf.decoder_text(d) for d in mf.decoders(r.file_manifest)],
            "size_bytes": Path(path).stat().st_size,
            "unlabeled": int((r.labels < 0).sum()),
            "class_counts": {n: int(c) for n, c in zip(names, counts)},
            "errors": [{"path": p, "reason": reason} for p, _, reason in r.errors],
            "manifest": r.manifest,
        }
