"""Database access: `Database` (the connector seam), `schema` (tables), `migrate` (Alembic, run in code).
Import the submodules directly; this package stays light so `config` can use `db.url` cheaply."""
