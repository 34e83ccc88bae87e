"""`report()`: pictures of a head sweep, and a report.md that embeds them beside the leaderboard.

    from pipeline.config import ReportConfig
    from pipeline.report import report
    summary = report("runs/", "runs/report/", ReportConfig(misclassified=16))
    summary.path            # "runs/report/report.md"

Reads what `train_head` records under RUNS_DIR (results.csv, <run-id>/metrics.json, head.json,
head.pt) and draws four PNG figures on matplotlib's Agg canvas (headless; no pyplot, so no
global backend state is touched):

    learning_curves.png   train/val loss and accuracy per epoch of every run, the best highlighted
    hyperparameters.png   validation accuracy against each swept hyper-parameter
    confusion_matrix.png  the best head's validation confusion matrix (from its metrics.json)
    misclassified.png     the validation images the best head gets wrong most confidently

The last one needs the validation rows again: the val cache, or the hash split of the train cache
(recomputed by `splits.validation_rows`). The best head runs on their cached features, and the
images are read from the cache's source_root; missing or changed files are skipped and counted.
What could not be drawn is said in the figure itself and in report.md's notes.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter

from cache import CacheReader
from cache.errors import UserError
from cache.records import Cut, Weights

from ._files import check_folder, make_folder, write_file, write_text
from ._readback import CHANGED, MISSING, images_root, read_row_image
from ._records import AXES, VAL_CACHE, VAL_HASH_SPLIT, read_metrics, read_results
from .config import ReportConfig, validate
from .head_file import load_head, open_head_cache, read_head_meta
from .leaderboard import table
from .splits import validation_rows

FIGURES = {"learning_curves": "Learning curves",
           "hyperparameters": "Validation accuracy by hyper-parameter",
           "confusion_matrix": "Confusion matrix of the best head",
           "misclassified": "Most confident mistakes of the best head"}
_COLORS = {"linear": "tab:blue", "mlp": "tab:orange", "logreg": "tab:green", "knn": "tab:brown",
           "ridge": "tab:red", "lda": "tab:purple"}
_GRID = "misclassified grid: "     # notes about the grid start so (the figure repeats them)
_WRITE_FIX = "free some space or choose another -o"
_THUMB = 256          # pixels: larger images are shrunk before they go into the grid
_PRED_ROWS = 4096     # cached rows per batch when the best head predicts the validation rows
# Log-axis labels 0.1, 0.2, 0.3, 0.5, 1, 2 (not 5x10^-1), the other minor ticks unlabelled.
_LOG_TICKS = FuncFormatter(lambda v, _: f"{v:g}" if v > 0 and round(
    v / 10 ** math.floor(math.log10(v) + 1e-9)) in (1, 2, 3, 5) else "")


@dataclass
class ReportSummary:
    """What `report()` wrote; `notes` says what could not be drawn, and why."""
    path: str               # report.md
    figures: dict           # figure name -> PNG path
    runs: int
    best_run: str
    misclassified: int      # images in the grid
    notes: list
    seconds: float

    def line(self) -> str:
        return (f"{self.path}: {len(self.figures)} figures of {self.runs} runs (best "
                f"{self.best_run}), {_count(self.misclassified, 'misclassified image')} shown, "
                f"{_count(len(self.notes), 'note')}, {self.seconds:.1f} s")


def report(runs_dir: str | Path, output: str | Path | None = None,
           config: ReportConfig = ReportConfig()) -> ReportSummary:
    """Draw the figures of the sweep recorded in `runs_dir` and write `output`/report.md.

    `output` defaults to RUNS_DIR/report. Raises UserError when `runs_dir` holds no sweep
    (no results.csv) or the settings are bad; a cache or images that cannot be found only
    leave the misclassified grid empty, with a note saying why.
    """
    t0 = time.perf_counter()
    validate(config)
    runs_dir = Path(runs_dir)
    out = Path(output) if output is not None else runs_dir / "report"
    check_folder(out, "report folder", "choose another -o")
    notes: list[str] = []
    rows, runs = _read_sweep(runs_dir, notes)
    best = rows[0]
    best_run = runs.get(best["run_id"])
    make_folder(out, "report folder", "choose another -o")
    mistakes, names = [], (best_run or {}).get("meta", {}).get("class_names", [])
    if best_run is not None and config.misclassified:
        mistakes = _mistakes(runs_dir / best["run_id"], best_run, config, notes)
    figures = {
        "learning_curves": _learning_curves(rows, runs),
        "hyperparameters": _hyperparameters(rows),
        "confusion_matrix": _confusion(best, best_run, names),
        "misclassified": _misclassified(mistakes, best["run_id"], notes),
    }
    paths = {}
    for name, fig in figures.items():
        paths[name] = str(out / f"{name}.png")
        FigureCanvasAgg(fig)
        write_file(paths[name], lambda tmp: fig.savefig(tmp, dpi=config.dpi, format="png"),
                   _WRITE_FIX)
    md = write_text(out / "report.md", _markdown(runs_dir, rows, best_run, paths, notes, config),
                    _WRITE_FIX)
    return ReportSummary(str(md), paths, len(rows), best["run_id"], len(mistakes), notes,
                         time.perf_counter() - t0)


# ------------------------------------------------------------------------------------ records

def _read_sweep(runs_dir: Path, notes: list) -> tuple[list[dict], dict]:
    """(results.csv rows in leaderboard order with numbers as numbers, run_id -> records).

    A run whose files are gone is left out with a note; files that are there but damaged are
    an error naming the file (`read_results`, `read_head_meta`, `read_metrics` check them)."""
    csv_path = runs_dir / "results.csv"
    if not csv_path.is_file():
        raise UserError(f"no results.csv in {runs_dir}: pass the folder that `pipeline "
                         "train-head -o RUNS_DIR` wrote")
    rows = read_results(csv_path)
    if not rows:
        raise UserError(f"{csv_path} lists no runs: run `pipeline train-head` again")
    rows.sort(key=lambda r: r.get("rank") or math.inf)
    runs = {}
    for r in rows:
        run_dir = runs_dir / r["run_id"]
        head_json, metrics_json = run_dir / "head.json", run_dir / "metrics.json"
        if not head_json.is_file() or not metrics_json.is_file():
            notes.append(f"run {r['run_id']} has no head.json/metrics.json in {run_dir}: left "
                         "out of the curves")
            continue
        meta = read_head_meta(head_json)
        runs[r["run_id"]] = {"meta": meta,
                             "metrics": read_metrics(metrics_json, meta["n_classes"])}
    return rows, runs


def _count(n: int, thing: str) -> str:
    return f"{n} {thing}" + ("" if n == 1 else "s")


def _label(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


# ------------------------------------------------------------------------------------ figures

def _learning_curves(rows: list[dict], runs: dict) -> Figure:
    fig = Figure(figsize=(11, 7.5), layout="constrained")
    axes = fig.subplots(2, 2, sharex=True)
    panels = [("train_loss", "train loss"), ("val_loss", "validation loss"),
              ("train_acc", "train accuracy"), ("val_acc", "validation accuracy")]
    curved = [r for r in rows if runs.get(r["run_id"], {}).get("metrics", {}).get("epochs")]
    highlight = curved[0]["run_id"] if curved else None
    for ax, (key, title) in zip(axes.flat, panels):
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if key.endswith("loss"):
            ax.set_yscale("log")        # early spikes of large learning rates hide the rest
            ax.yaxis.set_major_formatter(_LOG_TICKS)
            ax.yaxis.set_minor_formatter(_LOG_TICKS)
        drawn = False
        for r in reversed(curved):                      # the best last, so it lies on top
            history = runs[r["run_id"]]["metrics"]["epochs"]
            ys = [h.get(key) for h in history]
            if any(y is None for y in ys):
                continue
            best = r["run_id"] == highlight
            ax.plot([h["epoch"] for h in history], ys, color=_COLORS.get(r["head"], "gray"),
                    lw=2.5 if best else 0.9, alpha=1.0 if best else 0.35, zorder=3 if best else 2)
            drawn = True
        top = rows[0]
        if key.startswith("val") and top["run_id"] != highlight and top.get(key) is not None:
            ax.axhline(top[key], color="black", ls="--", lw=1.2)   # best run without epochs
            drawn = True
        if not drawn:
            ax.text(0.5, 0.5, "no validation data" if key.startswith("val") else
                    "no per-epoch history (fits without epochs only)", ha="center", va="center",
                    transform=ax.transAxes, color="gray")
    for ax in axes[1]:
        ax.set_xlabel("epoch")
    handles = [Line2D([], [], color=c, lw=1.5, label=k) for k, c in _COLORS.items()
               if any(r["head"] == k for r in curved)]
    if highlight:
        handles.append(Line2D([], [], color=_COLORS.get(curved[0]["head"], "gray"), lw=2.5,
                              label=f"best with epochs: {highlight}"))
    if rows[0]["run_id"] != highlight:
        handles.append(Line2D([], [], color="black", ls="--", lw=1.2,
                              label=f"best: {rows[0]['run_id']} (fit without epochs)"))
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncols=min(3, len(handles)),
                   fontsize=8, frameon=False)
    fig.suptitle(f"Learning curves of {len(curved)} of {len(rows)} runs")
    return fig


def _hyperparameters(rows: list[dict]) -> Figure:
    metric = "val_acc" if any(r.get("val_acc") is not None for r in rows) else "train_acc"
    swept = [a for a in AXES if len({r[a] for r in rows if r.get(a) is not None}) > 1]
    swept = swept or ["head"]
    cols = min(3, len(swept))
    nrows = math.ceil(len(swept) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.4 * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, cols, squeeze=False, sharey=True)
    jitter = np.random.default_rng(0).uniform(-0.12, 0.12, len(rows))   # (runs,)
    for ax, axis in zip(axes.flat, swept):
        values = sorted({r[axis] for r in rows if r.get(axis) is not None})
        pos = {v: i for i, v in enumerate(values)}
        for i, r in enumerate(rows):
            if r.get(axis) is None or r.get(metric) is None:
                continue
            x = pos[r[axis]] + jitter[i]
            ax.scatter(x, r[metric], s=28, color=_COLORS.get(r["head"], "gray"), alpha=0.8,
                       edgecolors="none", zorder=2, clip_on=False)
            if i == 0:
                ax.scatter(x, r[metric], s=260, marker="*", facecolors="none",
                           edgecolors="black", linewidths=1.2, zorder=3, clip_on=False)
        ax.set_xticks(range(len(values)), [_label(v) for v in values])
        ax.set_xlim(-0.6, len(values) - 0.4)
        ax.set_title(axis.replace("_", " "))
        ax.grid(axis="y", alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel(metric.replace("val_acc", "validation accuracy")
                      .replace("train_acc", "train accuracy (no validation data)"))
    lo, hi = axes[0, 0].get_ylim()           # shared: an accuracy axis stays within [0, 1]
    axes[0, 0].set_ylim(max(lo, 0.0), min(hi, 1.0))
    for ax in list(axes.flat)[len(swept):]:
        ax.set_visible(False)
    handles = [Line2D([], [], ls="", marker="o", color=c, label=k) for k, c in _COLORS.items()
               if any(r["head"] == k for r in rows)]
    handles.append(Line2D([], [], ls="", marker="*", markersize=12, markerfacecolor="none",
                          color="black", label=f"best: {rows[0]['run_id']}"))
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8,
               frameon=False)
    fig.suptitle(f"{len(rows)} runs: validation accuracy against each swept hyper-parameter"
                 if metric == "val_acc" else f"{len(rows)} runs (no validation data)")
    return fig


def _confusion(best: dict, run: dict | None, names: list[str]) -> Figure:
    val = ((run or {}).get("metrics") or {}).get("val")
    if not val or not names:
        return _message(f"{best['run_id']}: no validation data, so no confusion matrix "
                        "(train with --val or --val-fraction > 0)")
    cm = np.asarray(val["confusion_matrix"])                   # (C, C), rows: true
    c = len(names)
    side = min(max(5.0, 0.45 * c + 3.0), 18.0)
    fig = Figure(figsize=(side + 1.2, side), layout="constrained")
    ax = fig.subplots()
    rates = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, shrink=0.8, label="fraction of the true class")
    small = 8 if c <= 20 else 6
    if c <= 60:                         # beyond that, names would overprint: indices only
        long = max(map(len, names)) > 2
        ax.set_xticks(range(c), names, rotation=45 if long else 0,
                      ha="right" if long else "center", fontsize=small)
        ax.set_yticks(range(c), names, fontsize=small)
    if c <= 30:
        for i, j in zip(*np.nonzero(cm)):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=small,
                    color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"{best['run_id']}\nvalidation accuracy {val['top1']:.4f} on {int(cm.sum())} "
                 "images", fontsize=10)
    return fig


def _misclassified(mistakes: list[dict], run_id: str, notes: list) -> Figure:
    if not mistakes:
        reason = next((n for n in notes if n.startswith(_GRID)), None)
        return _message(f"{run_id}: " + (reason[len(_GRID):] if reason else
                                         "no misclassified validation images"))
    cols = min(8, len(mistakes))
    nrows = math.ceil(len(mistakes) / cols)
    fig = Figure(figsize=(max(8.0, 1.9 * cols), 2.25 * nrows + 0.5), layout="constrained")
    axes = fig.subplots(nrows, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, m in zip(axes.flat, mistakes):
        pixels = np.asarray(m["image"])
        ax.imshow(pixels, interpolation="nearest" if max(pixels.shape[:2]) < 64 else "antialiased")
        ax.set_title(f"true {m['true']}\npred {m['pred']} ({m['confidence']:.2f})", fontsize=8,
                     color="darkred")
    fig.suptitle(f"{len(mistakes)} validation images {run_id} gets wrong most confidently "
                 "(predicted class, softmax probability)", fontsize=10)
    return fig


def _message(text: str) -> Figure:
    """A figure that says why the picture it stands for could not be drawn."""
    fig = Figure(figsize=(8, 2.5), layout="constrained")
    ax = fig.subplots()
    ax.set_axis_off()
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, fontsize=11)
    return fig


# ------------------------------------------------------------------------------ the mistakes

def _mistakes(run_dir: Path, run: dict, config: ReportConfig, notes: list) -> list[dict]:
    """The best head's most confident mistakes on the validation rows, images loaded."""
    meta = run["meta"]
    reader, rows = _validation_rows(meta, config, notes)
    if reader is None:
        return []
    try:
        head, _ = load_head(run_dir)
        labels = reader.labels[rows]                                          # (V,)
        pred, confidence = _predict(head, reader, rows)                       # (V,), (V,)
        _check_recorded(run, labels, pred, notes)
        wrong = np.flatnonzero(pred != labels)
        order = wrong[np.argsort(-confidence[wrong], kind="stable")]
        names = meta.get("class_names") or [str(i) for i in range(meta["n_classes"])]
        return _load_images(reader, rows, order, labels, pred, confidence, names, config, notes)
    finally:
        reader.close()


