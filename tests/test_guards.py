"""Hostile input aimed at the lock files, the runs folder's records, --augment and --views, and
damaged caches: each ends in one `Error:` line with nothing lost and nothing written through,
and the corrected command then works.

resnet18 with random-init weights on 32 px images; caches of synthetic rows (no backbone).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cache.errors import UserError
from cache import partial_path
from cli.main import main
from pipeline import ExtractConfig, extract
from pipeline import _engine as engine
from pipeline._distributed import Job
from pipeline.augment import Augment
from pipeline.preprocessing import Preprocessing
from pipeline.config import TrainConfig
from pipeline.train_head import train_head

from ._caches import make_cache
from .conftest import make_folder
from .test_damaged import FAST, blobs, one_line, snapshot

ARGS = ["--backbone", "resnet18", "--weights", "none", "--image-size", "32", "--batch-size", "4",
        "--dtype", "float32", "-q"]


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def images(tmp_path):
    return make_folder(tmp_path / "imgs", per_class=2, size=(36, 40))


# ------------------------------------------------------------------------------ lock files

@pytest.mark.parametrize("kind, words", [("symlink", "is a symbolic link"),
                                         ("fifo", "is not a regular file"),
                                         ("folder", "is a folder"),
                                         ("hardlink", "with other names")])
def test_a_lock_file_that_is_not_ours_is_never_written_through(images, tmp_path, kind, words):
    out, lock = tmp_path / "c.h5", tmp_path / ".c.h5.lock"
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    {"symlink": lambda: lock.symlink_to(victim), "fifo": lambda: os.mkfifo(lock),
     "folder": lock.mkdir, "hardlink": lambda: os.link(victim, lock)}[kind]()
    one_line(cli("extract", images, "-o", out, *ARGS), f"{lock}, the lock file of {out}", words,
             "remove it and re-run")
    assert victim.read_text() == "precious\n"
    assert not out.exists() and not partial_path(out).exists()
    if kind == "symlink":                  # the corrected command: the link removed
        lock.unlink()
        assert cli("extract", images, "-o", out, *ARGS).exit_code == 0
        assert out.exists() and not lock.exists() and victim.read_text() == "precious\n"


def test_an_output_ending_in_a_slash_names_a_folder(images, tmp_path):
    result = cli("extract", images, "-o", f"{tmp_path}/newdir/", *ARGS)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "newdir/ ends in a slash, so it names a folder" in errors[0]
    with pytest.raises(UserError, match="ends in a slash"):
        extract(images, f"{tmp_path}/newdir/", ExtractConfig(weights="none", image_size=32))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs"]


# ------------------------------------------------------------------- concurrent sweeps

def test_a_sweep_that_lands_during_another_is_kept(tmp_path, monkeypatch):
    """Sweep B reads the folder's leaderboard, then sweep A lands before B writes its own:
    both sweeps' runs are in results.csv and summary.json."""
    cache, runs = make_cache(tmp_path / "train.h5", *blobs()), tmp_path / "runs"
    module = sys.modules["pipeline.train_head"]
    plan = module.plan_memory

    def meanwhile(*args, **kwargs):
        monkeypatch.setattr(module, "plan_memory", plan)
        train_head(cache, runs, TrainConfig(lr=(1e-2,), **FAST))          # sweep A
        return plan(*args, **kwargs)
    monkeypatch.setattr(module, "plan_memory", meanwhile)
    summary = train_head(cache, runs, TrainConfig(lr=(1e-1, 3e-1), **FAST))   # sweep B
    folders = sorted(p.name for p in runs.iterdir() if p.is_dir())
    assert len(folders) == 3 and summary.runs == 3
    listed = [line.split(",")[1] for line in (runs / "results.csv").read_text().splitlines()[1:]]
    assert sorted(listed) == folders
    board = json.loads((runs / "summary.json").read_text())["leaderboard"]
    assert sorted(r["run_id"] for r in board) == folders


