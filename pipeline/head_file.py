"""The saved-head file format: run_dir/head.pt (a state_dict) beside run_dir/head.json (plain
JSON metadata), and the plain modules a head is rebuilt as, with no training code.

    module, meta = load_head("runs/linear-adamw-lr0.001-.../")      # nn.Linear / nn.Sequential

Linear and logreg heads are an `nn.Linear(D, C)` (the tutorial's replacement fc8), mlp heads an
`nn.Sequential(Linear, act, Linear, act, ..., Linear)` (dropout is a training-time setting).
Heads are written by `save_head` (`pipeline.heads` trains them) and read by export and the
report through `load_head` / `read_head_meta`, which check every field they rely on.
"""
from __future__ import annotations

import io
import json
import math
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from cache import CacheReader
from cache import manifest as mf
from cache.errors import UserError, first_line
from cache.records import RECORD_KEY, Weights
from cache.manifest import (COUNT, NAME, NUMBER, OBJECT, POSITIVE, STRING, STRINGS, Check, Fields,
                            one_of, optional)

from ._files import make_folder, write_file, write_text
from .config import ACTIVATIONS, HEADS, LINEAR_LAYER
from .knn_head import KNNHead

HEAD_FORMAT = "pipeline-head/1"
# Each of config.ACTIVATIONS -> its module in a saved mlp head.
_ACTIVATION = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


def build_head(meta: dict) -> nn.Module:
    """The plain module a saved head's state_dict loads into, from its JSON metadata."""
    kind, d, c = meta["kind"], int(meta["in_dim"]), int(meta["n_classes"])
    if kind in LINEAR_LAYER:
        return nn.Linear(d, c)
    if kind == "knn":
        return KNNHead(d, c, int(meta["bank_rows"]), int(meta["k"]), float(meta["temperature"]))
    if kind != "mlp":
        raise UserError(f"unknown head kind {kind!r} in head metadata: expected one of "
                        f"{', '.join(HEADS)}")
    act = _ACTIVATION[meta["activation"]]
    dims, layers = [d, *meta["hidden"], c], []
    for i, o in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(i, o), act()]
    return nn.Sequential(*layers[:-1])


RETRAIN = "retrain it with `pipeline train-head`, or pick another run"
WRITE_FIX = "free some space or write the runs to another -o folder"


def save_head(run_dir: str | Path, state: dict[str, torch.Tensor], meta: dict,
              shared: dict | None = None) -> Path:
    """Write run_dir/head.pt (state_dict) and run_dir/head.json (metadata, plain JSON), each
    under a temporary name first: a full disk leaves the previous files, never a torn one.

    Tensors are stored as float32, except float16 and integer ones (a k-NN head's training
    rows and labels), kept as they are. `shared`: one dict passed by runs whose state is the
    same (the k-NN runs of a sweep): the first writes head.pt, the others hard-link it (copy
    it where the filesystem has no hard links), so the bytes are on disk once."""
    run_dir = make_folder(run_dir, "run folder", WRITE_FIX)
    first = (shared or {}).get("head.pt")
    if first is not None and first.is_file():
        write_file(run_dir / "head.pt", lambda tmp: _link(first, tmp), WRITE_FIX)
    else:
        tensors = {k: v.detach().contiguous() if v.dtype in _KEPT_DTYPES
                   else v.detach().to(torch.float32).contiguous() for k, v in state.items()}
        # Serialized in memory, then written by Python: torch.save reports a full disk as a
        # RuntimeError ("unexpected pos ..."), which would read as a bug.
        buf = io.BytesIO()
        torch.save(tensors, buf)
        write_file(run_dir / "head.pt", lambda tmp: tmp.write_bytes(buf.getbuffer()), WRITE_FIX)
        if shared is not None:
            shared["head.pt"] = run_dir / "head.pt"
    write_text(run_dir / "head.json", json.dumps({"format": HEAD_FORMAT, **meta}, indent=2),
               WRITE_FIX)
    return run_dir


_KEPT_DTYPES = (torch.float16, torch.int64)


def _link(source: Path, dest: Path) -> None:
    try:
        os.link(source, dest)
    except OSError:
        shutil.copyfile(source, dest)


def read_head_meta(path: str | Path) -> dict:
    """The metadata in head.json at `path`, checked: every field a reader of heads relies on is
    there with its type, else one UserError naming the file, the field and the fix."""
    path = Path(path)
    f = Fields(path, "head metadata", RETRAIN)
    try:
        text = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    return check_head_meta(f.load(text), f)


