"""Faults and hostile input after extract: damaged metadata (a cache manifest, head.json,
metrics.json, results.csv, model metadata), full disks and read-only output folders. Each ends
in one `Error:` line that names the file and the way out, with no traceback, and what was
written before is neither lost nor left half-written.

Caches are tiny synthetic ones (no backbone), except where export must rebuild the backbone:
a random-init VGG16 cut at pool5 (conv layers only) of 6 images at 32 px. Real full disks
and read-only mounts are tmpfs mounts, made only when the tests run as root and `mount`
works; the same faults are also injected by patching the writes, which runs everywhere.
"""
from __future__ import annotations

import csv
import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from cache.errors import UserError
from cache.store import CacheWriter, partial_path, read_manifest
from cli.main import main
from pipeline.config import ExportConfig, ExtractConfig, TrainConfig
from pipeline.export import export
from pipeline.extract import extract
from pipeline.heads import load_head
from pipeline.models import MODEL_FORMAT, load_model
from pipeline.report import report
from pipeline.train_head import train_head

from ._caches import MANIFEST, make_cache
from .conftest import make_folder

FAST = dict(epochs=2, batch_size=16, val_fraction=0.25)
ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def blobs(n=60, d=6, c=3, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % c
    return (rng.normal(size=(c, d))[y] * 2 + rng.normal(size=(n, d))).astype(np.float32), y


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line(result, *words) -> str:
    """The run ended with exit 1 and exactly one `Error:` line, last, holding every word."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and result.output.rstrip().endswith(errors[0]), result.output
    assert "\n" not in errors[0]
    for w in words:
        assert w in errors[0], errors[0]
    return errors[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative path -> bytes)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def temporaries(folder: Path) -> list[str]:
    """Files or folders a write left behind under a temporary (hidden) name."""
    return [p.name for p in folder.rglob(".*")]


# ---------------------------------------------------------------------------- mounts (root)

def _mount(where: Path, options: str) -> bool:
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or not shutil.which("mount"):
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                          capture_output=True)
    return done.returncode == 0


@pytest.fixture
def tmpfs(tmp_path):
    """make(name, options): a fresh tmpfs mounted at tmp_path/name (skips the test where that
    cannot be done); unmounted afterwards."""
    mounted = []

    def make(name: str, options: str) -> Path:
        where = tmp_path / name
        where.mkdir()
        if not _mount(where, options):
            pytest.skip(f"needs root and `mount -t tmpfs -o {options}` to work")
        mounted.append(where)
        return where

    yield make
    for where in reversed(mounted):
        subprocess.run(["umount", str(where)], check=False)


@pytest.fixture
def readonly(tmp_path, tmpfs):
    """A folder this process cannot write: chmod 0o500, or for root (whom that does not stop)
    a read-only tmpfs."""
    folder = tmp_path / "readonly"
    folder.mkdir()
    os.chmod(folder, 0o500)
    if not os.access(folder, os.W_OK):
        yield folder
        os.chmod(folder, 0o700)
        return
    os.chmod(folder, 0o700)
    yield tmpfs("readonly-mount", "ro,size=64k")


# ------------------------------------------------------------------------ damaged manifests

@pytest.fixture
def cache(tmp_path):
    return make_cache(tmp_path / "train.h5", *blobs())


def _set_manifest(path: Path, change) -> None:
    """Rewrite the stored manifest: `change` is the new text, or edits the parsed dict."""
    with h5py.File(path, "r+") as h5:
        if isinstance(change, str):
            h5.attrs["manifest"] = change
        else:
            manifest = json.loads(h5.attrs["manifest"])
            change(manifest)
            h5.attrs["manifest"] = json.dumps(manifest)


MANIFEST_DAMAGE = {
    "missing class_names": (lambda m: m.pop("class_names"),
                            "class_names must be a list of strings (it is missing)"),
    "class_names: 5": (lambda m: m.update(class_names=5),
                       "class_names must be a list of strings (got 5)"),
    "missing feature_dim": (lambda m: m.pop("feature_dim"),
                            "feature_dim must be a positive integer (it is missing)"),
    "crop size as text": (lambda m: m["preprocessing"].update(crop_size="32"),
                          "preprocessing.crop_size must be a positive integer (got '32')"),
    "invalid JSON": ('{"backbone": "vgg16", ', "damaged cache manifest: not valid JSON"),
    "not an object": ("[1, 2]", "the file must be a JSON object (got [1, 2])"),
}


@pytest.mark.parametrize("command", ["inspect", "train-head"])
@pytest.mark.parametrize("case", MANIFEST_DAMAGE)
def test_a_damaged_cache_manifest_is_one_line(cache, tmp_path, command, case):
    change, words = MANIFEST_DAMAGE[case]
    _set_manifest(cache, change)
    args = [cache] if command == "inspect" else [cache, "-o", tmp_path / "runs"]
    one_line(cli(command, *args), f"{cache}: damaged cache manifest", words, "re-extract")
    assert not (tmp_path / "runs").exists()
    with pytest.raises(UserError, match="damaged cache manifest"):
        read_manifest(cache)


def test_inspect_needs_every_preprocessing_setting_it_shows(cache):
    # make_cache writes no interpolation: enough to read features, not to describe the cache.
    one_line(cli("inspect", cache), f"{cache}: damaged cache manifest",
             "preprocessing.interpolation must be one of nearest, nearest-exact, bilinear",
             "(it is missing)")
    _set_manifest(cache, lambda m: m["preprocessing"].update(interpolation="bilinear"))
    result = cli("inspect", cache)
    assert result.exit_code == 0 and "crop 32, bilinear" in result.output, result.output


def _several_cuts(path: Path) -> Path:
    """A complete cache of two cuts (fc6: 4 wide, fc7: 3 wide), as extract --layer fc6,fc7
    writes one."""
    cuts = [{"name": "fc6", "layer": "classifier.1", "layer_alias": "fc6", "pool": None,
             "feature_dim": 4},
            {"name": "fc7", "layer": "classifier.4", "layer_alias": "fc7", "pool": None,
             "feature_dim": 3}]
    manifest = {**MANIFEST, "dtype": "float32", "class_names": ["a", "b"], "cuts": cuts,
                "preprocessing": {**MANIFEST["preprocessing"], "interpolation": "bilinear",
                                  "antialias": True}}
    writer = CacheWriter.create(partial_path(path), manifest)
    x = np.random.default_rng(0).normal(size=(20, 7)).astype(np.float32)
    writer.commit({"fc6": x[:, :4], "fc7": x[:, 4:]}, [i % 2 for i in range(20)],
                  [f"{'ab'[i % 2]}/{i}.png" for i in range(20)], ["0" * 64] * 20)
    return writer.finish(path)


@pytest.mark.parametrize("change, words", [
    (lambda m: m["cuts"][1].update(feature_dim="3"),
     "cuts[1].feature_dim must be a positive integer (got '3')"),
    (lambda m: m["cuts"][0].pop("name"), "cuts[0].name must be a non-empty string (it is missing)"),
    (lambda m: m.update(cuts={"fc6": 4}), "cuts must be a non-empty list of objects"),
    (lambda m: m["cuts"][1].update(name="fc6"), "cuts must be a list of cuts with distinct names"),
])
def test_a_damaged_several_cut_manifest_is_one_line(tmp_path, change, words):
    path = _several_cuts(tmp_path / "multi.h5")
    assert cli("inspect", path).exit_code == 0           # sound before the damage
    _set_manifest(path, change)
    one_line(cli("inspect", path), f"{path}: damaged cache manifest", words)
    one_line(cli("train-head", path, "-o", tmp_path / "runs", "--layer", "fc7"),
             f"{path}: damaged cache manifest", words)


# ------------------------------------------------------------- damaged run files and tables

@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A folder of 2 runs trained on a small synthetic cache (validated on a hash split)."""
    root = tmp_path_factory.mktemp("damaged-sweep")
    path = make_cache(root / "train.h5", *blobs())
    train_head(path, root / "runs", TrainConfig(lr=(1e-2, 1e-1), **FAST))
    return root / "runs"


def _copy(sweep: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the sweep folder and its best run folder."""
    runs = shutil.copytree(sweep, tmp_path / "runs")
    best = json.loads((runs / "summary.json").read_text())["best_run"]
    return runs, runs / best


def _damage_json(path: Path, change) -> None:
    if isinstance(change, str):
        path.write_text(change)
    else:
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))


HEAD_DAMAGE = {
    "missing in_dim": (lambda m: m.pop("in_dim"), "in_dim must be a positive integer (it is "
                                                  "missing)"),
    "class_names: 5": (lambda m: m.update(class_names=5),
                       "class_names must be a list of n_classes (3) strings or null (got 5)"),
    "kind: 3": (lambda m: m.update(kind=3),
                "kind must be one of linear, mlp, logreg, ridge, lda (got 3)"),
    "preprocessing as text": (lambda m: m["cache"].update(preprocessing="32px"),
                              "cache.preprocessing must be an object (got '32px')"),
    "hash split without fraction": (lambda m: m["data"]["val"].pop("fraction"),
                                    "data.val.fraction must be a number in (0, 1)"),
    "invalid JSON": ("{ truncated", "damaged head metadata: not valid JSON"),
}


@pytest.mark.parametrize("command", ["export", "report"])
@pytest.mark.parametrize("case", HEAD_DAMAGE)
def test_a_damaged_head_json_is_one_line(sweep, tmp_path, command, case):
    runs, best = _copy(sweep, tmp_path)
    change, words = HEAD_DAMAGE[case]
    _damage_json(best / "head.json", change)
    args = ([best, "-o", tmp_path / "m.pt2"] if command == "export"
            else [runs, "-o", tmp_path / "report"])
    one_line(cli(command, *args), f"{best / 'head.json'}: damaged head metadata", words,
             "retrain")
    assert not (tmp_path / "m.pt2").exists() and not (tmp_path / "report").exists()


def test_a_truncated_head_pt_is_one_line(sweep, tmp_path):
    runs, best = _copy(sweep, tmp_path)
    data = (best / "head.pt").read_bytes()
    (best / "head.pt").write_bytes(data[: len(data) // 2])
    one_line(cli("export", best, "-o", tmp_path / "m.pt2"), f"{best / 'head.pt'}: damaged head "
             "weights", "retrain")
    # report loads the best head to find its mistakes on the validation rows
    one_line(cli("report", runs, "-o", tmp_path / "report"), f"{best / 'head.pt'}: damaged")
    # weights of another shape than head.json says
    torch.save({"weight": torch.zeros(2, 2), "bias": torch.zeros(2)}, best / "head.pt")
    one_line(cli("export", best, "-o", tmp_path / "m.pt2"), "do not fit the head")


METRICS_DAMAGE = {
    "missing epochs": (lambda m: m.pop("epochs"), "epochs must be a list (it is missing)"),
    "epoch as text": (lambda m: m["epochs"][0].update(epoch="1"),
                      "epochs[0].epoch must be a positive integer (got '1')"),
    "confusion matrix as text": (lambda m: m["val"].update(confusion_matrix="x"),
                                 "val.confusion_matrix must be a square list of lists of "
                                 "counts, 3 x 3"),
    "confusion matrix of other classes": (
        lambda m: m["val"].update(confusion_matrix=[[1, 0], [0, 1]]), "3 x 3 (the head's"),
    "invalid JSON": ('{"epochs": [', "damaged run metrics: not valid JSON"),
}


@pytest.mark.parametrize("case", METRICS_DAMAGE)
def test_damaged_metrics_json_is_one_line(sweep, tmp_path, case):
    runs, best = _copy(sweep, tmp_path)
    change, words = METRICS_DAMAGE[case]
    _damage_json(best / "metrics.json", change)
    one_line(cli("report", runs, "-o", tmp_path / "report"),
             f"{best / 'metrics.json'}: damaged run metrics", words, "retrain that run")
    assert not (tmp_path / "report").exists()


def _edit_csv(path: Path, edit) -> None:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    edit(rows)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


RESULTS_DAMAGE = {
    "missing run_id column": (lambda rows: [r.pop(1) for r in rows],
                              "column 'run_id' must be in the header line (got ['rank', "),
    "lr as a word": (lambda rows: rows[1].__setitem__(rows[0].index("lr"), "fast"),
                     "line 2, column lr must be a number (got 'fast')"),
    "rank as a float word": (lambda rows: rows[2].__setitem__(0, "first"),
                             "line 3, column rank must be an integer (got 'first')"),
    "a run id outside the folder": (lambda rows: rows[1].__setitem__(1, "../../etc"),
                                    "line 2, column run_id must be a run folder name"),
    "a short row": (lambda rows: rows[2].__delitem__(slice(3, None)),
                    "line 3 must be 32 cells, one per column (got 3)"),
}


@pytest.mark.parametrize("command", ["report", "train-head"])
@pytest.mark.parametrize("case", RESULTS_DAMAGE)
def test_a_damaged_results_csv_is_one_line(sweep, tmp_path, command, case):
    runs, _ = _copy(sweep, tmp_path)
    edit, words = RESULTS_DAMAGE[case]
    _edit_csv(runs / "results.csv", edit)
    before = snapshot(runs)
    if command == "report":
        result = cli("report", runs, "-o", tmp_path / "report")
    else:   # a second sweep into the folder reads it to merge, and refuses before training
        cache = json.loads((runs / "summary.json").read_text())["data"]["train"]["path"]
        result = cli("train-head", cache, "-o", runs, "--lr", "0.05", "--epochs", "2",
                     "--val-fraction", "0.25", "--batch-size", "16")
    one_line(result, f"{runs / 'results.csv'}: damaged results table", words,
             "new -o folder")
    assert snapshot(runs) == before


def test_a_damaged_sweep_summary_is_one_line(sweep, tmp_path):
    runs, _ = _copy(sweep, tmp_path)
    _damage_json(runs / "summary.json", lambda s: s.update(class_names="abc"))
    cache = json.loads((sweep / "summary.json").read_text())["data"]["train"]["path"]
    one_line(cli("train-head", cache, "-o", runs, "--epochs", "1"),
             f"{runs / 'summary.json'}: damaged sweep summary",
             "class_names must be a list of strings (got 'abc')")


# ------------------------------------------------------------------ damaged model metadata

def _model_meta(**changes) -> dict:
    return {"format": MODEL_FORMAT, "model_format": "pt2", "class_names": ["ant", "bee"],
            "input": {"kind": "tensor"}, "output": "logits",
            "preprocessing": {"resize_size": 37, "crop_size": 32, "mean": [0.5] * 3,
                              "std": [0.25] * 3, "interpolation": "bilinear", "antialias": True},
            **changes}


def _tiny_pt2(path: Path, meta_text: str, classes: int = 2) -> Path:
    """A .pt2 archive as export writes one, of a tiny linear model on (N, 3, 32, 32)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, classes)).eval()
    program = torch.export.export(model, (torch.rand(2, 3, 32, 32),),
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    torch.export.save(program, path, extra_files={"pipeline.json": meta_text})
    return path


@pytest.fixture
def image(tmp_path) -> Path:
    return next(make_folder(tmp_path / "images", classes=("ant",), per_class=1).rglob("*.png"))


PT2_DAMAGE = {
    "missing preprocessing": (json.dumps({k: v for k, v in _model_meta().items()
                                          if k != "preprocessing"}),
                              "preprocessing must be an object (it is missing)"),
    "null preprocessing": (json.dumps(_model_meta(preprocessing=None)),
                           "preprocessing must be an object (got None)"),
    "class_names: 5": (json.dumps(_model_meta(class_names=5)),
                       "class_names must be a non-empty list of strings (got 5)"),
    "unknown preprocessing key": (
        json.dumps(_model_meta(preprocessing={**_model_meta()["preprocessing"], "gamma": 2})),
        "preprocessing.gamma must be absent: it is not a preprocessing setting"),
    "input kind": (json.dumps(_model_meta(input={"kind": "video"})),
                   "input.kind must be one of tensor, image (got 'video')"),
    "invalid JSON": ('{"format": "pipeline-model/1", ', "damaged model metadata: not valid JSON"),
}


def test_a_sound_tiny_model_predicts(tmp_path, image):
    model = _tiny_pt2(tmp_path / "m.pt2", json.dumps(_model_meta()))
    result = cli("predict", model, image, "--format", "json", "-q")
    assert result.exit_code == 0, result.output
    (pred,) = json.loads(result.stdout)["predictions"]
    assert [t["class"] for t in pred["top"]] in (["ant", "bee"], ["bee", "ant"])


@pytest.mark.parametrize("case", PT2_DAMAGE)
def test_damaged_pt2_metadata_is_one_line(tmp_path, image, case):
    text, words = PT2_DAMAGE[case]
    model = _tiny_pt2(tmp_path / "m.pt2", text)
    one_line(cli("predict", model, image, "-q"), f"{model}: damaged model metadata", words,
             "export the model again")


def test_class_names_that_do_not_fit_the_logits_are_one_line(tmp_path, image):
    model = _tiny_pt2(tmp_path / "m.pt2", json.dumps(_model_meta(class_names=["a", "b", "c"])))
    one_line(cli("predict", model, image, "-q"), f"{model}: damaged model metadata",
             "it names 3 classes, the model gives logits of shape (1, 2)")


def _sidecar(**changes) -> dict:
    return _model_meta(**{"model_format": "torchvision", "weights_file": "m.pth",
                          "torchvision": {"model": "vgg16", "num_classes": 2, "kwargs": {},
                                          "final_layer": "classifier.6"}, **changes})


SIDECAR_DAMAGE = {
    "missing class_names": ({k: v for k, v in _sidecar().items() if k != "class_names"},
                            "class_names must be a non-empty list of strings (it is missing)"),
    "class_names: 5": (_sidecar(class_names=5), "class_names must be a non-empty list of "
                                                "strings (got 5)"),
    "weights elsewhere": (_sidecar(weights_file="../other.pth"),
                          "weights_file must be a file name (no folder) (got '../other.pth')"),
    "num_classes": (_sidecar(torchvision={"model": "vgg16", "num_classes": 5}),
                    "torchvision.num_classes must be the number of class_names (2) (got 5)"),
    "std of zero": (_sidecar(preprocessing={**_model_meta()["preprocessing"], "std": [0, 1, 1]}),
                    "preprocessing.std must be a list of 3 positive finite numbers"),
    "missing torchvision": ({k: v for k, v in _sidecar().items() if k != "torchvision"},
                            "torchvision must be an object (it is missing)"),
    "unknown torchvision model": (_sidecar(torchvision={"model": "vgg99", "num_classes": 2}),
                                  "torchvision cannot build 'vgg99'"),
    "invalid JSON": ("{not json", "damaged model metadata: not valid JSON"),
}


@pytest.mark.parametrize("case", SIDECAR_DAMAGE)
def test_a_damaged_export_sidecar_is_one_line(tmp_path, image, case):
    meta, words = SIDECAR_DAMAGE[case]
    weights = tmp_path / "m.pth"
    weights.write_bytes(b"not read before the sidecar is checked")
    sidecar = tmp_path / "m.json"
    sidecar.write_text(meta if isinstance(meta, str) else json.dumps(meta))
    one_line(cli("predict", weights, image, "-q"), f"{sidecar}", words)
    one_line(cli("predict", sidecar, image, "-q"), f"{sidecar}", words)


# ---------------------------------------------------------------- full disks, read-only folders

def _patch_write(monkeypatch, method: str, name: str, error=ENOSPC, after: int = 0):
    """Make Path.<method> raise `error` when writing the file `name` (under its own name or
    a temporary one beside it), after `after` such writes went through. Returns the names it
    refused."""
    real = getattr(Path, method)
    seen, refused = [], []
    stem, suffix = Path(name).stem, Path(name).suffix

    def fake(self, *args, **kwargs):
        if self.suffix == suffix and (self.stem == stem or self.name.startswith(f".{stem}.")):
            seen.append(self.name)
            if len(seen) > after:
                refused.append(self.name)
                raise error
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, method, fake)
    return refused


