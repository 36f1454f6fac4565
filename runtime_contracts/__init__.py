"""Data only: the runtime contract schema and the catalog (read through mtplx.artifact.catalog)."""
