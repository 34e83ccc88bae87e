"""cache.plan: matching images to cached rows, refusing other settings, finishing a cache.

Caches are written directly with CacheWriter (3-dim features whose values name the row): no
model, no images, no torch.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

import cache.plan
from cache import CacheBusy, CacheReader, CacheWriter, partial_path, repair
from cache.errors import UserError
from cache.plan import CHANGED_REASON, finalize, open_compatible, open_existing, plan

REPO = Path(__file__).resolve().parents[1]
MANIFEST = {"backbone": "vgg16", "weights": "none", "weights_sha256": "0" * 64,
            "layer": "classifier.4", "feature_dim": 3, "preprocessing": {"crop_size": 32},
            "precision": "float32", "dtype": "float32", "class_names": ["a", "b"]}


def digest(path: str, version: int = 0) -> str:
    """A stand-in content digest: a different `version` is a changed file."""
    return hashlib.sha256(f"{path}:{version}".encode()).hexdigest()


def write(path: Path, rows, errors=(), manifest=MANIFEST, complete=True) -> Path:
    """A cache at `path` (complete) or the unfinished file `path` itself (not complete).

    rows: (path, label, version, value) with features [value, value + 0.5, -value]."""
    feats = np.array([[v, v + 0.5, -v] for *_, v in rows], dtype=np.float32).reshape(-1, 3)
    writer = CacheWriter.create(path.with_name(path.name + ".tmp") if complete else path, manifest)
    writer.commit(feats, [lab for _, lab, _, _ in rows], [p for p, *_ in rows],
                  [digest(p, ver) for p, _, ver, _ in rows], errors)
    if complete:
        writer.finish(path)
    else:
        writer.close()
    return path


def listing(images):
    """(paths, labels, class_names, digests) of images given as (path, label, version)."""
    return ([p for p, _, _ in images], [lab for _, lab, _ in images], ["a", "b"],
            [digest(p, ver) for p, _, ver in images])


def contents(path: Path):
    with CacheReader(path) as r:
        return r.load_features(), r.labels.tolist(), r.paths, r.digests, r.errors, r.manifest


def test_plan_new_changed_removed_and_failed_images(tmp_path):
    failed = ("a/bad.png", digest("a/bad.png"), "truncated")
    fixed = ("a/fixed.png", digest("a/fixed.png"), "empty file")
    old = write(tmp_path / "c.h5", [("a/0.png", 0, 0, 1.0), ("a/1.png", 0, 0, 2.0),
                                    ("b/gone.png", 1, 0, 3.0)], errors=[failed, fixed])
    images = [("a/0.png", 0, 0),        # unchanged: reused
              ("a/1.png", 0, 1),        # changed content: computed again
              ("a/bad.png", 0, 0),      # failed before, same bytes: still failed
              ("a/fixed.png", 0, 1),    # failed before, new bytes: tried again
              ("b/new.png", 1, 0)]      # new
    with CacheReader(old) as r:
        planned = plan(*listing(images), [r])
        assert planned.rows == [(0, 0, 0)]
        assert planned.errors == [failed]
        assert planned.todo == [1, 3, 4]
        assert planned.dropped(r) == 1          # the removed b/gone.png
        assert planned.changed(r) == 1          # a/1.png, computed again
        assert planned.output_rows() == [(0, 0, 0, "a/0.png", digest("a/0.png"))]
        after = plan(*listing(images), [r], changed_reason="changed")
    assert after.todo == [] and after.rows == planned.rows
    assert after.errors == sorted([failed, ("a/1.png", digest("a/1.png", 1), "changed"),
                                   ("a/fixed.png", digest("a/fixed.png", 1), "changed"),
                                   ("b/new.png", digest("b/new.png"), "changed")])


def test_later_sources_win(tmp_path):
    old = write(tmp_path / "c.h5", [("a/0.png", 0, 0, 1.0), ("a/1.png", 0, 0, 2.0)],
                errors=[("a/2.png", digest("a/2.png"), "old reason")])
    held = write(tmp_path / "p.h5", [("a/3.png", 0, 0, 4.0), ("a/1.png", 0, 0, 5.0)],
                 errors=[("a/2.png", digest("a/2.png"), "new reason")], complete=False)
    images = [("a/0.png", 0, 0), ("a/1.png", 0, 0), ("a/2.png", 0, 0), ("a/3.png", 0, 0)]
    with CacheReader(old) as r0, CacheReader(held, allow_incomplete=True) as r1:
        planned = plan(*listing(images), [r0, r1])
    assert planned.rows == [(0, 0, 0), (1, 1, 1), (3, 1, 0)]
    assert planned.errors == [("a/2.png", digest("a/2.png"), "new reason")]
    assert planned.todo == []


def test_plan_refuses_lists_of_different_lengths():
    with pytest.raises(ValueError, match="2 paths, 1 labels and 2 digests"):
        plan(["x", "y"], [0], [], ["d", "e"], [])


@pytest.mark.parametrize("images, class_names, whole", [
    ([("a/0.png", 0, 0), ("b/0.png", 1, 0)], ["a", "b"], True),
    ([("a/0.png", 0, 0), ("b/0.png", 1, 0), ("b/1.png", 1, 0)], ["a", "b"], False),   # new
    ([("a/0.png", 0, 0)], ["a", "b"], False),                                         # removed
    ([("a/0.png", 0, 0), ("b/0.png", 1, 1)], ["a", "b"], False),                      # changed
    ([("a/0.png", 0, 0), ("b/0.png", 0, 0)], ["a", "b"], False),                      # relabeled
    ([("a/0.png", 0, 0), ("b/0.png", 1, 0)], ["a", "b", "c"], False),                 # new class
])
def test_is_whole(tmp_path, images, class_names, whole):
    path = write(tmp_path / "c.h5", [("a/0.png", 0, 0, 1.0), ("b/0.png", 1, 0, 2.0)])
    paths, labels, _, digests = listing(images)
    with CacheReader(path) as r:
        planned = plan(paths, labels, class_names, digests, [r])
        assert planned.is_whole(r, 0) is whole
        assert not planned.is_whole(r, 1)   # as another source number, it is not


def test_is_whole_compares_errors(tmp_path):
    bad = ("a/bad.png", digest("a/bad.png"), "truncated")
    path = write(tmp_path / "c.h5", [("a/0.png", 0, 0, 1.0)], errors=[bad])
    with CacheReader(path) as r:
        assert plan(*listing([("a/0.png", 0, 0), ("a/bad.png", 0, 0)]), [r]).is_whole(r, 0)
        assert not plan(*listing([("a/0.png", 0, 0)]), [r]).is_whole(r, 0)   # error dropped


def test_open_compatible_refuses_other_settings_unless_overwrite(tmp_path):
    path = write(tmp_path / "c.h5", [("a/0.png", 0, 0, 1.0)])
    assert open_compatible(tmp_path / "none.h5", MANIFEST, False) is None
    reader = open_compatible(path, {**MANIFEST, "source_root": "/elsewhere"}, False)
    assert reader is not None and reader.n_rows == 1   # fields outside FEATURE_KEYS may differ
    reader.close()
    other = {**MANIFEST, "layer": "classifier.1", "preprocessing": {"crop_size": 48}}
    with pytest.raises(UserError) as e:
        open_compatible(path, other, False)
    assert "made with other settings" in str(e.value) and "--overwrite" in str(e.value)
    assert "layer: 'classifier.4' vs 'classifier.1'" in str(e.value)
    assert "preprocessing.crop_size: 32 vs 48" in str(e.value)
    assert open_compatible(path, other, True) is None
    assert contents(path)[0].tolist() == [[1.0, 1.5, -1.0]]   # ignored, not touched
    _assert_closed(path)


def test_open_compatible_refuses_a_file_that_is_not_a_cache(tmp_path):
    path = tmp_path / "c.h5"
    path.write_bytes(b"not hdf5 at all")
    with pytest.raises(UserError, match="not a usable feature cache.*--overwrite"):
        open_compatible(path, MANIFEST, False)
    assert open_compatible(path, MANIFEST, True) is None


@pytest.mark.parametrize("bug", [ValueError("a bug"), RuntimeError("a bug"), KeyError("a bug")])
def test_a_bug_while_opening_the_cache_never_gets_it_replaced(tmp_path, monkeypatch, bug):
    """Only a user mistake (UserError) lets --overwrite ignore a cache; any other exception
    while opening it is a bug, raised as it is, and the cache stays byte for byte."""
    out = write(tmp_path / "c.h5", [("a/0.png", 0, 0, 1.0)],
                manifest={**MANIFEST, "layer": "classifier.1"})      # other settings
    part = write(partial_path(out), [("a/0.png", 0, 0, 9.0)], complete=False)
    before, partial_before = out.read_bytes(), part.read_bytes()

    def buggy(path, *args, **kwargs):
        if Path(path) == out:
            raise bug
        return CacheReader(path, *args, **kwargs)
    monkeypatch.setattr(cache.plan, "CacheReader", buggy)
    with pytest.raises(type(bug), match="a bug"):
        open_existing(out, MANIFEST, overwrite=True)
    with pytest.raises(type(bug), match="a bug"):
        finalize(out, MANIFEST, *listing([("a/0.png", 0, 0)]))
    assert out.read_bytes() == before and part.read_bytes() == partial_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.h5", "c.h5.partial"]
    monkeypatch.undo()
    finalize(out, MANIFEST, *listing([("a/0.png", 0, 0)]))      # a user mistake: replaced
    assert contents(out)[0].tolist() == [[9.0, 9.5, -9.0]]


def test_open_existing_closes_the_cache_when_the_partial_is_refused(tmp_path):
    out = write(tmp_path / "c.h5", [("a/0.png", 0, 0, 1.0)])
    partial_path(out).write_bytes(b"\x89HDF\r\n\x1a\n damaged")
    with pytest.raises(UserError, match="c.h5.partial exists but is not a usable feature cache"
                       ) as failure:
        open_existing(out, MANIFEST, False)
    # `failure` keeps the call's frames alive: a reader left open in them would hold the file.
    assert failure.traceback
    _assert_closed(out)
    old, held = open_existing(out, MANIFEST, True)    # overwrite: the damaged partial is ignored
    assert held is None and old.n_rows == 1
    old.close()


def _assert_closed(path: Path) -> None:
    """No HDF5 file handle of this process is open on `path` (it can be replaced)."""
    open_files = [Path(i.name.decode()).resolve()
                  for i in h5py.h5f.get_obj_ids(types=h5py.h5f.OBJ_FILE)]
    assert path.resolve() not in open_files
    h5py.File(path, "a").close()   # opening for writing fails while a reader holds the file


def test_finalize_renames_a_whole_partial(tmp_path):
    out = tmp_path / "c.h5"
    part = write(partial_path(out), [("a/0.png", 0, 0, 1.0), ("b/0.png", 1, 0, 2.0)],
                 errors=[("b/bad.png", digest("b/bad.png"), "empty file")], complete=False)
    inode = os.stat(part).st_ino
    images = [("a/0.png", 0, 0), ("b/0.png", 1, 0), ("b/bad.png", 1, 0)]
    final = finalize(out, MANIFEST, *listing(images))
    assert final.rows == [(0, 0, 0), (1, 0, 1)] and final.todo == []
    assert os.stat(out).st_ino == inode and not part.exists()   # renamed, not copied
    feats, labels, paths, digests, errors, manifest = contents(out)
    assert feats.tolist() == [[1.0, 1.5, -1.0], [2.0, 2.5, -2.0]] and labels == [0, 1]
    assert paths == ["a/0.png", "b/0.png"] and digests == [digest("a/0.png"), digest("b/0.png")]
    assert errors == [("b/bad.png", digest("b/bad.png"), "empty file")]
    assert (manifest["rows"], manifest["errors"]) == (2, 1)


def test_finalize_assembles_from_cache_and_partial(tmp_path):
    out = write(tmp_path / "c.h5", [("a/0.png", 0, 0, 1.0), ("a/1.png", 0, 0, 2.0),
                                    ("b/gone.png", 1, 0, 3.0)])
    part = write(partial_path(out), [("a/1.png", 0, 1, 4.0), ("b/new.png", 1, 0, 5.0)],
                 complete=False)
    images = [("a/0.png", 0, 0), ("a/1.png", 0, 1), ("b/new.png", 1, 0), ("b/late.png", 1, 0)]
    final = finalize(out, MANIFEST, *listing(images))
    assert final.rows == [(0, 0, 0), (1, 1, 0), (2, 1, 1)]
    assert not part.exists()
    feats, labels, paths, digests, errors, manifest = contents(out)
    # Each output row equals its source row: a/0.png from the cache, the others from the partial.
    assert feats.tolist() == [[1.0, 1.5, -1.0], [4.0, 4.5, -4.0], [5.0, 5.5, -5.0]]
    assert labels == [0, 0, 1] and paths == ["a/0.png", "a/1.png", "b/new.png"]
    assert digests == [digest("a/0.png"), digest("a/1.png", 1), digest("b/new.png")]
    # An image still without a row changed while it was read: recorded, retried next run.
    assert errors == [("b/late.png", digest("b/late.png"), CHANGED_REASON)]
    assert (manifest["rows"], manifest["errors"], manifest["layer"]) == (3, 1, "classifier.4")
    assert not list(tmp_path.glob("*.assembling"))


def test_finalize_replaces_a_cache_with_other_settings(tmp_path):
    out = write(tmp_path / "c.h5", [("a/0.png", 0, 0, 1.0)],
                manifest={**MANIFEST, "layer": "classifier.1"})
    write(partial_path(out), [("a/0.png", 0, 0, 9.0)], complete=False)
    finalize(out, MANIFEST, *listing([("a/0.png", 0, 0)]))
    feats, *_, manifest = contents(out)
    assert feats.tolist() == [[9.0, 9.5, -9.0]] and manifest["layer"] == "classifier.4"


def test_cache_imports_neither_torch_nor_click():
    code = ("import sys, cache, cache.plan, cache.reader, cache.writer, cache.update, "
            "cache.inspect, cache.manifest; "
            "print(sorted(m for m in ('torch', 'click', 'pipeline') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


NOT_UTF8 = "file or folder name is not valid UTF-8: rename it"


def test_unusable_names_are_errors_with_no_digest(tmp_path):
    path = write(tmp_path / "c.h5", [("a/0.png", 0, 0, 1.0)])
    images = [("a/0.png", 0, 0), ("b/1.png", 1, 0)]
    with CacheReader(path) as r:
        planned = plan(*listing(images), [r], unusable=[("b/\\xff.png", NOT_UTF8),
                                                         ("a/\\xfe.png", NOT_UTF8)])
    assert planned.rows == [(0, 0, 0)] and planned.todo == [1]
    assert planned.errors == [("a/\\xfe.png", "", NOT_UTF8), ("b/\\xff.png", "", NOT_UTF8)]


def test_finalize_appends_missing_errors_to_a_partial_and_renames_it(tmp_path):
    out = tmp_path / "c.h5"
    part = write(partial_path(out), [("a/0.png", 0, 0, 1.0), ("b/0.png", 1, 0, 2.0)],
                 complete=False)
    inode = os.stat(part).st_ino
    images = [("a/0.png", 0, 0), ("b/0.png", 1, 0), ("b/late.png", 1, 0)]
    final = finalize(out, MANIFEST, *listing(images), unusable=[("a/\\xff.png", NOT_UTF8)])
    assert os.stat(out).st_ino == inode and not part.exists()   # renamed, not copied
    want = [("a/\\xff.png", "", NOT_UTF8), ("b/late.png", digest("b/late.png"), CHANGED_REASON)]
    assert final.errors == want
    feats, labels, paths, _, errors, manifest = contents(out)
    assert sorted(errors) == want and manifest["errors"] == 2
    assert feats.tolist() == [[1.0, 1.5, -1.0], [2.0, 2.5, -2.0]] and labels == [0, 1]


HOLD = ("import sys, time, h5py; f = h5py.File(sys.argv[1], 'r+'); print('open', flush=True); "
        "time.sleep(60)")


def test_a_file_held_by_another_process_is_busy_even_with_overwrite(tmp_path):
    out = write(tmp_path / "c.h5", [("a/0.png", 0, 0, 1.0)])
    part = write(partial_path(out), [("a/1.png", 0, 0, 2.0)], complete=False)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(part)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        before = part.read_bytes()
        for overwrite in (False, True):
            with pytest.raises(CacheBusy, match=r"c\.h5\.partial is busy: another process has "
                                                r"it open") as e:
                open_existing(out, MANIFEST, overwrite)
            assert "--overwrite" not in str(e.value)
            _assert_closed(out)
        assert part.read_bytes() == before
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


def test_a_partial_cut_short_by_a_failed_flush_is_rebuilt_from_its_committed_rows(tmp_path):
    """A flush that failed after recording the file's new end, before writing its tail: HDF5
    refuses such a file ("truncated file"); the rows committed before it are kept."""
    out = tmp_path / "c.h5"
    part = partial_path(out)
    writer = CacheWriter.create(part, MANIFEST)
    writer.commit(np.array([[1.0, 1.5, -1.0], [2.0, 2.5, -2.0]], np.float32), [0, 1],
                  ["a/0.png", "b/0.png"], [digest("a/0.png"), digest("b/0.png")])
    size = part.stat().st_size
    h5 = writer._file            # a second batch written and flushed, its marker never set
    for name, values in (("features", np.full((4000, 3), 7, np.float32)),
                         ("labels", np.zeros(4000, np.int64)),
                         ("paths", np.array(["x.png"] * 4000, dtype=object)),
                         ("digests", np.array([b"0" * 64] * 4000))):
        h5[name].resize(4002, axis=0)
        h5[name][2:] = values
    h5.flush()
    writer.close()
    os.truncate(part, size)
    with pytest.raises(UserError, match="truncated file"):
        CacheReader(part, allow_incomplete=True)
    old, held = open_existing(out, MANIFEST, False)
    try:
        assert old is None and held.n_rows == 2 and held.paths == ["a/0.png", "b/0.png"]
        assert held.load_features().tolist() == [[1.0, 1.5, -1.0], [2.0, 2.5, -2.0]]
    finally:
        held.close()
    assert not list(tmp_path.glob("*.repairing"))
    final = finalize(out, MANIFEST, *listing([("a/0.png", 0, 0), ("b/0.png", 1, 0)]))
    assert final.rows == [(0, 0, 0), (1, 0, 1)] and contents(out)[2] == ["a/0.png", "b/0.png"]


def test_a_partial_whose_committed_rows_cannot_be_read_is_named_damaged(tmp_path):
    out = tmp_path / "c.h5"
    part = write(partial_path(out), [("a/0.png", 0, 0, 1.0)], complete=False)
    part.write_bytes(part.read_bytes()[:600])       # its metadata gone with the tail
    with pytest.raises(UserError, match=r"c\.h5\.partial is damaged \(.*\) and cannot be "
                                        r"repaired: delete it and re-run the same extract "
                                        r"command \(its rows are computed again\)"):
        repair(part)
    with pytest.raises(UserError, match=r"c\.h5\.partial exists but is not a usable feature "
                                        r"cache .*pass --overwrite to replace it"):
        open_existing(out, MANIFEST, False)
    assert open_existing(out, MANIFEST, True) == [None, None]
