"""The loops that join a source to its target(s): one target (worker) or every tenant of a pattern."""
