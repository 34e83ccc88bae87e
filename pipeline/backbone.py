"""Build a frozen backbone, load its weights, and cut it at a layer.

    model, info = build_backbone("vgg16", "DEFAULT", layer="fc7")
    feats = model(images)   # images: (N, 3, H, W) float in [0, 1]  ->  (N, D)

Backbones: every classification model torchvision lists (`torchvision.models.list_models`),
and timm models as `timm:NAME` (the optional `timm` extra). Cuts: `penultimate` (the input of
the model's final classification layer: fc7 after its ReLU for VGG, the pooled vector for a
ResNet, the class token after the final norm for a ViT; `forward_head(pre_logits=True)` for
timm), any graph node name that `list_layers` gives (cut with torchvision's
`create_feature_extractor`, or timm's for timm models), and VGG's fc6/fc7/pool5. Spatial
outputs are flattened, or averaged to (N, C) with `pool="avg"`.

The returned module holds the normalisation (mean/std from the weights' own transforms, or
timm's data config: `pipeline.preprocessing`) and the truncated network, always in eval mode
with frozen parameters. Export reuses it.
"""
from __future__ import annotations

import functools
import hashlib
import logging
from dataclasses import replace
from pathlib import Path

import torch
import torchvision
from torch import nn

from cache.errors import UserError, first_line
from cache.records import RECORD_KEY, Cut, Weights

from .config import POOLS, split_layers
from .preprocessing import Preprocessing, default_preprocessing

TIMM = "timm:"
PENULTIMATE = "penultimate"
# VGG's named cuts -> graph node (module path) whose output is cached.
LAYER_ALIASES = {
    "fc7": "classifier.4",   # fc7 after its ReLU: the tutorial's cut, 4096 features
    "fc6": "classifier.1",   # fc6 after its ReLU, 4096 features
    "pool5": "avgpool",      # after adaptive avgpool, flattened: 512*7*7 = 25088 features
}


class FrozenBackbone(nn.Module):
    """Normalise a [0, 1] image batch, run the truncated network, flatten or average:
    (N, 3, H, W) -> (N, D); for a network cut at several nodes in one pass (a feature extractor
    returning {name: output}), {name: (N, D_name)}."""

    def __init__(self, trunk: nn.Module, mean, std, pool: str = "flatten"):
        super().__init__()
        self.trunk, self.pool = trunk, pool
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.eval()
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        x = (x - self.mean) / self.std   # same arithmetic as torchvision's F.normalize
        y = self.trunk(x)
        if isinstance(y, dict):
            return {name: pool_output(v, self.pool) for name, v in y.items()}
        return pool_output(y, self.pool)

    def train(self, mode: bool = True):
        # Frozen means frozen: Dropout/BatchNorm stay in eval mode whatever the caller asks.
        return super().train(False)


def pool_output(y: torch.Tensor, pool: str) -> torch.Tensor:
    """(N, ...) -> (N, D). flatten: every value; avg: the mean over the spatial positions of a
    (N, C, H, W) map, or over the tokens of a (N, L, C) sequence."""
    if pool == "avg" and y.dim() == 4:
        y = y.mean(dim=(2, 3))                                              # (N, C)
    elif pool == "avg" and y.dim() == 3:
        y = y.mean(dim=1)                                                   # (N, C)
    return torch.flatten(y, 1)


class _Node(nn.Module):
    """The output of one graph node of a feature extractor (which returns {node: tensor})."""

    def __init__(self, extractor: nn.Module):
        super().__init__()
        self.extractor = extractor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.extractor(x)["out"]



