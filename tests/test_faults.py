"""Faults and hostile input: a failed write, a second run, a kill, Ctrl-C, an -o that is not
ours, damaged markers. Each ends in one line, loses nothing committed and destroys nothing;
re-running the same command then gives the cache an uninterrupted run gives.

resnet18 with random-init weights on 32 px images (fast on a CPU); the slow runs wrap the
model so that each batch takes a moment, long enough to act between two commits.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cache import CacheReader, CacheWriter, StorageError, partial_path
from cache.errors import UserError
from cache.plan import CHANGED_REASON
from cli.main import main
from pipeline import ExtractConfig, extract
from pipeline.config import TrainConfig
from pipeline.train_head import train_head

from .conftest import error_lines, make_folder, one_error_line

REPO = Path(__file__).resolve().parents[1]
CFG = ExtractConfig(backbone="resnet18", weights="none", image_size=32, batch_size=4,
                    dtype="float32", workers=0, progress=False)
ARGS = ["--backbone", "resnet18", "--weights", "none", "--image-size", "32", "--batch-size", "4",
        "--dtype", "float32", "-q"]
FULL = "; free space and re-run the same command"
EXTRACT = sys.modules["pipeline.extract"]


def read(path):
    with CacheReader(path) as r:
        return (r.load_features(), list(r.paths), r.labels.tolist(), list(r.digests),
                sorted(r.errors))


def assert_same(got_path, want_path):
    got, want = read(got_path), read(want_path)
    np.testing.assert_array_equal(got[0], want[0])            # bit-identical on the CPU
    assert got[1:] == want[1:]
    assert not (np.abs(got[0]).sum(axis=1) == 0).any()         # no row left as zeros


def committed(path) -> int:
    with CacheReader(path, allow_incomplete=True) as r:
        return r.n_rows


# ----------------------------------------------------------------------- failed writes

class _FailingWrites:
    """Every HDF5 write after the first `k` raises ENOSPC, as a full disk would: dataset and
    attribute writes, resizes and flushes (a flush is where HDF5 writes what it buffered)."""

    TARGETS = ((h5py.Dataset, "__setitem__"), (h5py.Dataset, "resize"), (h5py.File, "flush"),
               (h5py.AttributeManager, "__setitem__"), (h5py.AttributeManager, "modify"))

    def __init__(self, monkeypatch, k: float):
        self.k, self.calls = k, []
        for owner, name in self.TARGETS:
            monkeypatch.setattr(owner, name, self._wrap(getattr(owner, name), name))

    def _wrap(self, original, name: str):
        def write(*args, **kwargs):
            self.calls.append(name)
            if len(self.calls) > self.k:
                raise OSError(errno.ENOSPC, "No space left on device")
            return original(*args, **kwargs)
        return write


@pytest.fixture
def built_once(monkeypatch):
    """Each run of a sweep reuses one built backbone (building it is most of a run here)."""
    build, built = EXTRACT.build_model, {}

    def once(config):
        if config.layer not in built:
            built[config.layer] = build(config)
        return built[config.layer]
    monkeypatch.setattr(EXTRACT, "build_model", once)


def _fault_points(monkeypatch, run) -> list[int]:
    """Every k for which "every write after the k-th fails" fails `run()` somewhere else: one
    per HDF5 write it makes."""
    with monkeypatch.context() as m:
        counter = _FailingWrites(m, float("inf"))
        run()
    return list(range(len(counter.calls)))


def _one_batch_then_full(src: Path, out: Path, monkeypatch) -> int:
    """Run extract until the disk fills just after its first committed batch (the writes of
    creating the file, then of one commit: its data, flush, markers, flush); return the rows
    that the partial it leaves holds."""
    with monkeypatch.context() as m:
        counter = _FailingWrites(m, float("inf"))
        extract(src, out.with_name("count.h5"), CFG)
    flushes = [k for k, name in enumerate(counter.calls) if name == "flush"]
    with monkeypatch.context() as m:
        _FailingWrites(m, flushes[2] + 1)      # the file's first flush, then the commit's two
        with pytest.raises(StorageError):
            extract(src, out, CFG)
    return committed(partial_path(out))


def _full_disk_line(monkeypatch, k: int, run) -> str:
    """Run with every HDF5 write after the k-th failing; return its one-line message."""
    with monkeypatch.context() as m:
        _FailingWrites(m, k)
        with pytest.raises(StorageError) as failure:
            run()
    text = str(failure.value)
    assert "\n" not in text and text.startswith("no space left on device ") and \
        text.endswith(FULL), (k, text)
    return text


@pytest.mark.slow      # every write of a run fails in turn; the real full-disk tests cover one
def test_every_failed_write_is_one_line_and_resumes_to_the_uninterrupted_cache(
        tmp_path, monkeypatch, built_once):
    src = make_folder(tmp_path / "images", classes=("a", "b"), per_class=4)
    (src / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    ref = tmp_path / "ref.h5"
    extract(src, ref, CFG)
    points = _fault_points(monkeypatch, lambda: extract(src, tmp_path / "count.h5", CFG))
    assert len(points) > 30
    for k in points:
        out = tmp_path / f"c{k}.h5"
        text = _full_disk_line(monkeypatch, k, lambda: extract(src, out, CFG))
        kept = int(re.search(r": (\d+|no) rows are committed", text).group(1).replace("no", "0"))
        assert not out.exists()
        if partial_path(out).exists():
            assert committed(partial_path(out)) == kept, (k, text)
        summary = extract(src, out, CFG)
        assert_same(out, ref)
        # Nothing committed is computed again; the broken image is never a row.
        assert (summary.computed, summary.reused, summary.rows) == (8 - kept, kept, 8), k
        assert not partial_path(out).exists() and not list(tmp_path.glob("*.lock"))


@pytest.mark.slow      # every assembling write in turn; a real full disk while assembling below
def test_failed_writes_while_assembling_keep_the_cache_and_the_partial(tmp_path, monkeypatch,
                                                                       built_once):
    src = make_folder(tmp_path / "images", classes=("a", "b"), per_class=4)
    base = tmp_path / "base.h5"
    extract(src, base, CFG)
    make_folder(src, classes=("c",), per_class=3, seed=4)            # 3 new images
    fresh = tmp_path / "fresh.h5"
    extract(src, fresh, CFG)

    def update(out: Path) -> None:
        shutil.copy(base, out)
        extract(src, out, CFG)
    points = _fault_points(monkeypatch, lambda: update(tmp_path / "count.h5"))
    assembling = 0
    for k in points:
        out = tmp_path / f"c{k}.h5"
        shutil.copy(base, out)
        text = _full_disk_line(monkeypatch, k, lambda: extract(src, out, CFG))
        assert out.read_bytes() == base.read_bytes()     # the complete cache is never touched
        assert not list(tmp_path.glob("*.assembling"))   # nor is the space of a half copy kept
        if ".assembling" in text:
            assembling += 1
            assert f"{out} is unchanged and the 3 rows computed so far are kept in " \
                   f"{partial_path(out)}" in text
            assert committed(partial_path(out)) == 3
        summary = extract(src, out, CFG)
        assert_same(out, fresh)
        assert (summary.rows, summary.computed + summary.reused) == (11, 11)
    assert assembling >= 3


def _tmpfs(path: Path, size: str) -> None:
    path.mkdir()
    if os.geteuid() != 0:
        pytest.skip("a real full disk needs root to mount a small tmpfs")
    run = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                         capture_output=True, text=True)
    if run.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {run.stderr.strip()}")


def _fill(folder: Path, leave: int) -> Path:
    """A file taking all of `folder`'s free space but `leave` bytes."""
    st = os.statvfs(folder)
    filler = folder / "filler"
    filler.write_bytes(b"\1" * max(0, st.f_bavail * st.f_frsize - leave))
    return filler


