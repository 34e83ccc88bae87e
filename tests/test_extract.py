"""extract(): cached features equal a direct forward pass; resume, incremental updates, guards."""
from __future__ import annotations

import io
import itertools
import json
import re
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torchvision
from click.testing import CliRunner
from PIL import Image
from torchvision.transforms._presets import ImageClassification

import cache.plan
from cache import CacheReader, UserError, partial_path
from cli.main import main
from pipeline import ExtractConfig, extract
from pipeline._progress import progress
from pipeline.backbone import state_dict_sha256

from .conftest import make_folder, one_line

SIZE = 32
CFG = ExtractConfig(weights="none", image_size=SIZE, batch_size=4, dtype="float32", progress=False,
                    workers=0)
REPO = Path(__file__).resolve().parents[1]


def random_vgg16(seed: int = 0) -> torch.nn.Module:
    """The network `--weights none` builds: torchvision's VGG16 initialised under seed 0."""
    torch.manual_seed(seed)
    return torchvision.models.vgg16(weights=None).eval()


def direct_features(model, root: Path, paths, module: torch.nn.Module) -> np.ndarray:
    """The output of `module` for each image, by a forward hook on the whole torchvision
    model and torchvision's own ImageNet preset (independent of pipeline.backbone)."""
    preset = ImageClassification(crop_size=SIZE, resize_size=round(SIZE * 256 / 224))
    out = []
    hook = module.register_forward_hook(lambda m, i, o: out.append(torch.flatten(o, 1)))
    with torch.inference_mode():
        for p in paths:
            model(preset(Image.open(root / p).convert("RGB")).unsqueeze(0))
    hook.remove()
    return torch.cat(out).numpy()


def read(path):
    with CacheReader(path) as r:
        return r.load_features(), list(r.paths), r.labels.tolist(), list(r.errors), r.manifest


@pytest.mark.parametrize("layer, module, dim", [
    ("fc7", lambda m: m.classifier[4], 4096),
    ("fc6", lambda m: m.classifier[1], 4096),
    ("pool5", lambda m: m.avgpool, 25088),
    ("features.9", lambda m: m.features[9], 128 * 8 * 8),
])
def test_cached_features_equal_direct_forward(folder, tmp_path, layer, module, dim):
    out = tmp_path / "c.h5"
    summary = extract(folder, out, ExtractConfig(**{**CFG.__dict__, "layer": layer}))
    feats, paths, labels, errors, manifest = read(out)
    model = random_vgg16()
    expected = direct_features(model, folder, paths, module(model))
    assert feats.shape == (12, dim) and manifest["feature_dim"] == dim
    np.testing.assert_allclose(feats, expected, rtol=1e-5, atol=1e-6)
    assert paths == sorted(paths) and labels == [0] * 6 + [1] * 6
    assert manifest["class_names"] == ["cat", "dog"] and errors == []
    assert manifest["weights_sha256"] == state_dict_sha256(model.state_dict())
    assert summary.rows == 12 and summary.computed == 12 and not partial_path(out).exists()


def test_float16_storage_is_float32_rounded(folder, tmp_path):
    extract(folder, tmp_path / "32.h5", CFG)
    extract(folder, tmp_path / "16.h5", ExtractConfig(**{**CFG.__dict__, "dtype": "float16"}))
    with CacheReader(tmp_path / "16.h5") as r:
        assert r.features.dtype == np.float16
        f16 = r.features[:]
    np.testing.assert_array_equal(f16, read(tmp_path / "32.h5")[0].astype(np.float16))


def _extract_cmd(src: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "cli", "-v", "extract", str(src), "-o", str(out), "--weights",
            "none", "--image-size", str(SIZE), "--batch-size", "4", "--dtype", "float32",
            "--workers", "0", "-q"]


