"""Tar shards as a SOURCE: listing (brace ranges, globs, webdataset grouping, labels), hostile
and damaged archives, features equal to the same images as files, incremental re-runs.

Shards are written with tarfile in tmp_path; the backbone is random-init resnet18 on 32 px.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import pipeline.shards as shards_mod
from cache import CacheReader
from cache.errors import UserError
from cli.main import main
from pipeline.config import ExtractConfig
from pipeline.extract import extract
from pipeline.shards import expand, read_path

from .conftest import one_line

CFG = ExtractConfig(backbone="resnet18", weights="none", image_size=32, batch_size=4,
                    dtype="float32", workers=0, progress=False)


def png(seed: int, size=(40, 36)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def add(tar: tarfile.TarFile, name: str, data: bytes, **info) -> None:
    member = tarfile.TarInfo(name)
    member.size = len(data)
    for k, v in info.items():
        setattr(member, k, v)
    tar.addfile(member, io.BytesIO(data))


def write_shard(path: Path, samples: dict[str, tuple[bytes, object]], label: str = "cls") -> Path:
    """A webdataset shard: KEY.png and, for a label, KEY.cls (or KEY.json {"y": label})."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, (data, y) in samples.items():
            add(tar, f"{key}.png", data)
            if y is not None and label == "cls":
                add(tar, f"{key}.cls", str(y).encode())
            elif y is not None:
                add(tar, f"{key}.json", json.dumps({"y": y, "caption": "x"}).encode())
    return path


def samples(lo: int, hi: int, labels=True) -> dict[str, tuple[bytes, object]]:
    return {f"{k:04d}": (png(k), k % 3 if labels else None) for k in range(lo, hi)}


def read(path):
    with CacheReader(path) as r:
        return (r.load_features(), list(r.paths), r.labels.tolist(), list(r.digests),
                sorted(r.errors), r.manifest)


@pytest.fixture
def sharded(tmp_path) -> Path:
    """Three shards of 4 labeled samples each under tmp_path/shards."""
    for s in range(3):
        write_shard(tmp_path / "shards" / f"part-{s:03d}.tar", samples(4 * s, 4 * s + 4))
    return tmp_path / "shards"


# ----------------------------------------------------------------------------- sources

def test_brace_range_glob_and_single_tar(sharded):
    by_range = expand(f"{sharded}/part-{{000..002}}.tar")
    assert by_range.root == sharded and by_range.shards == (
        "part-000.tar", "part-001.tar", "part-002.tar")
    assert expand(f"{sharded}/part-*.tar").shards == by_range.shards
    assert expand(f"{sharded}/part-{{001..002}}.tar").shards == ("part-001.tar", "part-002.tar")
    assert expand(sharded / "part-001.tar").shards == ("part-001.tar",)
    assert expand(f"{sharded}/part-{{002,000}}.tar").shards == ("part-000.tar", "part-002.tar")
    with pytest.raises(UserError, match="runs backwards"):
        expand(f"{sharded}/part-{{002..000}}.tar")


def test_missing_shard_and_empty_match_are_one_line_errors(sharded):
    with pytest.raises(UserError, match=r"part-003.tar does not exist \(of the 4"):
        expand(f"{sharded}/part-{{000..003}}.tar")
    with pytest.raises(UserError, match="matches no .tar shard"):
        expand(f"{sharded}/other-*.tar")
    result = CliRunner().invoke(main, ["extract", f"{sharded}/x-{{0..1}}.tar", "-o",
                                       str(sharded / "c.h5"), "--weights", "none"])
    one_line(result, "x-0.tar does not exist")


def test_compressed_tar_refused_in_one_line(tmp_path, sharded):
    import gzip
    gz = tmp_path / "part.tar"
    gz.write_bytes(gzip.compress((sharded / "part-000.tar").read_bytes()))
    with pytest.raises(UserError, match="gzip-compressed tar.*decompress"):
        expand(gz)
    result = CliRunner().invoke(main, ["extract", str(tmp_path / "p.tar.gz"), "-o",
                                       str(tmp_path / "c.h5"), "--weights", "none"])
    one_line(result, "compressed tar")