# --------------------------------------------------------------------- --augment, --views

PRE = Preprocessing(37, 32, (0.5,) * 3, (0.5,) * 3)


@pytest.mark.parametrize("spec, words", [
    ("Grayscale()", "uint8 tensor of shape (1, 64, 64): a view must stay an RGB uint8 image"),
    ("FiveCrop(8)", "FiveCrop gives an object of type tuple, not an image tensor"),
    ("Normalize([0.5, 0.5, 0.5], [0.2, 0.2, 0.2])", "Normalize fails on a 64x64"),
    ("ToPILImage()", "ToPILImage gives an object of type Image"),
    ("Lambda('x')", "Lambda fails"),
    ("CutMix()", "CutMix fails"),
    ("LinearTransformation(1, 2)", "is not a valid LinearTransformation"),
    ("RandomResizedCrop(size=-5)", "RandomResizedCrop fails"),
    ("RandomResizedCrop(scale=(-1, 2))", "RandomResizedCrop fails"),
    ("RandomRotation(1e308)", "RandomRotation fails"),
    ("Resize(100000)", "Resize would make a view of shape (3, 100000, 100000)"),
    ("Pad(30000)", "Pad would make a view of shape (3, 60064, 60064)"),
    ("GaussianBlur(99999)", "GaussianBlur fails"),
    ("(" * 20000, "characters long, more than the 1000"),
])
def test_an_augment_spec_that_cannot_run_is_refused_when_parsed(spec, words):
    with pytest.raises(UserError, match="--augment") as e:
        Augment.parse(spec, PRE)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_a_sound_augment_spec_still_parses():
    aug = Augment.parse("RandomResizedCrop(scale=(0.5, 1)),RandomHorizontalFlip(),"
                        "ColorJitter(0.2, 0.2),RandomRotation(10)", PRE)
    assert len(aug.transform.transforms) == 4


