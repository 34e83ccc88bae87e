"""Augmented views: K views per image in the cache (view 0 the plain one), each reproducible
alone; train-head draws one view per image per epoch; and the proof that the cache changes the
cost and nothing else: online augmentation trains the same head, bit for bit.

ResNet18 with random-init weights on 32 px images, float32 caches.
"""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cache import CacheReader, CacheWriter, partial_path
from cache.errors import UserError
from cli.main import main
from pipeline.augment import Augment
from pipeline.backbone import build_backbone
from pipeline.preprocessing import Preprocessing, to_float_batch
from pipeline._feature_splits import view_choice
from pipeline.config import ExtractConfig, TrainConfig
from pipeline.extract import extract
from pipeline.head_file import load_head
from pipeline.heads import HeadStack, StackedOptimizer
from pipeline.images import read_image
from pipeline.train_head import train_head

from ._caches import MANIFEST
from .conftest import failing_build, make_folder

SPEC = "RandomResizedCrop(scale=(0.3, 1)),RandomHorizontalFlip()"
CFG = ExtractConfig(backbone="resnet18", weights="none", image_size=32, batch_size=4,
                    dtype="float32", progress=False, workers=0)


def _cfg(**kw) -> ExtractConfig:
    return ExtractConfig(**{**CFG.__dict__, **kw})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("views")
    images = make_folder(root / "images", classes=("a", "b", "c"), per_class=4, seed=2)
    extract(images, root / "plain.h5", CFG)
    extract(images, root / "v4.h5", _cfg(views=4, augment=SPEC, augment_seed=3))
    return root, images


def _views(path) -> list[np.ndarray]:
    with CacheReader(path) as r:
        return [r.view(v)[:] for v in range(r.n_views)]


def test_views_are_the_augmented_images_through_the_backbone(data):
    root, images = data
    views = _views(root / "v4.h5")
    np.testing.assert_array_equal(views[0], _views(root / "plain.h5")[0])   # view 0 is plain
    model, info = build_backbone("resnet18", "none", "penultimate", 32)
    aug = Augment.parse(SPEC, Preprocessing.from_dict(info["preprocessing"]), seed=3)
    with CacheReader(root / "v4.h5") as r:
        paths, digests, manifest = r.paths, r.digests, r.manifest
    assert manifest["views"] == {"count": 4, "spec": SPEC, "seed": 3}
    shown = CliRunner().invoke(main, ["inspect", str(root / "v4.h5")])
    assert shown.exit_code == 0, shown.output
    assert f"4 views of each image: the plain one and 3 of {SPEC} (augment seed 3)" in shown.output
    with torch.inference_mode():
        for v in (1, 3):
            x = torch.stack([aug(read_image(images / p)[0], d, v) for p, d in zip(paths, digests)])
            np.testing.assert_allclose(views[v], model(to_float_batch(x)).numpy(), rtol=1e-4,
                                       atol=1e-5)
    assert not np.allclose(views[1], views[0]) and not np.allclose(views[1], views[2])


def test_views_resume_and_refuse_other_settings(data, tmp_path, monkeypatch):
    root, images = data
    out = tmp_path / "v.h5"
    module = sys.modules["pipeline.extract"]
    # 4 forward passes a batch (one per view): the 5th is the second batch's first.
    monkeypatch.setattr(module, "build_model", failing_build(module, n=5))
    with pytest.raises(RuntimeError, match="simulated failure"):
        extract(images, out, _cfg(views=4, augment=SPEC, augment_seed=3))
    with CacheReader(partial_path(out), allow_incomplete=True) as r:
        assert r.n_rows == 4
    monkeypatch.undo()
    summary = extract(images, out, _cfg(views=4, augment=SPEC, augment_seed=3))
    assert (summary.computed, summary.reused) == (8, 4)
    for got, want in zip(_views(out), _views(root / "v4.h5")):
        np.testing.assert_array_equal(got, want)          # resumed: bit-identical, every view
    assert extract(images, out, _cfg(views=4, augment=SPEC, augment_seed=3)).up_to_date
    for other, words in ((dict(views=3, augment=SPEC, augment_seed=3), "views.count: 4 vs 3"),
                         (dict(views=4, augment=SPEC, augment_seed=4), "views.seed: 3 vs 4"),
                         (dict(views=4, augment_seed=3), "views.spec")):
        with pytest.raises(UserError, match=words):
            extract(images, out, _cfg(**other))


@pytest.mark.parametrize("kw, words", [
    (dict(views=2, augment="Nope()"), "unknown transform 'Nope'"),
    (dict(views=2, layer="layer3,penultimate"), "augmented views of one cut at a time"),
    (dict(augment=SPEC), "add --views K"),
])
def test_bad_view_settings_fail_before_any_work(data, tmp_path, kw, words):
    root, images = data
    with pytest.raises(UserError, match=words):
        extract(images, tmp_path / "x.h5", _cfg(**kw))
    assert not list(tmp_path.iterdir())


