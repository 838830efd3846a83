"""Which blob store the settings name (`KICI_STORAGE_BACKEND`). Apart from `blobs` (the interface) so
the backends, which implement that interface, are not imported by it: the composition root picks one."""

from __future__ import annotations

from kici.orchestrator.config import Settings
from kici.orchestrator.storage.blobs import BlobStore


def blob_store_from_settings(settings: Settings) -> BlobStore:
    """The store `KICI_STORAGE_BACKEND` names. Nothing is contacted here (see `BlobStore.check`)."""
    if settings.storage_backend == "s3":
        from kici.orchestrator.storage.blobs_s3 import S3BlobStore

        assert settings.storage_bucket is not None  # the settings validator requires it
        return S3BlobStore(
            bucket=settings.storage_bucket,
            prefix=settings.storage_prefix,
            endpoint=settings.storage_endpoint,
            region=settings.storage_region,
            force_path_style=settings.storage_force_path_style,
        )
    from kici.orchestrator.storage.blobs_fs import FilesystemBlobStore, default_blob_root

    return FilesystemBlobStore(default_blob_root(settings.data_dir))
