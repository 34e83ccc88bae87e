"""Several cuts in one pass: a 3-cut cache equals three single-cut caches; resumed and incremental
runs work on every cut; train-head picks one cut and equals train-head on the single-cut cache;
caches written in format 1 (before several cuts existed) keep working everywhere."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cache import CacheReader, partial_path
from cache import manifest as mf
from cache.errors import UserError
from cli.main import main
from pipeline.config import ExportConfig, ExtractConfig, TrainConfig
from pipeline.export import export
from pipeline.extract import extract
from pipeline.train_head import train_head

from .conftest import failing_build, make_folder

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "format1"
CUTS = ("fc6", "fc7", "features.30")
CFG = ExtractConfig(weights="none", image_size=32, batch_size=4, dtype="float32", progress=False,
                    workers=0)


def _cfg(**kw) -> ExtractConfig:
    return ExtractConfig(**{**CFG.__dict__, **kw})


def _features(path, layer=None) -> np.ndarray:
    with CacheReader(path, layer=layer) as r:
        return r.load_features()


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuts")
    images = make_folder(root / "images", per_class=5)
    extract(images, root / "multi.h5", _cfg(layer=",".join(CUTS)))
    for cut in CUTS:
        extract(images, root / f"{cut}.h5", _cfg(layer=cut))
    return root, images


def test_three_cut_cache_equals_three_single_cut_caches(caches):
    root, _ = caches
    with CacheReader(root / "multi.h5") as r:
        assert r.cut_names == list(CUTS) and r.file_manifest["format_version"] == 2
        with pytest.raises(UserError, match=r"holds several cuts \(fc6, fc7, features.30\)"):
            r.features
    for cut in CUTS:
        np.testing.assert_array_equal(_features(root / "multi.h5", cut),
                                      _features(root / f"{cut}.h5"))
        with CacheReader(root / "multi.h5", layer=cut) as m, CacheReader(root / f"{cut}.h5") as s:
            assert mf.feature_fingerprint(m.manifest) == mf.feature_fingerprint(s.manifest)
            assert m.paths == s.paths and m.labels.tolist() == s.labels.tolist()
    # A cut is found by its name, its alias or its graph node.
    np.testing.assert_array_equal(_features(root / "multi.h5", "classifier.4"),
                                  _features(root / "fc7.h5"))
    with pytest.raises(UserError, match="holds no cut 'pool5', only fc6, fc7, features.30"):
        CacheReader(root / "multi.h5", layer="pool5")


def test_other_cuts_are_refused_with_the_difference(caches):
    root, images = caches
    with pytest.raises(UserError, match=r"cuts: fc6 \(classifier.1\), fc7 \(classifier.4\), "
                                        r"features.30 \(features.30\) vs fc6 \(classifier.1\), "
                                        r"fc7 \(classifier.4\)"):
        extract(images, root / "multi.h5", _cfg(layer="fc6,fc7"))
    with pytest.raises(UserError, match="names the node classifier.4 twice"):
        extract(images, root / "other.h5", _cfg(layer="fc7,classifier.4"))
    assert extract(images, root / "multi.h5", _cfg(layer=",".join(CUTS))).up_to_date


def test_resumed_and_incremental_runs_work_on_every_cut(caches, tmp_path, monkeypatch):
    root, images = caches
    module = sys.modules["pipeline.extract"]
    monkeypatch.setattr(module, "build_model", failing_build(module))
    out = tmp_path / "m.h5"
    with pytest.raises(RuntimeError, match="simulated failure"):
        extract(images, out, _cfg(layer=",".join(CUTS)))
    with CacheReader(partial_path(out), allow_incomplete=True, layer="fc6") as r:
        assert r.n_rows == 4
    monkeypatch.undo()
    summary = extract(images, out, _cfg(layer=",".join(CUTS)))
    assert (summary.computed, summary.reused) == (6, 4)
    for cut in CUTS:   # resumed: bit-identical to the uninterrupted cache
        np.testing.assert_array_equal(_features(out, cut), _features(root / "multi.h5", cut))
    # Incremental: two images added, one removed; every cut equals a fresh extraction.
    grown = tmp_path / "grown"
    shutil.copytree(images, grown)
    make_folder(tmp_path / "extra", classes=("cat",), per_class=2, seed=5)
    for i, p in enumerate(sorted((tmp_path / "extra" / "cat").iterdir())):
        shutil.copy(p, grown / "cat" / f"new{i}.png")
    (grown / "dog" / "000.png").unlink()
    shutil.copy(out, tmp_path / "g.h5")
    summary = extract(grown, tmp_path / "g.h5", _cfg(layer=",".join(CUTS)))
    assert (summary.computed, summary.reused, summary.removed) == (2, 9, 1)
    extract(grown, tmp_path / "fresh.h5", _cfg(layer=",".join(CUTS)))
    for cut in CUTS:   # new rows were computed in other batches: equal up to float rounding
        np.testing.assert_allclose(_features(tmp_path / "g.h5", cut),
                                   _features(tmp_path / "fresh.h5", cut), rtol=1e-5, atol=1e-6)


def test_train_head_picks_a_cut_and_equals_the_single_cut_cache(caches, tmp_path):
    root, _ = caches
    cfg = TrainConfig(head=("linear",), epochs=3, val_fraction=0.3)
    with pytest.raises(UserError, match=r"holds several cuts \(fc6, fc7, features.30\)"):
        train_head(root / "multi.h5", tmp_path / "none", cfg)
    for cut in ("fc7", "features.30"):
        multi = train_head(root / "multi.h5", tmp_path / f"m-{cut}", TrainConfig(
            **{**cfg.__dict__, "layer": cut}))
        single = train_head(root / f"{cut}.h5", tmp_path / f"s-{cut}", cfg)
        a, b = multi.leaderboard[0], single.leaderboard[0]
        assert a["val_acc"] == b["val_acc"] and a["train_loss"] == b["train_loss"]
        heads = [torch.load(Path(r["path"]) / "head.pt", weights_only=True) for r in (a, b)]
        for k in heads[0]:
            np.testing.assert_array_equal(heads[0][k].numpy(), heads[1][k].numpy())
    # The head records its cut; export rebuilds that cut and checks parity on the 3-cut cache.
    summary = export(multi.best_path, tmp_path / "m.pt2", ExportConfig())
    assert summary.meta["backbone"]["layer"] == "features.30"
    assert summary.parity["max_abs_diff"] <= summary.parity["tolerance"]


def test_a_val_cache_must_hold_the_cut(caches, tmp_path):
    root, _ = caches
    cfg = TrainConfig(head=("linear",), epochs=1, layer="fc6")
    with pytest.raises(UserError, match="holds no cut 'classifier.1'"):
        train_head(root / "multi.h5", tmp_path / "r", cfg, val_path=root / "fc7.h5")
    summary = train_head(root / "multi.h5", tmp_path / "r", cfg, val_path=root / "fc6.h5")
    assert summary.data["val"]["rows"] == 10


def test_format1_cache_keeps_working(tmp_path):
    """tests/fixtures/format1/cache.h5 was written before caches could hold several cuts
    (random-init VGG16, features.30, 32 px, 6 images of 2 classes)."""
    cache = tmp_path / "cache.h5"
    shutil.copy(FIXTURE / "cache.h5", cache)
    images = tmp_path / "images"
    shutil.copytree(FIXTURE / "images", images)
    with CacheReader(cache) as r:
        assert r.manifest["format_version"] == 1 and "pool" not in r.manifest
        assert r.cut_names == ["features.30"] and r.load_features().shape == (6, 512)
    run = CliRunner().invoke(main, ["inspect", str(cache)])
    assert run.exit_code == 0 and "layer features.30 512-d" in run.output, run.output
    summary = extract(images, cache, ExtractConfig(weights="none", layer="features.30",
                                                   image_size=32, workers=0, progress=False))
    assert summary.up_to_date                # the same settings still match the old manifest
    trained = train_head(cache, tmp_path / "runs", TrainConfig(epochs=2, val_fraction=0.0))
    model = export(trained.best_path, tmp_path / "m.pt2",
                   ExportConfig(cache=str(cache), images_root=str(images)))
    assert model.parity["max_abs_diff"] <= model.parity["tolerance"]