def test_one_view_of_a_views_cache_trains_as_the_plain_cache(data, tmp_path):
    root, _ = data
    cfg = TrainConfig(epochs=3, batch_size=4, val_fraction=0.0, lr=(1e-2,))
    plain = train_head(root / "plain.h5", tmp_path / "p", cfg)
    one = train_head(root / "v4.h5", tmp_path / "o", TrainConfig(**{**cfg.__dict__, "views": 1}))
    a, b = (torch.load(f"{s.best_path}/head.pt", weights_only=True) for s in (plain, one))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(UserError, match="holds 4 view"):
        train_head(root / "v4.h5", tmp_path / "x", TrainConfig(**{**cfg.__dict__, "views": 5}))


def _synthetic_views_cache(path, n=1000, dim=512, views=4):
    """A float32 cache of `views` views written directly (two 1 MiB chunks of 512 rows)."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, n)
    centres = rng.normal(0, 1, (3, dim))
    manifest = {**MANIFEST, "feature_dim": dim, "dtype": "float32", "class_names": ["a", "b", "c"],
                "views": {"count": views, "spec": SPEC, "seed": 0}}
    writer = CacheWriter.create(partial_path(path), manifest)
    feats = {"fc7": (centres[y] + rng.normal(0, 2, (n, dim))).astype(np.float32)}
    feats |= {f"view {v}": feats["fc7"] + rng.normal(0, 1, (n, dim)).astype(np.float32)
              for v in range(1, views)}
    writer.commit(feats, y.tolist(), [f"{i:05d}.png" for i in range(n)], ["0" * 64] * n)
    return writer.finish(path)


def test_streamed_views_equal_views_in_ram(tmp_path):
    cache = _synthetic_views_cache(tmp_path / "v.h5")
    cfg = dict(epochs=2, batch_size=64, val_fraction=0.0, lr=(1e-3,), shuffle_chunks=1)
    ram = train_head(cache, tmp_path / "r", TrainConfig(**cfg))
    streamed = train_head(cache, tmp_path / "s", TrainConfig(**cfg, max_memory=6 * 2**20))
    assert streamed.memory["train"] == "stream" and ram.memory["train"] == "ram"
    a, b = (torch.load(f"{s.best_path}/head.pt", weights_only=True) for s in (ram, streamed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    one = train_head(cache, tmp_path / "o", TrainConfig(**cfg, views=1))
    c = torch.load(f"{one.best_path}/head.pt", weights_only=True)
    assert not torch.equal(a["weight"], c["weight"])          # the views did change training


def test_online_augmentation_trains_the_same_head_bit_for_bit(data, tmp_path):
    """The tutorial's loop with online augmentation: every step decodes the batch's images,
    draws image i's transform in epoch e from the generator of view v(e, i), and runs the frozen
    backbone; the head's training step is train_head's. Against train_head on the views cache
    (extracted one image per batch, as the online loop computes its features)."""
    root, images = data
    cache = tmp_path / "v.h5"
    extract(images, cache, _cfg(views=4, augment=SPEC, augment_seed=3, batch_size=1))
    epochs, batch, lr, seed = 3, 4, 1e-2, 0
    trained = train_head(cache, tmp_path / "runs", TrainConfig(
        epochs=epochs, batch_size=batch, lr=(lr,), val_fraction=0.0, standardize=False,
        data_seed=seed, seed=(0,)))
    model, info = build_backbone("resnet18", "none", "penultimate", 32)
    aug = Augment.parse(SPEC, Preprocessing.from_dict(info["preprocessing"]), seed=3)
    with CacheReader(cache) as r:
        paths, digests, labels = r.paths, r.digests, torch.from_numpy(r.labels)
    decoded = [read_image(images / p)[0] for p in paths]
    stack = HeadStack(info["feature_dim"], 3, seeds=[0])
    opt = StackedOptimizer(stack.params, "adamw", [lr], [0.0])
    order = torch.Generator().manual_seed(seed)              # train_head's batch order
    for epoch in range(1, epochs + 1):
        perm = torch.randperm(len(paths), generator=order).numpy()
        view = view_choice(seed, epoch, len(paths), 4)
        for i in range(0, len(perm), batch):
            idx = perm[i:i + batch]
            with torch.inference_mode():
                x = torch.cat([model(to_float_batch(aug(decoded[j], digests[j],
                                                         int(view[j]))[None])) for j in idx])
            stack.losses(stack.forward(x.clone()), labels[idx]).sum().backward()
            opt.step()
    head, _ = load_head(trained.best_path)
    online = stack.head_state(0)
    for k, t in head.state_dict().items():
        assert torch.equal(t, online[k]), k
    assert len({int(v) for e in (1, 2, 3) for v in view_choice(seed, e, 12, 4)}) == 4