def _validation_rows(meta: dict, config: ReportConfig, notes: list
                     ) -> tuple[CacheReader | None, np.ndarray]:
    """The cache holding the best head's validation rows, and those rows, as train_head chose."""
    source = (meta.get("data") or {}).get("val")
    if source is None:
        notes.append(_GRID + "the sweep had no validation data (train with --val or "
                     "--val-fraction > 0)")
        return None, np.empty(0, np.int64)
    kind = source.get("kind") if isinstance(source, dict) else None
    if kind not in (VAL_HASH_SPLIT, VAL_CACHE):
        notes.append(f"{_GRID}head.json does not say where the validation rows came from in a "
                     f"form this report reads ({source!r}): re-run train-head to record it")
        return None, np.empty(0, np.int64)
    if meta.get("cache") is None:
        notes.append(f"{_GRID}head.json does not record the cache the head was trained on: "
                     "re-run train-head to record it")
        return None, np.empty(0, np.int64)
    split = kind == VAL_HASH_SPLIT
    path = Path(config.cache or (meta["cache"].get("path") or "" if split else source["path"]))
    try:
        reader, diff = open_head_cache(meta, path, bool((meta.get("config") or {}).get(
            "allow_incomplete")), classes=True)
    except UserError as e:
        notes.append(f"{_GRID}the validation cache cannot be read ({e}); pass --cache "
                     f"with the {'train' if split else 'validation'} cache the sweep used")
        return None, np.empty(0, np.int64)
    if diff:
        reader.close()
        notes.append(f"{_GRID}{path} holds other features than the head was trained on "
                     f"({'; '.join(diff)}); pass --cache with the cache the sweep used")
        return None, np.empty(0, np.int64)
    rows = (validation_rows(reader.paths, reader.labels, source["fraction"])
            if split else np.flatnonzero(reader.labels >= 0))
    expected = (meta.get("data") or {}).get("val_rows")
    if expected is not None and expected != len(rows):
        notes.append(f"{path} now gives {len(rows)} validation rows, the sweep had {expected}: "
                     "the cache changed since training, the mistakes are on the cache as it is")
    return reader, rows