def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout)


# 64x8x8 float32 values a row: 16 KiB, 64 rows to a 1 MiB HDF5 chunk, so a small disk fills.
BIG = ["--layer", "layer1.1.relu_1"]


@pytest.mark.parametrize("leave", [200_000, 2_000_000])   # before the first commit; after some
def test_a_real_full_disk_then_freed_space_resumes(tmp_path, leave):
    src = make_folder(tmp_path / "images", classes=("a", "b"), per_class=40, size=(36, 36))
    ref = tmp_path / "ref.h5"
    assert _cli("extract", str(src), "-o", str(ref), *ARGS, *BIG).returncode == 0
    disk = tmp_path / "disk"
    _tmpfs(disk, "4m")
    try:
        filler = _fill(disk, leave)
        out = disk / "c.h5"
        run = _cli("extract", str(src), "-o", str(out), *ARGS, *BIG)
        assert run.returncode == 1, run.stderr[-3000:]          # not a crash (139 was)
        line = one_error_line(run.stderr)
        found = re.fullmatch(rf"no space left on device writing {re.escape(str(out))}.partial: "
                             rf"(\d+) rows are committed{FULL}", line)
        assert found, line
        kept = int(found.group(1))
        assert (kept == 0) == (leave < 1_000_000)
        filler.unlink()                                           # free space
        run = _cli("extract", str(src), "-o", str(out), *ARGS, *BIG)
        assert run.returncode == 0, run.stderr[-3000:]
        assert f"80 rows ({80 - kept} computed, {kept} reused" in run.stdout
        assert_same(out, ref)
        assert sorted(os.listdir(disk)) == ["c.h5"]
    finally:
        subprocess.run(["umount", str(disk)])


