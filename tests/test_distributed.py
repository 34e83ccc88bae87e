"""`pipeline extract` on torchrun (2 CPU ranks, gloo) writes the cache one process writes;
kills, user errors and a missing rank end the job cleanly; unchanged images cost a stat.

The ranks run resnet18 with random-init weights on 32 px images, one thread each.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cache import CacheReader
from cache import manifest as mf
from cache.plan import shard_paths
from pipeline.config import ExtractConfig
from pipeline.extract import extract

from .conftest import error_lines, make_folder

REPO = Path(__file__).resolve().parents[1]
ARGS = ["--backbone", "resnet18", "--weights", "none", "--image-size", "32", "--batch-size", "4",
        "--dtype", "float32", "--workers", "0", "-q"]
CFG = ExtractConfig(backbone="resnet18", weights="none", image_size=32, batch_size=4,
                    dtype="float32", workers=0, progress=False)


def torchrun(mode: str, source: Path, output: Path, *extra: str, timeout: int = 240,
             ranks: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={ranks}", str(REPO / "tests" / "_dist_run.py"), mode, str(source),
           "-o", str(output), *ARGS, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=REPO)


def read(path):
    with CacheReader(path) as r:
        return (r.load_features(), list(r.paths), r.labels.tolist(), list(r.digests),
                sorted(r.errors), r.manifest)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    images = make_folder(root / "images", classes=("a", "b", "c"), per_class=7, seed=3)
    (images / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (images / "c" / "empty.png").write_bytes(b"")
    single = root / "single.h5"
    extract(images, single, CFG)
    return root, images, read(single)


def assert_same_cache(got, want):
    np.testing.assert_array_equal(got[0], want[0])              # bit-identical features
    assert got[1:5] == want[1:5]                                 # paths, labels, digests, errors
    a = {k: v for k, v in got[5].items() if k not in ("world_size", "rows", "errors")}
    b = {k: v for k, v in want[5].items() if k not in ("world_size", "rows", "errors")}
    assert a == b


def test_two_ranks_write_the_single_process_cache(data, tmp_path):
    root, images, single = data
    out = tmp_path / "two.h5"
    run = torchrun("ok", images, out)
    assert run.returncode == 0, run.stderr[-3000:]
    got = read(out)
    assert_same_cache(got, single)
    assert got[5]["world_size"] == 2 and len(got[4]) == 2 and len(got[1]) == 21
    assert run.stdout.count("21 rows") == 1 and "x 2 ranks" in run.stdout   # rank 0 alone says it
    assert not shard_paths(out)


def test_killed_rank_then_rerun_and_resume_with_one_process(data, tmp_path):
    root, images, single = data
    out = tmp_path / "killed.h5"
    run = torchrun("kill", images, out)
    assert run.returncode != 0 and not out.exists()
    shards = shard_paths(out)
    assert shards, run.stderr[-2000:]
    held = 0
    for p in shards:
        with CacheReader(p, allow_incomplete=True) as r:
            held += r.n_rows
    assert held >= 4                                   # committed batches survived the kill
    again = tmp_path / "again.h5"
    for p in shards:                                   # the same partial state, twice
        shutil.copy(p, again.with_name(again.name + p.name[len(out.name):]))
    run = torchrun("ok", images, out)                  # re-run on 2 ranks
    assert run.returncode == 0, run.stderr[-3000:]
    assert_same_cache(read(out), single)
    summary = extract(images, again, CFG)              # finished by 1 process
    assert summary.computed == 21 - held and summary.world_size == 1
    assert_same_cache(read(again), single)
    assert not shard_paths(out) and not shard_paths(again)


def test_user_error_on_one_rank_ends_both(data, tmp_path):
    root, images, _ = data
    out = tmp_path / "refused.h5"
    run = torchrun("user-error", images, out)
    assert run.returncode != 0 and not out.exists() and not shard_paths(out)
    errors = error_lines(run.stderr)
    assert len(errors) == 2, run.stderr[-3000:]          # one line from each rank
    assert all("cannot write to /nowhere: choose another -o" in e for e in errors)
    assert "rank 1: cannot write" in run.stderr
    assert "UserError" not in run.stderr      # torchrun prints its own report, we print one line


def test_a_missing_rank_is_named_after_the_timeout(data, tmp_path):
    root, images, _ = data
    out = tmp_path / "late.h5"
    t0 = time.perf_counter()
    run = torchrun("late", images, out, "--dist-timeout", "3")
    assert run.returncode != 0 and not out.exists()
    assert "not every rank arrived after checking the input" in run.stderr, run.stderr[-3000:]
    assert "Rank 1 failed to pass monitoredBarrier" in run.stderr
    assert time.perf_counter() - t0 < 120


def test_unchanged_images_cost_a_stat(data, tmp_path):
    root, source, _ = data
    images = tmp_path / "images"
    shutil.copytree(source, images)
    out = tmp_path / "c.h5"
    first = extract(images, out, CFG)
    assert first.hashed == 23                      # 21 images and 2 bad files: all read once
    with CacheReader(out) as r:
        assert (r.stats[:, 0] > 0).all()           # sizes kept beside the digests
    again = extract(images, out, CFG)
    assert again.up_to_date and again.hashed == 2  # only the bad files (no digest kept for them)
    touched = images / "a" / "000.png"
    os.utime(touched, ns=(time.time_ns(), time.time_ns() + 10**9))
    after_touch = extract(images, out, CFG)
    assert after_touch.hashed == 3 and after_touch.up_to_date   # same content: nothing computed
    changed = images / "a" / "001.png"
    changed.write_bytes((images / "b" / "000.png").read_bytes())
    after_change = extract(images, out, CFG)
    assert after_change.hashed == 3 and after_change.computed == 1
    assert extract(images, out, ExtractConfig(**{**CFG.__dict__, "rehash": True})).hashed == 23


def test_a_no_op_rerun_builds_no_model(data, tmp_path, monkeypatch):
    root, images, _ = data
    out = tmp_path / "c.h5"
    extract(images, out, CFG)
    module = sys.modules["pipeline.extract"]

    def no_model(config):
        raise AssertionError("the model was built for an up-to-date cache")
    monkeypatch.setattr(module, "build_model", no_model)
    summary = extract(images, out, CFG)
    assert summary.up_to_date and summary.manifest["backbone"] == "resnet18"
    assert mf.feature_fingerprint(summary.manifest)