class _PreLogits(nn.Module):
    """A timm model up to its classifier: forward_head(forward_features(x), pre_logits=True)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)


# --------------------------------------------------------------------------------- the cut

def is_timm(backbone: str) -> bool:
    return backbone.startswith(TIMM)


def _node_names(model: nn.Module, backbone: str) -> list[str]:
    """Graph node names of the eval-mode forward pass, in execution order."""
    if is_timm(backbone):
        from timm.models import get_graph_node_names
    else:
        from torchvision.models.feature_extraction import get_graph_node_names
    try:
        return get_graph_node_names(model)[1]
    except Exception as e:   # models whose forward cannot be traced symbolically
        raise UserError(f"{backbone} cannot be cut at inner nodes ({first_line(e)}): "
                        f"use --layer {PENULTIMATE}") from None


def _penultimate_node(model: nn.Module, backbone: str) -> str:
    """The node feeding the model's final Linear layer, skipping Dropout (identity in eval)."""
    names = _node_names(model, backbone)
    modules = dict(model.named_modules())
    if not isinstance(modules.get(names[-1]), nn.Linear):
        raise UserError(f"{backbone} does not end in a Linear classification layer, so it has no "
                        f"'{PENULTIMATE}' cut: pass --layer with a node name "
                        f"(`pipeline extract --list-layers --backbone {backbone}`)")
    i = len(names) - 2
    while i > 0 and isinstance(modules.get(names[i]), nn.Dropout):
        i -= 1
    return names[i]


def resolve_layer(layer: str, model: nn.Module | None = None, backbone: str = "vgg16") -> str:
    """Named cut -> graph node name: VGG's fc7/fc6/pool5, or `penultimate` (needs `model`)."""
    if layer == PENULTIMATE:
        if model is None:
            raise ValueError("resolving 'penultimate' needs the model")
        return PENULTIMATE if is_timm(backbone) else _penultimate_node(model, backbone)
    return LAYER_ALIASES.get(layer, layer) if backbone.startswith("vgg") else layer


def cut(model: nn.Module, layer: str, backbone: str = "vgg16") -> nn.Module:
    """The part of `model` whose output is graph node `layer` (or a named cut): a module
    mapping a normalised batch to that node's output."""
    return _cut_at(model, resolve_layer(layer, model, backbone), layer, backbone)


def _cut_at(model: nn.Module, node: str, layer: str, backbone: str) -> nn.Module:
    """`cut` at graph node `node`, resolved from the user's `layer` (named in errors)."""
    if node == PENULTIMATE:                                   # timm's own contract
        return _PreLogits(model)
    if layer != PENULTIMATE:   # the penultimate node was found among the graph's own nodes
        _check_node(_node_names(model, backbone), node, layer, backbone)
    if is_timm(backbone):
        from timm.models import create_feature_extractor
    else:
        from torchvision.models.feature_extraction import create_feature_extractor
    return _Node(create_feature_extractor(model, {node: "out"}))


def _check_node(names: list[str], node: str, layer: str, backbone: str) -> None:
    # A module that holds several nodes ("layer3") stands for its last node, as in the library.
    if node not in names and not any(n.startswith(node + ".") for n in names):
        aliases = f"{PENULTIMATE}, fc7, fc6, pool5" if backbone.startswith("vgg") else PENULTIMATE
        raise UserError(f"unknown layer {layer!r} of {backbone}: use {aliases} or a node name "
                        f"such as {names[len(names) // 2]} (all: `pipeline extract --list-layers "
                        f"--backbone {backbone}`)")


def list_layers(backbone: str = "vgg16", image_size: int | None = None) -> list[str]:
    """The cut names of a backbone: its named cuts, then every graph node in execution order.
    Builds the model with random weights (no download)."""
    model, _ = _model(backbone, "none", image_size)
    named = [PENULTIMATE] + (list(LAYER_ALIASES) if backbone.startswith("vgg") else [])
    return named + _node_names(model, backbone)


# ------------------------------------------------------------------------- models and weights

