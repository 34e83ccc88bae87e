"""The weights and cut records: JSON round trips, old manifests' strings converted, and export
finding a local weights file again by its recorded path."""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch

from cache import CacheReader, UserError
from cache import manifest as mf
from cache.records import RECORD_KEY, Cut, Weights
from pipeline.backbone import build_backbone

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "format1" / "cache.h5"
SHA = "ab" * 32


@pytest.mark.parametrize("backbone, label, kind, name, argument", [
    ("vgg16", "vgg16:IMAGENET1K_V1", "torchvision", "IMAGENET1K_V1", "IMAGENET1K_V1"),
    ("timm:resnet18", "timm:resnet18:a1_in1k", "timm", "a1_in1k", "DEFAULT"),
    ("vgg16", "file:my.pth", "file", "my.pth", None),
    ("vgg16", "none", "none", "none", "none"),
])
def test_weights_from_old_label(backbone, label, kind, name, argument):
    w = Weights.from_manifest({"backbone": backbone, "weights": label, "weights_sha256": SHA})
    assert (w.kind, w.name, w.sha256, w.path) == (kind, name, SHA, None)
    assert w.label(backbone) == label and w.argument() == argument
    assert w.is_random_init() == (kind == "none")
    assert Weights.from_json(json.loads(json.dumps(w.to_json()))) == w


def test_weights_record_wins_over_the_label_only_while_they_agree():
    w = Weights("file", "my.pth", SHA, "/data/my.pth")
    m = {"backbone": "vgg16", "weights": "file:my.pth", "weights_sha256": SHA,
         RECORD_KEY: w.to_json()}
    assert Weights.from_manifest(m) == w and w.argument() == "/data/my.pth"
    edited = {**m, "weights": "none"}               # the label decides the features
    assert Weights.from_manifest(edited) == Weights("none", "none", SHA)


@pytest.mark.parametrize("damaged", [{"kind": "url", "name": "x", "sha256": SHA},
                                     {"kind": "file", "name": "", "sha256": SHA},
                                     {"kind": "file", "name": "a", "sha256": SHA, "path": 3},
                                     "file:a"])
def test_damaged_weights_record_is_one_line(damaged):
    with pytest.raises(UserError, match=r"^c\.h5: damaged weights record .*: re-extract"):
        Weights.from_json(damaged, "c.h5")


def test_cut_record_round_trip_and_display_name():
    one = {"layer": "classifier.4", "layer_alias": "fc7", "pool": None, "feature_dim": 4096}
    [cut] = Cut.all(one)
    assert cut == Cut("fc7", "classifier.4", "fc7", None, 4096)
    assert cut.display_name == "fc7"
    assert Cut.from_json(cut.to_json()) == cut
    bare = Cut.from_json({"layer": "features.30", "feature_dim": 512})
    assert (bare.name, bare.display_name, bare.alias) == ("features.30", "features.30", None)
    multi = {"cuts": [cut.to_json(), Cut("pool5", "avgpool", "pool5", "avg", 25088).to_json()]}
    assert [c.display_name for c in Cut.all(multi)] == ["fc7", "pool5"]
    assert mf.cuts(multi) == [c.to_json() for c in Cut.all(multi)]


def test_old_cache_reads_back_as_records():
    with CacheReader(FIXTURE) as r:
        assert "weights_record" not in r.manifest
        assert r.weights == Weights("none", "none", r.manifest["weights_sha256"])
        assert r.weights.is_random_init()
        assert r.cuts == [Cut("features.30", "features.30", None, None, 512)]


# ------------------------------------------------------------ export finds the weights file

_export = importlib.import_module("pipeline.export")
SMALL = "mobilenet_v3_small"   # a few MB of weights: quick to save, load and hash


def _save_weights(path: Path, seed: int) -> Path:
    import torchvision
    torch.manual_seed(seed)
    torch.save(torchvision.models.get_model(SMALL, weights=None).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A local weights file and the head metadata's `cache` entry of a cache made with it."""
    folder = tmp_path_factory.mktemp("weights")
    path = _save_weights(folder / "mine.pth", seed=1)
    _, info = build_backbone(SMALL, path, "penultimate", image_size=32)
    return path, {"cache": info}


def test_build_records_the_file_path(made):
    path, meta = made
    w = Weights.from_manifest(meta["cache"])
    assert (w.kind, w.name, w.path) == ("file", "mine.pth", str(path.resolve()))
    assert meta["cache"]["weights"] == "file:mine.pth"        # the fingerprint's field as it was


def test_export_rebuilds_from_the_recorded_path(made):
    _, meta = made
    _, info = _export._rebuild_backbone(meta, None)           # no --weights
    assert info["weights_sha256"] == meta["cache"]["weights_sha256"]


def test_export_asks_for_weights_when_the_file_moved(made, tmp_path):
    path, meta = made
    moved = tmp_path / "moved.pth"
    moved.write_bytes(path.read_bytes())
    record = {**meta["cache"][RECORD_KEY], "path": str(tmp_path / "gone.pth")}
    gone = {"cache": {**meta["cache"], RECORD_KEY: record}}
    with pytest.raises(UserError) as e:
        _export._rebuild_backbone(gone, None)
    text = str(e.value)
    assert "\n" not in text and str(tmp_path / "gone.pth") in text and "--weights PATH" in text
    _, info = _export._rebuild_backbone(gone, str(moved))     # told where it went: fine
    assert info["weights_sha256"] == meta["cache"]["weights_sha256"]


def test_export_asks_for_weights_when_the_file_changed(made, tmp_path):
    _, meta = made
    changed = _save_weights(tmp_path / "mine.pth", seed=2)
    record = {**meta["cache"][RECORD_KEY], "path": str(changed)}
    with pytest.raises(UserError) as e:
        _export._rebuild_backbone({"cache": {**meta["cache"], RECORD_KEY: record}}, None)
    text = str(e.value)
    assert "\n" not in text and str(changed) in text and "has changed" in text
    assert "--weights PATH" in text


def test_one_cut_is_resolved_from_the_split_list():
    _, info = build_backbone("vgg16", "none", " fc7,", image_size=32)
    assert (info["layer"], info["layer_alias"], info["feature_dim"]) == ("classifier.4", "fc7", 4096)
    assert info["weights"] == "none" and info[RECORD_KEY]["kind"] == "none"
