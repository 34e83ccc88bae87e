"""The HDF5 feature store, no torch and no click: `manifest` (what determines the features, as
JSON), `writer` (crash-safe appending, resume, finish, repair), `reader` (in RAM or streamed),
`update` (assemble a cache from existing rows, refresh file stats), `plan` (incremental
updates), `inspect` (describe a file), `errors` (UserError and its kinds for cache files)."""
from ._h5 import fsync_path
from .errors import CacheBusy, StorageError, Unreadable, UserError, first_line
from .reader import CacheReader, cache_kind, read_manifest
from .update import assemble, refresh_stats
from .writer import CacheWriter, finish, partial_path, repair

__all__ = ["CacheBusy", "CacheReader", "CacheWriter", "StorageError", "Unreadable", "UserError",
           "assemble", "cache_kind", "finish", "first_line", "fsync_path", "partial_path",
           "read_manifest", "refresh_stats", "repair"]
