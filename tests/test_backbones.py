"""Backbones beyond VGG: cached features equal the libraries' own feature extraction (torchvision's
`create_feature_extractor`, timm's `forward_head(pre_logits=True)`) on the weights' own
preprocessing; export and predict for a non-VGG backbone equal the head on the cached features.

Random-init weights (`--weights none`: the model built under seed 0), 32 px images, no network.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from click.testing import CliRunner
from PIL import Image
from torchvision.models.feature_extraction import create_feature_extractor
from torchvision.transforms._presets import ImageClassification

from cache import CacheReader
from cache.errors import UserError
from cli.main import main
from pipeline.backbone import build_backbone, list_layers, load_weights
from pipeline.config import ExportConfig, ExtractConfig, PredictConfig, TrainConfig
from pipeline.export import export
from pipeline.extract import extract
from pipeline.head_file import load_head
from pipeline.models import load_model
from pipeline.predict import predict
from pipeline.train_head import train_head

from .conftest import make_folder

SIZE = 32


def _cfg(**kw) -> ExtractConfig:
    return ExtractConfig(**{"weights": "none", "image_size": SIZE, "batch_size": 4,
                            "dtype": "float32", "progress": False, "workers": 0, **kw})


def _seeded(build):
    torch.manual_seed(0)
    return build().eval()


def _cached(folder, path, **kw):
    extract(folder, path, _cfg(**kw))
    with CacheReader(path) as r:
        return r.load_features(), list(r.paths), r.manifest


def _torchvision_preset(name: str) -> ImageClassification:
    """The weights' own transforms (torchvision's preset) at SIZE, keeping their resize/crop ratio."""
    t = torchvision.models.get_model_weights(name).DEFAULT.transforms()
    return ImageClassification(crop_size=SIZE, resize_size=round(SIZE * t.resize_size[0] /
                                                                 t.crop_size[0]),
                               mean=t.mean, std=t.std, interpolation=t.interpolation)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("bb") / "images", per_class=2, size=(36, 44))


@pytest.mark.parametrize("name, inner, kwargs", [
    ("resnet18", "layer3.1.relu_1", {}),
    ("mobilenet_v3_small", "features.5", {}),
    ("vit_b_16", "encoder.layers.encoder_layer_1.add_1", {"image_size": SIZE}),
])
def test_torchvision_features_equal_create_feature_extractor(images, tmp_path, name, inner, kwargs):
    model = _seeded(lambda: torchvision.models.get_model(name, weights=None, **kwargs))
    penultimate = build_backbone(name, "none", "penultimate", SIZE)[1]["layer"]
    extractor = create_feature_extractor(model, [penultimate, inner])
    preset = _torchvision_preset(name)
    for layer in ("penultimate", inner):
        feats, paths, manifest = _cached(images, tmp_path / f"{layer}.h5", backbone=name,
                                         layer=layer)
        with torch.inference_mode():
            x = torch.stack([preset(Image.open(images / p).convert("RGB")) for p in paths])
            out = extractor(x)[penultimate if layer == "penultimate" else inner]
        np.testing.assert_allclose(feats, torch.flatten(out, 1).numpy(), rtol=1e-4, atol=1e-5)
        assert manifest["backbone"] == name and manifest["feature_dim"] == feats.shape[1]
    assert penultimate == {"resnet18": "flatten", "mobilenet_v3_small": "classifier.1",
                           "vit_b_16": "getitem_5"}[name]


def test_avg_pool_averages_spatial_outputs(images, tmp_path):
    flat, _, _ = _cached(images, tmp_path / "flat.h5", backbone="resnet18", layer="layer3")
    avg, _, manifest = _cached(images, tmp_path / "avg.h5", backbone="resnet18", layer="layer3",
                               pool="avg")
    assert flat.shape[1] == 256 * 2 * 2 and avg.shape[1] == 256 and manifest["pool"] == "avg"
    np.testing.assert_allclose(avg, flat.reshape(len(flat), 256, 4).mean(2), rtol=1e-5, atol=1e-6)


def test_timm_features_equal_forward_head_pre_logits(images, tmp_path):
    timm = pytest.importorskip("timm")
    from timm.data import create_transform, resolve_data_config

    model = _seeded(lambda: timm.create_model("test_vit", pretrained=False))
    transform = create_transform(**resolve_data_config({}, model=model), is_training=False)
    feats, paths, manifest = _cached(images, tmp_path / "t.h5", backbone="timm:test_vit",
                                     image_size=None)
    with torch.inference_mode():
        x = torch.stack([transform(Image.open(images / p).convert("RGB")) for p in paths])
        expected = model.forward_head(model.forward_features(x), pre_logits=True)
    np.testing.assert_allclose(feats, expected.numpy(), rtol=1e-4, atol=1e-5)
    assert manifest["preprocessing"]["crop_size"] == 160 and feats.shape == (4, 64)
    blocks, _, _ = _cached(images, tmp_path / "b.h5", backbone="timm:test_vit", layer="blocks.1",
                           image_size=None)
    with torch.inference_mode():
        tokens = model.blocks[:2](model.norm_pre(model._pos_embed(model.patch_embed(x))))
    np.testing.assert_allclose(blocks, torch.flatten(tokens, 1).numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rank, said", [(None, True), ("0", True), ("1", False)])
def test_the_random_init_warning_is_said_once_a_job(monkeypatch, caplog, rank, said):
    from pipeline.extract import build_model
    from pipeline.config import ExtractConfig
    if rank is None:
        monkeypatch.delenv("RANK", raising=False)
    else:
        monkeypatch.setenv("RANK", rank)
    build_model(ExtractConfig(backbone="resnet18", weights="none", image_size=SIZE))
    assert ("RANDOM-INIT resnet18" in caplog.text) == said


def test_list_layers_names_the_modules_that_work_as_cuts():
    run = CliRunner().invoke(main, ["extract", "--list-layers", "--backbone", "resnet18"])
    assert run.exit_code == 0, run.output
    line = run.output.splitlines()[-1]
    assert line.startswith("module names (each means its last node): layer1, layer1.0, ")
    modules = line.split(": ", 1)[1].split(", ")
    assert "layer3" in modules and "layer3.1.relu_1" not in modules
    for name in ("layer3", "layer2.0.downsample"):          # each one a cut that builds
        build_backbone("resnet18", "none", name, SIZE)


def test_an_unknown_backbone_is_said_before_any_random_init_warning(tmp_path, caplog):
    from pipeline.extract import extract
    from pipeline.config import ExtractConfig
    images = make_folder(tmp_path / "images", classes=("a",), per_class=1)
    with pytest.raises(UserError, match="unknown backbone 'nosuchnet'"):
        extract(images, tmp_path / "c.h5", ExtractConfig(backbone="nosuchnet", weights="none",
                                                           workers=0, progress=False))
    assert "RANDOM-INIT" not in caplog.text


def test_layer_names_and_refusals():
    names = list_layers("resnet18")
    assert names[0] == "penultimate" and "layer4.1.relu_1" in names and names[-1] == "fc"
    assert list_layers("vgg16")[:4] == ["penultimate", "fc7", "fc6", "pool5"]
    with pytest.raises(UserError, match="unknown backbone 'resnet0'"):
        build_backbone("resnet0", "none")
    with pytest.raises(UserError, match="unknown layer 'nope' of resnet18"):
        build_backbone("resnet18", "none", "nope", SIZE)
    run = CliRunner().invoke(main, ["extract", "--list-layers", "--backbone", "mobilenet_v3_small"])
    assert run.exit_code == 0 and "classifier.1" in run.output.split()


@pytest.fixture(scope="module")
def resnet_run(images, tmp_path_factory):
    root = tmp_path_factory.mktemp("resnet")
    cache = root / "train.h5"
    extract(images, cache, _cfg(backbone="resnet18"))
    run = train_head(cache, root / "runs", TrainConfig(epochs=3, val_fraction=0.0)).best_path
    return root, cache, run


@pytest.mark.parametrize("fmt, suffix", [("pt2", ".pt2"), ("onnx", ".onnx"),
                                         ("torchvision", ".pth")])
def test_export_and_predict_equal_the_head_on_cached_features(images, resnet_run, fmt, suffix):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    root, cache, run = resnet_run
    summary = export(run, root / f"model{suffix}", ExportConfig(format=fmt))
    assert summary.parity["max_abs_diff"] <= summary.parity["tolerance"]
    result = predict(summary.path, [images], PredictConfig(workers=0, progress=False))
    head, _ = load_head(run)
    with CacheReader(cache) as r, torch.no_grad():
        expected = head(torch.from_numpy(r.load_features())).numpy()
    np.testing.assert_allclose(result.logits, expected, rtol=1e-4, atol=1e-4)
    if fmt == "torchvision":   # the plain torchvision model, loaded the documented way
        model = torchvision.models.get_model("resnet18", num_classes=2)
        model.load_state_dict(torch.load(summary.path, weights_only=True))
        loaded = load_model(summary.path)
        x = torch.rand(2, 3, SIZE, SIZE)
        mean, std = (torch.tensor(loaded.meta["preprocessing"][k]).view(1, 3, 1, 1)
                     for k in ("mean", "std"))
        with torch.no_grad():
            np.testing.assert_allclose(model.eval()((x - mean) / std).numpy(),
                                       loaded.run(x).numpy(), rtol=1e-5, atol=1e-5)


def test_torchvision_format_needs_the_penultimate_cut(images, tmp_path):
    cache = tmp_path / "l3.h5"
    extract(images, cache, _cfg(backbone="resnet18", layer="layer3", pool="avg"))
    run = train_head(cache, tmp_path / "runs", TrainConfig(epochs=1, val_fraction=0.0)).best_path
    with pytest.raises(UserError, match="needs the penultimate cut"):
        export(run, tmp_path / "m.pth", ExportConfig(format="torchvision"))


@pytest.mark.parametrize("fmt, suffix", [("pt2", ".pt2"), ("onnx", ".onnx")])
def test_image_input_model_takes_pixels_of_any_size(images, resnet_run, fmt, suffix):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    root, cache, run = resnet_run
    summary = export(run, root / f"pixels{suffix}", ExportConfig(format=fmt, input="image"))
    assert summary.meta["input"]["kind"] == "image" and summary.meta["input"]["dtype"] == "uint8"
    assert summary.parity["max_abs_diff"] <= summary.parity["tolerance"]
    model = load_model(summary.path)
    head, _ = load_head(run)
    with CacheReader(cache) as r, torch.no_grad():
        expected = head(torch.from_numpy(r.load_features())).numpy()
        paths = list(r.paths)
    result = predict(summary.path, [images], PredictConfig(workers=0, progress=False))
    assert [p["path"] for p in result.predictions] == [(images / p).as_posix() for p in paths]
    scale = np.abs(expected).max()
    assert np.abs(result.logits - expected).max() <= 0.1 * scale     # tensor vs Pillow resize
    # Pixels of another size go in as they are: (1, 3, 50, 70) uint8.
    x = torch.randint(0, 256, (1, 3, 50, 70), dtype=torch.uint8)
    assert model.run(x).shape == (1, 2)


def test_image_input_refuses_the_torchvision_format(resnet_run):
    root, _, run = resnet_run
    with pytest.raises(UserError, match="--input image needs --format pt2 or onnx"):
        export(run, root / "m.pth", ExportConfig(format="torchvision", input="image"))


@pytest.mark.parametrize("error, expected", [
    (OSError("network unreachable"), UserError), (RuntimeError("no pretrained weights"), UserError),
    (ConnectionError(), UserError), (KeyError("a bug of ours"), KeyError)])
def test_only_download_errors_become_connect_once(monkeypatch, error, expected):
    """timm's pretrained weights: offline or missing weights read "connect once"; anything
    else keeps its traceback."""
    timm = pytest.importorskip("timm")

    def create_model(name, pretrained=False, **kwargs):
        raise error
    monkeypatch.setattr(timm, "create_model", create_model)
    with pytest.raises(expected) as e:
        load_weights("timm:test_vit", "DEFAULT")
    assert ("connect once" in str(e.value)) == (expected is UserError)