def check_backbone(backbone: str) -> None:
    """Refuse unknown names with the fix: a torchvision classification model or timm:NAME."""
    if is_timm(backbone):
        try:
            import timm
        except ImportError:
            raise UserError(f"--backbone {backbone} needs timm: pip install "
                            "'frozen-feature-pipeline[timm]'") from None
        name = backbone[len(TIMM):]
        if not timm.is_model(name.split(".")[0]):
            raise UserError(f"timm has no model {name!r}: see timm.list_models() for the names")
        return
    known = torchvision.models.list_models(module=torchvision.models)
    if backbone not in known:
        close = [n for n in known if n.split("_")[0] == backbone.split("_")[0]][:8] or known[:8]
        raise UserError(f"unknown backbone {backbone!r}: use a torchvision classification model "
                        f"({', '.join(close)}, ...: torchvision.models.list_models()) or "
                        "timm:NAME")


def _builder_kwargs(backbone: str, image_size: int | None) -> dict:
    """Constructor arguments that depend on the input size: ViTs size their position
    embeddings for one image size (torchvision: image_size, timm: img_size)."""
    if image_size is None:
        return {}
    if is_timm(backbone):
        import timm
        cfg = timm.get_pretrained_cfg(backbone[len(TIMM):])
        return {"img_size": image_size} if cfg is None or cfg.fixed_input_size else {}
    return {"image_size": image_size} if backbone.startswith("vit_") else {}


def _construct(backbone: str, image_size: int | None) -> nn.Module:
    """The backbone with random-init weights (its weights are loaded apart)."""
    kwargs = _builder_kwargs(backbone, image_size)
    if is_timm(backbone):
        import timm
        return timm.create_model(backbone[len(TIMM):], pretrained=False, **kwargs)
    return torchvision.models.get_model(backbone, weights=None, **kwargs)


