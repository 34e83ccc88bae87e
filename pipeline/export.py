"""`export()`: stitch a trained head onto the frozen backbone that made its features, as one model.

    from pipeline.config import ExportConfig
    from pipeline.export import export, load_model
    summary = export("runs/linear-adamw-.../", "model.pt2", ExportConfig(format="pt2"))
    model = load_model("model.pt2")
    logits = model.run(images)          # (N, 3, S, S) float in [0, 1]  ->  (N, C)

The backbone is rebuilt from the cache manifest the head records (same weights: the SHA-256 of
its state_dict must equal the manifest's), cut at the same layer, with the normalisation inside.
The model takes a float RGB batch in [0, 1] at the manifest's crop size, N dynamic, and returns
logits. Its metadata (class names, preprocessing, backbone, head) travels with it:

    pt2          torch.export archive, metadata in extra file `pipeline.json` (loading unpickles
                 code: treat the file as code)
    onnx         ONNX, dynamic batch, metadata in `metadata_props["pipeline"]`
    torchvision  a plain state_dict for torchvision.models.<vgg>(num_classes=C) (fc7 cut and a
                 linear head only: the tutorial's fine-tuned model) plus a MODEL.json sidecar;
                 that model expects *normalised* input (mean/std in the sidecar)

Before the file gets its name, the written model is loaded back and run on images the cache holds;
its logits must equal the head's on the cached features within the rounding of the cache (parity).
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.transforms import functional as TF

from cache import manifest as mf
from cache.errors import UserError
from cache.records import Cut, Weights
from cache import CacheReader, fsync_path

from . import _parity as parity
from ._files import check_output_file
from ._writers import write
from ._version import __version__
from .backbone import (LAYER_ALIASES, FrozenBackbone, build_backbone, builder_kwargs, final_layer,
                       is_timm, warn_random_init)
from .config import FORMATS, LINEAR_LAYER, ExportConfig, validate
from .head_file import load_head, open_head_cache
from .models import MODEL_FORMAT, SUFFIXES, LoadedModel, load_model
from .preprocessing import ImageInput, Preprocessing

log = logging.getLogger(__name__)



@dataclass
class ExportSummary:
    """What `export()` wrote; `parity` is None when the check was skipped."""
    path: str
    files: list            # every file written (the torchvision format adds MODEL.json)
    format: str
    size_bytes: int
    class_names: list
    input_size: int
    parity: dict | None    # images, max_abs_diff, tolerance
    seconds: float
    meta: dict

    def line(self) -> str:
        b = self.meta["backbone"]
        h = self.meta["head"]
        rows = (f" (embeds its {h['bank_rows']} training rows)" if "bank_rows" in h else "")
        text = (f"{self.path}: {self.format}, {self.size_bytes / 2**20:.1f} MiB, {b['backbone']} "
                f"{Cut.from_json(b).display_name} + {h['kind']} head{rows}, "
                f"{len(self.class_names)} classes, input " + (
                    f"(N, 3, {self.input_size}, {self.input_size}) float in [0, 1]"
                    if self.meta["input"]["kind"] == "tensor" else
                    "(N, 3, H, W) uint8 pixels of any size"))
        if self.parity is None:
            return text + "; parity check SKIPPED"
        p = self.parity
        return (text + f"; parity on {p['images']} cached images: max |logit diff| "
                f"{p['max_abs_diff']:.2e} <= tolerance {p['tolerance']:.2e}")


def export(head_path: str | Path, output: str | Path, config: ExportConfig = ExportConfig()
           ) -> ExportSummary:
    """Write the head at `head_path` (a run folder, its head.pt or head.json) stitched onto its
    backbone as one model file `output`, after checking it reproduces the head on cached images.

    Raises UserError for user mistakes: unknown or corrupt head, weights other than the cache's,
    a format this head cannot take, no reachable cached images, a failed parity check.
    """
    t0 = time.perf_counter()
    given, output = str(output), Path(output)
    _check_request(config, output, given)
    head, meta = _load_head(head_path)
    _check_format_fits(config.format, meta)
    reader = _open_cache(config, meta) if config.parity_check else None
    try:
        # The images first: a cheap refusal before the expensive rebuild and write.
        pre = Preprocessing.from_dict(meta["cache"]["preprocessing"])
        probe = (None if reader is None else parity.pick_images(
            reader, TF.pil_to_tensor if config.input == "image" else pre, config.images_root,
            config.parity_images))
        backbone, info = _rebuild_backbone(meta, config.weights)
        model_meta = _model_meta(config, meta, info)
        model = _Stitched(backbone, head, ImageInput(pre) if config.input == "image" else None)
        # Written and checked in a temporary folder beside the output (the same filesystem,
        # so the renames are atomic): a failure leaves any previous model file as it was.
        tmp_dir = output.parent / f".{output.name}.exporting"
        try:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            tmp_dir.mkdir()
            _check_space(model, tmp_dir, output)
            files = write(config.format, model, model_meta, tmp_dir / output.name)
            checked = None
            if probe is not None:
                checked = parity.check(load_model(tmp_dir / output.name), head, reader, *probe)
            final = [output.parent / f.name for f in files]
            for f in files:
                fsync_path(f)     # a full disk can surface only when the data reaches the disk
            for f, dest in zip(files, final):
                os.replace(f, dest)
        except OSError as e:   # ENOSPC, EIO, EACCES, EROFS while writing
            raise UserError(f"cannot write {output}: {e.strerror or e}: free some space or "
                            f"choose another -o ({output.name} is as it was)") from None
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    finally:
        if reader is not None:
            reader.close()
    return ExportSummary(str(output), [str(f) for f in final], config.format,
                         sum(f.stat().st_size for f in final), model_meta["class_names"],
                         info["preprocessing"]["crop_size"], checked, time.perf_counter() - t0,
                         model_meta)


class _Stitched(nn.Module):
    """(N, 3, S, S) float in [0, 1] -> (N, C) logits: normalise, frozen trunk, flatten, head.
    With `image_input`, it takes (N, 3, H, W) uint8 pixels and resizes and crops them first."""

    def __init__(self, backbone: FrozenBackbone, head: nn.Module,
                 image_input: ImageInput | None = None):
        super().__init__()
        self.backbone, self.head = backbone, head.requires_grad_(False)
        self.image_input = image_input
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.image_input is not None:
            x = self.image_input(x)                                   # (N, 3, S, S) in [0, 1]
        return self.head(self.backbone(x))


# ---------------------------------------------------------------------------------------------
# checks before any heavy work

def _check_request(config: ExportConfig, output: Path, given: str) -> None:
    """Refuse bad settings and an output that cannot be written, before any heavy work.
    `given` is the output as the user wrote it (a Path drops a trailing slash)."""
    validate(config)
    suffixes = SUFFIXES[config.format]
    if not given.strip():
        raise UserError(f"the output file name is empty: give one, such as "
                        f"model{suffixes[0]}")
    if given.endswith(("/", os.sep)) or output.is_dir():
        raise UserError(f"-o {given} is a folder: give a file name in it, such as "
                         f"{output / ('model' + suffixes[0])}")
    if output.suffix.lower() not in suffixes:
        raise UserError(f"-o {output}: a {config.format} model file ends in "
                         f"{' or '.join(suffixes)}; name it {output.with_suffix(suffixes[0])} "
                         f"or pick the format that matches")
    check_output_file(output)
    if config.input == "image" and config.format == "torchvision":
        raise UserError("--input image needs --format pt2 or onnx: the torchvision format is a "
                        "plain state_dict of the torchvision model, which takes normalised tensors")
    if config.format == "onnx":
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError as e:
            raise UserError(f"--format onnx needs the onnx extra ({e.name} is missing): "
                             "pip install 'frozen-feature-pipeline[onnx]'") from None


def _load_head(path: str | Path) -> tuple[nn.Module, dict]:
    """`head_file.load_head` (which checks head.json and head.pt), plus what export needs of it."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"no head at {path}: pass a run folder written by `pipeline train-head` "
                         "or its head.pt/head.json")
    if path.is_file() and path.name not in ("head.pt", "head.json"):
        raise UserError(f"{path} is not a head file: pass a run folder written by "
                         "`pipeline train-head` or its head.pt/head.json")
    head, meta = load_head(path)
    if meta.get("cache") is None:
        raise UserError(f"head {path} does not record the cache it was trained on: "
                         "retrain it with `pipeline train-head`")
    return head, meta


