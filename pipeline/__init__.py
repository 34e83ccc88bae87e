"""Feature-caching pipeline for frozen backbones: extract once, train many heads, export one model.

    from pipeline import extract, train_head, export, predict
    from pipeline import ExtractConfig, TrainConfig, ExportConfig, PredictConfig

    extract("photos/", "photos.h5", ExtractConfig(image_size=128))
    summary = train_head("photos.h5", "runs/", TrainConfig(head=("linear", "logreg")))
    export(summary.best_path, "model.pt2", ExportConfig())
    predict("model.pt2", ["new-photos/"], PredictConfig(top_k=3))

The stage functions are imported on first use: `import pipeline` and the configs cost no torch
import, so the command line answers `--help` at once.
"""
from __future__ import annotations

import importlib
import sys
import types

from cache.errors import UserError

from ._version import __version__
from .config import DemoConfig, ExportConfig, ExtractConfig, PredictConfig, ReportConfig, TrainConfig

# name -> module that defines it; imported when first asked for (PEP 562).
_LAZY = {
    "extract": "extract", "ExtractSummary": "extract",
    "train_head": "train_head", "TrainSummary": "train_head",
    "export": "export", "ExportSummary": "export",
    "predict": "predict", "PredictResult": "predict",
    "load_model": "models",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _Package(types.ModuleType):
    """Keeps `pipeline.extract` (and the other stage names) the function, not the module of the
    same name: importing a submodule makes Python set it as an attribute of its package."""

    def __setattr__(self, name, value):
        if _LAZY.get(name) == name and isinstance(value, types.ModuleType):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__all__ = ["__version__", "UserError", "ExtractConfig", "TrainConfig", "ExportConfig",
           "PredictConfig", "ReportConfig", "DemoConfig", *_LAZY]
