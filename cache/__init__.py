"""The HDF5 feature store: manifest, crash-safe writer, reader (in RAM or streamed), and the
planning of incremental updates (`cache.plan`). No torch and no click here."""
from .store import CacheReader, CacheWriter, partial_path, read_manifest

__all__ = ["CacheReader", "CacheWriter", "partial_path", "read_manifest"]