# ----------------------------------------------------------------------------- equivalence

def test_shards_and_folder_give_bit_identical_features(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    data = samples(0, 10, labels=False)
    for key, (blob, _) in data.items():
        (folder / f"{key}.png").write_bytes(blob)
    keys = sorted(data)
    write_shard(tmp_path / "sh" / "a.tar", {k: data[k] for k in keys[:6]})
    write_shard(tmp_path / "sh" / "b.tar", {k: data[k] for k in keys[6:]})
    extract(folder, tmp_path / "f.h5", CFG)
    summary = extract(f"{tmp_path}/sh/*.tar", tmp_path / "s.h5",   # decoded in 2 workers
                      ExtractConfig(**{**CFG.__dict__, "workers": 2}))
    f_feats, f_paths, _, f_digests, _, _ = read(tmp_path / "f.h5")
    s_feats, s_paths, s_labels, s_digests, errors, manifest = read(tmp_path / "s.h5")
    assert s_paths == [f"a.tar/{k}.png" for k in keys[:6]] + [f"b.tar/{k}.png" for k in keys[6:]]
    assert [p.split("/")[1] for p in s_paths] == f_paths
    assert s_feats.dtype == np.float32 and s_feats.shape == f_feats.shape
    assert np.array_equal(s_feats, f_feats)              # bit-identical, row for row
    assert s_digests == f_digests and errors == [] and s_labels == [-1] * 10
    assert manifest["source_kind"] == "shards" and summary.computed == 10


def test_cls_labels_and_integer_class_names(sharded, tmp_path):
    extract(f"{sharded}/part-{{000..002}}.tar", tmp_path / "c.h5", CFG)
    _, paths, labels, _, errors, manifest = read(tmp_path / "c.h5")
    assert paths[:2] == ["part-000.tar/0000.png", "part-000.tar/0001.png"] and len(paths) == 12
    assert labels == [k % 3 for k in range(12)] and errors == []
    assert manifest["class_names"] == ["0", "1", "2"]


def test_json_field_labels(tmp_path):
    write_shard(tmp_path / "j.tar", {"a": (png(1), 4), "b": (png(2), None), "c": (png(3), 1)},
                label="json")
    extract(tmp_path / "j.tar", tmp_path / "c.h5", ExtractConfig(**{**CFG.__dict__,
                                                                   "label_key": "json:y"}))
    _, paths, labels, _, _, manifest = read(tmp_path / "c.h5")
    assert paths == ["j.tar/a.png", "j.tar/b.png", "j.tar/c.png"] and labels == [4, -1, 1]
    assert manifest["class_names"] == ["0", "1", "2", "3", "4"]
    extract(tmp_path / "j.tar", tmp_path / "d.h5", CFG)       # no .cls members: unlabeled
    assert read(tmp_path / "d.h5")[2] == [-1, -1, -1]


def test_bad_label_key_and_mixed_labels_are_one_line_errors(tmp_path):
    write_shard(tmp_path / "j.tar", {"a": (png(1), 4), "b": (png(2), "owl")}, label="json")
    out = str(tmp_path / "c.h5")
    result = CliRunner().invoke(main, ["extract", str(tmp_path / "j.tar"), "-o", out,
                                       "--weights", "none", "--label-key", "txt"])
    one_line(result, "--label-key 'txt'", "json:FIELD")
    result = CliRunner().invoke(main, ["extract", str(tmp_path / "j.tar"), "-o", out,
                                       "--weights", "none", "--label-key", "json:y"])
    one_line(result, "mix integers and names")


# ----------------------------------------------------------------------------- hostile

def test_hostile_members_are_skipped_and_nothing_is_written(tmp_path, monkeypatch):
    shard = tmp_path / "in" / "evil.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tar:
        add(tar, "good.png", png(1))
        add(tar, "../up.png", png(2))
        add(tar, "/abs/x.png", png(3))
        add(tar, "link.png", b"", type=tarfile.SYMTYPE, linkname="/etc/passwd")
        add(tar, "hard.png", b"", type=tarfile.LNKTYPE, linkname="good.png")
        add(tar, "dev.png", b"", type=tarfile.CHRTYPE, devmajor=1, devminor=5)
        add(tar, "dir.jpg", b"", type=tarfile.DIRTYPE)
        add(tar, "notes.txt", b"hello")
    monkeypatch.setattr(tarfile.TarFile, "extract", None)      # never used
    monkeypatch.setattr(tarfile.TarFile, "extractall", None)
    before = sorted(p for p in tmp_path.rglob("*"))
    summary = extract(shard, tmp_path / "c.h5", CFG)
    after = sorted(p for p in tmp_path.rglob("*"))
    assert [p for p in after if p not in before] == [tmp_path / "c.h5"]
    assert not (tmp_path / "up.png").exists() and not Path("/abs/x.png").exists()
    _, paths, _, _, errors, _ = read(tmp_path / "c.h5")
    assert paths == ["evil.tar/good.png"]
    reasons = {p: r for p, _, r in errors}
    assert set(reasons) == {"evil.tar/../up.png", "evil.tar//abs/x.png", "evil.tar/link.png",
                            "evil.tar/hard.png", "evil.tar/dev.png", "evil.tar/dir.jpg"}
    assert "leaves the archive" in reasons["evil.tar/../up.png"]
    assert "absolute" in reasons["evil.tar//abs/x.png"]
    assert "symbolic link" in reasons["evil.tar/link.png"]
    assert "hard link" in reasons["evil.tar/hard.png"]
    assert "device" in reasons["evil.tar/dev.png"]
    assert "directory" in reasons["evil.tar/dir.jpg"]
    assert len(summary.bad) == 6


def test_truncated_shard_keeps_members_before_the_damage(tmp_path):
    shard = write_shard(tmp_path / "t.tar", samples(0, 6, labels=False))
    blob = shard.read_bytes()
    with tarfile.open(shard) as tar:
        fourth = tar.getmembers()[3]
    shard.write_bytes(blob[:fourth.offset_data + 100])       # inside the fourth image
    summary = extract(shard, tmp_path / "c.h5", CFG)
    _, paths, _, _, errors, _ = read(tmp_path / "c.h5")
    assert paths == ["t.tar/0000.png", "t.tar/0001.png", "t.tar/0002.png"]
    reasons = {p: r for p, _, r in errors}
    assert "truncated member" in reasons["t.tar/0003.png"]
    assert "damaged after 4 members" in reasons["t.tar"]
    assert summary.rows == 3
    with pytest.raises(UserError, match="--strict"):
        extract(shard, tmp_path / "d.h5", ExtractConfig(**{**CFG.__dict__, "strict": True}))


def test_huge_member_refused_without_reading_it(tmp_path, monkeypatch):
    shard = tmp_path / "big.tar"
    with open(shard, "wb") as f:
        info = tarfile.TarInfo("huge.png")
        info.size = 1 << 30
        f.write(info.tobuf(format=tarfile.GNU_FORMAT))
        f.seek((1 << 30), os.SEEK_CUR)                        # sparse: nothing written
        small = tarfile.TarInfo("small.png")
        data = png(5)
        small.size = len(data)
        f.write(small.tobuf(format=tarfile.GNU_FORMAT) + data + b"\0" * (-len(data) % 512))
        f.write(b"\0" * 1024)
    read_sizes = []
    real = shards_mod._hash_member
    monkeypatch.setattr(shards_mod, "_hash_member",
                        lambda f, m: read_sizes.append(m.size) or real(f, m))
    extract(shard, tmp_path / "c.h5", CFG)
    _, paths, _, _, errors, _ = read(tmp_path / "c.h5")
    assert paths == ["big.tar/small.png"] and read_sizes == [len(data)]
    assert errors[0][0] == "big.tar/huge.png" and "larger than any image" in errors[0][2]


# ----------------------------------------------------------------------------- incremental

def test_unchanged_shard_costs_a_stat_and_new_shard_only_its_rows(sharded, tmp_path,
                                                                  monkeypatch):
    source = f"{sharded}/part-*.tar"
    out = tmp_path / "c.h5"
    first = extract(source, out, CFG)
    assert first.computed == 12 and first.hashed == 12
    opened = []
    real_open = tarfile.open
    monkeypatch.setattr(tarfile, "open", lambda *a, **k: (
        k.get("mode") == "r:" and opened.append(k)) or real_open(*a, **k))   # reads only
    again = extract(source, out, CFG)
    assert again.up_to_date and again.hashed == 0 and opened == []
    write_shard(sharded / "part-003.tar", samples(12, 15))
    more = extract(source, out, CFG)
    assert (more.computed, more.reused, more.hashed, len(opened)) == (3, 12, 3, 1)
    feats, paths, labels, _, _, _ = read(out)
    fresh = tmp_path / "fresh.h5"
    extract(source, fresh, CFG)
    assert paths == read(fresh)[1] and labels == read(fresh)[2]
    assert np.array_equal(feats, read(fresh)[0])
    # a changed shard is read again, its changed member computed
    write_shard(sharded / "part-001.tar", {**samples(4, 8), "0005": (png(99), 2)})
    changed = extract(source, out, CFG)
    assert (changed.computed, changed.hashed) == (1, 4)


def test_read_path_reads_a_member_back(sharded):
    img, digest = read_path(sharded / "part-001.tar" / "0005.png")
    assert img.size == (36, 40)
    with pytest.raises(Exception, match="no member"):
        read_path(sharded / "part-001.tar" / "9999.png")


# ----------------------------------------------------------------------------- torchrun

@pytest.mark.slow
def test_two_ranks_equal_one_process(sharded, tmp_path):
    from .test_distributed import assert_same_cache, torchrun
    (sharded / "part-001.tar").write_bytes((sharded / "part-001.tar").read_bytes()[:3000])
    source = f"{sharded}/part-{{000..002}}.tar"
    extract(source, tmp_path / "one.h5", CFG)
    run = torchrun("ok", source, tmp_path / "two.h5")
    assert run.returncode == 0, run.stderr[-3000:]
    one, two = read(tmp_path / "one.h5"), read(tmp_path / "two.h5")
    assert_same_cache(two, one)
    assert two[5]["world_size"] == 2 and len(one[1]) == 8     # part-001 damaged in its first
    assert {e[0] for e in one[4]} == {"part-001.tar", "part-001.tar/0004.png"}


# ----------------------------------------------------------------------------- downstream

def test_export_report_and_predict_read_images_from_shards(sharded, tmp_path):
    import torch

    from pipeline.config import ExportConfig, PredictConfig, ReportConfig, TrainConfig
    from pipeline.export import export
    from pipeline.head_file import load_head
    from pipeline.predict import predict
    from pipeline.report import report
    from pipeline.train_head import train_head
    source = f"{sharded}/part-*.tar"
    cache = tmp_path / "c.h5"
    extract(source, cache, ExtractConfig(**{**CFG.__dict__, "dtype": "float16"}))
    runs = tmp_path / "runs"
    run = train_head(cache, runs, TrainConfig(epochs=2, val_fraction=0.5)).best_path
    exported = export(run, tmp_path / "m.pt2", ExportConfig())
    assert exported.parity["images"] > 0                         # decoded from the shards
    summary = report(runs, tmp_path / "r", ReportConfig(misclassified=50))
    assert not any("missing" in n for n in summary.notes) and summary.misclassified > 0
    result = predict(tmp_path / "m.pt2", [source], PredictConfig(workers=0, progress=False))
    with CacheReader(cache) as r:
        want = [(sharded / p).as_posix() for p in r.paths]
        feats = torch.from_numpy(r.load_features())
    assert [p["path"] for p in result.predictions] == want and result.skipped == []
    head, _ = load_head(run)
    with torch.no_grad():
        expected = head(feats).numpy()
    np.testing.assert_allclose(result.logits, expected, atol=exported.parity["tolerance"])
