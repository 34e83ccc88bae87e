"""Augmented views: view 0 is the plain preprocessing, every other view is reproducible alone
from (content digest, view, seed), and a SPEC is checked before any work."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from cache.errors import UserError
from pipeline.augment import DEFAULT_SPEC, Augment, view_seed
from pipeline.preprocessing import Preprocessing

PRE = Preprocessing(37, 32, (0.5,) * 3, (0.5,) * 3)


@pytest.fixture
def img():
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 60, 3), np.uint8))


def test_view_zero_is_the_plain_preprocessing(img):
    aug = Augment.parse(DEFAULT_SPEC, PRE)
    assert torch.equal(aug(img, "d" * 64, 0), PRE(img))


def test_views_are_reproducible_alone_and_differ(img):
    aug = Augment.parse(DEFAULT_SPEC, PRE, seed=7)
    views = [aug(img, "d" * 64, v) for v in range(1, 6)]
    assert all(v.shape == (3, 32, 32) and v.dtype == torch.uint8 for v in views)
    assert len({v.numpy().tobytes() for v in views}) == 5                 # five different views
    torch.manual_seed(123)                                                # the global RNG: no effect
    assert torch.equal(aug(img, "d" * 64, 3), views[2])                   # recomputed alone
    other_seed = Augment.parse(DEFAULT_SPEC, PRE, seed=8)(img, "d" * 64, 3)
    other_image = aug(img, "e" * 64, 3)
    assert not torch.equal(other_seed, views[2]) and not torch.equal(other_image, views[2])


def test_a_view_is_the_spec_drawn_from_its_seeded_generator(img):
    """What an online training loop does: seed the RNG by view_seed, apply the same transforms."""
    aug = Augment.parse("RandomResizedCrop(scale=(0.5, 1)),RandomHorizontalFlip()", PRE, seed=1)
    torch.manual_seed(view_seed("d" * 64, 4, 1))
    online = v2.Compose([v2.RandomResizedCrop(32, scale=(0.5, 1)), v2.RandomHorizontalFlip()])(
        v2.functional.pil_to_tensor(img))
    assert torch.equal(aug(img, "d" * 64, 4), online)


def test_the_global_random_state_is_left_alone(img):
    aug = Augment.parse(DEFAULT_SPEC, PRE)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    aug(img, "d" * 64, 2)
    assert torch.equal(torch.rand(3), expected)


def test_transforms_without_a_crop_end_at_the_crop_size(img):
    aug = Augment.parse("ColorJitter(0.2, 0.2),RandomHorizontalFlip(p=1.0)", PRE)
    out = aug(img, "d" * 64, 1)
    assert out.shape == (3, 32, 32)
    flipped = PRE(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    assert not torch.equal(out, PRE(img)) and out.float().sub(flipped.float()).abs().mean() < 40


@pytest.mark.parametrize("spec, words", [
    ("Nope()", "unknown transform 'Nope'"),
    ("RandomResizedCrop(scale=(0.5,1)", "is not a list of transforms"),
    ("RandomResizedCrop(scale=foo)", "must be literals"),
    ("__import__('os').system('true')", "is not a call such as"),
    ("ColorJitter(brightness=-1)", "is not a valid ColorJitter"),
    ("", "names no transform"),
    ("Compose", "is not a call such as"),
])
def test_bad_specs_are_one_line_errors(spec, words):
    with pytest.raises(UserError, match=words.replace("(", r"\(").replace(")", r"\)")):
        Augment.parse(spec, PRE)


def test_a_malformed_spec_is_told_in_the_users_own_terms():
    with pytest.raises(UserError) as e:
        Augment.parse("RandomResizedCrop(scale=(0.5,1)", PRE)
    assert "']'" not in str(e.value) and "never closed" in str(e.value), str(e.value)