@pytest.mark.parametrize("bad, words", [
    (["--views", "2", "--augment", "Grayscale()"], "a view must stay an RGB uint8 image"),
    (["--views", "2", "--augment", "Resize(100000)"], "Resize would make a view"),
    (["--views", "100000"], "--views 100000: use 1 (the plain view) to 256"),
])
def test_bad_views_fail_before_any_work_and_the_corrected_command_works(images, tmp_path, bad,
                                                                         words):
    out = tmp_path / "c.h5"
    one_line(cli("extract", images, "-o", out, *ARGS, *bad), words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs"]      # no partial, no lock
    result = cli("extract", images, "-o", out, *ARGS, "--views", "2", "--augment",
                 "RandomHorizontalFlip()")
    assert result.exit_code == 0, result.output
    assert cli("inspect", out).output.count("2 views of each image") == 1


def test_a_run_that_fails_before_its_first_commit_leaves_no_partial(images, tmp_path,
                                                                    monkeypatch):
    out = tmp_path / "c.h5"

    def fail(*args, **kwargs):
        raise RuntimeError("a worker failed")
    monkeypatch.setattr(engine, "run", fail)
    cfg = ExtractConfig(backbone="resnet18", weights="none", image_size=32, workers=0,
                        progress=False)
    with pytest.raises(RuntimeError, match="a worker failed"):
        extract(images, out, cfg)
    assert not partial_path(out).exists() and not out.exists()
    monkeypatch.undo()
    assert extract(images, out, cfg).rows == 4


# ------------------------------------------------------------------------ damaged caches

@pytest.mark.parametrize("views, words", [
    ("abc", "views must be an object or null (got 'abc')"),
    ({"count": 2.5, "spec": "RandomHorizontalFlip()", "seed": 0},
     "views.count must be an integer from 2 to 256 (got 2.5)"),
    ({"count": 3, "seed": 0}, "views.spec must be a non-empty string (it is missing)"),
])
def test_damaged_views_in_a_manifest_are_one_line(tmp_path, views, words):
    cache = make_cache(tmp_path / "train.h5", *blobs())
    with h5py.File(cache, "r+") as h5:
        h5.attrs["manifest"] = json.dumps({**json.loads(h5.attrs["manifest"]), "views": views})
    before = snapshot(tmp_path)
    for args in (["inspect", cache], ["train-head", cache, "-o", tmp_path / "runs"]):
        one_line(cli(*args), f"{cache}: damaged cache manifest", words, "re-extract")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("damage", ["dataset", "manifest"])
def test_features_narrower_or_wider_than_the_manifest_are_refused(tmp_path, damage):
    cache = make_cache(tmp_path / "train.h5", *blobs())           # 6 wide
    with h5py.File(cache, "r+") as h5:
        if damage == "dataset":
            del h5["features"]
            h5.create_dataset("features", data=np.zeros((60, 7), np.float32), maxshape=(None, 7))
        else:
            m = json.loads(h5.attrs["manifest"])
            h5.attrs["manifest"] = json.dumps({**m, "feature_dim": 99})
    want = "(60, 7) where its manifest says (N, 6)" if damage == "dataset" else (
        "(60, 6) where its manifest says (N, 99)")
    before = snapshot(tmp_path)
    for args in (["inspect", cache], ["train-head", cache, "-o", tmp_path / "runs"]):
        one_line(cli(*args), f"{cache} is damaged: its features fc7 have shape", want)
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------- torchrun

def test_a_gone_launcher_is_one_line_on_every_rank(monkeypatch):
    class GoneStore:
        def add(self, key, n):
            raise torch.distributed.DistNetworkError("Broken pipe")
    monkeypatch.setattr(torch.distributed.distributed_c10d, "_get_default_store", GoneStore)
    add = Job(rank=1, world_size=2).counter("images")       # a launcher on another node
    with pytest.raises(UserError, match=r"rank 1: the torchrun launcher is gone \(.*Broken "
                                        r"pipe\): committed work is kept; re-run the same"):
        add(4)
    orphan = Job(rank=0, world_size=2, _launcher=-1).counter("images")
    with pytest.raises(UserError, match=r"rank 0: the torchrun launcher is gone \(its process "
                                        r"ended\)"):
        orphan(4)


@pytest.mark.slow
def test_killing_the_torchrun_launcher_is_one_line_per_rank_and_resumes(tmp_path):
    from .test_distributed import ARGS as DIST_ARGS
    from .test_distributed import REPO, read

    src = make_folder(tmp_path / "images", classes=("a", "b"), per_class=20)
    out = tmp_path / "c.h5"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(REPO / "tests" / "_dist_run.py"), "slow", str(src), "-o", str(out), *DIST_ARGS,
           "--batch-size", "2"]                    # 10 batches of 0.5 s a rank
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=env, cwd=REPO) as launcher:
        deadline = time.monotonic() + 180
        while not list(tmp_path.glob("c.h5.shard-*")) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.5)                            # a batch or two committed
        launcher.kill()
        text = launcher.stdout.read()              # until every rank has ended
    assert "Traceback" not in text, text[-3000:]
    errors = sorted(line for line in text.splitlines() if line.startswith("Error:"))
    assert [e[:len("Error: rank 0: the torchrun launcher is gone (")] for e in errors] == [
        f"Error: rank {r}: the torchrun launcher is gone (" for r in (0, 1)], text[-3000:]
    assert all(e.endswith("committed work is kept; re-run the same torchrun command to resume")
               for e in errors)
    assert list(tmp_path.glob("c.h5.shard-*")) and not out.exists()
    cmd[cmd.index("slow")] = "ok"                   # the same command, at full speed
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    alone = extract(src, tmp_path / "alone.h5", ExtractConfig(
        backbone="resnet18", weights="none", image_size=32, batch_size=2, dtype="float32",
        workers=0, progress=False))
    got, want = read(out), read(alone.path)
    np.testing.assert_array_equal(got[0], want[0])
    assert got[1:5] == want[1:5]