def _check_format_fits(fmt: str, meta: dict) -> None:
    if fmt != "torchvision":
        return
    cut = Cut.from_json(meta["cache"]).display_name
    if is_timm(meta["cache"]["backbone"]) or meta["kind"] not in LINEAR_LAYER:
        raise UserError(f"--format torchvision is a torchvision model with its last layer "
                        f"replaced: it needs a torchvision backbone cut at penultimate (VGG: fc7) "
                        f"and a linear (or logreg, ridge, lda) head, this is a {meta['kind']} head on "
                        f"{meta['cache']['backbone']} {cut}: use --format pt2 or onnx")
    backbone = meta["cache"]["backbone"]
    # A VGG's penultimate cut is known without building it; other backbones are checked when
    # the state_dict is loaded into the torchvision model (`_writers._write_torchvision`).
    if backbone.startswith("vgg") and meta["cache"]["layer"] != LAYER_ALIASES["fc7"]:
        raise UserError(f"--format torchvision is {backbone} with its last layer replaced: it "
                        f"needs the head on fc7 (the penultimate cut), this is a {meta['kind']} "
                        f"head on {cut}: use --format pt2 or onnx, or extract with --layer "
                        "penultimate")


def _open_cache(config: ExportConfig, meta: dict) -> CacheReader:
    """The cache whose images and features drive the parity check (same features as the head's)."""
    path = Path(config.cache or meta["cache"].get("path") or "")
    if not path.is_file():
        raise UserError(f"the parity check needs the cache the head was trained on, and "
                         f"{str(path) or 'none'} is not there: pass --cache PATH, or "
                         "--no-parity-check to export without the check")
    reader, diff = open_head_cache(meta, path)
    if diff:
        reader.close()
        raise UserError(f"cache {path} holds other features than the head was trained on "
                         f"({'; '.join(diff)}): pass --cache with a cache of the same features")
    return reader


