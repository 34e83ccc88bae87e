"""Feature-caching pipeline for frozen backbones: extract once, train many heads, export one model.

    from pipeline import extract, ExtractConfig
    summary = extract("photos/", "photos.h5", ExtractConfig(image_size=64))
"""
__version__ = "0.1.0"

from .config import ExtractConfig  # noqa: E402
from .extract import ExtractSummary, extract  # noqa: E402

__all__ = ["__version__", "extract", "ExtractConfig", "ExtractSummary"]
