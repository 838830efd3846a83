"""Blob storage behind interfaces: job logs now; caches and artifacts later. The filesystem backend is
the embedded default; an S3-compatible backend will implement the same interfaces."""
