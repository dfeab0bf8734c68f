"""Batches to Turso: SQLite statements, Hrana, targets (HTTP or file), the pipeline and the marker."""