def _predict(head: torch.nn.Module, reader: CacheReader, rows: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray]:
    """(predicted class, its softmax probability) of each row, `_PRED_ROWS` rows at a time."""
    pred, confidence = np.empty(len(rows), np.int64), np.empty(len(rows), np.float32)
    with torch.inference_mode():
        for s in range(0, len(rows), _PRED_ROWS):
            x = torch.from_numpy(reader.read_rows(rows[s:s + _PRED_ROWS]))     # (B, D)
            p = head(x).softmax(-1)                                           # (B, C)
            conf, idx = p.max(-1)
            pred[s:s + len(x)], confidence[s:s + len(x)] = idx.numpy(), conf.numpy()
    return pred, confidence


def _check_recorded(run: dict, labels: np.ndarray, pred: np.ndarray, notes: list) -> None:
    """Say so when the recomputed predictions disagree with train_head's recorded matrix."""
    recorded = (run["metrics"].get("val") or {}).get("confusion_matrix")
    if recorded is None:
        return
    c = len(recorded)
    cm = np.bincount(labels * c + pred, minlength=c * c).reshape(c, c)
    if not np.array_equal(cm, np.asarray(recorded)):
        notes.append("the best head's predictions on the validation cache today differ from "
                     "those recorded at training (the cache changed): the confusion matrix is "
                     "the recorded one, the mistakes are today's")


