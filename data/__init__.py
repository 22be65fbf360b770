"""Datasets, manifests, collation and synthetic-data recipes (imported as `lyra.data`)."""