def _check_runs(runs: Path) -> None:
    """Every run folder's files are whole: head.pt loads, the JSON files parse."""
    for run in (p for p in runs.iterdir() if p.is_dir()):
        load_head(run)
        json.loads((run / "metrics.json").read_text())


@pytest.mark.parametrize("method, name, after, words", [
    ("write_bytes", "head.pt", 1, "head.pt: No space left on device"),      # the second head
    ("write_text", "metrics.json", 0, "metrics.json: No space left on device"),
    ("write_text", "results.csv", 0, "results.csv: No space left on device"),
    ("write_text", "summary.json", 0, "summary.json: No space left on device"),
])
def test_a_full_disk_during_train_head_loses_nothing(cache, tmp_path, monkeypatch, method, name,
                                                     after, words):
    runs = tmp_path / "runs"
    train_head(cache, runs, TrainConfig(lr=(1e-2,), **FAST))
    before = snapshot(runs)
    refused = _patch_write(monkeypatch, method, name, after=after)
    result = cli("train-head", cache, "-o", runs, "--lr", "0.01,0.1,0.5", "--epochs", "2",
                 "--val-fraction", "0.25", "--batch-size", "16")
    one_line(result, "cannot write", words, "free some space", "is as it was")
    assert refused
    monkeypatch.undo()
    after_files = snapshot(runs)
    assert temporaries(runs) == []
    # The previous sweep's table and summary are untouched; files written before the failure
    # are whole, and none that existed is gone.
    if name != "summary.json":
        assert after_files["results.csv"] == before["results.csv"]
    assert after_files["summary.json"] == before["summary.json"]
    assert set(before) <= set(after_files)
    _check_runs(runs)


