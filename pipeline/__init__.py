"""Feature-caching pipeline for frozen backbones: extract once, train many heads, export one model.

    from pipeline import extract, train_head, export, predict
    from pipeline import ExtractConfig, TrainConfig, ExportConfig, PredictConfig

    extract("photos/", "photos.h5", ExtractConfig(image_size=128))
    summary = train_head("photos.h5", "runs/", TrainConfig(head=("linear", "logreg")))
    export(summary["best_path"], "model.pt2", ExportConfig())
    predict("model.pt2", ["new-photos/"], PredictConfig(top_k=3))
"""
__version__ = "0.1.0"

from .config import ExportConfig, ExtractConfig, PredictConfig, TrainConfig  # noqa: E402
from .export import export  # noqa: E402
from .extract import ExtractSummary, extract  # noqa: E402
from .models import load_model  # noqa: E402
from .predict import predict  # noqa: E402
from .train_head import train_head  # noqa: E402

__all__ = ["__version__", "extract", "train_head", "export", "predict", "load_model",
           "ExtractConfig", "TrainConfig", "ExportConfig", "PredictConfig", "ExtractSummary"]