def test_a_real_full_disk_while_assembling_keeps_everything(tmp_path):
    src = make_folder(tmp_path / "images", classes=("a", "b"), per_class=40, size=(36, 36))
    disk = tmp_path / "disk"
    _tmpfs(disk, "7m")       # the cache, the new rows and a copy of all: about 6.5 MB
    try:
        out = disk / "c.h5"
        assert _cli("extract", str(src), "-o", str(out), *ARGS, *BIG).returncode == 0
        before = out.read_bytes()
        make_folder(src, classes=("c",), per_class=4, seed=9)
        filler = _fill(disk, 1_800_000)      # room for the new rows, not for a copy of all
        run = _cli("extract", str(src), "-o", str(out), *ARGS, *BIG)
        assert run.returncode == 1, run.stderr[-3000:]
        line = one_error_line(run.stderr)
        assert line == (f"no space left on device writing {out}.assembling: {out} is unchanged "
                        f"and the 4 rows computed so far are kept in {out}.partial{FULL}")
        assert out.read_bytes() == before and committed(partial_path(out)) == 4
        assert not (disk / "c.h5.assembling").exists()
        filler.unlink()
        run = _cli("extract", str(src), "-o", str(out), *ARGS, *BIG)
        assert run.returncode == 0, run.stderr[-3000:]
        assert "84 rows (0 computed, 84 reused" in run.stdout
        ref = tmp_path / "ref.h5"
        assert _cli("extract", str(src), "-o", str(ref), *ARGS, *BIG).returncode == 0
        assert_same(out, ref)
    finally:
        subprocess.run(["umount", str(disk)])


def test_a_partial_that_cannot_be_reopened_for_writing_is_rebuilt(tmp_path, monkeypatch):
    src = make_folder(tmp_path / "images", classes=("a", "b"), per_class=5)
    ref = tmp_path / "ref.h5"
    extract(src, ref, CFG)
    out = tmp_path / "c.h5"
    kept = _one_batch_then_full(src, out, monkeypatch)
    assert kept == 4
    # As HDF5 answers a file whose metadata a failed flush left half-written.
    refused = []
    open_h5 = sys.modules["cache._h5"].open_file

    def refuse_once(path, mode):
        if mode == "r+" and not refused:
            refused.append(path)
            raise RuntimeError("Unable to synchronously change a dataset's dimensions "
                               "(addr overflow, addr = 7256, size = 2616, eoa = 7256)")
        return open_h5(path, mode)
    monkeypatch.setattr(sys.modules["cache._h5"], "open_file", refuse_once)
    summary = extract(src, out, CFG)
    assert refused == [partial_path(out)]
    assert summary.computed == 10 - kept and summary.reused == kept
    assert_same(out, ref)
    assert not list(tmp_path.glob("*.repairing"))


# ----------------------------------------------------------- two runs, kills and Ctrl-C

# `pipeline extract` whose backbone sleeps 0.3 s a batch, and says so at each commit (-v).
SLOW = textwrap.dedent("""
    import sys, time, torch
    import pipeline.extract
    module = sys.modules["pipeline.extract"]
    build = module.build_model

    class Slow(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            time.sleep(0.3)
            return self.inner(x)
    module.build_model = lambda config: (lambda m, i: (Slow(m), i))(*build(config))
    from cli.main import main
    main(sys.argv[1:], prog_name="pipeline")
""")


def _slow(src: Path, out: Path, workers: int = 2) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SLOW, "-v", "extract", str(src), "-o", str(out),
                             *ARGS, "--workers", str(workers)], stderr=subprocess.PIPE, text=True,
                            cwd=REPO, start_new_session=True)


def _until_commit(proc: subprocess.Popen) -> list[str]:
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if "committed" in line:
            return lines
    raise AssertionError("".join(lines)[-3000:])


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry))
    return out


def _open_files(pid: int) -> set[str]:
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            found.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return found