def test_a_failed_rename_during_train_head_is_one_line(cache, tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    train_head(cache, runs, TrainConfig(lr=(1e-2,), **FAST))
    before = snapshot(runs)
    real = os.replace

    def failing(src, dst):
        if Path(dst).name == "head.json":
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    result = cli("train-head", cache, "-o", runs, "--lr", "0.01,0.1", "--epochs", "2",
                 "--val-fraction", "0.25", "--batch-size", "16")
    one_line(result, "head.json: Input/output error")
    monkeypatch.undo()
    assert temporaries(runs) == [] and snapshot(runs)["results.csv"] == before["results.csv"]
    _check_runs(runs)


def test_a_read_only_runs_folder_fails_before_training(cache, readonly):
    epochs = []
    with pytest.raises(UserError, match="is not writable: choose another -o"):
        train_head(cache, readonly / "runs", TrainConfig(**FAST), on_epoch=epochs.append)
    assert epochs == []
    one_line(cli("train-head", cache, "-o", readonly / "runs"), "cannot write runs folder",
             "choose another -o")
    one_line(cli("train-head", cache, "-o", readonly), "is not writable")


def test_a_read_only_report_folder_is_one_line(sweep, readonly):
    one_line(cli("report", sweep, "-o", readonly / "report"), "cannot write report folder",
             "choose another -o")


@pytest.mark.parametrize("target", ["report.md", "misclassified.png"])
def test_a_full_disk_during_report_keeps_the_previous_report(sweep, tmp_path, monkeypatch,
                                                             target):
    runs, _ = _copy(sweep, tmp_path)
    out = tmp_path / "report"
    report(runs, out)
    before = snapshot(out)
    if target.endswith(".md"):
        _patch_write(monkeypatch, "write_text", target)
    else:
        from matplotlib.figure import Figure
        real = Figure.savefig

        def savefig(self, fname, *args, **kwargs):
            if target.split(".")[0] in Path(fname).name:
                raise ENOSPC
            return real(self, fname, *args, **kwargs)

        monkeypatch.setattr(Figure, "savefig", savefig)
    one_line(cli("report", runs, "-o", out), f"cannot write {out / target}: No space left")
    monkeypatch.undo()
    after = snapshot(out)
    assert after[target] == before[target] and temporaries(out) == []


def test_predict_output_on_a_full_disk_or_read_only_folder(tmp_path, image, monkeypatch,
                                                           readonly):
    model = _tiny_pt2(tmp_path / "m.pt2", json.dumps(_model_meta()))
    out = tmp_path / "preds.csv"
    out.write_text("previous predictions\n")
    _patch_write(monkeypatch, "write_text", "preds.csv")
    one_line(cli("predict", model, image, "-o", out, "--format", "csv", "-q"),
             f"cannot write {out}: No space left on device")
    monkeypatch.undo()
    assert out.read_text() == "previous predictions\n" and temporaries(tmp_path) == []
    one_line(cli("predict", model, image, "-o", readonly / "p.csv", "-q"), "is not writable")


# ------------------------------------------------------- export: full disks, read-only folders

@pytest.fixture(scope="module")
def pool5(tmp_path_factory):
    """A random-init VGG16 pool5 cache of 6 tiny images and the best of 1 linear head on it."""
    root = tmp_path_factory.mktemp("damaged-export")
    images = make_folder(root / "images", classes=("ant", "bee"), per_class=3, size=(32, 32))
    cache = root / "c.h5"
    extract(images, cache, ExtractConfig(weights="none", layer="pool5", image_size=32,
                                         workers=0, progress=False))
    run = train_head(cache, root / "runs", TrainConfig(epochs=1, val_fraction=0.0)).best_path
    return run


def test_export_checks_free_space_before_writing(pool5, tmp_path, monkeypatch):
    out = tmp_path / "m.pt2"
    out.write_bytes(b"the previous model")

    class Usage:
        free = 2**20
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage)
    one_line(cli("export", pool5, "-o", out, "--no-parity-check"),
             f"not enough free space to write {out}", "MiB needed, 1 MiB free",
             "free some space or choose another -o")
    assert out.read_bytes() == b"the previous model" and temporaries(tmp_path) == []


