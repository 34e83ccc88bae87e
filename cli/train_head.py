"""`pipeline train-head`: a sweep of heads on a feature cache, and its leaderboard."""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import click

from pipeline.config import Options, TrainConfig, rule_of
from pipeline.leaderboard import table

from .main_helpers import click_type, defaults, fail_on_user_error, output_folder, size_text

_D = defaults(TrainConfig)
_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


class _List(click.ParamType):
    """A comma-separated list, each item converted by `item` (a sweep axis)."""
    name = "list"

    def __init__(self, item, rule=None, metavar: str = "A,B"):
        # Choices come from the field's Options; number ranges are checked by the library, whose
        # one-line message names the option and says "finite" for inf and nan.
        self.item, self.metavar = item, metavar
        self.choices = rule.values if isinstance(rule, Options) else None

    def get_metavar(self, param, ctx=None) -> str:
        return self.metavar

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            items = tuple(self.item(v.strip()) for v in str(value).split(",") if v.strip())
        except ValueError as e:
            self.fail(f"{value!r} is not a comma-separated list of {self.metavar} ({e})",
                      param, ctx)
        if not items:
            self.fail("give at least one value", param, ctx)
        bad = [v for v in items if self.choices and v not in self.choices]
        if bad:
            self.fail(f"{bad[0]!r} is not one of {', '.join(self.choices)}", param, ctx)
        return items


class _Size(click.ParamType):
    """A byte count: 4G, 512M, 1.5GiB, 1000000 (K/M/G/T are powers of 1024), within `rule`."""
    name = "size"

    def __init__(self, rule):
        self.rule = rule

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([kmgt]?)(i?b)?\s*",
                         str(value).lower())
        if not m:
            self.fail(f"{value!r} is not a size such as 4G, 512M or 1000000", param, ctx)
        size = int(float(m.group(1)) * _UNITS[m.group(2)])
        if self.rule.error(size):
            self.fail(f"{value!r} is less than one byte: give a size such as 4G or 512M",
                      param, ctx)
        return size


class _Views(click.ParamType):
    """all, or a number of views within `rule`."""
    name = "views"

    def __init__(self, rule):
        self.rule = rule

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, int):
            return value
        if str(value).strip().lower() == "all":
            return None
        try:
            n = int(value)
        except ValueError:
            n = 0
        if self.rule.error(n):
            self.fail(f"{value!r} is not 'all' or a number of views >= 1", param, ctx)
        return n


def _hidden(text: str) -> tuple[int, ...]:
    sizes = tuple(int(h) for h in text.lower().split("x"))
    if min(sizes) < 1:
        raise ValueError("layer sizes must be >= 1")
    return sizes


def _shown(values) -> str:
    return ",".join("x".join(map(str, v)) if isinstance(v, tuple) else f"{v:g}"
                    if isinstance(v, float) else str(v) for v in values)


def _axis(name: str, item, help: str, metavar="A,B"):
    return click.option(f"--{name.replace('_', '-')}", name,
                        type=_List(item, rule_of(TrainConfig, name), metavar),
                        default=_D[name], show_default=_shown(_D[name]), help=help)