@pytest.fixture
def slow_images(tmp_path):
    src = make_folder(tmp_path / "images", classes=("a", "b"), per_class=16)
    ref = tmp_path / "ref.h5"
    extract(src, ref, CFG)
    return src, ref


def test_a_second_run_is_told_who_writes_and_overwrite_changes_nothing(tmp_path, slow_images):
    src, ref = slow_images
    out = tmp_path / "c.h5"
    first = _slow(src, out)
    try:
        _until_commit(first)
        if Path("/proc/self/fd").is_dir():
            workers = _children(first.pid)
            assert workers                                # its decoding processes
            for pid in workers:                           # hold neither the cache nor the lock
                held = _open_files(pid)
                assert not {str(partial_path(out)), str(tmp_path / ".c.h5.lock")} & held, held
        assert (tmp_path / ".c.h5.lock").read_text().split()[0] == str(first.pid)
        for extra in ([], ["--overwrite"]):
            result = CliRunner().invoke(main, ["extract", str(src), "-o", str(out), *ARGS,
                                               "--workers", "0", *extra])
            assert result.exit_code == 1
            line = one_error_line(result.output)
            assert line == (f"{out} is being written by another `pipeline extract` "
                            f"(pid {first.pid}); wait for it or stop it")
            assert first.poll() is None                   # the first run goes on
    finally:
        rest = first.stderr.read()
        first.wait(timeout=240)
        first.stderr.close()
    assert first.returncode == 0, rest[-3000:]
    assert_same(out, ref)
    assert not (tmp_path / ".c.h5.lock").exists() and not partial_path(out).exists()


def test_under_torchrun_every_rank_is_told_who_writes(tmp_path):
    from .test_distributed import torchrun

    src = make_folder(tmp_path / "images", classes=("a", "b"), per_class=3)
    out = tmp_path / "c.h5"
    lock = EXTRACT.OutputLock(out)          # as a running `pipeline extract` holds it
    lock.acquire()
    try:
        run = torchrun("ok", src, out)
    finally:
        lock.release()
    assert run.returncode != 0
    errors = error_lines(run.stderr)
    said = f"{out} is being written by another `pipeline extract` (pid {os.getpid()}); " \
           "wait for it or stop it"
    assert sorted(errors) == sorted([f"Error: rank 0: {said}", f"Error: {said}"]), \
        run.stderr[-3000:]
    assert sorted(os.listdir(tmp_path)) == ["images"]      # nothing written, no lock left


def test_the_same_command_right_after_a_kill_resumes(tmp_path, slow_images):
    src, ref = slow_images
    out = tmp_path / "c.h5"
    first = _slow(src, out)
    _until_commit(first)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    first.stderr.close()
    kept = committed(partial_path(out))
    summary = extract(src, out, CFG)           # at once: its workers may still be exiting
    assert summary.computed == 32 - kept and summary.reused == kept
    assert_same(out, ref)


