"""Queries, one module per aggregate. Functions take an `AsyncConnection` from `Database.transaction()` or
`Database.read()`, so the caller decides what shares a transaction; no SQL lives outside this package."""
