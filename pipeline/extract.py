"""`extract()`: run a frozen backbone once over an image dataset and write an HDF5 feature cache.

    from pipeline import extract, ExtractConfig
    summary = extract("photos/", "photos.h5", ExtractConfig(layer="fc7", image_size=64))

Crash-safe and resumable: rows are committed batch by batch to `CACHE.h5.partial`; a re-run
of the same command continues from the last committed batch. Incremental: against an
existing cache, only new or changed images (by content hash) are computed; removed ones
are dropped. The cache appears under its final name only when complete. The planning
(what to reuse, what to compute, how to finish) is `cache.plan`; the decode -> forward ->
commit loop is `pipeline._engine`; this module runs the stage around them. The model comes
from `build_model(config)`, the one place to replace to wrap or stub it.

A re-run that finds the cache up to date costs the listing (a stat per image) and imports no
torch: the settings, versions and file stats are compared with the cache's record first
(`pipeline._uptodate`). When there is work, the model is built in a thread started as soon as
it is known to be needed, while the images are listed and hashed.

One run at a time per cache: a run holds a lock on `.CACHE.h5.lock` beside the output (the
kernel drops it when the process ends, even by SIGKILL), and a second run is refused with the
pid of the first. `-o` must be a new path or one of our caches: never an input image, a device
or another program's file, even with --overwrite. A failed write (a full disk) or Ctrl-C ends
the run with one line; what was committed is kept and the same command resumes.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np

from cache import manifest as mf
from cache.errors import UserError
from cache.plan import (Plan, finalize, known_stats, open_existing, plan, shard_path,
                        shard_paths)
from cache import CacheReader, CacheWriter, partial_path, refresh_stats

from ._version import __version__
from .config import DEFAULT_SPEC, ExtractConfig, split_layers, validate
from ._distributed import Job
from ._output import (OutputLock, check_not_an_input, check_output, check_output_name,
                      check_replaceable, check_shared, dropped_if_empty)
from ._uptodate import device_type, listing, precision_for, settled, versions
from .sources import ImageList, find_images, is_shard_source

if TYPE_CHECKING:
    from ._decode import Decoder

log = logging.getLogger(__name__)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during `extract()`: `committed` rows are kept in the unfinished cache (its
    `.partial`, or the shards of a torchrun job), and re-running the same command resumes."""

    def __init__(self, committed: int):
        super().__init__(committed)
        self.committed = committed


@dataclass
class ExtractSummary:
    """What a run did. Of the cache's `rows`, `computed` counts those this run computed and
    `reused` those taken from earlier runs (never negative: a row computed for a file that
    changed meanwhile is in neither); `bad` lists (path, reason) of every image that could not
    be used, files whose names cannot be stored included (such images are in neither count)."""
    path: str
    rows: int
    computed: int
    reused: int
    removed: int
    bad: list
    seconds: float
    images_per_s: float
    up_to_date: bool
    device: str
    manifest: dict
    hashed: int = 0           # image files read to hash them (the others cost a stat)
    world_size: int = 1       # processes of the job (torchrun ranks)
    rank: int = 0             # this process's rank (only rank 0's summary describes the cache)
    changed: int = 0          # cached images whose file changed since: computed again, not dropped

    def line(self) -> str:
        if self.up_to_date:
            return f"{self.path}: up to date ({self.rows} rows, {len(self.bad)} skipped images)"
        ranks = f" x {self.world_size} ranks" if self.world_size > 1 else ""
        return (f"{self.path}: {self.rows} rows ({self.computed} computed, {self.reused} reused, "
                f"{self.removed} dropped{f', {self.changed} changed' if self.changed else ''}), "
                f"{len(self.bad)} skipped images, {self.seconds:.1f} s, "
                f"{self.images_per_s:.1f} images/s on {self.device}{ranks}")