def _kill_after(cmd, commits: int, delay: float = 0.0) -> None:
    """Run `cmd` and SIGKILL it `delay` seconds after its `commits`-th committed batch
    (commits=0: at its first line of output, before any batch)."""
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, cwd=REPO)
    seen = 0
    for line in proc.stderr:
        seen += "committed" in line
        if seen >= commits:
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    proc.stderr.close()


@pytest.mark.parametrize("commits, delay", [(0, 0.0), (1, 0.0), (3, 0.1), (4, 0.0)])
def test_kill_and_resume_equals_uninterrupted(tmp_path, commits, delay):
    src = make_folder(tmp_path / "images", classes=("a", "b", "c"), per_class=8)
    (src / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    ref = tmp_path / "ref.h5"
    extract(src, ref, CFG)
    out = tmp_path / "c.h5"
    _kill_after(_extract_cmd(src, out), commits, delay)
    assert not out.exists()   # only complete caches carry the final name
    held = held_rows = 0
    if partial_path(out).exists():
        with CacheReader(partial_path(out), allow_incomplete=True) as r:
            held, held_rows = r.n_rows + len(r.errors), r.n_rows
            assert not r.complete
        if commits:
            assert held >= 4 * commits   # every acknowledged batch survived
    summary = extract(src, out, CFG)
    # Nothing committed is computed again; broken.png is skipped, never counted as computed.
    assert summary.computed == 24 - held_rows and len(summary.bad) == 1
    got, want = read(out), read(ref)
    np.testing.assert_array_equal(got[0], want[0])   # bit-identical on the CPU
    assert got[1:4] == want[1:4]
    assert not partial_path(out).exists()


def test_incremental_update_computes_only_new_and_changed(folder, tmp_path):
    out = tmp_path / "c.h5"
    extract(folder, out, CFG)
    make_folder(folder, classes=("emu",), per_class=2, seed=5)   # 2 new images, new class
    Image.new("RGB", (40, 48), (200, 10, 10)).save(folder / "cat" / "001.png")   # changed
    (folder / "dog" / "002.png").unlink()                                        # removed
    summary = extract(folder, out, CFG)
    # The changed image is computed and said as changed; only the removed one is dropped.
    assert (summary.computed, summary.reused, summary.removed, summary.changed,
            summary.rows) == (3, 10, 1, 1, 13)
    assert "(3 computed, 10 reused, 1 dropped, 1 changed)" in summary.line()
    fresh = tmp_path / "fresh.h5"
    extract(folder, fresh, CFG)
    got, want = read(out), read(fresh)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6)
    assert got[1:4] == want[1:4]
    assert got[4]["class_names"] == ["cat", "dog", "emu"] and got[2][-2:] == [2, 2]
    again = extract(folder, out, CFG)
    assert again.up_to_date and again.computed == 0


def test_incremental_after_kill_of_an_update(folder, tmp_path):
    """An update interrupted half-way resumes from both the old cache and the partial."""
    out = tmp_path / "c.h5"
    extract(folder, out, CFG)
    make_folder(folder, classes=("emu",), per_class=9, seed=5)
    _kill_after(_extract_cmd(folder, out), 1)
    with CacheReader(partial_path(out), allow_incomplete=True) as r:
        held = r.n_rows
    summary = extract(folder, out, CFG)
    assert summary.computed == 9 - held and summary.rows == 21
    fresh = tmp_path / "fresh.h5"
    extract(folder, fresh, CFG)
    np.testing.assert_allclose(read(out)[0], read(fresh)[0], rtol=1e-5, atol=1e-6)


