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
import math
from dataclasses import dataclass

import torch
from PIL import Image
from torchvision.transforms import functional as TF
from torchvision.transforms import v2

from cache.errors import UserError

from .config import DEFAULT_SPEC
from .preprocessing import Preprocessing

MAX_SPEC_CHARS = 1000
# The most elements a view may hold after any of its transforms: 3 x 4096 x 4096 (48 MiB of
# uint8). One more Resize(100000) or Pad(30000) would ask for tens of GB per image.
MAX_VIEW_ELEMENTS = 3 * 4096 * 4096
_PROBE_DRAWS = 8            # random draws of the probe: a transform applied with p < 1 shows
_REAL_DRAWS = 2             # of which run on real values (the others give shapes only)


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
        transforms = _parse(spec, pre.crop_size)
        _probe(transforms, spec, pre.crop_size)
        return cls(spec, v2.Compose(transforms), pre, seed)

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


def _own_error(spec: str, e: SyntaxError) -> str:
    """The parser's complaint about the SPEC as the user typed it, not about the brackets put
    around it (an unclosed "(" must not be reported as a "]" the user never wrote)."""
    try:
        ast.parse(spec, mode="eval")
    except SyntaxError as own:
        return own.msg
    except (MemoryError, RecursionError):
        pass
    return e.msg


def _parse(spec: str, size: int) -> list:
    if len(spec) > MAX_SPEC_CHARS:
        raise UserError(f"--augment is {len(spec)} characters long, more than the "
                        f"{MAX_SPEC_CHARS} a SPEC may have: name fewer transforms")
    try:
        tree = ast.parse(f"[{spec}]", mode="eval").body
    except (MemoryError, RecursionError):   # the parser's own limits on nesting
        raise UserError(f"--augment {spec[:40]!r}...: too deeply nested to parse: write e.g. "
                        f"{DEFAULT_SPEC!r}") from None
    except SyntaxError as e:
        raise UserError(f"--augment {spec!r} is not a list of transforms ({_own_error(spec, e)}): "
                        f"write e.g. {DEFAULT_SPEC!r}") from None
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
    except Exception as e:           # noqa: BLE001 (third-party code: any wrong argument)
        raise UserError(f"--augment: {ast.unparse(node)} is not a valid {name} ({e})") from None


def _probe(transforms: list, spec: str, size: int) -> None:
    """Run the transforms on a (3, 2S, 2S) uint8 probe image before any work, so that a SPEC
    which parses but cannot make a view (a transform of another kind, a number out of range, a
    size of tens of GB) is a UserError now, not a DataLoader worker's traceback mid-run. Each
    step runs first on a "meta" tensor, which has a shape and no data: a view too large is
    refused before anything is allocated."""
    side = 2 * size
    noise = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        for draw in range(_PROBE_DRAWS):
            torch.manual_seed(draw)
            x = torch.randint(0, 256, (3, side, side), dtype=torch.uint8, generator=noise)
            if draw >= _REAL_DRAWS:                 # shapes only: a real view can take seconds
                x = x.to("meta")
            for t in transforms:
                x = _probe_step(t, x, spec, side)
                if x is None:                       # no meta kernel for `t`
                    break
            if x is None or x.is_meta:
                continue
            if not (x.dtype == torch.uint8 and x.ndim == 3 and x.shape[0] == 3
                    and x.numel() > 0):
                raise UserError(f"--augment {spec!r} turns a (3, {side}, {side}) uint8 image into "
                                f"a {x.dtype} tensor of shape {tuple(x.shape)}: a view must stay "
                                "an RGB uint8 image (3, H, W); drop the transform that changes it")


def _probe_step(t, x: torch.Tensor, spec: str, side: int) -> torch.Tensor | None:
    """`t(x)`, shape first (see `_probe`); a UserError naming `t` if it fails or is too large.
    For a meta `x`, the meta output, or None where `t` has no meta kernel."""
    name = type(t).__name__
    state = torch.random.get_rng_state()          # the same random parameters for both runs
    try:
        meta = t(x.to("meta"))
        shape = _output_shape(meta, name, spec)
    except NotImplementedError:                   # no meta kernel: the real run tells
        shape = None
    except UserError:
        raise
    except Exception as e:                        # noqa: BLE001 (third-party code)
        raise _failed(name, spec, side, e) from None
    if shape is not None and math.prod(shape) > MAX_VIEW_ELEMENTS:
        raise UserError(f"--augment {spec!r}: {name} would make a view of shape {shape} from a "
                        f"{side}x{side} image, more than the {MAX_VIEW_ELEMENTS:,} values a view "
                        "may hold: use smaller sizes")
    if x.is_meta:
        return None if shape is None else meta
    torch.random.set_rng_state(state)
    try:
        out = t(x)
    except Exception as e:                        # noqa: BLE001 (third-party code)
        raise _failed(name, spec, side, e) from None
    _output_shape(out, name, spec)
    if out.numel() > MAX_VIEW_ELEMENTS:
        raise UserError(f"--augment {spec!r}: {name} makes a view of shape {tuple(out.shape)} "
                        f"from a {side}x{side} image, more than the {MAX_VIEW_ELEMENTS:,} values "
                        "a view may hold: use smaller sizes")
    return out


def _output_shape(out, name: str, spec: str) -> tuple:
    if not isinstance(out, torch.Tensor):
        raise UserError(f"--augment {spec!r}: {name} gives an object of type {type(out).__name__}, "
                        "not an image tensor: use transforms that take and give one image (no FiveCrop, "
                        "ToPILImage, CutMix, ...)")
    return tuple(out.shape)


def _failed(name: str, spec: str, side: int, e: Exception) -> UserError:
    text = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    return UserError(f"--augment {spec!r}: {name} fails on a {side}x{side} RGB uint8 image "
                     f"({text}): fix its arguments or drop it")


__all__ = ["DEFAULT_SPEC", "Augment", "view_seed"]