def _load_images(reader: CacheReader, rows, order, labels, pred, confidence, names,
                 config: ReportConfig, notes: list) -> list[dict]:
    root = images_root(reader, config.images_root)
    out, missing, changed = [], 0, 0
    for i in order[: max(200, 10 * config.misclassified)]:       # bound the tries
        if len(out) == config.misclassified:
            break
        row = int(rows[i])
        image, why = read_row_image(reader, root, row)
        missing, changed = missing + (why == MISSING), changed + (why == CHANGED)
        if image is None:
            continue
        image.thumbnail((_THUMB, _THUMB))
        out.append({"image": image, "path": reader.paths[row], "true": names[labels[i]],
                    "pred": names[pred[i]], "confidence": float(confidence[i])})
    if missing or changed:
        notes.append(f"{_GRID}{missing} image files missing or unreadable and {changed} "
                     f"changed since extraction were skipped (under {root}; pass --images-root "
                     "if the images moved)")
    return out


# ---------------------------------------------------------------------------------- report.md

def _markdown(runs_dir: Path, rows: list[dict], best_run: dict | None, figures: dict,
              notes: list, config: ReportConfig) -> str:
    best = rows[0]
    ranked = ("validation accuracy" if best.get("val_acc") is not None else
              "log loss on the training rows (no validation data)")
    lines = [f"# Sweep report: {runs_dir}", "",
             f"{len(rows)} runs, ranked by {ranked}. Best: `{best['run_id']}`"
             + "".join(f", {title} {best[k]:.4f}" for k, title in
                       (("val_acc", "validation accuracy"), ("test_acc", "test accuracy"))
                       if best.get(k) is not None) + "."]
    cache = (best_run or {}).get("meta", {}).get("cache")
    if cache:
        weights, cut = Weights.from_manifest(cache), Cut.from_json(cache)
        lines += ["", f"Features: {cache['backbone']} {cut.display_name} "
                  f"({cut.dim} wide), weights {cache['weights']}"
                  + (" (RANDOM-INIT: the numbers describe random features)"
                     if weights.is_random_init() else "") + f", cache `{cache.get('path')}`."]
    lines += ["", "## Leaderboard", "", *_table(rows[: config.leaderboard_rows])]
    if len(rows) > config.leaderboard_rows:
        lines += ["", f"{len(rows) - config.leaderboard_rows} more runs in "
                      f"`{runs_dir / 'results.csv'}`."]
    for name, title in FIGURES.items():
        lines += ["", f"## {title}", "", f"![{title}]({Path(figures[name]).name})"]
    if notes:
        lines += ["", "## Notes", "", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


def _table(rows: list[dict]) -> list[str]:
    return table(rows, ("rank", "run_id", "head", "val_acc", "val_loss", "train_loss",
                        "test_acc", "epochs_run"), markdown=True)


__all__ = ["FIGURES", "ReportSummary", "report"]
