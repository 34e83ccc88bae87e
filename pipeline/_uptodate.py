"""What `extract` decides before it needs a model, without importing torch: the device and
precision a run would use, whether a cache's recorded settings are this run's, and the digest
and stat of every image (a stat per unchanged file, a read per changed one).

    kind = device_type(config.device)          # "cpu", or None when only torch can tell
    precision = precision_for(config.precision, kind)
    manifest = settled(reader, config, precision)     # None: a model must be built to compare
    (paths, labels, names, digests), stats, hashed = listing(images, known, rehash, job)

A re-run that finds its cache up to date imports none of torch, torchvision or timm: this
module, `cache` and the listing are all it runs.
"""
from __future__ import annotations

import importlib.util
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from cache.reader import CacheReader

from ._distributed import Job
from .config import ExtractConfig
from .sources import ImageList

# The settings that decide the features, as recorded in a cache's manifest["config"]: equal
# ones (and the same torch and torchvision) let a re-run trust the cache without a model.
SETTINGS = ("backbone", "weights", "layer", "pool", "image_size", "dtype", "views", "augment",
            "augment_seed", "decode", "draft")
_DEFAULTS = asdict(ExtractConfig())
# Device files of a GPU driver torch can use (NVIDIA, ROCm, WSL's GPU): without any of them,
# torch.cuda.is_available() is False, so "auto" means the CPU.
_GPU_NODES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg")
_HASH_THREADS = 8      # files hashed at once: enough to keep a disk or a network share busy
_VERSION = re.compile(r"""^__version__\s*=\s*['"]([^'"]+)['"]""", re.M)


def installed_version(package: str) -> str | None:
    """`package.__version__` without importing it: torch and torchvision write it, build label
    included ("2.14.1+cu130"), in their version.py, which is read as text; the distribution's
    version where there is no such file; None when the package is not installed."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None:
        return None
    version_py = Path(spec.origin).parent / "version.py"
    try:
        found = _VERSION.search(version_py.read_text(encoding="utf-8"))
    except OSError:
        found = None
    if found:
        return found.group(1)
    from importlib import metadata
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def gpu_possible() -> bool:
    """False when torch cannot see a GPU here, known without importing it (no GPU driver's
    device file, CUDA_VISIBLE_DEVICES empty, or macOS); True when only torch can tell."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1") or sys.platform == "darwin":
        return False
    if sys.platform.startswith("linux"):
        return any(os.path.exists(node) for node in _GPU_NODES)
    return True


def device_type(name: str) -> str | None:
    """"cpu" when --device `name` surely resolves to the CPU; None when torch must resolve it
    (and check it: an unknown device or a missing GPU is a user mistake torch reports)."""
    if name == "cpu" or name == "auto" and not gpu_possible():
        return "cpu"
    return None


def precision_for(name: str, kind: str) -> str:
    """The forward pass's precision for --precision `name` on a `kind` ("cpu", "cuda") device:
    auto is float16 autocast on CUDA (about 9x closer to float32 than bfloat16 at the same
    speed; the engine redoes a batch with a non-finite output in float32), float32 elsewhere."""
    if name == "auto":
        return "float16" if kind == "cuda" else "float32"
    return name


def versions() -> dict:
    """The versions of torch and torchvision a cache's features depend on, as recorded."""
    return {"torch": installed_version("torch"), "torchvision": installed_version("torchvision")}


def settled(old: CacheReader | None, config: ExtractConfig, precision: str) -> dict | None:
    """The complete cache's manifest when it was made with these very settings, so that it can
    be trusted without building the model (which computes the weights' SHA-256); else None.
    A local weights file is never trusted so: its content may have changed under its name."""
    if old is None or not old.complete or str(config.weights).lower() not in ("none", "default") \
            and Path(config.weights).exists():
        return None
    m = old.file_manifest
    recorded = m.get("config") or {}
    mine = {k: v for k, v in asdict(config).items() if k != "progress"}
    # A setting a cache predates was at its default then.
    same = [k for k in SETTINGS if recorded.get(k, _DEFAULTS[k]) == mine[k]]
    kept = m.get("versions") or {}
    if (len(same) < len(SETTINGS) or m.get("precision") != precision
            or any(kept.get(k) != v for k, v in versions().items())):
        return None
    return m


def listing(images: ImageList, known: dict, rehash: bool, job: Job,
            on_change: Callable[[], None] | None = None):
    """((paths, labels, class names, digests), (size, mtime_ns) of each file, files read to
    hash them) of the images. A file whose size and mtime equal those kept with its digest
    (`known`: path -> (size, mtime_ns, digest)) is not read again, unless `rehash`; the others
    are hashed in parallel, and `on_change()` is called before, when there are any. Under
    torchrun the ranks check a share each and exchange the results."""
    mine = job.share(range(len(images.paths)))
    stats = images.stats
    paths = images.paths
    results, todo = [], []                   # (digest, stat, read) of each of `mine`
    for i in mine:
        stat = stats[i] if stats is not None else _stat(images.absolute(i))
        kept = known.get(paths[i])
        if stat[0] < 0:
            results.append(("", stat, 0))        # gone or unreadable: retried on every run
        elif not rehash and kept is not None and kept[0] == stat[0] and kept[1] == stat[1]:
            results.append((kept[2], stat, 0))
        else:
            todo.append(len(results))
            results.append(("", stat, 1))
    if todo and on_change is not None:
        on_change()
    for k, digest in zip(todo, _digests([images.absolute(mine[k]) for k in todo])):
        results[k] = (digest, results[k][1], 1)
    parts = job.gather(results)
    if job.distributed:
        merged = [None] * len(paths)
        for rank, part in enumerate(parts):
            merged[rank::job.world_size] = part
        results = merged
    digests = [d for d, _, _ in results]
    return ((paths, images.labels, images.class_names, digests),
            [s for _, s, _ in results], sum(h for _, _, h in results))


def _stat(path: Path) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return -1, -1
    return st.st_size, st.st_mtime_ns


def _digests(paths: list[Path]) -> list[str]:
    """The content digest of each file ("" for one that cannot be read: it is retried on every
    run), several read at once when there are several."""
    if not paths:
        return []
    from .images import digest_or_blank    # PIL: imported only when a file is read
    if len(paths) < 2:
        return [digest_or_blank(p) for p in paths]
    pool = ThreadPoolExecutor(max_workers=min(_HASH_THREADS, len(paths), (os.cpu_count() or 1) * 2))
    try:
        return list(pool.map(digest_or_blank, paths))
    finally:   # on Ctrl-C, the files not yet begun are not hashed
        pool.shutdown(wait=True, cancel_futures=True)


__all__ = ["SETTINGS", "device_type", "gpu_possible", "installed_version", "listing",
           "precision_for", "settled", "versions"]
