"""Build a frozen VGG backbone, load its weights, cut it at a layer, and describe its preprocessing.

    model, info = build_backbone("vgg16", "DEFAULT", layer="fc7")
    feats = model(images)   # images: (N, 3, H, W) float in [0, 1]  ->  (N, D)

The returned module holds the normalisation (mean/std from the weights' own transforms)
and the truncated network, always in eval mode with frozen parameters. Export reuses it.
"""
from __future__ import annotations

import functools
import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torchvision
from PIL import Image
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from cache.errors import UserError

from .config import BACKBONES


# Named cuts -> module path after which the network is cut (outputs flattened).
LAYER_ALIASES = {
    "fc7": "classifier.4",   # fc7 after its ReLU: the tutorial's cut, 4096 features
    "fc6": "classifier.1",   # fc6 after its ReLU, 4096 features
    "pool5": "avgpool",      # after adaptive avgpool, flattened: 512*7*7 = 25088 features
}


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


class FrozenBackbone(nn.Module):
    """Normalise a [0, 1] image batch, run the truncated network, flatten: (N,3,H,W) -> (N,D)."""

    def __init__(self, trunk: nn.Module, mean, std):
        super().__init__()
        self.trunk = trunk
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.eval()
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std   # same arithmetic as torchvision's F.normalize
        return torch.flatten(self.trunk(x), 1)

    def train(self, mode: bool = True):
        # Frozen means frozen: Dropout/BatchNorm stay in eval mode whatever the caller asks.
        return super().train(False)


def resolve_layer(layer: str) -> str:
    """Named cut ('fc7', 'fc6', 'pool5') or module path -> module path."""
    return LAYER_ALIASES.get(layer, layer)


def layer_names(model: nn.Module) -> list[str]:
    """Module paths in execution order at which a VGG can be cut."""
    names = [f"features.{i}" for i in range(len(model.features))]
    return names + ["avgpool"] + [f"classifier.{i}" for i in range(len(model.classifier))]


def cut(model: nn.Module, layer: str) -> nn.Sequential:
    """The part of a torchvision VGG up to and including module path `layer`."""
    path = resolve_layer(layer)
    names = layer_names(model)
    if path not in names:
        raise UserError(f"unknown layer {layer!r}: use fc7, fc6, pool5 or a module path such as "
                         f"features.23, avgpool, classifier.0 (valid: {names[0]} .. {names[-1]})")
    stop = names.index(path)
    n_feat = len(model.features)
    parts: list[nn.Module] = [model.features[: min(stop + 1, n_feat)]]
    if stop >= n_feat:
        parts.append(model.avgpool)
    if stop > n_feat:
        parts += [nn.Flatten(1), model.classifier[: stop - n_feat]]
    return nn.Sequential(*parts)


def default_preprocessing(backbone: str, image_size: int | None = None) -> Preprocessing:
    """The preprocessing of the backbone's DEFAULT weights, optionally at another input size.

    Read from torchvision's weights metadata (no download). `image_size` keeps the
    weights' resize/crop ratio (256/224 for ImageNet VGGs).
    """
    t = _weights_enum(backbone).DEFAULT.transforms()
    resize, crop = int(t.resize_size[0]), int(t.crop_size[0])
    if image_size is not None:
        if image_size < 32:
            raise UserError(f"--image-size {image_size} is too small for VGG (5 poolings): use 32 or more")
        resize, crop = round(image_size * resize / crop), image_size
    return Preprocessing(resize_size=resize, crop_size=crop, mean=tuple(t.mean), std=tuple(t.std),
                         interpolation=t.interpolation.value, antialias=bool(t.antialias))


def load_weights(backbone: str, weights: str | Path) -> tuple[dict, str]:
    """(state_dict, weights name to record).

    `weights`: a torchvision weights name ('DEFAULT', 'IMAGENET1K_V1'; downloaded into
    $TORCH_HOME once), a local .pth state_dict (loaded with weights_only=True), or 'none':
    random init under seed 0, the same network in every run (so a cache can be resumed).
    """
    text = str(weights)
    if text.lower() == "none":
        return _random_init(backbone)[0], "none"
    enum = _weights_enum(backbone)
    if text in enum.__members__ or text == "DEFAULT":
        w = enum[text] if text != "DEFAULT" else enum.DEFAULT
        try:
            return w.get_state_dict(progress=False, check_hash=True), f"{backbone}:{w.name}"
        except Exception as e:  # offline, proxy, disk full: say what to do instead
            raise UserError(f"could not get {backbone} weights {w.name} ({e}): connect to the "
                             "internet once, or pass a local .pth file with --weights") from None
    path = Path(text)
    if not path.is_file():
        raise UserError(f"--weights {text!r} is neither a weights name of {backbone} "
                         f"({', '.join(['DEFAULT', *enum.__members__])}), an existing .pth file, nor 'none'")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot load weights file {path}: {e}") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise UserError(f"weights file {path} does not hold a state_dict")
    return sd, f"file:{path.name}"


def build_backbone(backbone: str = "vgg16", weights: str | Path = "DEFAULT", layer: str = "fc7",
                   image_size: int | None = None) -> tuple[FrozenBackbone, dict]:
    """Frozen, truncated backbone and a JSON-able description of it.

    The description holds: backbone, weights (name), weights_sha256 (of the full
    state_dict used), layer (module path), layer_alias, feature_dim, preprocessing.
    """
    if backbone not in BACKBONES:
        raise UserError(f"unknown backbone {backbone!r}: choose one of {', '.join(BACKBONES)}")
    state_dict, weights_name = load_weights(backbone, weights)
    with torch.device("meta"):   # no random init of 138M parameters only to overwrite them
        model = getattr(torchvision.models, backbone)(weights=None)
    try:
        model.load_state_dict(state_dict, assign=True)
    except RuntimeError as e:
        raise UserError(f"weights {weights_name} do not fit {backbone}: "
                         f"{str(e).splitlines()[0]}") from None
    pre = default_preprocessing(backbone, image_size)
    frozen = FrozenBackbone(cut(model, layer), pre.mean, pre.std)
    with torch.inference_mode():
        dim = frozen(torch.zeros(1, 3, pre.crop_size, pre.crop_size)).shape[1]
    info = {
        "backbone": backbone,
        "weights": weights_name,
        "weights_sha256": (_random_init(backbone)[1] if weights_name == "none"
                           else state_dict_sha256(model.state_dict())),
        "layer": resolve_layer(layer),
        "layer_alias": layer if layer in LAYER_ALIASES else None,
        "feature_dim": int(dim),
        "preprocessing": pre.to_dict(),
    }
    return frozen, info


def state_dict_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of a state_dict, in key order."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@functools.lru_cache(maxsize=2)
def _random_init(backbone: str) -> tuple[dict, str]:
    """Random-init state_dict under seed 0 and its SHA-256, made once per process."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        state_dict = getattr(torchvision.models, backbone)(weights=None).state_dict()
    return state_dict, state_dict_sha256(state_dict)


def _weights_enum(backbone: str):
    return torchvision.models.get_model_weights(backbone)


def to_float_batch(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) uint8 -> float32 in [0, 1], as torchvision's convert_image_dtype."""
    return images.to(torch.float32).div(255)


__all__ = ["BACKBONES", "LAYER_ALIASES", "Preprocessing", "FrozenBackbone", "build_backbone",
           "cut", "default_preprocessing", "load_weights", "resolve_layer", "state_dict_sha256",
           "to_float_batch"]
