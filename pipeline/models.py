"""Load a model written by `pipeline export`, whichever its format: `load_model(path).run(x)`.

Shared by export (its parity check loads the written file back) and predict.
"""
from __future__ import annotations

import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torchvision
from torchvision.transforms import functional as TF

from cache import manifest as mf
from cache.errors import UserError, first_line
from cache.manifest import NAME, OBJECT, POSITIVE, STRING, STRINGS, Check, Fields, one_of, optional

from .preprocessing import Preprocessing

MODEL_FORMAT = "pipeline-model/1"
SUFFIXES = {"pt2": (".pt2",), "onnx": (".onnx",), "torchvision": (".pth", ".pt")}   # by format
META_NAME = "pipeline.json"          # pt2 extra file / ONNX metadata_props key (as "pipeline")
REEXPORT = "export the model again with `pipeline export RUN -o MODEL`"



@dataclass
class LoadedModel:
    """An exported model: `run(x)` maps (N, 3, S, S) float32 in [0, 1] (or, for a model exported
    with `--input image`, (N, 3, H, W) uint8 pixels) to (N, C) float32 logits on the CPU,
    whatever device the model runs on."""
    path: Path
    format: str
    meta: dict
    run: Callable[[torch.Tensor], torch.Tensor]

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    @property
    def input_kind(self) -> str:
        """tensor: (N, 3, S, S) float in [0, 1]; image: (N, 3, H, W) uint8 of any size."""
        return (self.meta.get("input") or {}).get("kind", "tensor")

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing.from_dict(self.meta["preprocessing"])