def _weights_arg(recorded: Weights, given: str | None) -> str:
    """The --weights value that rebuilds the recorded weights: `given`, else the recorded
    name, or the local file at its recorded path while it is still there."""
    if given:
        return given
    arg = recorded.argument()
    if recorded.kind == "file" and (arg is None or not Path(arg).is_file()):
        where = f"from {arg}, which is no longer there" if arg else (
            f"{recorded.name} (its path was not recorded)")
        raise UserError(f"the cache was extracted with the local weights file {where}: "
                        "pass it with --weights PATH")
    return arg


def _rebuild_backbone(meta: dict, weights: str | None) -> tuple[FrozenBackbone, dict]:
    """The frozen backbone of the head's cache, proven to be the same by its weights' SHA-256."""
    m = meta["cache"]
    recorded = Weights.from_manifest(m, "the head's cache record")
    arg = _weights_arg(recorded, weights)
    if arg.lower() == "none":
        warn_random_init(log, m["backbone"], "the cache was made with", "none", "so is the model")
    backbone, info = build_backbone(m["backbone"], arg, m["layer"],
                                    image_size=m["preprocessing"]["crop_size"],
                                    pool=m.get("pool") or "flatten")
    if info["weights_sha256"] != m["weights_sha256"] and not weights and recorded.kind == "file":
        raise UserError(f"the local weights file {arg} has changed since the cache was "
                        f"extracted with it (state_dict sha256 {info['weights_sha256'][:12]}, "
                        f"recorded {m['weights_sha256'][:12]}): pass the original with "
                        "--weights PATH")
    if info["weights_sha256"] != m["weights_sha256"]:
        raise UserError(f"weights {info['weights']} (state_dict sha256 "
                         f"{info['weights_sha256'][:12]}) are not the weights the cache was "
                         f"extracted with ({m['weights']}, sha256 {m['weights_sha256'][:12]}): "
                         "pass those with --weights, or re-extract and retrain with these")
    if info["preprocessing"] != m["preprocessing"] or info["feature_dim"] != m["feature_dim"]:
        diff = mf.differences(m, info, ("preprocessing", "feature_dim"))
        raise UserError(f"the rebuilt backbone differs from the cache's ({'; '.join(diff)}): "
                         "export with the torchvision version that extracted the cache")
    return backbone, {**info, "layer_alias": m.get("layer_alias")}


