"""The re-run that finds nothing to do: decided without torch, at the cost of a stat per image;
and, when there is work, the model built while the images are listed and hashed."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import torch
import torchvision

from pipeline import ExtractConfig, extract
from pipeline import _uptodate
from pipeline import images as images_mod
from pipeline.sources import find_images

from .conftest import make_folder

CFG = ExtractConfig(backbone="resnet18", weights="none", image_size=32, batch_size=4,
                    dtype="float32", workers=0, progress=False, device="cpu")
ARGS = ["--backbone", "resnet18", "--weights", "none", "--image-size", "32", "--batch-size", "4",
        "--dtype", "float32", "--workers", "0", "--device", "cpu", "-q"]
REPO = Path(__file__).resolve().parents[1]
# The CLI in a fresh interpreter; prints its output and the heavy modules it imported.
_PROBE = """
import contextlib, io, json, sys
from cli.main import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        main(sys.argv[1:], prog_name="pipeline")
    except SystemExit as e:
        code = e.code
print(json.dumps({"code": code, "output": out.getvalue(), "heavy": sorted(
    m for m in ("torch", "torchvision", "timm", "sklearn", "PIL") if m in sys.modules)}))
"""


def _cli(*args: str) -> dict:
    done = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True,
                          timeout=300, cwd=REPO, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_an_up_to_date_rerun_imports_no_torch(tmp_path):
    images = make_folder(tmp_path / "images", per_class=3)
    out = tmp_path / "c.h5"
    first = _cli("extract", str(images), "-o", str(out), *ARGS)
    assert first["code"] in (0, None) and "6 rows (6 computed" in first["output"]
    again = _cli("extract", str(images), "-o", str(out), *ARGS)
    assert again["code"] in (0, None)
    assert again["output"].strip() == f"{out}: up to date (6 rows, 0 skipped images)"
    assert again["heavy"] == []
    # A changed image is work: only its row is computed, with the model (and torch).
    (images / "cat" / "000.png").write_bytes((images / "dog" / "001.png").read_bytes())
    changed = _cli("extract", str(images), "-o", str(out), *ARGS)
    assert "6 rows (1 computed, 5 reused, 0 dropped, 1 changed)" in changed["output"]
    assert "torch" in changed["heavy"]


def test_versions_read_without_import_equal_the_imported_ones():
    assert _uptodate.installed_version("torch") == torch.__version__
    assert _uptodate.installed_version("torchvision") == torchvision.__version__
    assert _uptodate.installed_version("no_such_package_here") is None


def test_the_walk_keeps_each_files_stat_in_sorted_order(tmp_path):
    images = make_folder(tmp_path / "images", classes=("b", "a"), per_class=3)
    (images / "a" / "notes.txt").write_text("not an image")
    os.mkfifo(images / "a" / "pipe.png")
    listed = find_images(images)
    assert list(listed.paths) == sorted(f"{c}/{i:03d}.png" for c in "ab" for i in range(3))
    assert listed.stats == tuple((st.st_size, st.st_mtime_ns) for st in (
        os.stat(images / p) for p in listed.paths))


def test_only_changed_files_are_read(tmp_path, monkeypatch):
    images = make_folder(tmp_path / "images", per_class=4)
    out = tmp_path / "c.h5"
    extract(images, out, CFG)
    read = []
    digest = images_mod.file_digest       # digest_or_blank's reader
    monkeypatch.setattr(images_mod, "file_digest", lambda p: read.append(p) or digest(p))
    touched = images / "dog" / "002.png"
    os.utime(touched, ns=(0, 10**18))
    summary = extract(images, out, CFG)
    assert summary.up_to_date and summary.hashed == 1 and read == [touched]
    read.clear()
    again = extract(images, out, CFG)
    assert again.up_to_date and again.hashed == 0 and read == []     # its new stat was kept


def test_the_model_is_built_while_images_are_hashed(tmp_path, monkeypatch):
    images = make_folder(tmp_path / "images", per_class=2)
    module = sys.modules["pipeline.extract"]
    build, building, overlapped = module.build_model, threading.Event(), []

    def slow_build(config):
        building.set()
        return build(config)
    digest = images_mod.file_digest

    def hash_after_build_began(path):
        overlapped.append(building.wait(timeout=20))   # never set if built only after hashing
        return digest(path)
    monkeypatch.setattr(module, "build_model", slow_build)
    monkeypatch.setattr(images_mod, "file_digest", hash_after_build_began)
    summary = extract(images, tmp_path / "c.h5", CFG)
    assert summary.computed == 4 and overlapped == [True] * 4