def extract(source: str | Path, output: str | Path, config: ExtractConfig = ExtractConfig()
            ) -> ExtractSummary:
    """Extract features of every image under `source` into the cache file `output`.

    Run by torchrun (WORLD_SIZE > 1), every rank calls this with the same arguments: the ranks
    list and plan alike, share the hashing, compute their deal of the batches into their own
    shard beside `output`, and rank 0 assembles the cache a single process would have written.

    Raises UserError for user mistakes (bad source, mismatching cache, unwritable output);
    with `config.strict`, also when images had to be skipped (after the cache is written).
    """
    output = check_output_name(output)
    with Job.from_env(config.dist_timeout) as job:
        # One job at a time per cache; the ranks of a job are one writer, so rank 0 alone
        # locks, and every rank stops if the lock is taken.
        lock = OutputLock(output)
        job.step("locking the output", lambda: lock.acquire() if job.lead else None)
        try:
            summary = _extract(Path(source), output, config, job)
        except KeyboardInterrupt:
            raise Interrupted(_held_rows(output)) from None
        finally:
            lock.release()
    return _finish_strict(summary, config)


def _extract(source: Path, output: Path, config: ExtractConfig, job: Job) -> ExtractSummary:
    t0 = time.perf_counter()
    images, device, precision = job.step("checking the input", lambda: _prepare(
        source, output, config, job))
    if job.distributed:
        check_shared(output, job)
    build = _Build(config, device)
    try:
        return _plan_and_run(source, output, config, job, t0, images, device, precision, build)
    finally:
        build.abandon()    # no build thread outlives a failed run (it would race the next one)


def _plan_and_run(source: Path, output: Path, config: ExtractConfig, job: Job, t0: float,
                  images: ImageList, device, precision: str, build: "_Build"
                  ) -> ExtractSummary:
    """Plan against the existing cache, then compute and assemble what is to be done."""
    sources = job.step("opening the existing cache", lambda: _open_all(output, None, True))
    try:
        # The same settings as the cache's: decide whether anything is to be done before
        # building a model (for a large backbone, the slowest part of a no-op re-run).
        same = settled(sources[0] or None, config, precision)
        # Decoders of the rows already there: --decode auto keeps to theirs.
        recorded = [d["name"] for r in sources if r for d in mf.decoders(r.file_manifest)]
        if same is None:
            build.start()          # other settings, or no cache: a model is needed anyway
        # Files to hash are most likely work: the model is built meanwhile.
        if is_shard_source(source):       # tar shards: listed now that the cache is open
            from .shards import known_members, list_shards
            images, names, stats, hashed = list_shards(
                images, config.label_key, known_members(sources[0] or None, config.label_key),
                config.rehash, job.share, job.gather)
        else:
            names, stats, hashed = listing(images, known_stats([r for r in sources if r]),
                                           config.rehash, job, on_change=build.start)
        if same is not None:
            planned = plan(*names, [r for r in sources if r], unusable=images.unusable)
            if _up_to_date(planned, sources):
                stale = _stale_stats(planned, sources[0], stats)
            else:
                same = None
    finally:
        _close(sources)
    if same is not None:                  # up to date
        build.abandon()
        if job.lead:
            refresh_stats(output, *stale)
        return _unchanged(output, planned, t0, device, same, hashed, job)
    model, info, device = job.step("building the backbone", build.result)
    decoder = _decoder(config, device, recorded)
    manifest = _manifest(info, config, precision, images, decoder)
    sources = job.step("opening the existing cache", lambda: _open_all(
        output, manifest, config.overwrite))
    try:
        planned = plan(*names, [r for r in sources if r is not None], unusable=images.unusable)
        manifest["decoders"] = _decoders(decoder, sources, bool(planned.todo), config, output)
        up_to_date = _up_to_date(planned, sources)
        removed, changed = ((0, 0) if sources[0] is None else            # while it is open
                            (planned.dropped(sources[0]), planned.changed(sources[0])))
        resume = sources[1] is not None if not job.distributed else None
    finally:
        _close(sources)
    job.wait("planning")   # every rank's readers closed before a rank opens its shard to write
    if up_to_date:
        return _unchanged(output, planned, t0, device, manifest, hashed, job)
    computed, compute_s, before = _compute(model, images, planned, stats, manifest, output,
                                           resume, config, device, precision, job, decoder)
    final = job.step("assembling the cache", lambda: finalize(
        output, manifest, *names, updates={"world_size": job.world_size},
        unusable=images.unusable) if job.lead else None)
    final = final or planned   # ranks other than 0 report the plan; rank 0 prints the summary
    fresh = _fresh_rows(final, before) if final.sources else min(computed, len(final.rows))
    return ExtractSummary(
        str(output), len(final.rows), fresh, len(final.rows) - fresh, removed, _bad(final),
        time.perf_counter() - t0, computed / compute_s if compute_s > 0 else 0.0, False,
        str(device), manifest, hashed, job.world_size, job.rank, changed)


