"""The decoders of `pipeline._decode`: the cpu decoder against Pillow + the weights' own
transforms (pixels and features, synthetic and real photos), the per-image fallback to Pillow,
draft decoding, the gpu batching with a stand-in decoder on the CPU, the decoders a cache
records and the rule against mixing them, and the float32 redo of non-finite batches."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_images
from torchvision.io import decode_jpeg

from cache import CacheReader
from cache.inspect import describe
from cache.errors import UserError
from pipeline import ExtractConfig, extract
from pipeline import _engine as engine
from pipeline._decode import Decoder, draft_size, gpu_batch, resolve_decoder
from pipeline._loading import collate
from pipeline.backbone import build_backbone
from pipeline.images import BadImageError, decode_file, read_image
from pipeline.preprocessing import Preprocessing, default_preprocessing, to_float_batch

PRE = Preprocessing(37, 32, (0.5,) * 3, (0.5,) * 3)
CPU = torch.device("cpu")


def jpeg(pixels: np.ndarray, **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90, **kwargs)
    return buf.getvalue()


def photos() -> list[bytes]:
    """scikit-learn's two sample photos (china, flower, 640x427) as JPEG q90, and crops."""
    out = []
    for img in load_sample_images().images:
        out += [jpeg(img), jpeg(img[50:350, 100:500]), jpeg(img[::-1, 200:])]
    return out


def smooth(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth random RGB image (photo-like spectra, unlike white noise)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC))


def pil_way(data: bytes, pre: Preprocessing) -> torch.Tensor:
    """Today's path: Pillow decode and the weights' transforms on the PIL image."""
    return pre(decode_file(io.BytesIO(data)))


def load(decoder: Decoder, data: bytes, pre: Preprocessing = PRE) -> torch.Tensor:
    return decoder.load(io.BytesIO(data), pre)


@pytest.mark.parametrize("size", [(40, 48), (300, 200), (427, 640)])
def test_cpu_decode_matches_pil_on_synthetic(size):
    data = jpeg(smooth(*size))
    pre = default_preprocessing("resnet18", 64)
    got, want = load(Decoder("cpu"), data, pre), pil_way(data, pre)
    assert got.shape == want.shape == (3, 64, 64) and got.dtype == torch.uint8
    diff = (got.int() - want.int()).abs()
    assert diff.float().mean() < 0.05 and diff.max() <= 1      # rounding of the resize only


def test_cpu_decode_features_match_pil_on_real_photos():
    """Random-init resnet18 features of the real photos: within 2e-3 (relative) of Pillow +
    the weights' own transforms."""
    torch.manual_seed(0)
    model, _ = build_backbone("resnet18", "none", "penultimate", None, "flatten")
    pre = default_preprocessing("resnet18")
    data = photos()
    x_cpu = torch.stack([load(Decoder("cpu"), d, pre) for d in data])     # (N, 3, 224, 224)
    x_pil = torch.stack([pil_way(d, pre) for d in data])
    assert (x_cpu.int() - x_pil.int()).abs().float().mean() < 0.05
    with torch.inference_mode():
        a, b = model(to_float_batch(x_cpu)), model(to_float_batch(x_pil))     # (N, 512)
    rel = (a - b).norm(dim=1) / b.norm(dim=1)
    assert rel.max() < 2e-3, rel