# ---------------------------------------------------------------------------------------------
# writing

def _model_meta(config: ExportConfig, meta: dict, info: dict) -> dict:
    """Everything a user of the model file needs, as plain JSON."""
    fmt, c = config.format, int(meta["n_classes"])
    names = list(meta.get("class_names") or []) or [str(i) for i in range(c)]
    s = info["preprocessing"]["crop_size"]
    out = {
        "format": MODEL_FORMAT,
        "model_format": fmt,
        "class_names": names,
        "input": ({"kind": "tensor", "shape": ["N", 3, s, s], "dtype": "float32",
                   "range": [0.0, 1.0], "channels": "RGB",
                   "normalized_inside": fmt != "torchvision"}
                  if config.input == "tensor" else
                  {"kind": "image", "shape": ["N", 3, "H", "W"], "dtype": "uint8",
                   "range": [0, 255], "channels": "RGB", "resized_inside": True,
                   "normalized_inside": True}),
        "output": "logits (N, C); softmax over C gives class probabilities",
        "preprocessing": info["preprocessing"],
        "backbone": {k: info[k] for k in ("backbone", "weights", "weights_sha256", "layer",
                                          "layer_alias", "feature_dim")},
        "cache": {k: meta["cache"].get(k) for k in ("path", "fingerprint", "precision", "dtype")},
        "head": {**{k: meta.get(k) for k in ("run_id", "kind", "in_dim", "n_classes", "hidden",
                                             "activation", "hyperparameters")},
                 **{k: meta[k] for k in ("k", "temperature", "bank_rows") if k in meta}},
        "versions": {"pipeline": __version__, "torch": torch.__version__,
                     "torchvision": torchvision.__version__},
    }
    if fmt == "torchvision":
        kwargs = builder_kwargs(info["backbone"], s)
        args = "".join(f", {k}={v!r}" for k, v in kwargs.items())
        out["torchvision"] = {"model": info["backbone"], "num_classes": c, "kwargs": kwargs,
                              "final_layer": final_layer(info["backbone"], s),
                              "usage": f"m = torchvision.models.get_model({info['backbone']!r}, "
                                       f"num_classes={c}{args}); m.load_state_dict(torch.load("
                                       "FILE, weights_only=True)); m.eval(); "
                                       "logits = m(normalize(x, mean, std))"}
    return out


# torch.export.save aborts the whole process (a C++ abort, exit 134) when the disk fills up
# under it, which no Python handler can turn into a message: so the free space is checked
# before any format is written, in the temporary folder beside the output where the file is
# written (the same filesystem as the output, so the space checked is the space used). Each
# format holds every parameter and buffer once (the .pt2 archive stores them uncompressed, ONNX
# as initializers, torchvision as a state_dict), plus the graph and metadata: the tensors' bytes
# with a relative and an absolute margin.
_SPACE_MARGIN = (1.05, 16 * 2**20)


def _check_space(model: nn.Module, folder: Path, output: Path) -> None:
    tensors = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    need = int(tensors * _SPACE_MARGIN[0]) + _SPACE_MARGIN[1]
    free = shutil.disk_usage(folder).free
    if free < need:
        raise UserError(f"not enough free space to write {output}: about {need / 2**20:.0f} MiB "
                        f"needed, {free / 2**20:.0f} MiB free in {output.parent}: free some "
                        f"space or choose another -o ({output.name} is as it was)")


__all__ = ["FORMATS", "MODEL_FORMAT", "ExportSummary", "LoadedModel", "export", "load_model"]