class _Build:
    """`build_model(config)` in a thread, started once a model is known (or likely) to be
    needed, so that importing torch, building the model, loading its weights and moving them
    to the GPU overlap the listing and hashing. `result()` waits for it (starting it if need
    be) and gives (model, info, device) or raises what the build raised."""

    def __init__(self, config: ExtractConfig, device):
        self.config, self.device = config, device
        self.thread: threading.Thread | None = None
        self.value = self.failure = None

    def start(self) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name="extract-build", daemon=True)
            self.thread.start()

    def _run(self) -> None:
        try:
            model, info = build_model(self.config)
            device = _torch_device(self.device)
            if device.type == "cuda":      # the CUDA context and the weights' copy, meanwhile
                model = model.to(device)
            self.value = model, info, device
        except BaseException as e:       # raised again in the caller's thread by result()
            self.failure = e

    def result(self):
        self.start()
        self.thread.join()
        if self.failure is not None:
            raise self.failure
        return self.value

    def abandon(self) -> None:
        """Up to date after all (files touched, not changed): wait for a started build, so that
        no thread outlives the run, and drop it."""
        if self.thread is not None:
            self.thread.join()


def _torch_device(device):
    """`device` ("cpu", or a torch.device already resolved) as a torch.device."""
    if isinstance(device, str):
        import torch
        return torch.device(device)
    return device


def _unchanged(output: Path, planned: Plan, t0: float, device, manifest: dict, hashed: int,
               job: Job) -> ExtractSummary:
    """The summary of a run that found the cache up to date: every row reused."""
    return ExtractSummary(str(output), len(planned.rows), 0, len(planned.rows), 0,
                          _bad(planned), time.perf_counter() - t0, 0.0, True, str(device),
                          manifest, hashed, job.world_size, job.rank)


def _fresh_rows(final: Plan, before: dict) -> int:
    """Rows of the final cache that this run computed: those of a partial or shard past the
    rows it held when this run began. (Rows computed for files that changed meanwhile are not
    in the cache, so counting commits would overstate it.)"""
    start = [before.get(Path(os.path.abspath(p)), float("inf")) for p in final.sources]
    return sum(r >= start[s] for _, s, r in final.rows)


def _prepare(source: Path, output: Path, config: ExtractConfig, job: Job):
    """(images, device, precision): the device is "cpu" where that is sure without torch,
    else the torch.device that torch resolved (and checked)."""
    _check_config(config)
    check_output(output)
    if is_shard_source(source):
        from .shards import expand
        images = expand(source)
        if os.path.abspath(output) in {str(images.root / s) for s in images.shards}:
            raise UserError(f"{output} is one of the input shards: extract never writes over "
                            "its input; choose another -o")
    else:
        images = find_images(source)
        check_not_an_input(output, images)
    check_replaceable(output)
    device = device_type(config.device)
    if device == "cpu" and config.decode == "gpu":
        raise UserError("--decode gpu needs a CUDA device with nvJPEG (cpu here): use "
                        "--decode cpu or auto")
    if device is None:
        from ._loading import resolve_device
        device = resolve_device(job.device(config.device))
        return images, device, precision_for(config.precision, device.type)
    return images, device, precision_for(config.precision, device)


def _open_all(output: Path, manifest: dict | None, overwrite: bool) -> list:
    """The existing cache, partial and shards; without a manifest (before the model is built),
    whatever of them is readable, for their file stats and recorded settings (an unreadable
    one as False: the full check after building the model says what is wrong with it)."""
    if manifest is not None:
        return open_existing(output, manifest, overwrite)
    out = []
    for path in (output, partial_path(output), *shard_paths(output)):
        try:
            out.append(CacheReader(path, allow_incomplete=True) if path.exists() else None)
        except UserError:
            out.append(False)
    return out


