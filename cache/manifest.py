"""The manifest: everything that determines a cache's features, as plain JSON.

A manifest is a dict of JSON types. `FEATURE_KEYS` are the fields that decide what a
feature row is; two caches whose FEATURE_KEYS agree hold interchangeable rows, whatever
their images. `differences()` names the fields that disagree, so a refusal can say which.

A cache holds one cut (format 1: `layer`, `layer_alias`, `pool` and `feature_dim` at the top)
or several cuts of one forward pass (format 2: a `cuts` list of those fields, each with the
`name` of its dataset). `cut_manifest()` gives one cut of either as a format-1 manifest, so
the stages that use one cut read both alike.

`validate()` checks what a stored manifest holds before anything reads it, so that a damaged
one is one line naming the file and the field (`Fields` does the same for the other JSON files
of the pipeline: head.json, metrics.json, model metadata).
"""
from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Callable, NamedTuple, NoReturn

from .errors import UserError
from .records import RECORD_KEY, REEXTRACT, Cut, Weights

FORMAT_VERSION = 1          # one cut: dataset `features`
MULTI_CUT_VERSION = 2       # several cuts: group `cuts`, one dataset per cut name
CUT_KEYS = ("layer", "layer_alias", "pool", "feature_dim")
# Each view is a forward pass of every image and a dataset of its own, whose HDF5 chunk
# buffer holds ~1 MiB while it is written: past a few hundred, a run would spend hours and
# gigabytes of buffers before its first commit.
MAX_VIEWS = 256

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
# Not a feature key: `weights_record` (records.Weights as JSON: kind, name, SHA-256, and a
# local file's path, which may move without changing a row).
# Fields that decide the plain-view row of an image, whatever the storage dtype and whatever
# augmented views a cache also holds: train, val and test caches, and a head and the cache
# that checks it, must agree on these.
ROW_KEYS = tuple(k for k in FEATURE_KEYS if k not in ("dtype", "views"))


# A cache made before the decoder was recorded was decoded by Pillow.
_PIL = {"name": "pil", "library": "Pillow", "draft": False}


