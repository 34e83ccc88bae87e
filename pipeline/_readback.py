"""The images a cache's rows were made from, read back and proven unchanged by their digest:
export's parity check and the report's mistake grid decode them again."""
from __future__ import annotations

from pathlib import Path

from PIL import Image

from cache import CacheReader

from .images import BadImageError
from .shards import read_path

MISSING, CHANGED = "missing", "changed"


def images_root(reader: CacheReader, given: str | Path | None) -> Path:
    """Where the cached rows' images are: `given` (--images-root), else the cache's source root."""
    return Path(given or reader.manifest.get("source_root") or ".")


def read_row_image(reader: CacheReader, root: Path, row: int) -> tuple[Image.Image | None, str]:
    """(image, "") of cached row `row`, decoded with Pillow (a file, or a tar shard's member); (None, MISSING) when its
    file is gone or unreadable, (None, CHANGED) when its SHA-256 is not the one recorded."""
    try:
        image, digest = read_path(root / reader.paths[row])   # a file or a shard's member
    except BadImageError:
        return None, MISSING
    if digest != reader.digests[row]:
        return None, CHANGED
    return image, ""


__all__ = ["CHANGED", "MISSING", "images_root", "read_row_image"]