def _close(sources) -> None:
    for r in sources:
        if r:
            r.close()


def _up_to_date(planned: Plan, sources: list) -> bool:
    old, others = sources[0], [r for r in sources[1:] if r is not None]
    return bool(old) and not others and planned.is_whole(old, 0)


def _stale_stats(planned: Plan, old: CacheReader, stats: list) -> tuple[list, list]:
    """(rows, current stats) of the cache's rows whose files kept their content but not their
    size/mtime record (touched, or copied without their times)."""
    sizes, mtimes = old.stats[:, 0].tolist(), old.stats[:, 1].tolist()
    rows = [(r, stats[i]) for i, _, r in planned.rows if (sizes[r], mtimes[r]) != tuple(stats[i])]
    return [r for r, _ in rows], [s for _, s in rows]


def _compute(model, images: ImageList, planned: Plan, stats, manifest: dict, output: Path,
             resume: bool | None, config: ExtractConfig, device, precision: str, job: Job,
             decoder: Decoder) -> tuple[int, float, dict]:
    """Compute this rank's deal of the planned batches; return the job's rows computed, its
    compute seconds (the slowest rank's), and the rows each file written (partial or shards,
    by absolute path) held before."""
    from ._loading import default_batch_size
    size = default_batch_size(config.batch_size, device.type == "cuda")
    batches = [planned.todo[k:k + size] for k in range(0, len(planned.todo), size)]
    if job.distributed:
        path = shard_path(output, job.rank)
        resume = path.exists()
    else:
        path = partial_path(output)

    from . import _engine as engine
    from .preprocessing import Preprocessing

    def run() -> tuple[Path, int, int, float]:
        # The decoding workers are forked before the writer opens its file: a worker forked
        # while it is open would inherit HDF5's descriptor and its lock, and one that outlives
        # a killed run would keep the file locked for the next.
        pre = Preprocessing.from_dict(manifest["preprocessing"])
        with engine.decoding(images, job.share(batches), pre, _augment(config, pre),
                             config.views, config.workers, device, decoder) as loaded:
            writer = CacheWriter.resume(path) if resume else CacheWriter.create(path, manifest)
            with writer, dropped_if_empty(writer, created=not resume):
                rows_before = writer.committed_rows
                t = time.perf_counter()
                engine.run(model, images, loaded, stats, writer, dtype=config.dtype,
                           device=device, precision=precision,
                           done=job.counter("extract/images"), total=len(planned.todo),
                           shown=config.progress if job.lead else False, pre=pre)
                return (Path(os.path.abspath(path)), rows_before,
                        writer.committed_rows - rows_before, time.perf_counter() - t)
    done = job.gather(job.step("computing", run))
    return (sum(n for _, _, n, _ in done), max(s for *_, s in done),
            {p: b for p, b, _, _ in done})


def _bad(planned: Plan) -> list[tuple[str, str]]:
    return [(p, reason) for p, _, reason in planned.errors]


def _augment(config: ExtractConfig, pre):
    """The Augment of the augmented views (None for one view); imports torchvision."""
    if config.views == 1:
        return None
    from .augment import Augment
    return Augment.parse(config.augment or DEFAULT_SPEC, pre, config.augment_seed)


def _check_config(config: ExtractConfig) -> None:
    validate(config)
    if config.views > mf.MAX_VIEWS:
        raise UserError(f"--views {config.views}: use 1 (the plain view) to {mf.MAX_VIEWS} (each "
                        "view is a forward pass of every image and a dataset of its own)")
    if config.views > 1 and config.decode not in ("auto", "pil"):
        raise UserError(f"--decode {config.decode} with --views {config.views}: augmented "
                        "views decode with Pillow; drop --decode or pass --decode pil")
    if config.views > 1 and len(split_layers(config.layer)) > 1:
        raise UserError(f"--views {config.views} with several cuts ({config.layer}): extract "
                        "augmented views of one cut at a time")
    if config.views == 1 and (config.augment or config.augment_seed):
        raise UserError("--augment and --augment-seed describe augmented views: add --views K "
                        "(K > 1)")
    if config.views > 1:                 # a bad SPEC: fail now
        from .preprocessing import Preprocessing
        _augment(config, Preprocessing(37, 32, (0.5,) * 3, (0.5,) * 3))