@pytest.mark.parametrize("fault", ["save", "rename"])
def test_export_write_failures_keep_the_previous_model(pool5, tmp_path, monkeypatch, fault):
    out = tmp_path / "m.pt2"
    out.write_bytes(b"the previous model")
    if fault == "save":
        def save(*args, **kwargs):
            raise ENOSPC
        monkeypatch.setattr(torch.export, "save", save)
    else:
        real = os.replace

        def replace(src, dst):
            if Path(dst) == out:
                raise OSError(errno.EROFS, os.strerror(errno.EROFS))
            return real(src, dst)
        monkeypatch.setattr(os, "replace", replace)
    words = "No space left on device" if fault == "save" else "Read-only file system"
    one_line(cli("export", pool5, "-o", out, "--no-parity-check"), f"cannot write {out}: {words}",
             "is as it was")
    assert out.read_bytes() == b"the previous model" and temporaries(tmp_path) == []


def test_export_into_a_read_only_folder_is_one_line(pool5, readonly):
    one_line(cli("export", pool5, "-o", readonly / "m.pt2"), "cannot write to", "choose another")


def test_the_space_estimate_covers_what_export_writes(pool5, tmp_path):
    from pipeline.backbone import build_backbone
    from pipeline.export import _SPACE_MARGIN

    summary = export(pool5, tmp_path / "m.pt2", ExportConfig(parity_check=False))
    assert load_model(tmp_path / "m.pt2").class_names == ["ant", "bee"]
    backbone, _ = build_backbone("vgg16", "none", "pool5", image_size=32)
    head, _ = load_head(pool5)
    tensors = sum(t.numel() * t.element_size()
                  for m in (backbone, head) for t in m.state_dict().values())
    assert tensors < summary.size_bytes <= tensors * _SPACE_MARGIN[0] + _SPACE_MARGIN[1]