@click.command("train-head")
@click.argument("train", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("-o", "--output", "runs_dir", type=click.Path(file_okay=False), required=True,
              callback=output_folder,
              help="Folder for the runs (RUNS/<run-id>/), results.csv and summary.json.")
@click.option("--val", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="Validation cache (same backbone, weights, cut, preprocessing and classes).")
@click.option("--val-fraction", type=click_type(TrainConfig, "val_fraction"),
              default=_D["val_fraction"], show_default=True,
              help="Without --val: hold out this fraction of TRAIN for validation, chosen by a "
                   "hash of each image path (adding images never moves old ones); 0: none.")
@click.option("--test", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="Test cache: measured for every head, never used to pick one.")
@_axis("head", str, "Head kinds: linear (the tutorial's new last layer), mlp, logreg "
       "(scikit-learn LogisticRegression), knn (DINO's weighted k-nearest-neighbour vote: "
       "no training), ridge (RidgeClassifier) and lda (LinearDiscriminantAnalysis, lsqr "
       "solver), the last two in closed form.", "KIND,...")
@_axis("hidden", _hidden, "mlp hidden layer sizes, layers joined by x: 512,1024x256.",
       metavar="H[xH],...")
@_axis("activation", str, "mlp activations.", "ACT,...")
@_axis("optimizer", str, "Optimizers: adamw, sgd (with --momentum).", "OPT,...")
@_axis("lr", float, "Learning rates.", metavar="LR,...")
@_axis("weight_decay", float, "Weight decays (decoupled for adamw, L2 for sgd).", metavar="WD,...")
@_axis("dropout", float, "Dropout on the input features (and mlp hidden layers); 0.5 brings back "
       "the tutorial's train-mode dropout after fc7.", metavar="P,...")
@_axis("label_smoothing", float, "Label smoothing of the cross-entropy.", metavar="EPS,...")
@_axis("seed", int, "Head initialisation seeds.", metavar="SEED,...")
@_axis("C", float, "logreg inverse regularisation strengths.", metavar="C,...")
@_axis("k", int, "knn: neighbours that vote; every k and T is scored from one search for the "
       "largest k.", metavar="K,...")
@_axis("temperature", float, "knn: temperatures T of the votes, exp(cosine similarity / T).",
       metavar="T,...")
@_axis("alpha", float, "ridge regularisation strengths (> 0); every alpha costs about what one "
       "does.", metavar="A,...")
@_axis("shrinkage", float, "lda covariance shrinkages in [0, 1] (0: none, 1: the identity times "
       "the mean variance).", metavar="S,...")
@click.option("--epochs", type=click_type(TrainConfig, "epochs"),
              default=_D["epochs"], show_default=True,
              help="Passes over the training rows.")
@click.option("--batch-size", type=click_type(TrainConfig, "batch_size"), default=_D["batch_size"],
              show_default=True, help="Rows per step.")
@click.option("--momentum", type=click_type(TrainConfig, "momentum"), default=_D["momentum"],
              show_default=True,
              help="sgd momentum.")
@click.option("--schedule", type=click_type(TrainConfig, "schedule"),
              default=_D["schedule"], show_default=True,
              help="Learning-rate schedule: cosine decays per step to 0; step multiplies by 0.1 "
                   "every --lr-step epochs.")
@click.option("--lr-step", type=click_type(TrainConfig, "lr_step"), default=_D["lr_step"],
              show_default=True,
              help="Period of the step schedule in epochs; 0: a third of --epochs.")
@click.option("--class-weight", type=click_type(TrainConfig, "class_weight"),
              default=_D["class_weight"], show_default=True,
              help="balanced: weigh classes by n / (classes x count), as scikit-learn.")
@click.option("--patience", type=click_type(TrainConfig, "patience"), default=_D["patience"],
              show_default=True,
              help="Early stopping: stop a head after this many epochs without better validation "
                   "accuracy (ties: lower loss) and keep its best epoch; 0: off.")
@click.option("--halving", is_flag=True, default=_D["halving"],
              help="Successive halving: at epochs r, 2r, 4r, ... (r from --epochs and the number "
                   "of heads) stop the heads of worse validation loss and train on with the "
                   "rest; stopped heads keep their records.")
@click.option("--halving-rate", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              default=_D["halving_rate"], show_default=True,
              help="Fraction of the training heads stopped at each halving.")
@click.option("--data-seed", type=int, default=_D["data_seed"], show_default=True,
              help="Seed of the batch order and dropout noise, shared by all heads.")
@click.option("--shuffle-chunks", type=click_type(TrainConfig, "shuffle_chunks"),
              default=_D["shuffle_chunks"],
              show_default=True,
              help="Shuffle window in HDF5 chunks; 0: every chunk that fits in --max-memory.")
@click.option("--max-memory", type=_Size(rule_of(TrainConfig, "max_memory")),
              default=_D["max_memory"],
              show_default=size_text(_D["max_memory"]),
              help="Features held in RAM at most (4G, 512M); a larger cache is streamed from "
                   "HDF5 in shuffled whole chunks. A pass of heads holds at most a quarter of it "
                   "in parameters and optimizer state: more heads, more passes.")
@click.option("--standardize/--no-standardize", default=_D["standardize"], show_default=True,
              help="linear and mlp heads: train on features standardized with the training "
                   "rows' per-feature mean and std (folded into the saved head, which takes "
                   "raw features).")
@click.option("--logreg-max-iter", type=click_type(TrainConfig, "logreg_max_iter"),
              default=_D["logreg_max_iter"],
              show_default=True, help="lbfgs iterations per logreg fit.")
@click.option("--logreg-standardize/--no-logreg-standardize", default=_D["logreg_standardize"],
              show_default=True, help="Fit logreg on standardized features (folded into the "
                                      "saved layer, which takes raw features).")
@click.option("--layer", default=_D["layer"],
              help="The cut to train on, for a cache extracted with several (--layer fc6,fc7): "
                   "its name, alias or graph node; default: the cache's only cut.")
@click.option("--views", type=_Views(rule_of(TrainConfig, "views")), default=_D["views"],
              show_default="all",
              help="For a cache extracted with --views K: draw each image's view in each epoch "
                   "from all K, or from the first N (1: the plain view only). Validation and "
                   "test use the plain view.")
@click.option("--allow-incomplete", is_flag=True,
              help="Use the committed rows of caches whose extraction did not finish.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("-q", "--quiet", is_flag=True,
              help="Warnings only on stderr (no line per pass); the leaderboard is still printed.")
@click.pass_context
@fail_on_user_error
def train_head_command(ctx: click.Context, train: Path, runs_dir: Path, val: Path | None,
                       test: Path | None, as_json: bool, quiet: bool, **options) -> None:
    """Train many heads on the cached features in TRAIN, in one pass per head shape (split when
    a pass would exceed a quarter of --max-memory), and print a leaderboard sorted by
    validation accuracy.

    Comma-separated values are swept: --lr 1e-3,1e-2 --weight-decay 0,1e-4 --dropout 0,0.5
    --seed 0,1,2 is 24 experiments, trained together. Each run lands in RUNS/<run-id>/ (head.pt,
    head.json, metrics.json); RUNS/results.csv has one row per experiment. stderr gets a line
    per pass; `pipeline -v train-head` adds a line per epoch, -q leaves warnings only.
    """
    from pipeline.train_head import train_head

    if val is not None and ctx.get_parameter_source("val_fraction").name == "COMMANDLINE":
        raise click.UsageError("give --val or --val-fraction, not both")
    stage_log = logging.getLogger("pipeline.train_head")
    level = stage_log.level
    if quiet:
        stage_log.setLevel(logging.WARNING)
    try:
        summary = train_head(train, runs_dir, TrainConfig(**options), val_path=val,
                             test_path=test)
    finally:
        stage_log.setLevel(level)
    if as_json:
        click.echo(json.dumps(summary.to_json(), indent=2))
        return
    click.echo(_table(summary.leaderboard))
    click.echo(f"\n{summary.line()}")
    click.echo(f"best: {summary.best_run}  ->  {summary.best_path}")


def _table(rows: list[dict], limit: int = 40) -> str:
    """The leaderboard as aligned text columns (the first `limit` rows)."""
    return "\n".join(table(rows, ("rank", "run_id", "val_acc", "val_balanced_acc", "val_top5",
                                   "val_loss", "train_loss", "test_acc", "epochs_run"),
                            limit=limit))
