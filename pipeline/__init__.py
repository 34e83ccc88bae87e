"""Feature-caching pipeline for frozen backbones: extract once, train many heads, export one model.

    from pipeline import extract, train_head, export, predict
    from pipeline import ExtractConfig, TrainConfig, ExportConfig, PredictConfig

    extract("photos/", "photos.h5", ExtractConfig(image_size=128))
    summary = train_head("photos.h5", "runs/", TrainConfig(head=("linear", "logreg")))
    export(summary.best_path, "model.pt2", ExportConfig())
    predict("model.pt2", ["new-photos/"], PredictConfig(top_k=3))

Each stage is a module that can be called as its own verb: `pipeline.export(...)` and
`pipeline.export.export(...)` are the same call, and `pipeline.export.load_model` is there too.
The stages are imported on first use: `import pipeline` and the configs cost no torch import,
so the command line answers `--help` at once.
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


class _Stage(types.ModuleType):
    """A stage module that is also its verb: calling `pipeline.export` calls `pipeline.export.export`
    (looked up at each call, so a function replaced on the module is the one that runs)."""

    def __call__(self, *args, **kwargs):
        return getattr(self, self.__name__.rpartition(".")[2])(*args, **kwargs)


def _stage(module: types.ModuleType) -> types.ModuleType:
    if type(module) is types.ModuleType:
        module.__class__ = _Stage
    return module


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        value = _stage(module) if _LAZY[name] == name else getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _Package(types.ModuleType):
    """Makes `pipeline.extract` (and the other stage names) a callable module, whichever way it was
    imported first: importing a submodule makes Python set it as an attribute of its package, and
    `from pipeline import extract` goes through `__getattr__`."""

    def __setattr__(self, name, value):
        if _LAZY.get(name) == name and isinstance(value, types.ModuleType):
            value = _stage(value)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__all__ = ["__version__", "UserError", "ExtractConfig", "TrainConfig", "ExportConfig",
           "PredictConfig", "ReportConfig", "DemoConfig", *_LAZY]