# ------------------------------------------------------------------- real full disks (tmpfs)

def test_real_full_disk_train_head_loses_nothing(tmp_path, tmpfs):
    disk = tmpfs("disk", "size=1m")
    x, y = blobs(n=400, d=256, c=40)
    cache = make_cache(tmp_path / "wide.h5", x, y)                 # heads of 41 KiB each
    runs = disk / "runs"
    small = train_head(cache, runs, TrainConfig(lr=(1e-2,), epochs=1, val_fraction=0.25))
    before = snapshot(runs)
    lrs = ",".join(str(1e-3 * (i + 1)) for i in range(40))     # 40 heads: more than 1 MiB
    result = cli("train-head", cache, "-o", runs, "--lr", lrs, "--epochs", "1",
                 "--val-fraction", "0.25")
    one_line(result, "No space left on device", "free some space")
    after = snapshot(runs)
    assert after["results.csv"] == before["results.csv"]
    assert after["summary.json"] == before["summary.json"]
    assert temporaries(runs) == []
    assert json.loads(after["summary.json"])["best_run"] == small.best_run
    for run in (p for p in runs.iterdir() if p.is_dir()):   # the runs written are whole
        if (run / "head.pt").exists() and (run / "head.json").exists():
            load_head(run)


def test_real_full_disk_export_is_refused_before_writing(pool5, tmpfs):
    disk = tmpfs("disk", "size=1m")
    one_line(cli("export", pool5, "-o", disk / "m.pt2", "--no-parity-check"),
             f"not enough free space to write {disk / 'm.pt2'}")
    assert list(disk.iterdir()) == []


def test_real_full_disk_report_is_one_line(sweep, tmpfs):
    disk = tmpfs("disk", "size=16k")
    one_line(cli("report", sweep, "-o", disk / "report"), "No space left on device",
             "free some space or choose another -o")
    assert temporaries(disk) == []
    assert all(p.stat().st_size > 0 for p in (disk / "report").iterdir())


def test_a_real_read_only_mount_is_refused_before_training(cache, tmpfs):
    mount = tmpfs("ro", "ro,size=64k")
    epochs = []
    with pytest.raises(UserError, match=f"cannot write runs folder {mount / 'runs'}"):
        train_head(cache, mount / "runs", TrainConfig(**FAST), on_epoch=epochs.append)
    assert epochs == []