@functools.lru_cache(maxsize=2)
def _random_init(backbone: str, image_size: int | None) -> tuple[dict, str]:
    """Random-init state_dict under seed 0 and its SHA-256, made once per process: the same
    network in every run, so a cache made with `--weights none` can be resumed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        state_dict = _construct(backbone, image_size).state_dict()
    return state_dict, state_dict_sha256(state_dict)


def load_weights(backbone: str, weights: str | Path, image_size: int | None = None
                 ) -> tuple[dict, str]:
    """(state_dict, weights name to record).

    `weights`: a torchvision weights name ('DEFAULT', 'IMAGENET1K_V2'; downloaded into
    $TORCH_HOME once) or, for timm models, 'DEFAULT' (timm's pretrained weights for that name,
    from where timm gets them); a local .pth state_dict (loaded with weights_only=True); or
    'none': random init under seed 0.
    """
    text = str(weights)
    if text.lower() == "none":
        return _random_init(backbone, image_size)[0], "none"
    if is_timm(backbone) and text == "DEFAULT":
        import timm
        kwargs = _builder_kwargs(backbone, image_size)
        try:
            model = timm.create_model(backbone[len(TIMM):], pretrained=True, **kwargs)
        except (OSError, RuntimeError) as e:   # offline (URLError and the hub's HTTP errors
            # are OSErrors), gated, no weights for this name (timm's RuntimeError)
            reason = first_line(e)
            raise UserError(f"could not get timm weights for {backbone} ({reason}): connect "
                            "once, or pass a local .pth file with --weights (--weights none: "
                            "random-init weights, for trying things out)") from None
        return model.state_dict(), f"{backbone}:{model.pretrained_cfg.get('tag') or 'DEFAULT'}"
    if not is_timm(backbone):
        enum = torchvision.models.get_model_weights(backbone)
        if text in enum.__members__ or text == "DEFAULT":
            w = enum[text] if text != "DEFAULT" else enum.DEFAULT
            try:
                return w.get_state_dict(progress=False, check_hash=True), f"{backbone}:{w.name}"
            except (OSError, RuntimeError) as e:  # offline, proxy, disk full (URLError is
                # an OSError), a hash mismatch or a torn download (RuntimeError)
                # Where torchvision looks first: a file copied there from another machine works.
                where = Path(torch.hub.get_dir()) / "checkpoints" / Path(w.url).name
                raise UserError(f"could not get {backbone} weights {w.name} ({e}): connect to "
                                f"the internet once, copy {where.name} from a machine that has it "
                                f"to {where}, or pass a local .pth file with --weights "
                                "(--weights none: random-init weights, for trying things "
                                "out)") from None
    return _load_file(backbone, Path(text)), f"file:{Path(text).name}"


def _load_file(backbone: str, path: Path) -> dict:
    if not path.is_file():
        names = "DEFAULT" if is_timm(backbone) else ", ".join(
            ["DEFAULT", *torchvision.models.get_model_weights(backbone).__members__])
        raise UserError(f"--weights {str(path)!r} is neither a weights name of {backbone} "
                        f"({names}), an existing .pth file, nor 'none'")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot load weights file {path}: {e}") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise UserError(f"weights file {path} does not hold a state_dict")
    return sd


def _model(backbone: str, weights: str | Path, image_size: int | None
           ) -> tuple[nn.Module, Weights]:
    """(eval-mode model with the weights loaded, the record of its weights)."""
    check_backbone(backbone)
    state_dict, name = load_weights(backbone, weights, image_size)
    with torch.device("meta"):   # no random init of many parameters only to overwrite them
        model = _construct(backbone, image_size)
    try:
        model.load_state_dict(state_dict, assign=True)
        if any(t.is_meta for t in model.buffers()):   # non-persistent buffers are not in a
            model = _construct(backbone, image_size)  # state_dict: build them for real
            model.load_state_dict(state_dict)
    except RuntimeError as e:
        raise UserError(f"weights {name} do not fit {backbone}"
                        f"{'' if image_size is None else f' at --image-size {image_size}'}: "
                        f"{first_line(e)}") from None
    sha = _random_init(backbone, image_size)[1] if name == "none" else state_dict_sha256(
        model.state_dict())
    record = Weights.from_label(backbone, name, sha)
    if record.kind == "file":   # where it was, so that export finds it again by itself
        record = replace(record, path=str(Path(weights).resolve()))
    return model.eval().requires_grad_(False), record


def warn_random_init(logger: logging.Logger, backbone: str, how: str, flag: str,
                     consequence: str) -> None:
    """Say loudly, on the stage's own logger, that a model has random-init weights ("using
    RANDOM-INIT vgg16 weights (--weights none): ..."). The record carries the mark
    `random_init`, by which `pipeline demo`, which says it once itself, drops it."""
    logger.warning("%s RANDOM-INIT %s weights (%s): %s", how, backbone, flag, consequence,
                   extra={"random_init": True}, stacklevel=2)


def builder_kwargs(backbone: str, image_size: int | None) -> dict:
    """What `torchvision.models.get_model(backbone, ...)` (or timm's create_model) needs besides
    num_classes to rebuild this backbone at this input size."""
    return _builder_kwargs(backbone, image_size)


def final_layer(backbone: str, image_size: int | None = None) -> str:
    """Module name of the model's final Linear classification layer (what a head replaces)."""
    with torch.device("meta"):   # tracing needs no weights
        model = _construct(backbone, image_size)
    names = _node_names(model, backbone)
    if not isinstance(dict(model.named_modules()).get(names[-1]), nn.Linear):
        raise UserError(f"{backbone} does not end in a Linear classification layer")
    return names[-1]


def build_backbone(backbone: str = "vgg16", weights: str | Path = "DEFAULT",
                   layer: str = PENULTIMATE, image_size: int | None = None,
                   pool: str = "flatten") -> tuple[FrozenBackbone, dict]:
    """Frozen, truncated backbone and a JSON-able description of it.

    The description holds: backbone, weights (name), weights_sha256 (of the full
    state_dict used), weights_record (`cache.records.Weights.to_json()`), layer (graph node), layer_alias, pool, feature_dim, preprocessing.
    `layer` may list several cuts ("fc6,fc7,pool5"): the module then returns {name: (N, D)}
    from one forward pass, and the description has `cuts` (name, layer, layer_alias, pool,
    feature_dim of each) instead of the one cut's fields.
    """
    if pool not in POOLS:
        raise UserError(f"unknown pool {pool!r}: use {' or '.join(POOLS)}")
    check_backbone(backbone)
    layers = split_layers(layer)
    if not layers:
        raise UserError(f"--layer {layer!r} names no cut: give one, or several joined by commas")
    model, record = _model(backbone, weights, image_size)
    named = weights if not is_timm(backbone) else "DEFAULT"
    pre = default_preprocessing(backbone, image_size, str(named))
    info = {"backbone": backbone, "weights": record.label(backbone),
            "weights_sha256": record.sha256, RECORD_KEY: record.to_json(),
            "preprocessing": pre.to_dict()}
    if len(layers) > 1:
        return _multi_cut(model, backbone, layers, pre, pool, info)
    layer = layers[0]   # resolved once: "fc7," and " fc7" name the cut fc7, as in a list
    node = resolve_layer(layer, model, backbone)
    frozen = FrozenBackbone(_cut_at(model, node, layer, backbone), pre.mean, pre.std, pool)
    with torch.inference_mode():
        dim = frozen(torch.zeros(2, 3, pre.crop_size, pre.crop_size)).shape[1]
    info.update({
        "layer": node,
        "layer_alias": _alias(backbone, layer, node),
        "pool": None if pool == "flatten" else pool,   # None keeps older caches' manifests equal
        "feature_dim": int(dim),
    })
    return frozen, info


def _multi_cut(model: nn.Module, backbone: str, layers: list[str], pre: Preprocessing,
               pool: str, info: dict) -> tuple[FrozenBackbone, dict]:
    """One feature extractor returning every cut (timm's `penultimate` as the graph node that
    feeds its classifier, so that it comes from the same pass)."""
    names, nodes = _node_names(model, backbone), []
    for layer in layers:
        node = resolve_layer(layer, model, backbone)
        nodes.append(_penultimate_node(model, backbone) if node == PENULTIMATE else node)
        _check_node(names, nodes[-1], layer, backbone)
    twice = {n for n in nodes if nodes.count(n) > 1}
    if twice:
        raise UserError(f"--layer {','.join(layers)} names the node {twice.pop()} twice: "
                        "give each cut once")
    if is_timm(backbone):
        from timm.models import create_feature_extractor
    else:
        from torchvision.models.feature_extraction import create_feature_extractor
    multi = FrozenBackbone(create_feature_extractor(model, dict(zip(nodes, layers))),
                           pre.mean, pre.std, pool)
    with torch.inference_mode():
        out = multi(torch.zeros(2, 3, pre.crop_size, pre.crop_size))
    info["cuts"] = [Cut(layer, node, _alias(backbone, layer, node),
                        None if pool == "flatten" else pool, int(out[layer].shape[1])).to_json()
                    for layer, node in zip(layers, nodes)]
    return multi, info


def _alias(backbone: str, layer: str, node: str) -> str | None:
    """The cut's short name: VGG's own name of the node (fc7 for penultimate), else what the
    user asked for when that was not the node name itself."""
    if backbone.startswith("vgg"):
        named = [a for a, n in LAYER_ALIASES.items() if n == node]
        if named:
            return named[0]
    return layer if layer != node else None


def state_dict_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of a state_dict, in key order."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


__all__ = ["LAYER_ALIASES", "PENULTIMATE", "FrozenBackbone", "split_layers", "build_backbone",
           "builder_kwargs", "final_layer", "check_backbone", "cut", "list_layers", "load_weights",
           "pool_output", "resolve_layer", "state_dict_sha256", "warn_random_init"]