def decoders(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The decoders whose rows a cache holds, each {name, library, draft}: one, unless rows
    were added with --mix-decoders. Not a FEATURE_KEY: extract checks it row-wise (refusing
    to mix decoders unasked), and caches of different decoders may still be compared."""
    found = manifest.get("decoders")
    return [d for d in found if isinstance(d, dict)] if isinstance(found, list) else [_PIL]


def decoder_key(decoder: dict[str, Any]) -> tuple:
    """What makes two decoders' pixels differ: the decoder and whether it drafts."""
    return decoder.get("name"), bool(decoder.get("draft"))


def decoder_text(decoder: dict[str, Any]) -> str:
    """E.g. "gpu (torchvision 0.29.1 (nvJPEG))", "cpu (..., draft)"."""
    draft = ", draft" if decoder.get("draft") else ""
    return f"{decoder.get('name')} ({decoder.get('library')}{draft})"


def cuts(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The cuts a cache holds, each {name, layer, layer_alias, pool, feature_dim}; a one-cut
    manifest's cut is named by its alias (fc7, penultimate) or else its layer."""
    return [c.to_json() for c in Cut.all(manifest)]


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


def loads(text: str | bytes, path: Any = None) -> dict[str, Any]:
    """Parse a stored manifest (of the cache at `path`, named in the error if it is not a JSON
    object). `validate()` checks its fields."""
    return Fields(path if path is not None else "cache", "cache manifest", REEXTRACT).load(text)


def validate(manifest: Any, path: Any, preprocessing: tuple = ("crop_size",)) -> dict[str, Any]:
    """`manifest` if it holds every field a reader relies on, with the right type; else a
    UserError naming `path`, the field and the fix. Both forms: one cut (layer, feature_dim at
    the top) and several (a `cuts` list of them). Of the preprocessing settings, those named in
    `preprocessing` must be there (readers of features need only the crop size; `FOR_DISPLAY`
    for showing them all)."""
    f = Fields(path, "cache manifest", REEXTRACT)
    if not isinstance(manifest, dict):
        f.fail("the manifest", "a JSON object", manifest)
    for key in ("backbone", "weights", "weights_sha256", "precision", "dtype"):
        f.need(manifest, key, NAME)
    f.need(manifest, "class_names", STRINGS)
    # Extract records all six preprocessing settings; readers of features use only the crop
    # size (the others travel on to the heads, where they are checked in full).
    check_preprocessing(f, f.need(manifest, "preprocessing", OBJECT), "preprocessing.",
                        required=preprocessing, strict=False)
    for key in ("source_root", "source_kind"):
        f.may(manifest, key, optional(STRING))
    for key in ("config", "versions"):
        f.may(manifest, key, optional(OBJECT))
    views = f.may(manifest, "views", optional(OBJECT))
    if views is not None:
        f.need(views, "count", VIEW_COUNT, "views.")
        f.need(views, "spec", NAME, "views.")
        f.need(views, "seed", INTEGER, "views.")
    if manifest.get(RECORD_KEY) is not None:
        Weights.from_json(manifest[RECORD_KEY], path)
    if manifest.get("cuts") is None:
        _check_cut(f, manifest, "")
        return manifest
    listed = f.need(manifest, "cuts", Check(
        lambda v: isinstance(v, list) and bool(v) and all(isinstance(c, dict) for c in v),
        "a non-empty list of objects"))
    for i, cut in enumerate(listed):
        f.need(cut, "name", NAME, f"cuts[{i}].")
        _check_cut(f, cut, f"cuts[{i}].")
    names = [c["name"] for c in listed]
    if len(set(names)) != len(names):
        f.fail("cuts", "a list of cuts with distinct names", names)
    return manifest


def _check_cut(f: "Fields", cut: dict, where: str) -> None:
    f.need(cut, "layer", NAME, where)
    f.need(cut, "feature_dim", POSITIVE, where)
    f.may(cut, "layer_alias", optional(STRING), where)
    f.may(cut, "pool", optional(STRING), where)


def check_widths(manifest: dict[str, Any], shapes: dict[str, tuple], path: Any) -> None:
    """Every features dataset (`shapes`: key -> its shape, keys as `feature_datasets` names
    them) must be (N, D) with the D its manifest gives, else a UserError naming `path`: a cut
    or a manifest edited after extraction would otherwise train or match a head of the wrong
    width."""
    for key, dim in feature_datasets(manifest):
        shape = tuple(shapes[key])
        if len(shape) != 2 or shape[1] != dim:
            raise UserError(f"{path} is damaged: its features {key} have shape {shape} where its "
                            f"manifest says (N, {dim}): {REEXTRACT}")


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


# ------------------------------------------------------------------ checking stored JSON files

PREPROCESSING_KEYS = ("resize_size", "crop_size", "mean", "std", "interpolation", "antialias")
# torchvision's InterpolationMode values (the cache layer does not import torchvision).
INTERPOLATIONS = ("nearest", "nearest-exact", "bilinear", "bicubic", "box", "hamming", "lanczos")
_MISSING = object()


class Check(NamedTuple):
    """What a field must be: a test and the words for it ("a list of strings")."""
    ok: Callable[[Any], bool]
    text: str


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    """A JSON number (NaN and infinities included: Python's json writes them)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def optional(check: Check) -> Check:
    return Check(lambda v: v is None or check.ok(v), f"{check.text} or null")


def one_of(*values) -> Check:
    return Check(lambda v: isinstance(v, (str, int, float)) and v in values,
                 "one of " + ", ".join(map(str, values)))


STRING = Check(lambda v: isinstance(v, str), "a string")
NAME = Check(lambda v: isinstance(v, str) and bool(v), "a non-empty string")
BOOL = Check(lambda v: isinstance(v, bool), "true or false")
POSITIVE = Check(lambda v: _is_int(v) and v >= 1, "a positive integer")
INTEGER = Check(_is_int, "an integer")
VIEW_COUNT = Check(lambda v: _is_int(v) and 2 <= v <= MAX_VIEWS,
                   f"an integer from 2 to {MAX_VIEWS}")
COUNT = Check(lambda v: _is_int(v) and v >= 0, "an integer >= 0")
NUMBER = Check(is_number, "a number")
OBJECT = Check(lambda v: isinstance(v, dict), "an object")
LIST = Check(lambda v: isinstance(v, list), "a list")
STRINGS = Check(lambda v: isinstance(v, list) and all(isinstance(s, str) for s in v),
                "a list of strings")
_RGB = Check(lambda v: isinstance(v, list) and len(v) == 3
             and all(is_number(x) and math.isfinite(x) for x in v), "a list of 3 finite numbers")
_RGB_SCALE = Check(lambda v: _RGB.ok(v) and all(x > 0 for x in v),
                   "a list of 3 positive finite numbers")


class Fields:
    """Checks the fields of one stored JSON file of a known kind. The first wrong one raises
    UserError "<file>: damaged <kind>: <field> must be <what> (<got>): <fix>", so every reader
    can index what it checked without a KeyError or TypeError further on."""

    def __init__(self, path: Any, kind: str, fix: str):
        self.path, self.kind, self.fix = path, kind, fix

    def fail(self, field: str, must: str, value: Any = _MISSING) -> NoReturn:
        got = "it is missing" if value is _MISSING else f"got {_short(value)}"
        raise UserError(f"{self.path}: damaged {self.kind}: {field} must be {must} ({got}): "
                        f"{self.fix}")

    def load(self, text: str | bytes) -> dict[str, Any]:
        """Parse JSON text that must hold an object."""
        try:
            if isinstance(text, (bytes, bytearray)):
                text = bytes(text).decode("utf-8")
            data = json.loads(text)
        except (TypeError, ValueError) as e:   # JSONDecodeError, UnicodeDecodeError, not text
            raise UserError(f"{self.path}: damaged {self.kind}: not valid JSON ({e}): "
                            f"{self.fix}") from None
        if not isinstance(data, dict):
            self.fail("the file", "a JSON object", data)
        return data

    def need(self, obj: dict, key: str, check: Check, where: str = "") -> Any:
        """obj[key], which must be there and pass `check`."""
        if key not in obj:
            self.fail(where + key, check.text)
        return self.may(obj, key, check, where)

    def may(self, obj: dict, key: str, check: Check, where: str = "") -> Any:
        """obj[key] if it is there (it must then pass `check`), else None."""
        value = obj.get(key)
        if key in obj and not check.ok(value):
            self.fail(where + key, check.text, value)
        return value


FOR_MODELS = ("resize_size", "crop_size", "mean", "std")   # what rebuilding the transform needs
FOR_DISPLAY = (*FOR_MODELS, "interpolation")              # what `pipeline inspect` shows


def check_preprocessing(f: Fields, value: dict, where: str, required: tuple = FOR_MODELS,
                        strict: bool = True) -> dict:
    """The preprocessing settings `value` (a dict): the `required` keys must be there, every
    key there must have its type, and with `strict` no other key may be there (rebuilding the
    transform takes exactly these)."""
    checks = {"resize_size": POSITIVE, "crop_size": POSITIVE, "mean": _RGB, "std": _RGB_SCALE,
              "interpolation": one_of(*INTERPOLATIONS), "antialias": BOOL}
    for key, check in checks.items():
        (f.need if key in required else f.may)(value, key, check, where)
    unknown = sorted(set(value) - set(PREPROCESSING_KEYS))
    if strict and unknown:
        f.fail(where + unknown[0], "absent: it is not a preprocessing setting",
               value[unknown[0]])
    return value