def _held_rows(output: Path) -> int:
    """Rows committed in the unfinished files of `output` (its partial and shards)."""
    total = 0
    for path in (partial_path(output), *shard_paths(output)):
        with contextlib.suppress(Exception):
            if path.exists():
                with CacheReader(path, allow_incomplete=True) as r:
                    total += r.n_rows
    return total


def build_model(config: ExtractConfig):
    """The frozen model and its manifest entries (backbone, weights, cuts, preprocessing, ...)
    for `config`: the one place `extract()` builds a model (not at all when the cache's recorded
    settings show it up to date). Tests and tools may replace it
    (`pipeline.extract.build_model = ...`) to wrap or stub the model; the replacement takes the
    config and returns (model, info) likewise."""
    from .backbone import build_backbone, warn_random_init
    built = build_backbone(config.backbone, config.weights, config.layer, config.image_size,
                           config.pool)
    # Once the names are known good (not before the error), and once a job: by rank 0 alone.
    if config.weights.lower() == "none" and os.environ.get("RANK", "0") == "0":
        warn_random_init(log, config.backbone, "using", "--weights none",
                         "features describe a random network, not a pretrained one")
    return built


def _manifest(info: dict, config: ExtractConfig, precision: str, images: ImageList,
              decoder: Decoder) -> dict:
    return {
        **info,
        "decoders": [decoder.record()],    # every decoder whose rows the cache holds
        "format_version": mf.MULTI_CUT_VERSION if info.get("cuts") else mf.FORMAT_VERSION,
        "views": None if config.views == 1 else {
            "count": config.views, "spec": config.augment or DEFAULT_SPEC,
            "seed": config.augment_seed},
        "dtype": config.dtype,
        "precision": precision,
        "class_names": list(images.class_names),
        "source_root": str(images.root),
        "source_kind": images.kind,
        "config": {k: v for k, v in asdict(config).items() if k != "progress"},
        "versions": {"pipeline": __version__, **versions(), "h5py": h5py.__version__,
                     "numpy": np.__version__},
    }


def _decoder(config: ExtractConfig, device, recorded: list[str]) -> Decoder:
    """The decoder of this run: --decode, where auto prefers the one that made the existing
    rows (`recorded`, their decoders' names). Augmented views decode with Pillow (their
    transforms take PIL images; `_check_config` refuses another --decode with them)."""
    from ._decode import Decoder, resolve_decoder
    if config.views > 1:
        return Decoder("pil", config.draft)
    return resolve_decoder(config.decode, device, config.draft, recorded)


def _decoders(decoder: Decoder, sources: list, computing: bool, config: ExtractConfig,
              output: Path) -> list[dict]:
    """The decoders of the rows the cache will hold: those of the existing rows, and this
    run's when it computes any. Rows of another decoder are added only with --mix-decoders."""
    mine = decoder.record()
    kept = [d for r in sources if r for d in mf.decoders(r.file_manifest)]
    other = [d for d in kept if mf.decoder_key(d) != mf.decoder_key(mine)]
    if computing and other and not config.mix_decoders:
        names = ", ".join(mf.decoder_text(d) for d in other)
        raise UserError(
            f"{output} holds rows decoded by {names}; this run decodes with "
            f"{mf.decoder_text(mine)}, whose pixels differ: pass --decode {other[0]['name']} to "
            f"match (gpu needs a CUDA device), --mix-decoders to add these rows anyway (the "
            f"manifest then lists both decoders), or --overwrite to start again")
    out = []
    for d in kept + ([mine] if computing or not kept else []):
        if mf.decoder_key(d) not in map(mf.decoder_key, out):
            out.append(d)
    return out


def _finish_strict(summary: ExtractSummary, config: ExtractConfig) -> ExtractSummary:
    if config.strict and summary.bad:
        raise UserError(f"{len(summary.bad)} images could not be used (--strict): "
                         + "; ".join(f"{p}: {r}" for p, r in summary.bad[:5])
                         + (" ..." if len(summary.bad) > 5 else "")
                         + f". The cache {summary.path} holds the rest.")
    return summary
