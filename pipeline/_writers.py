"""Export's writers, one per model format: `pt2` (torch.export archive, metadata as an extra
file), `onnx` (dynamo export, metadata in metadata_props) and `torchvision` (a plain state_dict
plus a MODEL.json sidecar).

    files = write("onnx", stitched, meta, Path("model.onnx"))   # [model.onnx]
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path
from typing import Callable

import torch
import torchvision
from torch import nn

from cache.errors import UserError, first_line
from cache.records import Cut

from .models import META_NAME


def _example(model: nn.Module, meta: dict) -> tuple[torch.Tensor, dict]:
    """An example input batch and its dynamic dimensions. A batch of 2 (torch.export specialises
    a batch of 1 to a constant); an image input of unequal sides, so neither is specialised."""
    s, g = meta["preprocessing"]["crop_size"], torch.Generator().manual_seed(0)
    batch = torch.export.Dim("batch", min=1)
    if model.image_input is None:
        return torch.rand(2, 3, s, s, generator=g), {0: batch}
    x = torch.randint(0, 256, (2, 3, s + 7, s + 3), generator=g, dtype=torch.uint8)
    return x, {0: batch, 2: torch.export.Dim("height", min=2, max=2**15),
               3: torch.export.Dim("width", min=2, max=2**15)}


def _write_pt2(model: nn.Module, meta: dict, path: Path) -> list[Path]:
    x, dims = _example(model, meta)
    program = torch.export.export(model, (x,), dynamic_shapes=(dims,))
    torch.export.save(program, path, extra_files={META_NAME: json.dumps(meta)})
    return [path]


def _write_onnx(model: nn.Module, meta: dict, path: Path) -> list[Path]:
    x, dims = _example(model, meta)
    with _quiet("onnxscript", "onnx_ir"):   # they log every optimisation pass at INFO
        program = torch.onnx.export(model, (x,), None, dynamo=True,
                                    verbose=False, dynamic_shapes=(dims,),
                                    input_names=["images"], output_names=["logits"])
    program.model.metadata_props["pipeline"] = json.dumps(meta)
    program.save(path, external_data=False)   # VGGs stay well under protobuf's 2 GB
    return [path]


def _write_torchvision(model: nn.Module, meta: dict, path: Path) -> list[Path]:
    """The state_dict of the torchvision model with its final Linear = the head. The cut's
    feature extractor keeps the model's own parameter names, so the backbone's tensors are
    the model's up to its last layer; a strict load into get_model(num_classes=C) proves that
    nothing is missing (which is the case unless the cut is the penultimate one)."""
    tv = meta["torchvision"]
    prefix = "trunk.extractor."
    state = {k[len(prefix):]: v for k, v in model.backbone.state_dict().items()
             if k.startswith(prefix)}
    state |= {f"{tv['final_layer']}.{k}": v for k, v in model.head.state_dict().items()}
    with torch.device("meta"):
        full = torchvision.models.get_model(tv["model"], num_classes=tv["num_classes"],
                                            **tv["kwargs"])
    try:
        full.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        cut = Cut.from_json(meta["backbone"]).display_name
        raise UserError(f"--format torchvision needs the penultimate cut of {tv['model']} (this "
                        f"head is on {cut}: {first_line(e, 160)}): use --format pt2 or "
                        "onnx, or extract with --layer penultimate") from None
    # Serialized in memory, then written by Python: torch.save reports a full disk as a
    # RuntimeError ("unexpected pos ..."), not as the OSError that export turns into one line.
    buf = io.BytesIO()
    torch.save({k: v.detach().contiguous() for k, v in state.items()}, buf)
    path.write_bytes(buf.getbuffer())
    del buf
    sidecar = path.with_suffix(".json")
    sidecar.write_text(json.dumps({**meta, "weights_file": path.name}, indent=2))
    return [path, sidecar]


@contextlib.contextmanager
def _quiet(*names: str):
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


_WRITERS: dict[str, Callable[[nn.Module, dict, Path], list[Path]]] = {
    "pt2": _write_pt2, "onnx": _write_onnx, "torchvision": _write_torchvision}


def write(fmt: str, model: nn.Module, meta: dict, path: Path) -> list[Path]:
    """Write the stitched `model` (export's: `.backbone`, `.head`, `.image_input`) with its
    metadata `meta` as format `fmt` at `path`; return every file written."""
    return _WRITERS[fmt](model, meta, path)
