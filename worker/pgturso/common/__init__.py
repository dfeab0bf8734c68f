"""Shared by every layer: settings, logs, metrics, errors, retries and identifier quoting."""
