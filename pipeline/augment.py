"""Augmented views of an image, each reproducible alone.

    aug = Augment.parse("RandomResizedCrop(scale=(0.5, 1)),RandomHorizontalFlip()", pre, seed=0)
    crop = aug(img, digest, view=3)      # (3, S, S) uint8; view 0 is the plain preprocessing

A SPEC names torchvision `transforms.v2` transforms with literal arguments, joined by commas.
It is parsed with Python's own parser and only literals are accepted (no code runs). A
transform that needs an output size and gets none (RandomResizedCrop, RandomCrop, ...) gets the
crop size; if the views come out at another size, the plain resize and centre crop follow.

View v >= 1 of an image draws its randomness from a generator seeded by (the image's content
digest, v, the augment seed), so any view can be computed again alone, in any order, in any
process: a resumed or incremental extraction reuses views, and a training loop that augments
online can draw exactly the transform view v got.
"""
from __future__ import annotations

import ast
import hashlib
import inspect
from dataclasses import dataclass

import torch
from PIL import Image
from torchvision.transforms import functional as TF
from torchvision.transforms import v2

from cache.errors import UserError

from .config import DEFAULT_SPEC
from .preprocessing import Preprocessing

@dataclass(frozen=True)
class Augment:
    """Parsed SPEC with the preprocessing it completes and the seed of its randomness."""
    spec: str
    transform: v2.Compose
    pre: Preprocessing
    seed: int = 0

    @classmethod
    def parse(cls, spec: str, pre: Preprocessing, seed: int = 0) -> "Augment":
        """Check and build SPEC (a UserError names what is wrong and how to write it)."""
        return cls(spec, v2.Compose(_parse(spec, pre.crop_size)), pre, seed)

    def __call__(self, img: Image.Image, digest: str, view: int) -> torch.Tensor:
        """View `view` of the RGB image whose content digest is `digest`: (3, S, S) uint8."""
        if view == 0:
            return self.pre(img)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(view_seed(digest, view, self.seed))
            out = self.transform(TF.pil_to_tensor(img))                   # (3, h, w) uint8
        if tuple(out.shape[-2:]) != (self.pre.crop_size,) * 2:
            out = self.pre(TF.to_pil_image(out))
        return out


def view_seed(digest: str, view: int, seed: int) -> int:
    """The seed of view `view` of the image with content `digest` (63 bits)."""
    h = hashlib.sha256(f"{digest}/{view}/{seed}".encode()).digest()
    return int.from_bytes(h[:8], "big") >> 1


def _parse(spec: str, size: int) -> list:
    try:
        tree = ast.parse(f"[{spec}]", mode="eval").body
    except SyntaxError as e:
        raise UserError(f"--augment {spec!r} is not a list of transforms ({e.msg}): write e.g. "
                        f"{DEFAULT_SPEC!r}") from None
    if not isinstance(tree, ast.List) or not tree.elts:
        raise UserError(f"--augment {spec!r} names no transform: write e.g. {DEFAULT_SPEC!r}")
    return [_transform(node, spec, size) for node in tree.elts]


def _transform(node: ast.expr, spec: str, size: int):
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
        raise UserError(f"--augment {spec!r}: {ast.unparse(node)!r} is not a call such as "
                        "RandomHorizontalFlip(): name a torchvision.transforms.v2 transform")
    name = node.func.id
    cls = getattr(v2, name, None)
    if not (inspect.isclass(cls) and issubclass(cls, v2.Transform)):
        raise UserError(f"--augment: unknown transform {name!r}: use a torchvision.transforms.v2 "
                        "transform, e.g. RandomResizedCrop, RandomHorizontalFlip, ColorJitter")
    try:
        args = [ast.literal_eval(a) for a in node.args]
        kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
    except ValueError:
        raise UserError(f"--augment: the arguments of {name} must be literals (numbers, "
                        f"tuples, strings): {ast.unparse(node)!r}") from None
    if "size" in inspect.signature(cls).parameters and not args and "size" not in kwargs:
        kwargs["size"] = size
    try:
        return cls(*args, **kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"--augment: {ast.unparse(node)} is not a valid {name} ({e})") from None


__all__ = ["DEFAULT_SPEC", "Augment", "view_seed"]