def test_libjpeg_pixels_are_pillows():
    """Before the resize, libjpeg-turbo through torchvision gives Pillow's very pixels."""
    data = photos()[0]
    with Image.open(io.BytesIO(data)) as img:
        want = np.asarray(img.convert("RGB"))
    got = load(Decoder("cpu"), data, Preprocessing(427, 427, (0.5,) * 3, (0.5,) * 3))
    assert np.array_equal(got.permute(1, 2, 0).numpy(), want[:, 106:533])


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_as_pillow(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = jpeg(smooth(60, 90, seed=orientation), exif=exif)
    pre = Preprocessing(64, 48, (0.5,) * 3, (0.5,) * 3)
    got, want = load(Decoder("cpu"), data, pre), pil_way(data, pre)
    assert (got.int() - want.int()).abs().max() <= 1


def _fallback_cases() -> dict[str, bytes]:
    px = smooth(50, 70)
    out = {}
    for name, img, fmt in [("png", Image.fromarray(px), "PNG"),
                           ("cmyk", Image.fromarray(px).convert("CMYK"), "JPEG"),
                           ("palette", Image.fromarray(px).convert("P"), "PNG"),
                           ("16bit", Image.fromarray((px[..., 0].astype(np.uint16) * 257)), "PNG")]:
        buf = io.BytesIO()
        img.save(buf, fmt)
        out[name] = buf.getvalue()
    return out


@pytest.mark.parametrize("case", ["png", "cmyk", "palette", "16bit"])
def test_other_images_fall_back_to_pillow(case, monkeypatch):
    """CMYK JPEGs, PNGs, palette and 16-bit images take today's path (Pillow's CMYK
    conversion, its 16-bit scaling, its resize), never libjpeg-turbo."""
    data = _fallback_cases()[case]
    called = []
    monkeypatch.setattr("pipeline._decode._jpeg_cpu", lambda d: called.append(d))
    got = load(Decoder("cpu"), data)
    assert called == [] and torch.equal(got, pil_way(data, PRE))
    if case == "16bit":     # scaled, not clipped to white
        assert got.float().mean() < 250


def test_truncated_and_bad_jpegs_recorded_as_before(tmp_path):
    data = jpeg(smooth(200, 300))
    (tmp_path / "cut.jpg").write_bytes(data[:len(data) // 2])
    (tmp_path / "junk.jpg").write_bytes(b"\xff\xd8\xff" + b"junk" * 10)
    reasons = {}
    for name in ("cut.jpg", "junk.jpg"):
        with pytest.raises(BadImageError) as pil_error:
            read_image(tmp_path / name)
        reasons[name] = str(pil_error.value)
        for decoder in (Decoder("cpu"), Decoder("gpu")):
            with pytest.raises(BadImageError) as error:
                read_image(tmp_path / name, lambda fp, d=decoder: d.load(fp, PRE))
                if decoder.name == "gpu":   # the header passes: nvJPEG's fallback decides
                    raise BadImageError(gpu_batch(
                        [load(decoder, (tmp_path / name).read_bytes())], PRE, CPU)[1][0])
            assert str(error.value) == str(pil_error.value)
    assert reasons == {"cut.jpg": "truncated image",
                       "junk.jpg": "not an image (cannot identify image file)"}


def test_bomb_refused_from_the_header(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    (tmp_path / "big.jpg").write_bytes(jpeg(smooth(100, 100)))
    with pytest.raises(BadImageError, match="decompression bomb"):
        read_image(tmp_path / "big.jpg", lambda fp: Decoder("cpu").load(fp, PRE))


def test_draft_decodes_large_jpegs_smaller():
    big = jpeg(smooth(400, 600))
    assert draft_size((600, 400), PRE) == (56, 37)
    assert draft_size((70, 60), PRE) is None                # under twice the resize: none
    with Image.open(io.BytesIO(big)) as img:
        img.draft("RGB", draft_size(img.size, PRE))
        assert img.size == (75, 50)                          # 1/8 scale, sides >= (56, 37)
    plain, drafted = load(Decoder("cpu"), big), load(Decoder("cpu", draft=True), big)
    assert plain.shape == drafted.shape == (3, 32, 32)
    diff = (plain.float() - drafted.float()).abs().mean()
    assert 0 < diff < 6                                      # close, not the same pixels
    assert torch.equal(load(Decoder("pil", draft=True), big),
                       PRE(decode_file(io.BytesIO(big), draft_size((600, 400), PRE))))


def test_gpu_batch_with_a_stand_in_decoder():
    """The batching of the gpu decoder, with torchvision's CPU decoder standing in for nvJPEG:
    decoded images, images the workers already decoded, a JPEG the batch decoder fails on
    (decoded on the CPU instead) and a truncated one (recorded as bad) in one batch."""
    good = [jpeg(smooth(60, 80, seed=s)) for s in range(3)]
    cut = good[0][:len(good[0]) // 2]
    gpu = Decoder("gpu")
    items = [load(gpu, good[0]), load(Decoder("cpu"), _fallback_cases()["png"]),
             load(gpu, good[1]), torch.frombuffer(bytearray(cut), dtype=torch.uint8),
             load(gpu, good[2])]
    assert [t.dim() for t in items] == [1, 3, 1, 1, 1]
    calls = []

    def fake(batch, mode, device, apply_exif_orientation):
        calls.append(len(batch))
        if any(torch.equal(b, items[4]) for b in batch):
            raise RuntimeError("nvJPEG cannot decode this one")
        return [decode_jpeg(b, mode=mode, apply_exif_orientation=apply_exif_orientation)
                for b in batch]
    x, bad = gpu_batch(items, PRE, CPU, decode=fake)
    assert calls == [4, 1, 1, 1, 1]                 # the batch, then one by one
    assert list(bad) == [3] and "truncated" in bad[3]
    assert x.shape == (4, 3, 32, 32)
    for got, data in zip(x[[0, 2, 3]], good):
        assert torch.equal(got, load(Decoder("cpu"), data))


def test_gpu_decoder_leaves_turned_jpegs_to_the_cpu():
    """nvJPEG ignores EXIF orientation: a JPEG with one is decoded (upright) in the worker."""
    exif = Image.Exif()
    exif[0x0112] = 6
    data = jpeg(smooth(60, 90), exif=exif)
    got = load(Decoder("gpu"), data)
    assert got.shape == (3, 32, 32) and torch.equal(got, load(Decoder("cpu"), data))
    assert load(Decoder("gpu"), jpeg(smooth(60, 90))).dim() == 1      # bytes for the device


def test_collate_keeps_jpeg_bytes_for_the_device():
    a, b = torch.zeros(3, 4, 4, dtype=torch.uint8), torch.arange(10, dtype=torch.uint8)
    batch = collate([(0, a, "d0", None, "a.png"), (1, None, "d1", "bad", "b.jpg"),
                     (2, b, "d2", None, "c.jpg")])
    assert isinstance(batch["images"], list) and batch["paths"] == ["a.png", "c.jpg"]
    assert batch["errors"] == [("b.jpg", "d1", "bad")]


def test_resolve_decoder():
    assert resolve_decoder("auto", CPU) == Decoder("cpu")
    assert resolve_decoder("auto", CPU, recorded=["pil"]) == Decoder("pil")
    assert resolve_decoder("auto", CPU, recorded=["gpu", "cpu"]) == Decoder("cpu")
    with pytest.raises(UserError, match="--decode gpu needs a CUDA device"):
        resolve_decoder("gpu", CPU)


def _folder(root: Path, n: int, seed: int = 0) -> Path:
    (root / "a").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / "a" / f"{seed}-{i}.jpg").write_bytes(jpeg(smooth(48, 64, seed=seed * 100 + i)))
    return root


CFG = dict(backbone="resnet18", weights="none", image_size=32, workers=0, progress=False)


def test_manifest_records_decoders_and_refuses_to_mix(tmp_path):
    src, out = _folder(tmp_path / "src", 3), tmp_path / "c.h5"
    extract(src, out, ExtractConfig(**CFG, decode="cpu"))
    with CacheReader(out) as r:
        [d] = r.manifest["decoders"]
    assert d["name"] == "cpu" and "libjpeg-turbo" in d["library"] and d["draft"] is False
    _folder(src, 2, seed=1)                                 # ten images added on a laptop
    with pytest.raises(UserError, match="holds rows decoded by cpu.*--decode cpu to match.*"
                                        "--mix-decoders"):
        extract(src, out, ExtractConfig(**CFG, decode="pil"))
    with pytest.raises(UserError, match="draft"):
        extract(src, out, ExtractConfig(**CFG, decode="cpu", draft=True))
    s = extract(src, out, ExtractConfig(**CFG, decode="pil", mix_decoders=True))
    assert s.computed == 2 and s.reused == 3
    with CacheReader(out) as r:
        assert [d["name"] for d in r.manifest["decoders"]] == ["cpu", "pil"]
    shown = describe(out)["decoders"]                       # what `pipeline inspect` prints
    assert shown[0].startswith("cpu (torchvision") and shown[1].startswith("pil (Pillow")


def test_auto_keeps_the_decoder_of_an_old_cache(tmp_path):
    """A cache made before decoders were recorded was decoded by Pillow: auto goes on with it."""
    src, out = _folder(tmp_path / "src", 2), tmp_path / "c.h5"
    extract(src, out, ExtractConfig(**CFG, decode="pil"))
    with CacheReader(out) as r:
        assert [d["name"] for d in r.manifest["decoders"]] == ["pil"]
    _folder(src, 1, seed=2)
    extract(src, out, ExtractConfig(**CFG))                 # auto: pil, no refusal
    with CacheReader(out) as r:
        assert [d["name"] for d in r.manifest["decoders"]] == ["pil"] and r.n_rows == 3


def test_cache_features_equal_the_cpu_decoder_forward(tmp_path):
    src, out = _folder(tmp_path / "src", 3), tmp_path / "c.h5"
    extract(src, out, ExtractConfig(**CFG, dtype="float32"))
    model, info = build_backbone("resnet18", "none", "penultimate", 32, "flatten")
    pre = Preprocessing.from_dict(info["preprocessing"])
    with CacheReader(out) as r:
        x = torch.stack([load(Decoder("cpu"), (src / p).read_bytes(), pre) for p in r.paths])
        with torch.inference_mode():
            want = model(to_float_batch(x)).numpy()
        np.testing.assert_allclose(r.features[:], want, rtol=1e-5, atol=1e-5)


def test_non_finite_batch_redone_in_float32(monkeypatch):
    """A reduced-precision batch with an inf is computed again in float32."""
    class Overflow(torch.nn.Module):
        def forward(self, x):                               # (B, 3, S, S) -> (B, 2)
            y = x.flatten(1)[:, :2] * 1e6
            if torch.is_autocast_enabled("cpu"):
                return y.to(torch.bfloat16) * torch.tensor(float("inf"))
            return y
    x = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    redone = [0]
    out = engine._forward(Overflow(), x, CPU, torch.autocast("cpu", dtype=torch.bfloat16),
                          torch.float32, redone)
    assert redone == [1] and torch.isfinite(out).all() and out[0, 0] == 1e6
    out = engine._forward(Overflow(), x, CPU, torch.autocast("cpu", dtype=torch.bfloat16,
                                                            enabled=True), torch.float32, redone)
    assert redone == [2]


@pytest.mark.slow
def test_gpu_bench_dry_run_on_the_cpu():
    """`bench/gpu.sh --dry-run` runs the GPU benchmark's whole script on a CPU machine."""
    import os
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(["bash", "bench/gpu.sh", "--dry-run"], cwd=root, capture_output=True,
                          text=True, env={**os.environ, "PYTHON": sys.executable}, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    for heading in ("extract / bare", "of 12 MP", "rel. diff median", "images/s"):
        assert heading in done.stdout
    assert "resnet18" in done.stdout and "predict --device cpu" in done.stdout
