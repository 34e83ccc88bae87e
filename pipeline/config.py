"""Stage configs: frozen dataclasses whose defaults are the only defaults (the CLI reads them).

Torch-free, so the command line can build its options without importing torch.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ExtractConfig:
    """What to extract and how. Every field that changes the features lands in the manifest."""
    backbone: str = "vgg16"          # vgg11/13/16/19, optionally _bn
    weights: str = "DEFAULT"         # torchvision weights name, local .pth state_dict, or "none"
    layer: str = "fc7"               # fc7 (after ReLU), fc6, pool5, or a module path
    image_size: int | None = None    # crop size; None: the weights' own (224)
    batch_size: int = 32             # images per forward pass and per committed batch
    workers: int = -1                # decoding processes; -1: auto (CPU: cores//2, GPU: up to 8)
    device: str = "auto"             # auto, cpu, cuda, cuda:N
    dtype: str = "float16"           # storage dtype: float16 or float32
    precision: str = "auto"          # forward precision: auto (bfloat16 on GPU, float32 on CPU),
                                     # float32, bfloat16, float16 (autocast)
    overwrite: bool = False          # start again when an existing cache does not match
    strict: bool = False             # skipped images make the run fail (after it finishes)
    progress: bool | None = None     # progress line on stderr; None: only on a terminal