def check_head_meta(meta: dict, f: Fields) -> dict:
    """The checks of `read_head_meta` on parsed metadata (`f` names the file)."""
    if meta.get("format") != HEAD_FORMAT:
        raise UserError(f"{f.path} has head format {meta.get('format')!r}, this tool reads "
                        f"{HEAD_FORMAT!r}: retrain the head")
    kind = f.need(meta, "kind", one_of(*HEADS))
    in_dim = f.need(meta, "in_dim", POSITIVE)
    n_classes = f.need(meta, "n_classes", POSITIVE)
    sizes = Check(lambda v: isinstance(v, list) and all(POSITIVE.ok(h) for h in v),
                  "a list of positive integers")
    if kind == "mlp":
        f.need(meta, "hidden", Check(lambda v: sizes.ok(v) and bool(v),
                                     "a non-empty list of positive integers"))
        f.need(meta, "activation", one_of(*ACTIVATIONS))
    else:
        f.may(meta, "hidden", optional(sizes))
        f.may(meta, "activation", optional(STRING))
    if kind == "knn":
        rows = f.need(meta, "bank_rows", POSITIVE)
        f.need(meta, "k", Check(lambda v: POSITIVE.ok(v) and v <= rows,
                                f"a positive integer <= bank_rows ({rows})"))
        f.need(meta, "temperature", Check(lambda v: NUMBER.ok(v) and math.isfinite(v) and v > 0,
                                          "a finite number > 0"))
    f.may(meta, "class_names", optional(Check(
        lambda v: STRINGS.ok(v) and len(v) == n_classes,
        f"a list of n_classes ({n_classes}) strings")))
    for key in ("run_id", "input"):
        f.may(meta, key, optional(STRING))
    for key in ("hyperparameters", "config", "standardization", "versions"):
        f.may(meta, key, optional(OBJECT))
    for key in ("best_epoch", "weights_epoch"):
        f.may(meta, key, optional(COUNT))
    cache = f.may(meta, "cache", optional(OBJECT))
    if cache is not None:
        for key in ("backbone", "weights", "weights_sha256", "layer", "precision", "dtype"):
            f.need(cache, key, NAME, "cache.")
        for key in ("layer_alias", "pool", "path", "fingerprint"):
            f.may(cache, key, optional(STRING), "cache.")
        if cache.get(RECORD_KEY) is not None:
            Weights.from_json(cache[RECORD_KEY], f"{f.path}: cache.{RECORD_KEY}", RETRAIN)
        f.need(cache, "feature_dim", Check(lambda v: v == in_dim,
                                           f"in_dim ({in_dim}), the width the head takes"),
               "cache.")
        mf.check_preprocessing(f, f.need(cache, "preprocessing", OBJECT, "cache."),
                               "cache.preprocessing.")
    data = f.may(meta, "data", optional(OBJECT))
    if data is not None:
        for key in ("train_rows", "val_rows"):
            f.may(data, key, optional(COUNT), "data.")
        val = data.get("val")
        # Only the kinds this version writes are checked; others are said, not guessed, by
        # the report (which cannot tell where such validation rows came from).
        if isinstance(val, dict) and val.get("kind") == "hash_split":
            f.need(val, "fraction", Check(lambda v: NUMBER.ok(v) and 0 < v < 1,
                                          "a number in (0, 1)"), "data.val.")
        elif isinstance(val, dict) and val.get("kind") == "cache":
            f.need(val, "path", NAME, "data.val.")
    return meta


def load_head(path: str | Path) -> tuple[nn.Module, dict]:
    """(module in eval mode, metadata) of a saved head: a run folder, its head.pt or head.json.

    The weights are read with torch.load(weights_only=True): no code is unpickled. A damaged
    head.json or head.pt is one UserError naming the file.
    """
    path = Path(path)
    run_dir = path if path.is_dir() else path.parent
    meta_path, weights_path = run_dir / "head.json", run_dir / "head.pt"
    if not meta_path.is_file() or not weights_path.is_file():
        raise UserError(f"{path} is not a trained head: expected head.json and head.pt in "
                         f"{run_dir} (a run folder written by `pipeline train-head`)")
    meta = read_head_meta(meta_path)
    module = build_head(meta)
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as e:   # truncated zip, not a torch file, unpickling refused, ...
        raise UserError(f"{weights_path}: damaged head weights ({_reason(e)}): "
                        f"{RETRAIN}") from None
    try:
        module.load_state_dict(state)
    except (RuntimeError, TypeError) as e:   # missing or unexpected tensors, other shapes,
        # values that are not tensors (RuntimeError), not a dict (TypeError)
        raise UserError(f"{weights_path}: damaged head weights: they do not fit the head "
                        f"{meta_path.name} describes ({_reason(e)}): {RETRAIN}") from None
    return module.eval(), meta


def open_head_cache(meta: dict, path: str | Path, allow_incomplete: bool = False,
                    classes: bool = False) -> tuple[CacheReader, list[str]]:
    """The cache at `path` opened at the head's cut, and what in it differs from the features
    the head was trained on (`meta["cache"]`): the fields that decide a plain-view row (a
    float16 or augmented cache of the same rows is fine), with `classes` the class names too.
    An empty list: it holds the head's features. The caller closes the reader."""
    reader = CacheReader(path, layer=meta["cache"]["layer"], allow_incomplete=allow_incomplete)
    keys = (*mf.ROW_KEYS, "class_names") if classes else mf.ROW_KEYS
    return reader, mf.differences({**meta["cache"], "class_names": meta.get("class_names")},
                                  reader.manifest, keys)


def _reason(e: Exception) -> str:
    line = first_line(e)
    return line if line == type(e).__name__ else f"{type(e).__name__}: {line}"


__all__ = ["HEAD_FORMAT", "RETRAIN", "WRITE_FIX", "build_head", "check_head_meta", "load_head",
           "open_head_cache", "read_head_meta", "save_head"]
