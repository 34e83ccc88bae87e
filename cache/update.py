"""Changing a complete cache without recomputing any feature: `assemble` a new one from rows
of existing caches (an incremental re-extraction's merge of reused and new rows), and
`refresh_stats` (record new file times of rows whose content is unchanged)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from . import _h5
from . import manifest as mf
from .errors import CacheBusy, first_line
from .reader import CacheReader
from .writer import CacheWriter

log = logging.getLogger(__name__)


def assemble(dest: str | Path, manifest: dict, sources: Sequence[CacheReader],
             rows: Sequence[tuple[int, int, int, str, str]],
             errors: Sequence[tuple[str, str, str]] = ()) -> Path:
    """Write a complete cache at `dest` from rows of existing caches, without recomputing.

    `rows` lists the output rows in order as (source number, source row, label, path,
    digest). Used when an incremental re-extraction merges reused and new rows. The new
    file is built under a temporary name and renamed into place, so `dest` is never torn.
    """
    dest = Path(dest)
    tmp = dest.with_name(dest.name + ".assembling")
    writer = CacheWriter.create(tmp, manifest)
    dims = dict(mf.feature_datasets(manifest))
    block = _h5.rows_per_chunk(max(dims.values()), manifest["dtype"]) * 8

    def empty(n: int) -> dict[str, np.ndarray]:
        return {name: np.empty((n, d), manifest["dtype"]) for name, d in dims.items()}

    try:
        for start in range(0, len(rows), block):
            part = rows[start:start + block]
            feats = empty(len(part))                                   # cut -> (B, D_cut)
            src = np.array([r[0] for r in part])
            src_rows = np.array([r[1] for r in part])
            stats = np.empty((len(part), 2), np.int64)
            for s in np.unique(src):
                mask = src == s
                for name, values in feats.items():
                    values[mask] = sources[s].read_rows(src_rows[mask], cut=name)
                stats[mask] = sources[s].stats[src_rows[mask]]
            writer.commit(feats, [r[2] for r in part], [r[3] for r in part],
                          [r[4] for r in part], stats=stats)
        writer.commit(empty(0), [], [], [], errors)
        return writer.finish(dest)
    except BaseException:
        # The temporary file is of no use half-written, and on a full disk it holds the space
        # a re-run needs.
        _h5.abandon(writer._file)
        tmp.unlink(missing_ok=True)
        raise


def refresh_stats(path: str | Path, rows: Sequence[int], stats: Sequence[tuple[int, int]]
                  ) -> None:
    """Record new (size, mtime_ns) for rows of a complete cache whose files were found
    unchanged in content (touched, or copied without their times), so that the next run trusts
    them again. Only the stats dataset changes: a write torn by a crash leaves each row with
    its old or its new stats, both true of the same content. Only an optimization: when the
    file cannot be written (busy, a full disk), it says so and the next run hashes those files
    again."""
    if not len(rows):
        return
    path = Path(path)
    try:
        h5 = _h5.open_file(path, "r+")
    except (CacheBusy, OSError, RuntimeError) as e:
        log.warning("could not record new file times in %s (%s): the next run reads those "
                    "files again", path, first_line(e))
        return
    try:
        if "stats" in h5:
            order = np.argsort(rows)
            data = h5["stats"][:]
            data[np.asarray(rows)[order]] = np.asarray(stats, np.int64).reshape(-1, 2)[order]
            h5["stats"][:] = data
        h5.close()
    except BaseException as e:
        _h5.abandon(h5)
        if not _h5.io_failure(e):
            raise
        log.warning("could not record new file times in %s (%s): the next run reads those "
                    "files again", path, first_line(e))
