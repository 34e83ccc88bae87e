"""The manifest: everything that determines a cache's features, as plain JSON.

A manifest is a dict of JSON types. `FEATURE_KEYS` are the fields that decide what a
feature row is; two caches whose FEATURE_KEYS agree hold interchangeable rows, whatever
their images. `differences()` names the fields that disagree, so a refusal can say which.

A cache holds one cut (format 1: `layer`, `layer_alias`, `pool` and `feature_dim` at the top)
or several cuts of one forward pass (format 2: a `cuts` list of those fields, each with the
`name` of its dataset). `cut_manifest()` gives one cut of either as a format-1 manifest, so
the stages that use one cut read both alike.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

from .errors import UserError

FORMAT_VERSION = 1          # one cut: dataset `features`
MULTI_CUT_VERSION = 2       # several cuts: group `cuts`, one dataset per cut name
CUT_KEYS = ("layer", "layer_alias", "pool", "feature_dim")

# Fields that decide the value of a feature row: mixing rows that differ in any is wrong.
FEATURE_KEYS = (
    "backbone",       # e.g. "vgg16"
    "weights",        # torchvision weights name, "file:<name>", or "none"
    "weights_sha256", # SHA-256 of the backbone state_dict actually used
    "layer",          # cut point as a module path, e.g. "classifier.4" (fc7 after ReLU)
    "pool",           # None (flattened) or "avg" (mean over spatial positions or tokens)
    "feature_dim",    # D
    "preprocessing",  # resize, crop, interpolation, mean, std
    "precision",      # compute precision of the forward pass: "float32", "bfloat16", "float16"
    "dtype",          # storage dtype of the features
    "cuts",           # several cuts: [{name, layer, layer_alias, pool, feature_dim}]; else None
    "views",          # augmented views: {count, spec, seed}; None for the plain view alone
)
# Fields that decide the plain-view row of an image, whatever the storage dtype and whatever
# augmented views a cache also holds: train, val and test caches, and a head and the cache
# that checks it, must agree on these.
ROW_KEYS = tuple(k for k in FEATURE_KEYS if k not in ("dtype", "views"))


def cuts(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The cuts a cache holds, each {name, layer, layer_alias, pool, feature_dim}; a one-cut
    manifest's cut is named by its alias (fc7, penultimate) or else its layer."""
    if manifest.get("cuts"):
        return [dict(c) for c in manifest["cuts"]]
    cut = {k: manifest.get(k) for k in CUT_KEYS}
    return [{"name": cut["layer_alias"] or cut["layer"], **cut}]


def view_count(manifest: dict[str, Any]) -> int:
    """Views of each image the cache holds: 1 (the plain preprocessing) unless augmented."""
    return int((manifest.get("views") or {}).get("count", 1))


def feature_datasets(manifest: dict[str, Any]) -> list[tuple[str, int]]:
    """(key, feature dim) of every features dataset a cache holds, in commit order: each cut
    (by name; its plain view), then views 1..K-1 of a one-cut cache (keys "view 1", ...)."""
    out = [(c["name"], int(c["feature_dim"])) for c in cuts(manifest)]
    return out + [(f"view {v}", out[0][1]) for v in range(1, view_count(manifest))]


def cut_manifest(manifest: dict[str, Any], cut: dict[str, Any]) -> dict[str, Any]:
    """The manifest of one cut, as a one-cut cache of it would have."""
    out = {k: v for k, v in manifest.items() if k != "cuts"}
    out.update({k: cut.get(k) for k in CUT_KEYS})
    return out


def find_cut(manifest: dict[str, Any], wanted: str) -> dict[str, Any] | None:
    """The cut named `wanted` (by its name, alias or layer), or None."""
    for cut in cuts(manifest):
        if wanted in (cut["name"], cut["layer"], cut.get("layer_alias")):
            return cut
    return None


def dumps(manifest: dict[str, Any]) -> str:
    """Serialize a manifest as canonical JSON (sorted keys), the form stored in the file."""
    return json.dumps(manifest, sort_keys=True, separators=(",", ":"))


def loads(text: str | bytes) -> dict[str, Any]:
    """Parse a stored manifest."""
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    manifest = json.loads(text)
    if not isinstance(manifest, dict):
        raise UserError("cache manifest is not a JSON object: the file is not a feature cache")
    return manifest


def feature_fingerprint(manifest: dict[str, Any]) -> str:
    """SHA-256 over the FEATURE_KEYS: equal fingerprints mean interchangeable feature rows."""
    subset = {k: manifest.get(k) for k in FEATURE_KEYS}
    return hashlib.sha256(dumps(subset).encode()).hexdigest()


def differences(old: dict[str, Any], new: dict[str, Any], keys=FEATURE_KEYS) -> list[str]:
    """Human-readable list of `keys` whose values differ, e.g. ["layer: 'fc6' vs 'fc7'"]."""
    out = []
    for k in keys:
        a, b = old.get(k), new.get(k)
        if a != b:
            if k == "cuts":
                out.append(f"cuts: {_cut_list(cuts(old))} vs {_cut_list(cuts(new))}")
            elif isinstance(a, dict) and isinstance(b, dict):
                sub = [f"{k}.{s}: {a.get(s)!r} vs {b.get(s)!r}"
                       for s in sorted(set(a) | set(b)) if a.get(s) != b.get(s)]
                out.extend(sub)
            else:
                out.append(f"{k}: {_short(a)} vs {_short(b)}")
    return out


def _cut_list(items: list) -> str:
    """Cut names with their layer and pool, e.g. "fc6 (classifier.1), pool5 (avgpool, avg)"."""
    def one(c: dict) -> str:
        where = ", ".join(str(v) for v in (c.get("layer"), c.get("pool")) if v)
        return f"{c.get('name')} ({where})"
    return ", ".join(one(c) for c in items if isinstance(c, dict)) or "none"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
