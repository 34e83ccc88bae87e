"""How images become a backbone's input: the resize, crop and normalisation its weights were
trained with, read from the weights' own config (torchvision's transforms, timm's pretrained
cfg), never typed by hand.

    pre = default_preprocessing("vgg16", image_size=128)    # Preprocessing(146, 128, mean, std)
    x = pre(pil_image)                                      # (3, 128, 128) uint8
    y = ImageInput(pre)(pixels)                             # (N, 3, H, W) uint8 -> (N, 3, 128, 128)

A cache's manifest and an exported model record it (`Preprocessing.to_dict`); the
normalisation itself runs inside the model.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torchvision
from PIL import Image
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF



@dataclass(frozen=True)
class Preprocessing:
    """Resize, centre crop and normalisation, as torchvision's ImageClassification preset."""
    resize_size: int          # shorter side is resized to this
    crop_size: int            # then a centre crop of crop_size x crop_size
    mean: tuple[float, ...]   # per-channel mean, applied inside the model
    std: tuple[float, ...]    # per-channel std, applied inside the model
    interpolation: str = "bilinear"
    antialias: bool = True

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        return cls(**{**d, "mean": tuple(d["mean"]), "std": tuple(d["std"])})

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """RGB PIL image -> (3, crop, crop) uint8 tensor (normalisation happens in the model)."""
        img = TF.resize(img, [self.resize_size], interpolation=InterpolationMode(self.interpolation),
                        antialias=self.antialias)
        img = TF.center_crop(img, [self.crop_size])
        return TF.pil_to_tensor(img)


class ImageInput(nn.Module):
    """`Preprocessing` as tensor operations, for models that take decoded pixels:
    (N, 3, H, W) uint8 of any H and W -> (N, 3, S, S) float in [0, 1].

    The shorter side is resized to resize_size (the longer to floor(resize * long / short)),
    antialiased, rounded back to whole gray levels as Pillow's 8-bit resize is, then centre
    cropped with Python's round-half-to-even offset, as torchvision's center_crop computes it.
    Only integer arithmetic on the input's sides, so torch.export keeps H and W dynamic.
    Measured against Pillow: at most one gray level apart.
    """

    def __init__(self, pre: Preprocessing):
        super().__init__()
        self.resize, self.crop = pre.resize_size, pre.crop_size
        self.mode = pre.interpolation if pre.interpolation in ("bilinear", "bicubic") else "bilinear"
        self.antialias = pre.antialias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2], x.shape[-1]
        short = torch.sym_min(h, w)
        nh, nw = self.resize * h // short, self.resize * w // short
        y = nn.functional.interpolate(x.float(), size=(nh, nw), mode=self.mode,
                                      antialias=self.antialias, align_corners=False)
        y = y.round().clamp(0, 255)                                     # (N, 3, nh, nw)
        top, left = _centre_offset(nh - self.crop), _centre_offset(nw - self.crop)
        return y[..., top:top + self.crop, left:left + self.crop] / 255  # (N, 3, S, S)


def _centre_offset(d):
    """int(round(d / 2)) with round-half-to-even, in integers: k, or k + 1 when d = 2k + 1
    and k is odd."""
    k = d // 2
    return k + (d % 2) * (k % 2)


def default_preprocessing(backbone: str, image_size: int | None = None,
                          weights: str = "DEFAULT") -> Preprocessing:
    """The preprocessing of the backbone's weights (torchvision: the named weights' own
    transforms, DEFAULT's for a file or random init; timm: its data config for the model),
    optionally at another input size, keeping the resize/crop ratio (256/224 for ImageNet)."""
    from .backbone import TIMM, is_timm   # backbone imports this module: not at its top
    if is_timm(backbone):
        resize, crop, mean, std, interp = _timm_preprocessing(backbone[len(TIMM):])
        antialias = True
    else:
        enum = torchvision.models.get_model_weights(backbone)
        w = enum[weights] if weights in enum.__members__ else enum.DEFAULT
        t = w.transforms()
        resize, crop, mean, std = int(t.resize_size[0]), int(t.crop_size[0]), t.mean, t.std
        interp, antialias = t.interpolation.value, bool(t.antialias)
    if image_size is not None:
        resize, crop = round(image_size * resize / crop), image_size
    return Preprocessing(resize_size=resize, crop_size=crop, mean=tuple(mean), std=tuple(std),
                         interpolation=interp, antialias=antialias)


def _timm_preprocessing(name: str):
    """(resize, crop, mean, std, interpolation) of timm's data config for model `name`."""
    import timm
    from timm.data import resolve_data_config
    cfg = timm.get_pretrained_cfg(name)
    data = resolve_data_config(pretrained_cfg=cfg.to_dict() if cfg is not None else {})
    crop = int(data["input_size"][-1])
    resize = int(crop / data.get("crop_pct", 0.875))   # timm's own rounding (floor)
    interp = data.get("interpolation", "bilinear")
    return resize, crop, data["mean"], data["std"], interp if interp in ("bilinear", "bicubic",
                                                                          "nearest") else "bilinear"


def to_float_batch(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) uint8 -> float32 in [0, 1], as torchvision's convert_image_dtype."""
    return images.to(torch.float32).div(255)


__all__ = ["Preprocessing", "ImageInput", "default_preprocessing", "to_float_batch"]