def load_model(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a model written by `export()`, whichever its format, to run on `device`.

    pt2 archives are loaded with torch.export.load, which unpickles code: load only files you
    trust. ONNX and the torchvision state_dict (weights_only=True) do not. ONNX models run on
    onnxruntime's CPU provider whatever `device` says.
    """
    device = torch.device(device)
    path = Path(path)
    if path.suffix.lower() == ".json" and path.is_file():   # the torchvision sidecar itself
        meta = _read_json(path)
        path = path.with_name(meta.get("weights_file") or path.stem + ".pth")
    if not path.is_file():
        raise UserError(f"no model at {path}: pass a file written by `pipeline export`")
    sidecar = path.with_suffix(".json")
    if path.suffix.lower() in SUFFIXES["torchvision"]:
        if not sidecar.is_file():
            raise UserError(f"{path} has no {sidecar.name} next to it: a torchvision-format "
                             "model needs the sidecar `pipeline export` wrote with it")
        return _load_torchvision(path, _read_json(sidecar), device)
    if zipfile.is_zipfile(path):
        return _load_pt2(path, device)
    return _load_onnx(path)


def _read_json(path: Path) -> dict:
    """The torchvision sidecar at `path`, checked (`check_meta`)."""
    try:
        text = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    return check_meta(text, path, sidecar=True)


def check_meta(text: str | bytes, where: Path, sidecar: bool = False) -> dict:
    """The model metadata `pipeline export` wrote (the pt2 extra file, the ONNX property or the
    torchvision sidecar), parsed and checked: every field a reader relies on is there with its
    type, else one UserError naming the file, the field and the fix."""
    f = Fields(where, "model metadata", REEXPORT)
    meta = f.load(text)
    if meta.get("format") != MODEL_FORMAT:
        raise UserError(f"{where} is not a model written by `pipeline export` (format "
                         f"{meta.get('format')!r}, expected {MODEL_FORMAT!r}): {REEXPORT}")
    names = f.need(meta, "class_names", Check(lambda v: STRINGS.ok(v) and bool(v),
                                              "a non-empty list of strings"))
    f.may(meta, "model_format", optional(STRING))
    mf.check_preprocessing(f, f.need(meta, "preprocessing", OBJECT), "preprocessing.")
    inputs = f.may(meta, "input", optional(OBJECT))
    if inputs is not None:
        f.need(inputs, "kind", one_of("tensor", "image"), "input.")
    for key in ("backbone", "cache", "head", "versions"):
        f.may(meta, key, optional(OBJECT))
    if sidecar:
        # The weights file lies beside the sidecar: a bare file name, never a path elsewhere.
        f.need(meta, "weights_file", Check(
            lambda v: NAME.ok(v) and Path(v).name == v and v not in (".", ".."),
            "a file name (no folder)"))
        tv = f.need(meta, "torchvision", OBJECT)
        f.need(tv, "model", NAME, "torchvision.")
        f.need(tv, "num_classes", Check(lambda v: POSITIVE.ok(v) and v == len(names),
                                        f"the number of class_names ({len(names)})"),
               "torchvision.")
        f.may(tv, "kwargs", optional(OBJECT), "torchvision.")
    return meta


def _load_pt2(path: Path, device: torch.device) -> LoadedModel:
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    if not any(n.endswith("/archive_format") for n in names):
        raise UserError(f"{path} is a zip file but not a .pt2 archive written by "
                         "`pipeline export`")
    if not any(n.endswith(f"/extra/{META_NAME}") for n in names):
        raise UserError(f"{path} is a .pt2 archive without {META_NAME}: it was not written by "
                         "`pipeline export`; export the model again")
    if path.suffix.lower() != ".pt2":
        raise UserError(f"{path} is a .pt2 archive: rename it to {path.with_suffix('.pt2').name} "
                         "(torch.export.load reads only .pt2 files)")
    extra = {META_NAME: ""}
    with warnings.catch_warnings():
        # Older torch (2.11) warns about its own read-only buffer while loading the weights:
        # harmless, and an error where warnings are errors (the test suite).
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        program = torch.export.load(path, extra_files=extra)
    meta = check_meta(extra[META_NAME], path)
    if device.type != "cpu":
        from torch.export.passes import move_to_device_pass
        program = move_to_device_pass(program, device)
    module = program.module()

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return module(x.to(device)).cpu()
    return LoadedModel(path, "pt2", meta, run)


def _load_onnx(path: Path) -> LoadedModel:
    with open(path, "rb") as f:
        if f.read(1) != b"\x08":   # an ONNX ModelProto opens with field 1, ir_version (varint)
            raise UserError(f"{path} is not a model written by `pipeline export` (neither .pt2, "
                             "ONNX nor a torchvision state_dict with its sidecar)")
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError(f"{path} looks like an ONNX model, which needs onnxruntime: "
                         "pip install 'frozen-feature-pipeline[onnx]'") from None
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:   # onnxruntime raises its own exception types
        raise UserError(f"{path} is not a model written by `pipeline export` (neither .pt2, "
                         f"ONNX nor a torchvision state_dict with its sidecar): "
                         f"{first_line(e)}") from None
    text = session.get_modelmeta().custom_metadata_map.get("pipeline")
    if text is None:
        raise UserError(f"{path} is an ONNX model without pipeline metadata: it was not written "
                         "by `pipeline export`")
    meta = check_meta(text, path)
    name = session.get_inputs()[0].name

    pixels = (meta.get("input") or {}).get("kind") == "image"

    def run(x: torch.Tensor) -> torch.Tensor:
        x = x.detach().cpu().numpy()
        out = session.run(None, {name: x if pixels else x.astype(np.float32, copy=False)})
        return torch.from_numpy(out[0])
    return LoadedModel(path, "onnx", meta, run)


def _not_its_state_dict(path: Path, e: Exception) -> UserError:
    return UserError(f"{path} is not the state_dict its sidecar describes "
                     f"({first_line(e)}): "
                     "export the model again")


def _load_torchvision(path: Path, meta: dict, device: torch.device) -> LoadedModel:
    tv = meta["torchvision"]
    try:
        with torch.device("meta"):   # no random init only to overwrite it
            vgg = torchvision.models.get_model(tv["model"], num_classes=int(tv["num_classes"]),
                                               **(tv.get("kwargs") or {}))
    except (ValueError, TypeError) as e:   # an unknown model name, arguments it does not take
        raise UserError(f"{path.with_suffix('.json')}: damaged model metadata: torchvision "
                        f"cannot build {tv['model']!r} with {tv.get('kwargs') or {}} "
                        f"({first_line(e)}): "
                        f"{REEXPORT}") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # truncated zip, not a torch file, unpickling refused, ...
        raise _not_its_state_dict(path, e) from None
    try:
        vgg.load_state_dict(state, assign=True)
    except (RuntimeError, TypeError) as e:   # other tensors or shapes; not a dict
        raise _not_its_state_dict(path, e) from None
    vgg.eval().requires_grad_(False).to(device)
    pre = meta["preprocessing"]

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return vgg(TF.normalize(x.to(device), pre["mean"], pre["std"])).cpu()
    return LoadedModel(path, "torchvision", meta, run)