def test_ctrl_c_is_one_line_exit_130_and_resumes(tmp_path, slow_images):
    src, ref = slow_images
    out = tmp_path / "c.h5"
    first = _slow(src, out)
    _until_commit(first)
    os.killpg(first.pid, signal.SIGINT)        # as a terminal does: to every process of the job
    rest = first.stderr.read()
    first.wait(timeout=60)
    first.stderr.close()
    assert first.returncode == 130, rest
    assert "Traceback" not in rest, rest
    lines = [line for line in rest.splitlines() if not line.startswith("DEBUG: committed")]
    assert len(lines) == 1, rest
    found = re.fullmatch(r"Interrupted: (\d+) rows committed; re-run the same command to resume",
                         lines[0])
    assert found, rest
    kept = int(found.group(1))
    assert kept >= 4 and committed(partial_path(out)) == kept
    for _ in range(50):                        # the decoding workers end with it
        try:
            os.killpg(first.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("processes of the interrupted run are still alive")
    summary = extract(src, out, CFG)
    assert summary.computed == 32 - kept
    assert_same(out, ref)


HOLD = textwrap.dedent("""
    import sys, time, h5py
    f = h5py.File(sys.argv[1], "r+")
    print("open", flush=True)
    time.sleep(120)
""")


def test_a_busy_partial_is_refused_and_never_offered_overwrite(tmp_path, monkeypatch):
    src = make_folder(tmp_path / "images", classes=("a", "b"), per_class=5)
    ref = tmp_path / "ref.h5"
    extract(src, ref, CFG)
    out = tmp_path / "c.h5"
    assert _one_batch_then_full(src, out, monkeypatch) == 4
    part = partial_path(out)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(part)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        before = part.read_bytes()
        for extra in ([], ["--overwrite"]):
            result = CliRunner().invoke(main, ["extract", str(src), "-o", str(out), *ARGS,
                                               "--workers", "0", *extra])
            assert result.exit_code == 1
            line = one_error_line(result.output)
            assert line.startswith(f"{part} is busy: another process has it open") and \
                "--overwrite" not in line, line
            assert part.read_bytes() == before
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    extract(src, out, CFG)
    assert_same(out, ref)


# --------------------------------------------------------------- outputs that are not ours

def _hostile_output(kind: str, src: Path, tmp: Path) -> Path:
    if kind == "input image":
        return src / "a" / "000.png"
    if kind == "link to an input image":
        (tmp / "link.h5").symlink_to(src / "a" / "001.png")
        return tmp / "link.h5"
    if kind == "hard link to an input image":
        os.link(src / "b" / "002.png", tmp / "hard.h5")
        return tmp / "hard.h5"
    if kind == "fifo":
        os.mkfifo(tmp / "fifo.h5")
        return tmp / "fifo.h5"
    if kind == "character device":
        return Path(os.devnull)
    if kind == "text file":
        (tmp / "notes.h5").write_text("my notes, not a cache")
        return tmp / "notes.h5"
    if kind == "other HDF5 file":
        with h5py.File(tmp / "data.h5", "w") as f:
            f["x"] = np.arange(5)
        return tmp / "data.h5"
    raise ValueError(kind)


def _state(path: Path):
    st = os.stat(path)
    return (stat.S_IFMT(st.st_mode), st.st_ino,
            path.read_bytes() if stat.S_ISREG(st.st_mode) else None)


@pytest.mark.parametrize("kind, words", [
    ("input image", "is one of the input images (a/000.png)"),
    ("link to an input image", "is one of the input images (a/001.png)"),
    ("hard link to an input image", "exists and is not a feature cache (not an HDF5 file)"),
    ("fifo", "exists and is not a regular file"),
    ("character device", "exists and is not a regular file"),
    ("text file", "exists and is not a feature cache (not an HDF5 file)"),
    ("other HDF5 file", "exists and is not a feature cache (an HDF5 file of other data)"),
])
def test_overwrite_never_replaces_what_is_not_a_feature_cache(tmp_path, kind, words):
    src = make_folder(tmp_path / "images", classes=("a", "b"), per_class=3)
    out = _hostile_output(kind, src, tmp_path)
    before = _state(out)
    listing = sorted(os.listdir(out.parent))
    result = CliRunner().invoke(main, ["extract", str(src), "-o", str(out), *ARGS,
                                       "--workers", "0", "--overwrite"])
    assert result.exit_code == 1
    line = one_error_line(result.output)
    assert line.startswith(str(out)) and words in line, line
    assert _state(out) == before
    assert sorted(os.listdir(out.parent)) == listing       # no partial, no lock file left


# ------------------------------------------------------------------------ damaged files

@pytest.mark.parametrize("marker, value", [("committed_rows", -5), ("committed_rows", 10**6),
                                           ("committed_errors", -1), ("committed_errors", 99)])
@pytest.mark.parametrize("which", ["partial", "cache"])
def test_damaged_markers_are_refused_naming_the_file(tmp_path, monkeypatch, marker, value,
                                                     which):
    src = make_folder(tmp_path / "images", classes=("a", "b"), per_class=5)
    (src / "a" / "broken.png").write_bytes(b"")
    out = tmp_path / "c.h5"
    if which == "partial":
        assert _one_batch_then_full(src, out, monkeypatch) == 4
        damaged = partial_path(out)
    else:
        extract(src, out, CFG)
        damaged = out
    with h5py.File(damaged, "r+") as f:
        f.attrs[marker] = value
    before = damaged.read_bytes()
    with pytest.raises(UserError, match=rf"^{re.escape(str(damaged))} is damaged: its markers "
                                        rf"say .* but it holds \d+ rows and \d+ errors"):
        CacheReader(damaged, allow_incomplete=True)
    if which == "partial":
        with pytest.raises(UserError, match="is damaged"):
            CacheWriter.resume(damaged)
    result = CliRunner().invoke(main, ["extract", str(src), "-o", str(out), *ARGS,
                                       "--workers", "0"])
    assert result.exit_code == 1
    line = one_error_line(result.output)
    assert f"{damaged} is damaged" in line and str(value) in line
    assert damaged.read_bytes() == before                  # refused, not "repaired" blindly


def test_summary_counts_stay_true_when_files_change_during_the_run(tmp_path, monkeypatch):
    src = make_folder(tmp_path / "images", classes=("a", "b"), per_class=6)
    other = make_folder(tmp_path / "other", classes=("b",), per_class=6, seed=7)
    build = EXTRACT.build_model

    class ChangeFilesAtFirstBatch(torch.nn.Module):
        """The first forward pass rewrites the images of class b, read only later."""

        def __init__(self, inner):
            super().__init__()
            self.inner, self.calls = inner, 0

        def forward(self, x):
            self.calls += 1
            if self.calls == 1:
                for i in range(6):
                    shutil.copy(other / "b" / f"{i:03d}.png", src / "b" / f"{i:03d}.png")
            return self.inner(x)
    monkeypatch.setattr(EXTRACT, "build_model",
                        lambda config: (lambda m, i: (ChangeFilesAtFirstBatch(m), i))(
                            *build(config)))
    out = tmp_path / "c.h5"
    summary = extract(src, out, CFG)
    assert (summary.rows, summary.computed, summary.reused) == (6, 6, 0)   # never negative
    assert sorted(summary.bad) == [(f"b/{i:03d}.png", CHANGED_REASON) for i in range(6)]
    assert "6 rows (6 computed, 0 reused, 0 dropped), 6 skipped images" in summary.line()
    monkeypatch.undo()
    again = extract(src, out, CFG)
    assert (again.rows, again.computed, again.reused, again.bad) == (12, 6, 6, [])
    extract(src, tmp_path / "fresh.h5", CFG)
    assert_same(out, tmp_path / "fresh.h5")


def test_a_contiguous_copy_reads_and_trains(tmp_path):
    src = make_folder(tmp_path / "images", classes=("a", "b"), per_class=8)
    (src / "b" / "empty.png").write_bytes(b"")
    out = tmp_path / "c.h5"
    extract(src, out, CFG)
    conti = tmp_path / "conti.h5"
    with h5py.File(out, "r") as a, h5py.File(conti, "w") as b:   # as h5repack -l CONTI does
        for key, value in a.attrs.items():
            b.attrs[key] = value
        for name in a:
            b.create_dataset(name, data=a[name][()], dtype=a[name].dtype)
        assert all(b[name].chunks is None for name in b)
    with CacheReader(out) as r:
        want = r.load_features()
    with CacheReader(conti) as r:
        np.testing.assert_array_equal(r.load_features(), want)
        blocks = list(r.iter_chunks())
        assert blocks[0][:2] == (0, 16) and len(blocks) == 1
        np.testing.assert_array_equal(r.read_rows([15, 2, 3]), want[[15, 2, 3]])
        assert [p for p, _, _ in r.errors] == ["b/empty.png"]
    summary = train_head(conti, tmp_path / "runs", TrainConfig(epochs=2, val_fraction=0.25))
    assert summary.best_run and (tmp_path / "runs" / summary.best_run / "head.pt").exists()


@pytest.mark.skipif(sys.platform in ("win32", "darwin"), reason="file names are always Unicode")
def test_names_that_are_not_utf8_are_recorded_and_count_for_strict(tmp_path):
    src = make_folder(tmp_path / "images", classes=("a", "b"), per_class=3)
    try:
        fd = os.open(os.fsencode(src / "a") + b"/b\xffad.png", os.O_WRONLY | os.O_CREAT, 0o644)
    except OSError as e:
        pytest.skip(f"this filesystem refuses names that are not UTF-8: {e}")
    with os.fdopen(fd, "wb") as f:
        f.write((src / "a" / "000.png").read_bytes())
    reason = "file or folder name is not valid UTF-8: rename it"
    out = tmp_path / "c.h5"
    summary = extract(src, out, CFG)
    assert summary.rows == 6 and summary.bad == [("a/b\\xffad.png", reason)]
    with CacheReader(out) as r:
        assert r.errors == [("a/b\\xffad.png", "", reason)]
    again = extract(src, out, CFG)
    assert again.up_to_date and again.bad == summary.bad
    shown = CliRunner().invoke(main, ["inspect", str(out)]).output
    assert "1 skipped images" in shown and f"a/b\\xffad.png: {reason}" in shown
    result = CliRunner().invoke(main, ["extract", str(src), "-o", str(out), *ARGS, "--strict"])
    assert result.exit_code == 1
    assert "1 images could not be used (--strict): a/b\\xffad.png" in one_error_line(result.output)
