"""The HDF5 feature store: manifest, crash-safe writer, reader (in RAM or streamed). No torch here."""
from .store import CacheReader, CacheWriter, partial_path, read_manifest

__all__ = ["CacheReader", "CacheWriter", "partial_path", "read_manifest"]