class _FailOnSecondBatch(torch.nn.Module):
    """Wraps the backbone; its second forward pass raises, as an out-of-memory error would."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("simulated failure in batch 2")
        return self.inner(x)


def test_failed_runs_stop_the_committer_and_keep_committed_batches(folder, tmp_path, monkeypatch):
    module = sys.modules["pipeline.extract"]
    build = module.build_model

    def failing_build(config):
        model, info = build(config)
        return _FailOnSecondBatch(model), info
    monkeypatch.setattr(module, "build_model", failing_build)
    cfg = ExtractConfig(**{**CFG.__dict__, "batch_size": 2})
    out = tmp_path / "c.h5"
    for run in (1, 2, 3):   # each run commits one more batch of 2, then fails
        with pytest.raises(RuntimeError, match="simulated failure"):
            extract(folder, out, cfg)
        assert [t for t in threading.enumerate() if t.name == "extract-committer"] == []
        with CacheReader(partial_path(out), allow_incomplete=True) as r:
            assert r.n_rows == 2 * run and not r.complete
            assert r.paths == [f"cat/{i:03d}.png" for i in range(2 * run)]
    monkeypatch.undo()
    summary = extract(folder, out, cfg)
    assert (summary.computed, summary.reused, summary.rows) == (6, 6, 12)
    extract(folder, tmp_path / "fresh.h5", cfg)
    got, want = read(out), read(tmp_path / "fresh.h5")
    np.testing.assert_array_equal(got[0], want[0])   # resumed three times, still bit-identical
    assert got[1:4] == want[1:4]


def _open_hdf5_files() -> list[Path]:
    return [Path(i.name.decode()).resolve()
            for i in h5py.h5f.get_obj_ids(types=h5py.h5f.OBJ_FILE)]


def test_damaged_partial_is_refused_and_the_cache_closed(folder, tmp_path):
    out = tmp_path / "c.h5"
    extract(folder, out, CFG)
    before = out.read_bytes()
    partial_path(out).write_bytes(b"\x89HDF\r\n\x1a\n damaged by a full disk")
    with pytest.raises(UserError, match="c.h5.partial exists") as failure:
        extract(folder, out, CFG)
    # `failure` keeps the failed call's frames alive, as a debugger or a logged traceback
    # would: a reader left open in them would still hold the file.
    assert failure.traceback and out.resolve() not in _open_hdf5_files()
    assert out.read_bytes() == before
    h5py.File(out, "a").close()   # HDF5 refuses to open for writing a file a reader holds


def test_summary_counts_exclude_images_that_failed(folder, tmp_path, monkeypatch):
    # A clock that advances 1 s a call: extract reads it before and after computing, so the
    # compute phase lasts exactly 1 s and images/s equals the images computed.
    clock = itertools.count()
    monkeypatch.setattr(sys.modules["pipeline.extract"], "time",
                        types.SimpleNamespace(perf_counter=lambda: float(next(clock))))
    (folder / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    out = tmp_path / "c.h5"
    first = extract(folder, out, CFG)
    assert (first.rows, first.computed, first.reused, len(first.bad)) == (12, 12, 0, 1)
    assert first.images_per_s == 12.0 and first.bad[0][0] == "cat/broken.png"
    assert "12 rows (12 computed, 0 reused, 0 dropped), 1 skipped images" in first.line()
    make_folder(folder, classes=("emu",), per_class=1, seed=5)
    (folder / "dog" / "empty.png").write_bytes(b"")
    second = extract(folder, out, CFG)
    assert (second.rows, second.computed, second.reused, len(second.bad)) == (13, 1, 12, 2)
    assert second.images_per_s == 1.0
    assert sorted(p for p, _ in second.bad) == ["cat/broken.png", "dog/empty.png"]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("enabled, terminal, shown", [
    (None, True, True), (None, False, False), (True, False, True), (False, True, False)])
def test_progress_bar_on_stderr(monkeypatch, enabled, terminal, shown):
    err = _Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    with progress(8, "extract", enabled) as bar:
        bar.update(3)
        bar.refresh()
        bar.update(5)
    text = err.getvalue()
    assert bool(text) is shown
    if shown:   # count, images/s and elapsed<remaining (the ETA)
        assert re.search(r"extract: +38%.* 3/8 \[\d\d:\d\d<\d\d:\d\d, +[\d.]+img/s\]", text)
        assert re.search(r"8/8 \[", text)


@pytest.mark.parametrize("change, words", [
    ({"layer": "fc6"}, "layer: 'classifier.4' vs 'classifier.1'"),
    ({"dtype": "float16"}, "dtype: 'float32' vs 'float16'"),
    ({"image_size": 48}, "preprocessing.crop_size: 32 vs 48"),
    ({"backbone": "vgg11"}, "backbone: 'vgg16' vs 'vgg11'"),
])
def test_other_settings_are_refused_then_overwritten(folder, tmp_path, change, words):
    out = tmp_path / "c.h5"
    extract(folder, out, CFG)
    before = out.read_bytes()
    other = ExtractConfig(**{**CFG.__dict__, **change})
    with pytest.raises(UserError, match="made with other settings") as e:
        extract(folder, out, other)
    assert words in str(e.value) and "--overwrite" in str(e.value)
    assert out.read_bytes() == before   # nothing lost
    extract(folder, out, ExtractConfig(**{**other.__dict__, "overwrite": True}))
    assert read(out)[4]["layer"] == {"fc6": "classifier.1"}.get(change.get("layer"), "classifier.4")


def test_a_bug_while_opening_the_cache_keeps_its_traceback_even_with_overwrite(
        folder, tmp_path, monkeypatch):
    """--overwrite replaces a cache refused for a user mistake (other settings), never one that
    a bug failed to open: the bug is raised as it is and the cache stays byte for byte."""
    out = tmp_path / "c.h5"
    extract(folder, out, CFG)
    before, listing = out.read_bytes(), sorted(tmp_path.iterdir())

    def buggy(path, *args, **kwargs):
        if Path(path) == out:
            raise ValueError("a bug in reading the cache")
        return CacheReader(path, *args, **kwargs)
    monkeypatch.setattr(cache.plan, "CacheReader", buggy)
    args = ["extract", str(folder), "-o", str(out), "--weights", "none", "--image-size",
            str(SIZE), "--dtype", "float16", "--workers", "0", "-q", "--overwrite"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "Error:" not in result.output
    assert isinstance(result.exception, ValueError) and result.exc_info[2] is not None
    assert str(result.exception) == "a bug in reading the cache"
    assert out.read_bytes() == before and sorted(tmp_path.iterdir()) == listing
    monkeypatch.undo()
    assert CliRunner().invoke(main, args).exit_code == 0                  # replaced
    assert read(out)[4]["dtype"] == "float16"


def _bad_images(root: Path) -> dict[str, str]:
    """Write one file of each bad kind into root/bad; return name -> expected reason words."""
    bad = root / "bad"
    bad.mkdir(parents=True)
    Image.new("RGB", (64, 64), (9, 9, 9)).save(bad / "full.jpg", quality=95)
    data = (bad / "full.jpg").read_bytes()
    (bad / "full.jpg").unlink()
    (bad / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (bad / "empty.png").write_bytes(b"")
    (bad / "text.jpg").write_text("not an image at all")
    (bad / "gone.png").symlink_to(root / "does-not-exist.png")
    (bad / "bomb.png").write_bytes(_bomb_png(20000, 20000))
    return {"truncated.jpg": "truncated", "empty.png": "empty", "text.jpg": "not an image",
            "gone.png": "unreadable", "bomb.png": "decompression bomb"}


def _bomb_png(w: int, h: int) -> bytes:
    import struct
    import zlib

    def chunk(kind, payload):
        return (struct.pack(">I", len(payload)) + kind + payload
                + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def _odd_images(root: Path) -> None:
    """Images that are fine but need care: 16-bit, CMYK, RGBA, palette, grey, EXIF-rotated."""
    odd = root / "odd"
    odd.mkdir(parents=True)
    Image.fromarray(np.full((40, 40), 40000, dtype=np.uint16)).save(odd / "grey16.png")
    Image.new("CMYK", (40, 40), (10, 200, 30, 5)).save(odd / "cmyk.tiff")
    Image.new("RGBA", (40, 40), (10, 20, 30, 128)).save(odd / "rgba.png")
    Image.new("RGB", (40, 40), (1, 2, 3)).convert("P").save(odd / "palette.gif")
    Image.new("L", (40, 40), 77).save(odd / "grey.bmp")
    img = Image.new("RGB", (40, 60), (5, 6, 7))
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(odd / "rotated.webp", exif=exif.tobytes())


def test_bad_images_are_skipped_recorded_and_strict_fails(tmp_path):
    src = make_folder(tmp_path / "images", classes=("good",), per_class=3)
    reasons = _bad_images(src)
    _odd_images(src)
    out = tmp_path / "c.h5"
    summary = extract(src, out, CFG)
    assert summary.rows == 3 + 6
    bad = dict(summary.bad)
    assert sorted(bad) == sorted(f"bad/{n}" for n in reasons)
    for name, words in reasons.items():
        assert words in bad[f"bad/{name}"]
    with CacheReader(out) as r:
        assert sorted(p for p, _, _ in r.errors) == sorted(bad)
        assert set(r.paths) >= {"odd/grey16.png", "odd/cmyk.tiff", "odd/rotated.webp"}
    result = CliRunner().invoke(main, ["extract", str(src), "-o", str(tmp_path / "s.h5"),
                                       "--weights", "none", "--image-size", "32", "--strict", "-q"])
    assert result.exit_code == 1 and "6 images could not be used (--strict)" not in result.output
    assert "5 images could not be used (--strict)" in result.output
    assert (tmp_path / "s.h5").exists() and "Traceback" not in result.output


def test_sixteen_bit_image_is_scaled_not_clipped(tmp_path):
    src = tmp_path / "images"
    src.mkdir()
    Image.fromarray(np.full((40, 40), 32896, dtype=np.uint16)).save(src / "a16.png")  # 128 * 257
    Image.new("RGB", (40, 40), (128, 128, 128)).save(src / "b8.png")
    extract(src, tmp_path / "c.h5", CFG)
    feats = read(tmp_path / "c.h5")[0]
    np.testing.assert_array_equal(feats[0], feats[1])


def test_weights_from_local_pth_file(folder, tmp_path):
    model = random_vgg16(seed=7)
    torch.save(model.state_dict(), tmp_path / "mine.pth")
    out = tmp_path / "c.h5"
    extract(folder, out, ExtractConfig(**{**CFG.__dict__, "weights": str(tmp_path / "mine.pth")}))
    feats, paths, _, _, manifest = read(out)
    assert manifest["weights"] == "file:mine.pth"
    assert manifest["weights_sha256"] == state_dict_sha256(model.state_dict())
    np.testing.assert_allclose(feats, direct_features(model, folder, paths, model.classifier[4]),
                               rtol=1e-5, atol=1e-6)


def test_weights_name_uses_torchvision_download(folder, tmp_path, monkeypatch):
    model = random_vgg16(seed=3)
    asked = []

    def fake_download(url, *args, **kwargs):
        asked.append(url)
        return model.state_dict()
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", fake_download)
    out = tmp_path / "c.h5"
    extract(folder, out, ExtractConfig(**{**CFG.__dict__, "weights": "IMAGENET1K_V1"}))
    feats, paths, _, _, manifest = read(out)
    assert asked == [torchvision.models.VGG16_Weights.IMAGENET1K_V1.url]
    assert manifest["weights"] == "vgg16:IMAGENET1K_V1"
    assert manifest["weights_sha256"] == state_dict_sha256(model.state_dict())
    np.testing.assert_allclose(feats, direct_features(model, folder, paths, model.classifier[4]),
                               rtol=1e-5, atol=1e-6)

    def offline(url, *args, **kwargs):
        raise OSError("network unreachable")
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(UserError, match="could not get vgg16 weights IMAGENET1K_V1") as e:
        extract(folder, tmp_path / "d.h5", ExtractConfig(**{**CFG.__dict__, "weights": "DEFAULT"}))
    # Says where torchvision keeps the file (to copy it from another machine) and how to try
    # things out offline.
    kept = Path(torch.hub.get_dir()) / "checkpoints" / "vgg16-397923af.pth"
    assert f"to {kept}," in str(e.value) and "--weights none: random-init" in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("args, words", [
    (["{tmp}/nope", "-o", "{tmp}/c.h5"], "does not exist"),
    (["{tmp}/empty", "-o", "{tmp}/c.h5"], "no images"),
    (["{src}", "-o", "{tmp}/missing-dir/c.h5"], "does not exist"),
    (["{src}", "-o", "{tmp}"], "is a folder"),
    (["{src}", "-o", "{tmp}/c.h5", "--weights", "{tmp}/nope.pth"], "neither a weights name"),
    (["{src}", "-o", "{tmp}/c.h5", "--layer", "fc9"], "unknown layer 'fc9'"),
    # Without CUDA: "CUDA is not available"; with it: no such device. Both name the option.
    (["{src}", "-o", "{tmp}/c.h5", "--device", "cuda:999"], "--device cuda:999: "),
])
def test_cli_user_errors_are_one_line(folder, tmp_path, args, words):
    (tmp_path / "empty").mkdir()
    args = [a.format(tmp=tmp_path, src=folder) for a in args]
    if "--weights" not in args:
        args += ["--weights", "none"]
    if "--device" not in args and torch.cuda.is_available():
        pytest.skip("device check needs a machine without CUDA")
    one_line(CliRunner().invoke(main, ["extract", *args, "--image-size", "32", "-q"]), words)
    assert not (tmp_path / "c.h5").exists()


def test_cli_extract_and_inspect(folder, tmp_path, caplog):
    out = tmp_path / "c.h5"
    runner = CliRunner()
    result = runner.invoke(main, ["extract", str(folder), "-o", str(out), "--weights", "none",
                                  "--image-size", "32", "-q"])
    assert result.exit_code == 0, result.output
    assert "12 rows (12 computed, 0 reused, 0 dropped), 0 skipped images" in result.output
    assert any("RANDOM-INIT" in r.message for r in caplog.records)   # said loudly
    info = json.loads(runner.invoke(main, ["inspect", str(out), "--json"]).output)
    assert info["complete"] and info["rows"] == 12 and info["class_counts"] == {"cat": 6, "dog": 6}
    text = runner.invoke(main, ["inspect", str(out)]).output
    assert "complete, 12 rows x 4096 float16" in text and "layer fc7" in text


def test_incomplete_cache_is_refused_by_readers(folder, tmp_path):
    out = tmp_path / "c.h5"
    _kill_after(_extract_cmd(folder, out), 1)
    with pytest.raises(UserError, match="unfinished one is at"):
        CacheReader(out)
    with pytest.raises(UserError, match="incomplete cache"):
        CacheReader(partial_path(out))
    result = CliRunner().invoke(main, ["inspect", str(partial_path(out))])
    assert result.exit_code == 0 and "INCOMPLETE" in result.output


def test_csv_list_source_with_labels(folder, tmp_path):
    lst = tmp_path / "list.csv"
    lst.write_text("path,label\n" + "".join(
        f"{folder / c / f'{i:03d}.png'},{'x' if c == 'cat' else 'y'}\n"
        for c in ("cat", "dog") for i in range(2)))
    extract(lst, tmp_path / "c.h5", CFG)
    _, paths, labels, _, manifest = read(tmp_path / "c.h5")
    assert manifest["class_names"] == ["x", "y"] and labels == [0, 0, 1, 1] and len(paths) == 4
