"""The shard store: layout facts, metadata, manifest, readers (DALI loader, torch fallback).

Sibling packages (prep, train, infer) import only the names listed here.
"""
from shards import layout  # noqa: F401

_PUBLIC = {
    "load_sites": "shards.metadata",
    "load_wells": "shards.metadata",
    "source_test_ids": "shards.metadata",
    "read_test_labels": "shards.metadata",
    "MetadataError": "shards.metadata",
    "open_store": "shards.store",
    "StoreError": "shards.store",
    "make_loader": "shards.loader",
    "LoaderSpec": "shards.loader_spec",
    "LoaderError": "shards.loader_spec",
    "SITE_MODES": "shards.loader_spec",
    "BACKENDS": "shards.loader_spec",
}


def __getattr__(name):
    # Lazy so that importing `shards.layout` does not pull in DALI, torch or zarr.
    if name in _PUBLIC:
        import importlib
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'shards' has no attribute {name!r}")


__all__ = ["layout", *_PUBLIC]
