"""Feature-caching pipeline for frozen backbones: extract once, train many heads, export one model.

    from pipeline import extract, ExtractConfig
"""
__version__ = "0.1.0"

# Stages import torch; load them on first use so `pipeline --help` stays fast.
_LAZY = {
    "extract": ("extract", "extract"),
    "ExtractSummary": ("extract", "ExtractSummary"),
    "ExtractConfig": ("config", "ExtractConfig"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f"{__name__}.{module}"), attr)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]
