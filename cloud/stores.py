"""Open the store a configuration describes (cloud.backend.Store): S3 or a directory."""

from __future__ import annotations

from cloud.backend import DirectoryConfig, Store
from cloud.directory_store import DirectoryStore
from cloud.store import ObjectStore, StoreConfig


def open_store(config: StoreConfig | DirectoryConfig) -> Store:
    """The store ``config`` describes (nothing is contacted or created yet)."""
    if isinstance(config, DirectoryConfig):
        return DirectoryStore(config.root)
    return ObjectStore(config)
