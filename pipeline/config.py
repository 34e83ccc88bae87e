"""Stage configs: frozen dataclasses whose defaults are the only defaults (the CLI reads them),
and the allowed values of their fields, written once beside each field for the library and the
CLI alike: `validate(config)` checks a config against them, and the CLI derives its click types
from the same records (as scikit-learn's `_parameter_constraints`).

Torch-free, so the command line can build its options without importing torch.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields
from typing import ClassVar

from cache.errors import UserError

# Allowed values: the stages check against these and the CLI offers them as choices.
# Backbones are open-ended (every torchvision classification model, and timm:NAME): the
# extract stage checks a name against torchvision's and timm's own lists.
POOLS = ("flatten", "avg")                              # how a spatial cut becomes a vector
DTYPES = ("float16", "float32")                         # storage dtype of cached features
PRECISIONS = ("auto", "float32", "bfloat16", "float16")  # forward-pass precision (autocast)
DECODERS = ("auto", "cpu", "gpu", "pil")                # how image files become input tensors
HEADS = ("linear", "mlp", "logreg", "knn", "ridge", "lda")
CLOSED_FORM = ("ridge", "lda")              # heads solved from one pass of statistics
LINEAR_LAYER = ("linear", "logreg", "ridge", "lda")   # heads saved as one nn.Linear
ACTIVATIONS = ("relu", "gelu", "tanh")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("constant", "cosine", "step")
CLASS_WEIGHTS = ("none", "balanced")
FORMATS = ("pt2", "onnx", "torchvision")                # exported model formats
INPUTS = ("tensor", "image")                            # what an exported model takes
DEMO_OUT = "demo-out"                                   # the demo's default output folder


@dataclass(frozen=True)
class Interval:
    """Allowed numbers: `kind` (int or float) from `low` to `high` (None: unbounded), each end
    included unless open; floats must be finite. `none`: None is allowed too (a default)."""
    kind: type
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    none: bool = False

    def error(self, value) -> str | None:
        """None if `value` is allowed, else what to use instead ("use an integer >= 1")."""
        if value is None and self.none:
            return None
        number = numbers.Integral if self.kind is int else numbers.Real   # numpy's too
        if (isinstance(value, bool) or not isinstance(value, number)
                or not math.isfinite(value)
                or (self.low is not None and (value <= self.low if self.low_open
                                              else value < self.low))
                or (self.high is not None and (value >= self.high if self.high_open
                                               else value > self.high))):
            return f"use {self.describe()}"
        return None

    def describe(self) -> str:
        what = "an integer" if self.kind is int else "a finite number"
        if self.low is not None and self.high is not None:
            ends = "(["[not self.low_open], ")]"[not self.high_open]
            return f"{what} in {ends[0]}{self.low:g}, {self.high:g}{ends[1]}"
        if self.low is not None:
            return f"{what} {'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            return f"{what} {'<' if self.high_open else '<='} {self.high:g}"
        return what


@dataclass(frozen=True)
class Options:
    """Allowed strings."""
    values: tuple[str, ...]

    def error(self, value) -> str | None:
        return None if value in self.values else f"choose from {', '.join(self.values)}"


def rule_of(config_cls, name: str) -> Interval | Options | None:
    """The allowed values of field `name` of a config class, or None when any value goes."""
    return config_cls.constraints.get(name)


def flag(name: str) -> str:
    """The command-line option of a config field: image_size -> --image-size."""
    return "--" + name.replace("_", "-")


def validate(config) -> None:
    """Raise UserError naming the first field of `config` outside its allowed values, its
    option and what to use instead (`--image-size 16: use an integer >= 32`). Tuple fields are
    sweep axes: they must hold at least one value, and each value is checked."""
    for f in fields(config):
        rule = config.constraints.get(f.name)
        if rule is None:
            continue
        value = getattr(config, f.name)
        axis = isinstance(f.default, tuple)
        if axis and not value:
            raise UserError(f"{flag(f.name)} is empty: give at least one value")
        for v in value if axis else (value,):
            error = rule.error(v)
            if error is not None:
                unknown = "unknown " if isinstance(rule, Options) else ""
                shown = repr(v) if isinstance(rule, Options) else v
                raise UserError(f"{unknown}{flag(f.name)} {shown}: {error}")
# --augment of the augmented views: the fine-tuning recipe people use with these backbones,
# torchvision's RandomResizedCrop defaults (scale 0.08-1, ratio 3/4-4/3) and a horizontal flip.
DEFAULT_SPEC = "RandomResizedCrop(),RandomHorizontalFlip()"


def split_layers(layer: str) -> list[str]:
    """`--layer fc6,fc7,pool5` -> ["fc6", "fc7", "pool5"]."""
    return [part.strip() for part in layer.split(",") if part.strip()]


@dataclass(frozen=True)
class ExtractConfig:
    """What to extract and how. Every field that changes the features lands in the manifest."""
    backbone: str = "vgg16"          # a torchvision classification model, or timm:NAME
    weights: str = "DEFAULT"         # weights name (DEFAULT, IMAGENET1K_V2, ...), a local .pth
                                     # state_dict, or "none" (random init)
    layer: str = "penultimate"       # penultimate (input of the final classifier layer; VGG: fc7),
                                     # a graph node name, or VGG's fc7, fc6, pool5
    pool: str = "flatten"            # spatial outputs: flatten, or avg (mean over positions)
    image_size: int | None = None    # crop size; None: the weights' own (224)
    batch_size: int | None = None    # images per forward pass and per committed batch;
                                     # None: 32 on a CPU, 256 on a GPU
    workers: int = -1                # decoding processes; -1: auto (CPU: cores//2, at most 4;
                                     # GPU: every core, at most 16)
    device: str = "auto"             # auto, cpu, cuda, cuda:N
    decode: str = "auto"             # cpu (libjpeg-turbo to tensors in the workers), gpu
                                     # (nvJPEG on the device), pil (Pillow); auto: the existing
                                     # cache's decoder where it runs here, else gpu on a GPU
    draft: bool = False              # JPEGs >= 2x the resize target decode at a reduced DCT scale
    mix_decoders: bool = False       # let this run add rows decoded otherwise than the cache's
                                     # (the manifest lists every decoder of its rows)
    dtype: str = "float16"           # storage dtype: float16 or float32
    views: int = 1                   # views cached per image: the plain preprocessing, and
                                     # views - 1 augmented by `augment`
    augment: str | None = None       # transforms.v2 SPEC of the augmented views; None: a
                                     # RandomResizedCrop and a horizontal flip
    augment_seed: int = 0            # with each image's digest and the view number, seeds a view
    precision: str = "auto"          # forward precision: auto (float16 on GPU, float32 on CPU),
                                     # float32, bfloat16, float16 (autocast)
    overwrite: bool = False          # start again when an existing cache does not match
    rehash: bool = False             # hash every image again, even those whose size and mtime
                                     # are unchanged since their digest was kept
    dist_timeout: float = 1800.0     # torchrun: seconds a rank waits for the others at a
                                     # meeting point before naming the missing ones
    strict: bool = False             # skipped images make the run fail (after it finishes)
    label_key: str = "cls"           # tar shards: a sample's label from its KEY.cls member, or
                                     # json:FIELD of its KEY.json member
    progress: bool | None = None     # progress line on stderr; None: only on a terminal

    constraints: ClassVar[dict] = {
        "pool": Options(POOLS), "image_size": Interval(int, 32, none=True),
        "batch_size": Interval(int, 1, none=True), "workers": Interval(int, -1),
        "dtype": Options(DTYPES), "views": Interval(int, 1), "precision": Options(PRECISIONS),
        "dist_timeout": Interval(float, 1), "decode": Options(DECODERS),
    }


@dataclass(frozen=True)
class TrainConfig:
    """A sweep of head experiments on cached features.

    Tuple fields are sweep axes: the experiments are their cartesian product, each head kind
    taking only the axes it uses (linear: optimizer..seed; mlp: also hidden, activation;
    logreg: C; knn: k, temperature; ridge: alpha; lda: shrinkage). The other fields are shared
    by every experiment of the sweep. Stored in every run's metadata.
    """
    # Sweep axes.
    head: tuple[str, ...] = ("linear",)               # linear, mlp, logreg, knn, ridge, lda
    hidden: tuple[tuple[int, ...], ...] = ((1024,),)  # mlp hidden sizes, e.g. ((512,), (1024, 256))
    activation: tuple[str, ...] = ("relu",)           # mlp: relu, gelu, tanh
    optimizer: tuple[str, ...] = ("adamw",)           # adamw, sgd (with --momentum)
    lr: tuple[float, ...] = (1e-3,)                   # learning rate
    weight_decay: tuple[float, ...] = (0.0,)          # decoupled for adamw, L2 for sgd
    dropout: tuple[float, ...] = (0.0,)               # on input features (and mlp hidden layers)
    label_smoothing: tuple[float, ...] = (0.0,)       # cross-entropy label smoothing
    seed: tuple[int, ...] = (0,)                      # head initialisation
    C: tuple[float, ...] = (1.0,)                     # logreg inverse regularisation strength
    k: tuple[int, ...] = (10, 20, 100, 200)           # knn: neighbours that vote (DINO's k-NN)
    temperature: tuple[float, ...] = (0.07,)          # knn: a neighbour's vote is exp(cos / T)
    alpha: tuple[float, ...] = (1.0,)                 # ridge regularisation strength (> 0)
    shrinkage: tuple[float, ...] = (0.0,)             # lda covariance shrinkage, in [0, 1]
    # Shared by the whole sweep.
    epochs: int = 20                  # passes over the training rows
    batch_size: int = 256             # rows per step
    momentum: float = 0.9             # sgd momentum
    schedule: str = "constant"        # constant, cosine (per step), step (x0.1 every lr_step)
    lr_step: int = 0                  # step schedule period in epochs; 0: a third of the epochs
    class_weight: str = "none"        # none, balanced (n / (classes * count), as scikit-learn)
    patience: int = 0                 # early stopping: epochs without better val accuracy; 0: off
    halving: bool = False             # successive halving: at epochs r, 2r, 4r, ... stop the
                                      # heads of worse validation loss, train on with the rest
    halving_rate: float = 0.5         # fraction of the training heads stopped at each of those
    val_fraction: float = 0.1         # held out of TRAIN by path hash when no val cache is given
    data_seed: int = 0                # batch order and dropout noise (shared by a pass's heads)
    shuffle_chunks: int = 0           # shuffle window in HDF5 chunks; 0: all that fit in max_memory
    max_memory: int = 4 * 2**30       # bytes of features held in RAM; above it, stream from HDF5
    logreg_max_iter: int = 1000       # lbfgs iterations per logreg fit
    standardize: bool = True          # linear/mlp: train on features standardized with the
                                      # training rows' mean and std (folded into the saved head)
    logreg_standardize: bool = True   # fit on standardized features (folded into the saved layer)
    allow_incomplete: bool = False    # train on the committed rows of unfinished caches
    views: int | None = None          # augmented views to draw from (the first N of the cache's;
                                      # None: all it holds); each epoch, one view per image
    layer: str | None = None          # the cut of a several-cut cache to train on (its name,
                                      # alias or graph node); None: the cache's only cut

    constraints: ClassVar[dict] = {
        "head": Options(HEADS), "activation": Options(ACTIVATIONS),
        "optimizer": Options(OPTIMIZERS), "lr": Interval(float, 0, low_open=True),
        "weight_decay": Interval(float, 0), "dropout": Interval(float, 0, 1, high_open=True),
        "label_smoothing": Interval(float, 0, 1, high_open=True), "seed": Interval(int),
        "C": Interval(float, 0, low_open=True), "k": Interval(int, 1),
        "temperature": Interval(float, 0, low_open=True),
        "alpha": Interval(float, 0, low_open=True), "shrinkage": Interval(float, 0, 1),
        "halving_rate": Interval(float, 0, 1, low_open=True, high_open=True),
        "epochs": Interval(int, 1), "batch_size": Interval(int, 1),
        "momentum": Interval(float, 0, 1), "schedule": Options(SCHEDULES),
        "lr_step": Interval(int, 0), "class_weight": Options(CLASS_WEIGHTS),
        "patience": Interval(int, 0), "val_fraction": Interval(float, 0, 1, high_open=True),
        "shuffle_chunks": Interval(int, 0), "max_memory": Interval(int, 1),
        "logreg_max_iter": Interval(int, 1), "views": Interval(int, 1, none=True),
    }


@dataclass(frozen=True)
class ExportConfig:
    """How to stitch a trained head onto its frozen backbone and write one model file."""
    format: str = "pt2"              # pt2 (torch.export), onnx, torchvision (penultimate cut +
                                     # linear head: the torchvision model, last layer replaced)
    input: str = "tensor"            # tensor: (N, 3, S, S) float in [0, 1], preprocessed;
                                     # image: (N, 3, H, W) uint8 decoded pixels of any size
    weights: str | None = None       # backbone weights; None: the ones the cache manifest names
    cache: str | None = None         # cache for the parity check; None: the head's training cache
    images_root: str | None = None   # where the cached image paths now live; None: manifest's source_root
    parity_images: int = 8           # cached images run through the stitched model at export
    parity_check: bool = True        # False: skip the check (no cache or images needed)

    constraints: ClassVar[dict] = {
        "format": Options(FORMATS), "input": Options(INPUTS), "parity_images": Interval(int, 1),
    }


@dataclass(frozen=True)
class PredictConfig:
    """How to run an exported model over images."""
    top_k: int = 5                   # classes reported per image, most probable first
    batch_size: int = 32             # images per forward pass
    workers: int = -1                # decoding processes; -1: auto (none for a single batch)
    device: str = "auto"             # auto (CUDA when there is one), cpu, cuda, cuda:N
    decode: str = "auto"             # cpu, gpu, pil; auto: gpu on a GPU, else cpu
    draft: bool = False              # JPEGs >= 2x the resize target decode at a reduced DCT scale
    progress: bool | None = None     # progress line on stderr; None: only on a terminal

    constraints: ClassVar[dict] = {
        "top_k": Interval(int, 1), "batch_size": Interval(int, 1), "workers": Interval(int, -1),
        "decode": Options(DECODERS),
    }


@dataclass(frozen=True)
class ReportConfig:
    """What `report()` draws from a sweep's records (RUNS_DIR of `train-head`)."""
    cache: str | None = None          # cache holding the validation rows (the val cache, or the
                                      # train cache of a hash split); None: the one head.json names
    images_root: str | None = None    # where the cached image paths live now; None: the cache's
                                      # source_root
    misclassified: int = 16           # images in the grid of the most confident mistakes
    leaderboard_rows: int = 20        # rows of the leaderboard table in report.md
    dpi: int = 100                    # resolution of the PNG figures

    constraints: ClassVar[dict] = {
        "misclassified": Interval(int, 0), "leaderboard_rows": Interval(int, 1),
        "dpi": Interval(int, 20),
    }


@dataclass(frozen=True)
class DemoConfig:
    """The demo: scikit-learn's digits through every stage, small enough for a 2-core CPU."""
    weights: str | None = None        # backbone weights; None: ImageNet's if already in
                                      # torchvision's cache, else random init ("none")
    image_size: int = 32              # input crop (VGG's smallest: 5 poolings)
    per_class: int | None = None      # at most this many digits per class; None: all 1,797
    test_every: int = 5               # every n-th image of each digit is held out for testing
    epochs: int = 20                  # epochs of the linear and mlp heads of the sweep
    tutorial_steps: int = 3           # training steps timed the tutorial's way (after a warm-up)
    tutorial_batch: int = 32          # images per tutorial-way step
    report: bool = True               # write the report (figures and report.md) under DIR/report
    progress: bool | None = None      # progress lines on stderr; None: only on a terminal

    constraints: ClassVar[dict] = {
        "image_size": Interval(int, 32), "per_class": Interval(int, 2, none=True),
        "test_every": Interval(int, 2), "epochs": Interval(int, 1),
        "tutorial_steps": Interval(int, 1), "tutorial_batch": Interval(int, 1),
    }
